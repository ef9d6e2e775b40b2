"""structlog set-up and the processor that keeps patient identifiers out of logs.

Two defences, both applied to every event:

1. Keys that name a patient identifier (``PatientName``, ``patient_id``, ...) are
   dropped, whatever their value.
2. Values that a component has seen as a patient identifier (``remember_identifiers``
   is called with each dataset read at the door) are replaced wherever they appear in
   a string: an exception message that quotes a file's header is scrubbed too.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
from pydicom.multival import MultiValue

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
REDACTED = "[redacted]"


def _normalise(key: str) -> str:
    return re.sub(r"[^a-z]", "", key.lower())


_PHI_KEYS = {_normalise(k) for k in PHI_KEYWORDS}


class _IdentifierMemory:
    """A bounded, thread-safe set of identifier strings seen in this process."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._values: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            changed = False
            for value in values:
                value = value.strip()
                # Very short values ("M", "1") would redact ordinary words.
                if len(value) < 3:
                    continue
                if value not in self._values:
                    changed = True
                self._values[value] = None
                self._values.move_to_end(value)
            while len(self._values) > self._capacity:
                self._values.popitem(last=False)
            if changed:
                self._pattern = None

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            with self._lock:
                if not self._values:
                    return text
                alternatives = sorted(self._values, key=len, reverse=True)
                pattern = re.compile("|".join(re.escape(v) for v in alternatives))
                self._pattern = pattern
        return pattern.sub(REDACTED, text)


_memory = _IdentifierMemory()


def remember_identifiers(ds: Any) -> None:
    """Record the patient identifiers of a pydicom dataset so logs never show them.

    Person names are also recorded in their components (family, given) and in the
    ``Given Family`` order that exception messages may use.
    """
    values: list[str] = []
    for keyword in PHI_KEYWORDS:
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
            elif isinstance(item, str):
                values.append(item)
            else:
                values.append(str(item))
    _memory.add(values)


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


def scrub_phi(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: drop identifier keys and scrub identifier values."""
    for key in list(event_dict):
        if _normalise(key) in _PHI_KEYS:
            del event_dict[key]
        else:
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
