"""HL7 v2 priority updates to a RIS over MLLP.

The node sends an order-change message (``ORM^O01`` with ``ORC-1 = XO``, HL7 v2.5.1
chapter 4) that carries the study's new priority in the quantity/timing fields
(``ORC-7.6`` and ``OBR-27.6``, HL7 table 0027: ``S`` STAT, ``R`` routine), the
accession number as placer/filler order number (how a RIS finds the order), the
Study Instance UID in a ``ZDS`` segment (the IHE Radiology convention), and a note
with the AI finding. Framing is MLLP (HL7 v2 transport, appendix C): ``<VT> message
<FS><CR>``; the RIS answers with an ``ACK`` whose ``MSA-1`` is ``AA``/``CA`` on success.

The message necessarily carries patient identifiers for the RIS; none of them is
ever logged.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from triage_node.config import Settings
from triage_node.db.models import PriorityClass
from triage_node.logs import get_logger

log = get_logger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
#: HL7 table 0027 priority codes for each worklist class.
HL7_PRIORITY = {
    PriorityClass.stat_ai.value: "S",
    PriorityClass.stat_order.value: "S",
    PriorityClass.routine.value: "R",
}
HL7_VERSION = "2.5.1"


class HL7Error(RuntimeError):
    """The RIS refused the message, or no ACK came back.

    ``final`` is true for a rejection (``AR``/``CR``) that a retry cannot fix.
    """

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


#: C0 control characters and DEL: none belongs in a field value. 0x0B and 0x1C are MLLP's
#: block start and end and 0x0D ends a segment, so a value carrying them could end the
#: message early or smuggle a segment into it. Line breaks become spaces; the rest go.
_CONTROLS = {c: None for c in [*range(0x20), 0x7F]} | {0x09: " ", 0x0A: " ", 0x0D: " "}


def escape(value: str | None) -> str:
    """Escape HL7 delimiters in a field value (HL7 v2 section 2.7) and drop control characters.

    The values come from DICOM headers a modality wrote; no MLLP framing byte (0x0B,
    0x1C) or segment terminator (0x0D) is ever left in one.
    """
    if not value:
        return ""
    out = value.translate(_CONTROLS).replace("\\", "\\E\\")
    for char, code in (("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        out = out.replace(char, code)
    return out


def person_name(dicom_pn: str | None) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as HL7 XPN components."""
    if not dicom_pn:
        return ""
    alphabetic = dicom_pn.split("=", 1)[0]
    return "^".join(escape(part) for part in alphabetic.split("^"))


@dataclass(frozen=True)
class PriorityUpdate:
    """What the RIS is told about one study."""

    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    priority_class: str
    procedure: str | None
    note: str


def build_orm(update: PriorityUpdate, *, sending_application: str, control_id: str | None = None,
              now: datetime | None = None) -> tuple[str, str]:
    """Build the ``ORM^O01`` message; returns ``(message, control_id)``.

    Segments are separated by carriage returns, as HL7 v2 requires.
    """
    now = now or datetime.now(UTC)
    stamp = now.strftime("%Y%m%d%H%M%S")
    control_id = control_id or uuid.uuid4().hex[:20]
    priority = HL7_PRIORITY.get(update.priority_class, "R")
    timing = f"^^^^^{priority}"
    accession = escape(update.accession_number)
    segments = [
        f"MSH|^~\\&|{escape(sending_application)}|TRIAGE|RIS|RIS|{stamp}||ORM^O01^ORM_O01|"
        f"{control_id}|P|{HL7_VERSION}",
        f"PID|1||{escape(update.patient_id)}||{person_name(update.patient_name)}",
        f"ORC|XO|{accession}|{accession}||||{timing}||{stamp}",
        f"OBR|1|{accession}|{accession}|^{escape(update.procedure)}" + "|" * 23 + timing,
        f"ZDS|{escape(update.study_uid)}^{escape(sending_application)}^Application^DICOM",
        f"NTE|1|L|{escape(update.note)}",
    ]
    return "\r".join(segments) + "\r", control_id


def mllp_exchange(host: str, port: int, message: str, *, timeout: float = 10.0) -> str:
    """Send one framed message and return the framed reply's text."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(START_BLOCK + message.encode("utf-8") + END_BLOCK)
        buffer = b""
        while END_BLOCK not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise HL7Error("connection closed before an ACK arrived")
            buffer += chunk
    start = buffer.find(START_BLOCK)
    return buffer[start + 1 : buffer.index(END_BLOCK)].decode("utf-8", errors="replace")


def check_ack(reply: str, control_id: str) -> str:
    """Return ``MSA-1`` of an accepting ACK for ``control_id``, else raise `HL7Error`."""
    for segment in reply.replace("\n", "\r").split("\r"):
        fields = segment.split("|")
        if fields[0] == "MSA":
            code = fields[1] if len(fields) > 1 else ""
            acked = fields[2] if len(fields) > 2 else ""
            if acked != control_id:
                raise HL7Error(f"ACK for control id {acked!r}, sent {control_id!r}")
            if code not in ("AA", "CA"):
                raise HL7Error(f"RIS answered {code}", final=code in ("AR", "CR"))
            return code
    raise HL7Error("reply has no MSA segment")


def send_priority_update(
    settings: Settings,
    update: PriorityUpdate,
    *,
    attempts: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Send the update to ``settings.hl7_host:hl7_port``; returns the ACK code.

    Returns None when no RIS is configured. Connection errors and ``AE``/``CE`` answers
    are retried with backoff; ``AR``/``CR`` (rejected) is final.
    """
    if not settings.hl7_host:
        return None
    message, control_id = build_orm(update, sending_application=settings.ae_title)
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            reply = mllp_exchange(settings.hl7_host, settings.hl7_port, message)
            code = check_ack(reply, control_id)
            log.info("hl7.acknowledged", study_uid=update.study_uid, ack=code, attempt=attempt,
                     priority_class=update.priority_class)
            return code
        except (OSError, HL7Error) as exc:
            last = exc
            log.warning("hl7.retry", study_uid=update.study_uid, attempt=attempt, error=str(exc))
            if isinstance(exc, HL7Error) and exc.final:
                break
            if attempt < attempts:
                sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
    raise HL7Error(f"HL7 update for {update.study_uid} failed: {last}")
