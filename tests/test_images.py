"""deploy/Dockerfile: one image per role from the lock file, non-root, no PyTorch at run time.

No Docker engine runs here: the Dockerfile is parsed (with the parser of
scripts/role_sizes.py, which replays the same installs to measure them) and checked against
docker-compose.yml, constraints.txt and docs/OPERATIONS.md.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
RUNTIME = ("api", "worker-cpu", "worker-triton")
TARGETS = (*RUNTIME, "trainer")


def _load_role_sizes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("role_sizes", ROOT / "scripts" / "role_sizes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("role_sizes", module)
    spec.loader.exec_module(module)
    return module


role_sizes = _load_role_sizes()


@pytest.fixture(scope="module")
def stages() -> dict:
    return role_sizes.parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _installs(stages: dict, target: str) -> list[list[str]]:
    return role_sizes.pip_installs(stages, target)


def _extras(args: list[str]) -> set[str]:
    """Extras of the project requirement (``.`` or ``.[a,b]``) in one ``pip install``."""
    out: set[str] = set()
    for word in args:
        match = re.fullmatch(r"\.(?:\[([a-z0-9_,-]+)\])?", word)
        if match and match.group(1):
            out |= set(match.group(1).split(","))
    return out


def test_the_four_role_targets_exist_and_the_script_measures_them(stages):
    assert set(TARGETS) <= set(stages)
    assert role_sizes.ROLES == TARGETS


def test_every_target_is_built_on_python_slim_through_the_lock_file(stages):
    for target in TARGETS:
        chain = role_sizes.chain(stages, target)
        assert chain[0].parent.startswith("python:3.11-slim"), f"{target}: {chain[0].parent}"
        installs = _installs(stages, target)
        assert installs, f"{target} installs nothing"
        # the first install is the core from the lock file; every one goes through it
        assert installs[0][:2] == ["-c", "constraints.txt"] and installs[0][-2:] == ["-e", "."], target
        for args in installs:
            assert "constraints.txt" == args[args.index("-c") + 1], f"{target}: pip install {args}"
            assert "--no-deps" not in args and "-r" not in args, f"{target}: pip install {args}"
    # nothing in the file runs pip without the lock file
    for stage in stages.values():
        for instruction, arguments in stage.instructions:
            if instruction == "RUN":
                for command in role_sizes.shell_commands(arguments):
                    if "pip" in command:
                        assert "-c" in command and "constraints.txt" in command, f"{stage.name}: {command}"


def test_runtime_images_install_no_train_extra_and_each_role_only_its_own(stages):
    wanted = {"api": set(), "worker-cpu": set(), "worker-triton": {"triton"}, "trainer": {"train"}}
    for target, extras in wanted.items():
        got = set().union(*(_extras(args) for args in _installs(stages, target)))
        assert got == extras, f"{target} installs extras {sorted(got)}, wants {sorted(extras)}"
    for target in RUNTIME:
        words = [word for args in _installs(stages, target) for word in args]
        assert not [w for w in words if "[train" in w or "torch" in w or "monai" in w], f"{target}: {words}"


def test_trainer_finds_the_pinned_pytorch_build(stages):
    torch = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    if "+cpu" in torch:  # a local version: only PyTorch's CPU index has it
        args = [a for install in _installs(stages, "trainer") for a in install]
        assert "https://download.pytorch.org/whl/cpu" in args


def test_no_role_installs_dcmtk(stages):
    for target in TARGETS:
        for stage in role_sizes.chain(stages, target):
            for instruction, arguments in stage.instructions:
                assert not (instruction == "RUN" and "dcmtk" in arguments), f"{target}: {arguments}"


def test_each_target_ends_as_the_non_root_user_the_base_creates(stages):
    base_runs = " ".join(a for s in stages.values() for i, a in s.instructions if i == "RUN")
    uid = re.search(r"useradd .*--uid (\d+)", base_runs)
    assert uid and uid.group(1) != "0"
    for target in TARGETS:
        own = stages[target].instructions
        users = [i for i, (instruction, _) in enumerate(own) if instruction == "USER"]
        assert users, f"{target} sets no USER"
        user = own[users[-1]][1].split(":")[0]
        assert user == uid.group(1), f"{target} runs as {user!r}"
        # nothing after it runs as root again
        assert all(instruction != "RUN" for instruction, _ in own[users[-1]:]), target


def test_the_files_the_code_reads_at_run_time_are_copied(stages):
    copied = {
        word.rstrip("/")
        for stage in role_sizes.chain(stages, "api")
        for instruction, arguments in stage.instructions if instruction == "COPY"
        for word in arguments.split()[:-1]
    }
    # triage_node.db.schema: REPO_ROOT/migrations; settings: REPO_ROOT/deploy/triton (model card, models)
    assert {"constraints.txt", "pyproject.toml", "migrations", "deploy/triton", "triage_node", "worker"} <= copied
    core = [args for args in _installs(stages, "api")]
    assert all("-e" in args for args in core), "REPO_ROOT is found from the package: install editable in /app"


def test_every_built_compose_service_names_an_existing_target(compose, stages):
    built = {name: s["build"] for name, s in compose["services"].items() if "build" in s}
    assert {"node", "worker", "beat", "migrate", "proxy-cert"} <= set(built)
    for name, build in built.items():
        assert isinstance(build, dict), f"{name}: build must be a mapping with a target"
        assert build.get("dockerfile") == "deploy/Dockerfile" and build.get("context") == ".", name
        assert build.get("target") in TARGETS, f"{name}: target {build.get('target')!r}"
    assert built["node"]["target"] == "api" and built["migrate"]["target"] == "api"
    # the site's workers use Triton (TRIAGE_INFERENCE_BACKEND: triton): its client must be there
    backend = compose["x-node-env"]["TRIAGE_INFERENCE_BACKEND"]
    assert built["worker"]["target"] == ("worker-triton" if backend == "triton" else "worker-cpu")


def test_the_operations_doc_lists_each_target_with_its_compose_services(compose):
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    section = text.split("### Images per role", 1)[1].split(role_sizes.BEGIN, 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z-]+)` \|.*\| ([^|]*) \|$", section, re.M)}
    assert set(rows) == set(TARGETS)
    for target in TARGETS:
        services = sorted(n for n, s in compose["services"].items()
                          if isinstance(s.get("build"), dict) and s["build"].get("target") == target)
        named = sorted(re.findall(r"`([a-z-]+)`", rows[target].split("(")[0]))
        named = [n for n in named if n in compose["services"]]
        assert named == services, f"{target}: docs say {named}, compose has {services}"
    assert role_sizes.BEGIN in text and role_sizes.END in text


def test_shell_commands_split_on_and():
    assert role_sizes.shell_commands("pip install -c constraints.txt -e . && triage-node version") == [
        ["pip", "install", "-c", "constraints.txt", "-e", "."], ["triage-node", "version"]]
    assert shlex.split('-e ".[triton]"') == ["-e", ".[triton]"]
