"""Every ``triage-node`` command written in the docs must still work.

The command lines are taken from the fenced code blocks of ``README.md`` and
``docs/**/*.md`` (a line whose shell word ends in ``triage-node``: ``triage-node``,
``.venv/bin/triage-node``, ``ExecStart=/opt/.../triage-node``, ``docker compose exec node
triage-node``; backslash continuations joined, comments and what follows ``&&``, ``|``,
``;`` or a redirection dropped). For each one:

(a) the subcommand path exists, ``<path> --help`` exits 0, every option the line uses is
    in that help text, and the whole argument list parses (types, choices, required
    options) without running the command;
(b) the harmless ones are run for real in a scratch data folder (``TRIAGE_DATA_DIR`` set
    to a temporary folder, which is also the working directory): ``version``, ``config
    show``, ``db upgrade``, ``db current``, ``token create`` / ``list`` / ``revoke``,
    ``studies``, ``audit``, ``outbox list``, ``triton check`` and a small ``synth``.

Not run: ``serve``, ``worker``, ``reconcile`` (long-running, or they need a broker and
workers), ``train`` / ``evaluate`` / ``export`` / ``bench`` / ``demo`` (minutes of CPU),
``outbox retry`` / ``deliver`` (they act on a PACS's outbox), and ``docs generate``: it
rewrites docs/CONFIGURATION.md and docs/CONFORMANCE.md in the working tree, which would
change the files under test (tests/test_docs_generated.py checks those against the code
instead).

Also: every ``tests/test_x.py::test_y`` the docs cite as evidence still exists.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

try:  # typer >= 0.24 ships its own copy of click
    from typer._click.exceptions import BadParameter, ClickException
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import BadParameter, ClickException

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
#: Shell words that end the triage-node command on a line.
STOPS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1", ")"}
#: Subcommand paths run for real in the scratch folder (see the module docstring).
SAFE = {
    ("version",), ("config", "show"), ("db", "upgrade"), ("db", "current"),
    ("token", "create"), ("token", "list"), ("studies",), ("audit",), ("outbox", "list"),
    ("triton", "check"), ("synth",), ("retention",),
}
#: ``synth`` lines asking for more studies than this are only parsed, not run.
SYNTH_MAX_STUDIES = 2


@dataclass(frozen=True)
class DocCommand:
    source: str  # file:line
    argv: tuple[str, ...]  # arguments after ``triage-node``

    def __str__(self) -> str:
        return f"{self.source}: triage-node {shlex.join(self.argv)}"


def _fenced_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of every line inside a fenced block, continuations joined."""
    out: list[tuple[int, str]] = []
    inside, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _is_node(word: str) -> bool:
    return word.rsplit("=", 1)[-1].rsplit("/", 1)[-1] == "triage-node"


def doc_commands() -> list[DocCommand]:
    """Every triage-node command line in the fenced blocks of the docs."""
    found = []
    for path in DOCS:
        for number, line in _fenced_lines(path):
            if "triage-node" not in line:
                continue
            try:
                words = _words(line)
            except ValueError as exc:  # unbalanced quotes: a broken doc line
                raise AssertionError(f"{path.relative_to(ROOT)}:{number}: cannot split {line!r}: {exc}") from None
            for i, word in enumerate(words):
                if not _is_node(word):
                    continue
                argv = []
                for arg in words[i + 1:]:
                    if arg in STOPS or arg.startswith((">", "2>")):
                        break
                    argv.append(arg)
                found.append(DocCommand(f"{path.relative_to(ROOT)}:{number}", tuple(argv)))
    return found


COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    from triage_node.cli import build_app

    return build_app()


def split_path(app: typer.Typer, argv: tuple[str, ...]) -> tuple[list[str], list[str], Any]:
    """(subcommand path, remaining arguments, click command) of a command line."""
    command = typer.main.get_command(app)
    path: list[str] = []
    rest = list(argv)
    while hasattr(command, "commands"):  # a group
        if getattr(command, "invoke_without_command", False) and (not rest or rest[0].startswith("-")):
            break  # a group that runs by itself with options (`retention --dry-run`)
        assert rest, f"`triage-node {' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        assert name in command.commands, (
            f"no command `{name}` under `triage-node {' '.join(path)}` "
            f"(known: {', '.join(sorted(command.commands))})"
        )
        path.append(name)
        command = command.commands[name]
    return path, rest, command


