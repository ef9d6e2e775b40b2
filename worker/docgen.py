"""Documents generated from the code, so that they cannot drift from it.

``docs/CONFIGURATION.md`` comes from the Settings class; the tables of
``docs/CONFORMANCE.md`` (SOP classes, transfer syntaxes, status codes, association
rejections, SR codes) come from the listener and the report writers; the job lifecycle
diagram of ``docs/ARCHITECTURE.md`` comes from ``triage_node.jobs``. Generated parts of
a hand-written document sit between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->``. Tests compare the committed files with a fresh rendering;
``triage-node docs generate`` rewrites them. This lives with the worker because it reads
both packages (``triage_node`` never imports ``worker``).
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer
from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from triage_node.config import REPO_ROOT, Settings

DOCS_DIR = REPO_ROOT / "docs"


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is None:
        if isinstance(annotation, type) and issubclass(annotation, Enum):
            return " \\| ".join(f"`{m.value}`" for m in annotation)
        return getattr(annotation, "__name__", str(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    inner = ", ".join(_type_name(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return f"{inner} (optional)" if len(args) < len(typing.get_args(annotation)) else inner
    return f"{origin.__name__}[{inner}]"


def _default(field: typing.Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "(development value; must be set in production)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        try:
            value = value.relative_to(REPO_ROOT)
        except ValueError:
            pass
        value = str(value)
    if value is None:
        return "unset"
    return f"`{json.dumps(value, default=str)}`"


def render_configuration() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `triage_node/config.py` by `triage-node docs generate`; a test fails when",
        "this file and the code differ. Every setting is read from, in order of precedence: the",
        "command line flags of a command (where it has one), the environment variable, the TOML",
        "file named by `TRIAGE_CONFIG_FILE`, and the default. Lists and objects are given as JSON",
        'in environment variables (`TRIAGE_ALLOWED_CALLERS=\'["CT_ED_1@10.1.2.0/24"]\'`).',
        "",
        "| setting | environment variable | type / allowed values | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        lines.append(
            f"| `{name}` | `TRIAGE_{name.upper()}` | {_type_name(field.annotation)} | "
            f"{_default(field)} | {field.description or ''} |"
        )
    return "\n".join(lines) + "\n"


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


def _decoder_plugins(uid: str) -> str:
    """The pydicom decoding plugins installed for a compressed transfer syntax."""
    from pydicom.pixels import get_decoder

    return ", ".join(f"`{name}`" for name in sorted(get_decoder(uid).available_plugins))


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# Meaning of each status constant of the Storage SCP (PS3.4 Table B.2-1). A constant
# added to the store without an entry here fails the docs test.
_STATUS_MEANINGS = {
    "SUCCESS": ("Success", "The object is on disk (fsynced) and recorded in the database."),
    "OUT_OF_RESOURCES": (
        "Refused: Out of Resources",
        "Free space on the spool filesystem is below `min_free_disk_mb`.",
    ),
    "DATABASE_UNAVAILABLE": (
        "Refused: Out of Resources",
        "The database could not record the instance; nothing is acknowledged, resend later.",
    ),
    "OBJECT_TOO_LARGE": (
        "Refused: Out of Resources",
        "A deflated data set inflates past `max_object_mb` (it is inflated in bounded steps "
        "and refused there).",
    ),
    "DATASET_DOES_NOT_MATCH_SOP_CLASS": (
        "Error: Data Set does not match SOP Class",
        "Required attributes are missing, the dataset's SOP Class differs from the "
        "presentation context, the pixel data is the wrong size, or the series or study is "
        "already filed under another study or PatientID.",
    ),
    "CANNOT_UNDERSTAND": (
        "Error: Cannot understand",
        "The header cannot be parsed, or a deflated data set cannot be inflated.",
    ),
    "INVALID_UID": (
        "Error: Cannot understand",
        "A Study, Series or SOP Instance UID is not a valid UID (PS3.5 9.1).",
    ),
}


# PS3.8 Table 9-21: A-ASSOCIATE-RJ result, source and reason values.
_RJ_RESULT = {1: "rejected-permanent", 2: "rejected-transient"}
_RJ_SOURCE = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE)",
    3: "DICOM UL service-provider (presentation)",
}
_RJ_REASON = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}


def _status_rows() -> list[tuple[str, ...]]:
    from triage_node.ingest import header as store

    rows = []
    for name, value in vars(store).items():
        if not name.isupper() or not isinstance(value, int) or name.startswith("_"):
            continue
        if name not in _STATUS_MEANINGS:
            if name in ("SOURCES",) or not (0 <= value <= 0xFFFF) or name.endswith("RETRIES"):
                continue
            raise KeyError(f"status constant {name} has no meaning in worker/docgen.py")
        status, when = _STATUS_MEANINGS[name]
        rows.append((f"`0x{value:04X}`", status, when))
    return sorted(rows)


def conformance_blocks() -> dict[str, str]:
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
    )
    from pynetdicom import AllStoragePresentationContexts

    from triage_node.ingest import admission
    from triage_node.ingest.scp import TRIAGED_SOP_CLASSES
    from triage_node.ingest.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES, NATIVE_TRANSFER_SYNTAXES
    from worker.pipeline.sr_classes import SR_CLASS_UIDS
    from worker.pipeline.sr_codes import CODES

    triaged = [(_uid_name(u), f"`{u}`", "stored and triaged") for u in TRIAGED_SOP_CLASSES]
    others = [
        (_uid_name(str(cx.abstract_syntax)), f"`{cx.abstract_syntax}`", "stored, not triaged")
        for cx in AllStoragePresentationContexts
        if str(cx.abstract_syntax) not in TRIAGED_SOP_CLASSES
    ]
    rejects = []
    for name, value in vars(admission).items():
        if name.startswith("ASSOCIATE_RJ_"):
            result, source, reason = value
            rejects.append(
                (
                    f"`{name}`",
                    f"{result} ({_RJ_RESULT[result]})",
                    f"{source} ({_RJ_SOURCE[source]})",
                    f"{reason} ({_RJ_REASON[(source, reason)]})",
                )
            )
    codes = []
    for cls, code in CODES.items():
        site = f"{code.site.meaning} ({code.site.scheme_designator} {code.site.value})" if code.site else ""
        codes.append(
            (
                cls,
                f"{code.finding.meaning}",
                f"{code.finding.scheme_designator} `{code.finding.value}`",
                site,
            )
        )
    scu = [
        (_uid_name(str(uid)), f"`{uid}`", f"`{option}`", _uid_name(str(ExplicitVRLittleEndian)) + ", "
         + _uid_name(str(ImplicitVRLittleEndian)))
        for option, uid in [
            *((f"sr_class = \"{c}\"", u) for c, u in SR_CLASS_UIDS.items()),
            ("send_overlays = true", SecondaryCaptureImageStorage),
        ]
    ]
    return {
        "scp-triaged": _table(("SOP Class", "UID", "handling"), triaged),
        "scp-stored": _table(("SOP Class", "UID", "handling"), others),
        "scp-transfer-syntaxes": _table(
            ("Transfer Syntax", "UID", "decoded for inference by (pydicom plugins)"),
            [
                (_uid_name(str(t)), f"`{t}`",
                 "none needed" if t in NATIVE_TRANSFER_SYNTAXES else _decoder_plugins(t))
                for t in ACCEPTED_TRANSFER_SYNTAXES
            ],
        ),
        "scp-statuses": _table(("status", "PS3.4 meaning", "when the node returns it"), _status_rows()),
        "association-rejects": _table(("constant", "result", "source", "reason/diag"), rejects),
        "sr-codes": _table(("class", "finding", "code", "finding site"), codes),
        "scu-sop-classes": _table(("SOP Class", "UID", "sent when the destination has", "transfer syntaxes proposed"), scu),
    }


def fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace every generated block of ``text``; a block the text lacks is an error."""
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- generated:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /generated:{re.escape(name)} -->)",
            re.S,
        )
        if not pattern.search(text):
            raise KeyError(f"document has no generated block {name!r}")
        def fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + "\n" + m.group(2)

        text = pattern.sub(fill, text)
    return text


