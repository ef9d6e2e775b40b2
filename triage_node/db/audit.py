"""Audit events: the one write path into the append-only ``audit_events`` table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from triage_node.db.models import AuditEvent
from triage_node.db.session import transaction
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow

log = get_logger(__name__)

_INSERT = AuditEvent.__table__.insert()


def _row(
    action: str,
    *,
    actor: str,
    outcome: str = "ok",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    job_id: int | None = None,
    **detail: Any,
) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "action": action,
        "actor": actor,
        "outcome": outcome,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_uid": sop_uid,
        "job_id": job_id,
        "detail": detail,
    }


def record(session: Session, action: str, **fields: Any) -> AuditEvent:
    """Add an audit event to the session's transaction.

    ``fields``: ``actor`` (required) names who acted: ``ae:<calling AE>@<ip>``,
    ``token:<name>``, ``worker``, ``node``; ``outcome`` (default ``"ok"``),
    ``study_uid``, ``series_uid``, ``sop_uid``, ``job_id``; any other keyword goes to
    ``detail``, which must never hold patient identifiers.
    """
    event = AuditEvent(**_row(action, **fields))
    session.add(event)
    return event


def record_now(session: Session, action: str, **fields: Any) -> None:
    """The same row as `record`, written at once as one Core INSERT in the session's transaction.

    For the per-instance path of the listener, where the ORM unit of work costs more
    than the INSERT itself; nothing is returned, since no object is kept.
    """
    session.connection().execute(_INSERT, _row(action, **fields))


# -- refusals, rate-summarised -------------------------------------------------------------
#: Seconds a refusal window lasts: the first refusal per (action, peer, reason) in a
#: window is written, later ones are counted into one summary row when it closes.
REFUSAL_WINDOW_S = 60.0
#: Open windows kept at most; past this the oldest is closed (its summary written) early.
REFUSAL_WINDOWS_MAX = 4096


@dataclass
class _Window:
    session_factory: Any
    action: str
    peer: str
    reason: str
    opened: float
    closes: float
    actor: str
    count: int = 0  # refusals after the first one, not yet written
    last: float = 0.0  # when the last of them came
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, str, str, str]:
        return (id(self.session_factory), self.action, self.peer, self.reason)


class RefusalSummary:
    """Bounded audit rows for repeated refusals (a flood of associations from one source).

    The first refusal per ``(action, peer, reason)`` in a window of ``window_s``
    seconds is written at once, as before; later ones in the window are only counted.
    When the window closes (a daemon thread wakes then; `flush` closes every window, and
    a refusal after it closes its window too) one summary row is written with the count:
    outcome ``failed``, ``detail.summary`` true, ``detail.count`` N and the message
    ``"N more refusals from X in the last T s"``. A flood of any length from one source
    thus writes about two rows per window instead of one per refusal.
    """

    def __init__(self, window_s: float = REFUSAL_WINDOW_S, clock: Callable[[], float] = time.monotonic,
                 max_windows: int = REFUSAL_WINDOWS_MAX) -> None:
        self.window_s = window_s
        self._clock = clock
        self._max = max_windows
        self._windows: dict[tuple[int, str, str, str], _Window] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def refused(self, session_factory: Any, action: str, *, peer: str, reason: str,
                actor: str, **detail: Any) -> bool:
        """Audit one refusal; True when its own row was written, False when only counted."""
        now = self._clock()
        key = (id(session_factory), action, peer, reason)
        with self._cond:
            due = [w for w in self._windows.values() if w.closes <= now]
            window = self._windows.get(key)
            counted = False
            if window is not None and window.closes > now:
                counted = True
                window.count += 1
                window.actor = actor
                window.last = now
            else:
                self._windows[key] = _Window(session_factory, action, peer, reason, now,
                                             now + self.window_s, actor, detail=detail)
            for w in due:
                if self._windows.get(w.key) is w:
                    del self._windows[w.key]
            while len(self._windows) > self._max:
                due.append(self._windows.pop(next(iter(self._windows))))
            if counted and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-refusals", daemon=True)
                self._thread.start()
            self._cond.notify()
        self._write_summaries(due, now)
        if counted:
            return False
        _commit(session_factory, action, actor=actor, outcome="failed", reason=reason, **detail)
        return True

    def flush(self) -> None:
        """Close every open window now, writing the summaries of those that counted any."""
        with self._cond:
            windows, self._windows = list(self._windows.values()), {}
        self._write_summaries(windows, self._clock())

    def _run(self) -> None:
        while True:
            with self._cond:
                now = self._clock()
                due = [k for k, w in self._windows.items() if w.closes <= now]
                windows = [self._windows.pop(k) for k in due]
                if not windows:
                    wait = min((w.closes for w in self._windows.values()), default=now + self.window_s)
                    self._cond.wait(timeout=max(0.05, wait - now))
                    continue
            self._write_summaries(windows, now)

    def _write_summaries(self, windows: list[_Window], now: float) -> None:
        for w in windows:
            if w.count == 0:
                continue
            seconds = round(w.last - w.opened, 1)  # first to last refusal of the window
            _commit(
                w.session_factory, w.action, actor=w.actor, outcome="failed", reason=w.reason,
                summary=True, count=w.count, window_s=seconds,
                message=f"{w.count} more refusals from {w.peer} in the last {seconds:g} s",
                **w.detail,
            )


def _commit(session_factory: Any, action: str, **fields: Any) -> None:
    # The refusal goes out whether or not the row could be written: never wait on the audit.
    try:
        with transaction(session_factory) as session:
            record_now(session, action, **fields)
    except SQLAlchemyError:
        log.error("audit row could not be written", action=action)


_refusals = RefusalSummary()


def record_refusal(session_factory: Any, action: str, *, peer: str, reason: str, actor: str,
                   **detail: Any) -> bool:
    """Audit a refusal (an association, a request) rate-summarised per source and reason.

    Parameters
    ----------
    session_factory : sessionmaker
        Where the rows go (each row in its own committed transaction).
    action : str
        e.g. ``"association.rejected"``.
    peer : str
        Who is refused: the peer's address (not the calling AE title, which a peer can
        vary at will).
    reason : str
        Why; windows are kept per reason, so a different refusal is written at once.
    actor : str
        The audit actor, e.g. ``ae:<calling AE>@<ip>``.
    **detail
        Extra detail for the row (never patient identifiers).

    Returns
    -------
    bool
        True when this refusal's own row was written, False when it was counted into the
        window's summary row (`RefusalSummary`).
    """
    return _refusals.refused(session_factory, action, peer=peer, reason=reason, actor=actor,
                             **detail)


def flush_refusals() -> None:
    """Write the summary rows of all open refusal windows (at shutdown; tests)."""
    _refusals.flush()
