"""Documents generated from the code, so that they cannot drift from it.

``docs/CONFIGURATION.md`` comes from the Settings class; tests compare the committed
files with a fresh rendering (``triage-node docs generate`` rewrites them).
"""

from __future__ import annotations

import json
import typing
from enum import Enum
from pathlib import Path

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


def generated_documents() -> dict[Path, str]:
    return {DOCS_DIR / "CONFIGURATION.md": render_configuration()}


def write_all() -> list[Path]:
    written = []
    for path, text in generated_documents().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