def _bench(name: str) -> dict | None:
    path = DOCS_DIR / "bench" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def readme_blocks() -> dict[str, str]:
    """The README's benchmark table, from the JSON files the benchmark commands write."""
    rows: list[tuple[str, ...]] = []
    ingest, e2e, load = _bench("ingest"), _bench("e2e"), _bench("load")
    if ingest:
        r, when = ingest["results"], ingest["date"][:16].replace("T", " ")
        node = r["triage-node"]["images_per_s"]
        peers = ", ".join(
            f"{k} {v['images_per_s']:.0f}/s" for k, v in r.items()
            if k != "triage-node" and not k.startswith("triage-node, ")
        )
        rows.append((
            "`triage-node bench ingest`",
            f"{ingest['images']} slices {ingest['size']} by storescu: this node {node:.0f} images/s "
            "(fsync + database row before each response)",
            peers,
            when,
        ))
    if e2e:
        b, t, when = e2e["backends"], e2e["targets"], e2e["when_utc"][:16].replace("T", " ")
        ours = "; ".join(
            f"{k}: p50 {v['single']['p50_s']:.2f} s, p95 {v['single']['p95_s']:.2f} s "
            f"({v['together']['studies']} together: p95 {v['together']['p95_s']:.2f} s)"
            for k, v in b.items()
        )
        enqueue = f"; last image -> job queued p95 {t['enqueue_p95_s']} s" if "enqueue_p95_s" in t else ""
        ms = e2e["ms_per_slice"]
        rows.append((
            "`triage-node bench e2e`",
            f"one {e2e['study']['slices']}-slice {e2e['study']['rows']}x{e2e['study']['rows']} study, "
            f"last image acknowledged -> SR accepted by the PACS: {ours}{enqueue}",
            f"Triton / in-process p50 x{t.get('triton_over_onnx_p50', '-')}; slice CNN "
            f"PyTorch eager {ms['pytorch_eager_ms']} ms/slice vs ONNX Runtime {ms['onnxruntime_ms']}",
            when,
        ))
    if load:
        u, rss = load["under_load"], load["rss_mb"]
        rows.append((
            "`triage-node bench load`",
            f"{load['setup']['associations']} associations for {load['setup']['minutes']} min: "
            f"{load['images']} images, {len(load['failures'])} failure statuses, C-STORE p95 "
            f"{u['image']['p95_ms']:.0f} ms, study p95 {u['study']['p95_ms'] / 1000:.1f} s",
            f"one study at a time: C-STORE p95 {load['single_study']['image']['p95_ms']:.0f} ms; "
            f"RSS {rss['start']:.0f} -> {rss['end']:.0f} MB",
            load["date"][:16].replace("T", " "),
        ))
    return {"bench-table": _table(("command", "our path", "side by side", "run (UTC)"), rows)}


def architecture_blocks() -> dict[str, str]:
    """The job lifecycle diagram, from `triage_node.jobs.states.TRANSITIONS`."""
    from triage_node.jobs import mermaid_diagram

    return {"job-lifecycle": mermaid_diagram()}


def generated_documents() -> dict[Path, str]:
    conformance = DOCS_DIR / "CONFORMANCE.md"
    architecture = DOCS_DIR / "ARCHITECTURE.md"
    readme = REPO_ROOT / "README.md"
    return {
        DOCS_DIR / "CONFIGURATION.md": render_configuration(),
        conformance: fill_blocks(conformance.read_text(), conformance_blocks()),
        architecture: fill_blocks(architecture.read_text(), architecture_blocks()),
        readme: fill_blocks(readme.read_text(), readme_blocks()),
    }


def write_all() -> list[Path]:
    written = []
    for path, text in generated_documents().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def register(app: typer.Typer) -> None:
    docs_app = typer.Typer(help="Documents generated from the code.", no_args_is_help=True)
    app.add_typer(docs_app, name="docs")

    @docs_app.command("generate")
    def docs_generate() -> None:
        """Rewrite the generated documents (configuration reference, conformance tables)."""
        for path in write_all():
            typer.echo(f"wrote {path}")