def test_the_docs_hold_the_commands_an_operator_needs() -> None:
    """The extraction finds the runbook's commands (an empty list would pass everything)."""
    texts = {str(c).split(": ", 1)[1] for c in COMMANDS}
    for expected in (
        "triage-node db upgrade", "triage-node outbox retry --dead", "triage-node reconcile --json",
        "triage-node triton check", "triage-node serve", "triage-node token list --json",
    ):
        assert expected in texts, f"{expected!r} not found in the docs' code blocks"
    sources = {c.source.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/OPERATIONS.md"} <= sources


def test_extraction_handles_paths_continuations_and_operators(tmp_path: Path) -> None:
    words = _words('bash scripts/install.sh && .venv/bin/triage-node demo --out demo-out  # comment')
    assert [w for w in words if _is_node(w)] == [".venv/bin/triage-node"]
    assert _is_node("ExecStart=/opt/triage/.venv/bin/triage-node") and not _is_node("triage-node.service")
    doc = tmp_path / "x.md"
    doc.write_text("text triage-node version\n```bash\ntriage-node audit \\\n  --json > out.txt\n```\n")
    assert _fenced_lines(doc) == [(3, "triage-node audit    --json > out.txt")]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_doc_command_parses(app: typer.Typer, command: DocCommand) -> None:
    path, rest, click_command = split_path(app, command.argv)
    runner = CliRunner()
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, f"{command}\n{result.output}"
    for arg in rest:
        if arg.startswith("-") and arg != "-":
            option = arg.split("=", 1)[0]
            assert option in result.output, f"{command}: option {option} is not in `{' '.join(path)} --help`"
    # The whole line parses: unknown options, bad values, bad choices and missing
    # required options raise here. Nothing runs (the callback is not invoked).
    try:
        click_command.make_context(" ".join(["triage-node", *path]), list(rest))
    except BadParameter as exc:
        # Paths that must exist (training data, runs) do not exist on this machine.
        if "does not exist" not in exc.format_message():
            raise AssertionError(f"{command}: {exc.format_message()}") from None
    except ClickException as exc:
        raise AssertionError(f"{command}: {exc.format_message()}") from None


def _safe_to_run(app: typer.Typer, command: DocCommand) -> bool:
    path, rest, _ = split_path(app, command.argv)
    if tuple(path) not in SAFE:
        return False
    if path == ["synth"]:
        studies = rest[rest.index("--studies") + 1] if "--studies" in rest else "4"
        return int(studies) <= SYNTH_MAX_STUDIES and "--preview" not in rest
    return True


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data folder as TRIAGE_DATA_DIR and working directory, no other TRIAGE_* set."""
    import os

    for name in list(os.environ):
        if name.startswith("TRIAGE_"):
            monkeypatch.delenv(name)
    data = tmp_path / "data"
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(data))
    # The docs' set-up exports one (there is no default secret); token create needs it.
    monkeypatch.setenv("TRIAGE_SECRET_KEY", "doc-commands-" + os.urandom(8).hex())
    monkeypatch.chdir(tmp_path)
    # `triton check --repository deploy/triton/models` names paths relative to the repository.
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    return data


def _run(app: typer.Typer, argv: list[str], what: str) -> str:
    """Run a command in process; its standard output (log lines go to standard error)."""
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{what} exited {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.stdout


def test_safe_commands_run_in_a_scratch_data_dir(app: typer.Typer, scratch: Path) -> None:
    """Run the harmless commands: the brief's list, then every safe line of the docs."""
    _run(app, ["db", "upgrade"], "db upgrade")
    assert (scratch / "triage.db").is_file()
    current = _run(app, ["db", "current"], "db current")
    assert current.strip(), "db current printed nothing"
    assert _run(app, ["version"], "version").strip()
    shown = json.loads(_run(app, ["config", "show", "--json"], "config show --json"))
    assert Path(shown["data_dir"]).resolve() == scratch.resolve()
    token = _run(app, ["token", "create", "--role", "viewer", "--name", "doc-test"], "token create")
    assert token.strip()
    tokens = json.loads(_run(app, ["token", "list", "--json"], "token list --json"))
    (row,) = [t for t in tokens if t.get("name") == "doc-test"]
    assert token.strip() not in json.dumps(tokens), "token list shows the token itself"
    _run(app, ["token", "revoke", str(row["id"])], "token revoke")
    assert _run(app, ["studies", "--json"], "studies --json").strip() in ("[]", "")
    _run(app, ["audit", "--json"], "audit --json")
    _run(app, ["outbox", "list", "--json"], "outbox list --json")
    assert "ok" in _run(app, ["triton", "check"], "triton check")
    _run(app, ["synth", "--out", "synth-out", "--studies", "1", "--seed", "1", "--components", "axial",
               "--rows", "256"], "synth")
    assert list((scratch.parent / "synth-out").rglob("*.dcm"))

    ran = 0
    for command in COMMANDS:
        if _safe_to_run(app, command):
            _run(app, list(command.argv), str(command))
            ran += 1
    assert ran >= 10, f"only {ran} doc commands were safe to run"


def test_tests_cited_by_the_docs_exist() -> None:
    """A runbook line such as ``tests/test_x.py::test_y`` names a test that is still there."""
    cited = set()
    for path in DOCS:
        cited |= set(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", path.read_text(encoding="utf-8")))
    assert len(cited) >= 5, "the runbook should cite the tests that show its claims"
    for file, name in sorted(cited):
        source = ROOT / file
        assert source.is_file(), f"{file} (cited in the docs) does not exist"
        assert re.search(rf"^(async )?def {name}\(", source.read_text(encoding="utf-8"), re.M), (
            f"{file}::{name} (cited in the docs) does not exist"
        )
