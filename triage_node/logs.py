"""structlog set-up and the processor that keeps patient identifiers out of logs.

Two defences, both applied to every event:

1. Keys that name a patient identifier (``PatientName``, ``patient_id``, ...) are
   dropped, whatever their value.
2. Values that a component has seen as a patient identifier (``remember_identifiers``
   is called with each dataset read at the door) are replaced wherever they appear as
   whole words in a string: an exception message that quotes a file's header is
   scrubbed too. Those values come from peers, so `triage_node.log_scrub` refuses the
   ones that could blind the log (short, common, the node's own words) and keeps them
   per source; the fields that say who and what (``level``, ``peer``, ...) are never
   scrubbed.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog
from pydicom.multival import MultiValue

from triage_node.log_scrub import (
    PER_DATASET,
    REDACTED,
    STRUCTURAL_KEYS,
    IdentifierMemory,
    Vocabulary,
    refusal,
)

# DICOM keywords of the identifiers that must never reach a log line.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "AccessionNumber",
    "PatientAddress",
    "PatientTelephoneNumbers",
)
#: The order values are remembered in: a data set gives at most PER_DATASET values, so
#: its own identifiers come before the lists a sender may pad (Other*).
_REMEMBER_ORDER = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "AccessionNumber",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
)
__all__ = ["REDACTED", "configure_logging", "forget_identifiers", "get_logger",
           "protect_vocabulary", "remember_identifiers", "scrub_phi"]


def _normalise(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


_PHI_KEYS = {_normalise(k) for k in PHI_KEYWORDS}
_memory = IdentifierMemory()
_vocabulary = Vocabulary()


def _candidates(ds: Any) -> list[str]:
    values: list[str] = []
    for keyword in _REMEMBER_ORDER:
        element = ds.get(keyword) if hasattr(ds, "get") else None
        if element is None:
            continue
        items = element if isinstance(element, (list, tuple, MultiValue)) else [element]
        for item in items:
            if hasattr(item, "components"):  # pydicom PersonName
                text = str(item)
                values.append(text)
                parts = [p for p in text.split("^") if p]
                values.extend(parts)
                if len(parts) >= 2:
                    values.append(f"{parts[1]} {parts[0]}")
                    values.append(f"{parts[0]}, {parts[1]}")
            elif hasattr(item, "get"):  # an OtherPatientIDsSequence item
                values.extend(_candidates_of_item(item))
            elif isinstance(item, str):
                values.append(item)
            else:
                values.append(str(item))
    return values


def _candidates_of_item(item: Any) -> list[str]:
    value = item.get("PatientID")
    return [str(value)] if value is not None else []


def remember_identifiers(ds: Any, source: str | None = None) -> None:
    """Record the patient identifiers of a pydicom dataset so logs never show them.

    Person names are also recorded in their components (family, given) and in the
    ``Given Family`` order that exception messages may use. ``source`` is who sent the
    data set (default: the ``peer`` bound in structlog's context, else ``-``); values
    that could not be identifiers are skipped (`triage_node.log_scrub.refusal`).
    """
    context = structlog.contextvars.get_contextvars()
    source = source or str(context.get("peer") or "-")
    current = (source, str(context.get("calling_ae") or ""))
    kept: list[str] = []
    for value in _candidates(ds):
        value = value.strip()
        if value in kept or refusal(value, _vocabulary, current) is not None:
            continue
        kept.append(value)
        if len(kept) == PER_DATASET:
            break
    _memory.add(kept, source)


def protect_vocabulary(items: Iterable[str]) -> None:
    """Words the scrubber must never redact: the node's AE titles, names, hosts."""
    _vocabulary.protect(items)


def settings_vocabulary(settings: Any) -> list[str]:
    """The names a node's settings give it and its peers (AE titles, destinations, hosts)."""
    items = [settings.ae_title, *settings.stat_calling_aes]
    items += [entry.partition("@")[0] for entry in settings.allowed_callers]
    for dest in settings.destinations:
        items += [dest.name, dest.ae_title or "", dest.host or ""]
    items += [settings.hl7_host or "", settings.dicom_host, settings.http_host]
    return [i for i in items if i and i != "*"]


def forget_identifiers() -> None:
    """Clear the remembered identifiers (tests use this)."""
    _memory.clear()


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return _memory.scrub(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if _normalise(str(k)) in _PHI_KEYS else _scrub_value(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub_value(v) for v in value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if type(value).__name__ in ("Dataset", "FileDataset"):
        return f"<Dataset SOPInstanceUID={getattr(value, 'SOPInstanceUID', '?')}>"
    return _memory.scrub(str(value))


def scrub_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop identifier keys and scrub identifier values."""
    for key in list(event_dict):
        if _normalise(key) in _PHI_KEYS:
            del event_dict[key]
        elif key not in STRUCTURAL_KEYS:
            event_dict[key] = _scrub_value(event_dict[key])
    return event_dict


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog (and the stdlib loggers it renders for) once per process.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrub_phi,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # filter_by_level first: a DEBUG call on the per-object path costs a level
        # check, not the whole chain, when the node logs at INFO or above.
        processors=[
            structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        # Exceptions may be rendered only here (from the stdlib record), so scrub again.
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            scrub_phi,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at DEBUG and dataset contents at INFO for some
    # events; keep it at WARNING so headers never reach the log.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
