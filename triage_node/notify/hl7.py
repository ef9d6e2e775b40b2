"""HL7 v2 messages to the RIS: priority updates (ORM^O01) and AI results (ORU^R01).

Messages are built and parsed with python-hl7 (``hl7``) containers; this module only
decides what goes in which field. Both messages carry the accession number as placer and
filler order number (how a RIS finds the order), the patient in PID, and the Study Instance
UID in a ``ZDS`` segment (the IHE Radiology convention).

- ``ORM^O01`` with ``ORC-1 = XO`` (order changed, HL7 v2.5.1 chapter 4): the study's new
  priority in the quantity/timing fields ``ORC-7.6`` and ``OBR-27.6`` (HL7 table 0027:
  ``S`` STAT, ``R`` routine) and a note with the AI finding.
- ``ORU^R01`` (chapter 7) with ``ORC-1 = RE`` and result status ``P`` (preliminary: the
  finding is unverified, as the SR's VerificationFlag says): a text summary, per class one
  coded OBX (SNOMED CT Present/Absent) and one numeric OBX (probability, UCUM ``1``) with a
  shared OBX-4 sub-id, the model name/version/operating point, and the intended-use notice
  the SR carries.

Sending (MLLP, ACK handling) is in ``mllp.py``, retries and dead letters in ``outbox.py``.
The messages necessarily carry patient identifiers for the RIS; none is ever logged.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7
from hl7.exceptions import HL7Exception

from triage_node.config import Settings
from triage_node.db.models import PriorityClass
from triage_node.logs import get_logger
from triage_node.timeutil import utcnow

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
#: MSH-18 (HL7 table 0211): field values are written as UTF-8, not as \X..\ escapes.
CHARACTER_SET = "UNICODE UTF-8"
ORM = "ORM^O01"
ORU = "ORU^R01"

#: OBX-3 observation identifiers (local coding system ``L``, HL7 table 0396) and the label
#: of each class of the model.
CLASS_LABELS = {
    "any": "Intracranial hemorrhage",
    "epidural": "Epidural hemorrhage",
    "subdural": "Subdural hemorrhage",
    "intraparenchymal": "Intraparenchymal hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid hemorrhage",
}
#: OBX-5 of a class: SNOMED CT qualifiers, as the SR's qualitative evaluation (CID 240 style).
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("2667000", "Absent", "SCT")


class HL7Error(RuntimeError):
    """The RIS refused the message, or no ACK came back.

    ``final`` is true for a refusal (``AE``/``AR``/``CE``/``CR``) that a retry cannot fix.
    """

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


#: C0 control characters and DEL: none belongs in a field value. 0x0B and 0x1C are MLLP's
#: block start and end and 0x0D ends a segment, so a value carrying them could end the
#: message early or smuggle a segment into it. Line breaks become spaces; the rest go.
_CONTROLS = {c: None for c in [*range(0x20), 0x7F]} | {0x09: " ", 0x0A: " ", 0x0D: " "}
_ASCII_RUN = re.compile(r"[\x20-\x7e]+")
_DELIMITERS = hl7.Message()  # default encoding characters |^~\& for hl7's escaper


def escape(value: str | None) -> str:
    """One field value, safe to place in a message (HL7 v2.5.1 section 2.7).

    Control characters are dropped first, so no MLLP framing byte (0x0B, 0x1C) or segment
    terminator (0x0D) is ever left in a value a modality wrote; then python-hl7 escapes the
    delimiters. It would write every non-ASCII character as ``\\Xhh\\`` (one byte of an
    unknown code page), so only ASCII runs go through it: the message is UTF-8 (MSH-18).
    """
    if not value:
        return ""
    clean = value.translate(_CONTROLS)
    return _ASCII_RUN.sub(lambda m: _DELIMITERS.escape(m.group()), clean)


def person_name(dicom_pn: str | None) -> tuple[str, ...]:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as HL7 XPN components (raw values)."""
    if not dicom_pn:
        return ()
    return tuple(dicom_pn.split("=", 1)[0].split("^")[:5])


#: A field: one value, or its components (empty ones left out), or None for an empty field.
FieldValue = str | Sequence[str] | None


class _Builder:
    """Adds segments to an ``hl7.Message``; every value is escaped on the way in."""

    def __init__(self) -> None:
        self.message = hl7.Message()

    def segment(self, name: str, fields: Mapping[int, FieldValue]) -> None:
        seg = self.message.create_segment([self.message.create_field([name])])
        if name == "MSH":  # MSH-1 and MSH-2 are the delimiters themselves
            seg.assign_field("|", 1)
            seg.assign_field("^~\\&", 2)
        for number in sorted(fields):
            value = fields[number]
            if isinstance(value, str):
                seg.assign_field(escape(value), number)
            elif value:
                for k, component in enumerate(value, start=1):
                    seg.assign_field(escape(component), number, 1, k)
            else:
                seg.assign_field("", number)
        self.message.append(seg)


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def new_control_id() -> str:
    """MSH-10: unique per message (20 characters, the field's length in v2.5.1)."""
    return uuid.uuid4().hex[:20]


@dataclass(frozen=True)
class Envelope:
    """MSH-3..6: who sends, who receives."""

    sending_application: str
    sending_facility: str = "TRIAGE"
    receiving_application: str = "RIS"
    receiving_facility: str = "RIS"

    @classmethod
    def from_settings(cls, settings: Settings) -> Envelope:
        return cls(
            sending_application=settings.hl7_sending_application or settings.ae_title,
            sending_facility=settings.hl7_sending_facility,
            receiving_application=settings.hl7_receiving_application,
            receiving_facility=settings.hl7_receiving_facility,
        )


def _header(b: _Builder, env: Envelope, message_type: str, control_id: str, stamp: str) -> None:
    code, event = message_type.split("^")
    b.segment("MSH", {
        3: env.sending_application, 4: env.sending_facility,
        5: env.receiving_application, 6: env.receiving_facility,
        7: stamp, 9: (code, event, f"{code}_{event}"), 10: control_id, 11: "P",
        12: HL7_VERSION, 18: CHARACTER_SET,
    })


def _zds(b: _Builder, study_uid: str, env: Envelope) -> None:
    b.segment("ZDS", {1: (study_uid, env.sending_application, "Application", "DICOM")})


@dataclass(frozen=True)
class PriorityUpdate:
    """What the RIS is told about one study's priority."""

    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    priority_class: str
    procedure: str | None
    note: str


def build_orm(update: PriorityUpdate, *, sending_application: str | None = None,
              envelope: Envelope | None = None, control_id: str | None = None,
              now: datetime | None = None) -> tuple[str, str]:
    """Build the ``ORM^O01`` order-change message; returns ``(message, control_id)``."""
    env = envelope or Envelope(sending_application=sending_application or "TRIAGE_NODE")
    stamp = _stamp(now or utcnow())
    control_id = control_id or new_control_id()
    timing = ("", "", "", "", "", HL7_PRIORITY.get(update.priority_class, "R"))
    accession = update.accession_number or ""
    b = _Builder()
    _header(b, env, ORM, control_id, stamp)
    b.segment("PID", {1: "1", 3: update.patient_id, 5: person_name(update.patient_name)})
    b.segment("ORC", {1: "XO", 2: accession, 3: accession, 7: timing, 9: stamp})
    b.segment("OBR", {1: "1", 2: accession, 3: accession, 4: ("", update.procedure or ""), 27: timing})
    _zds(b, update.study_uid, env)
    b.segment("NTE", {1: "1", 2: "L", 3: update.note})
    return str(b.message), control_id


@dataclass(frozen=True)
class ClassFinding:
    """One class of the model: present or absent at the operating point, and its probability."""

    name: str
    present: bool
    probability: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability of {self.name!r} must be in [0, 1], got {self.probability}")


@dataclass(frozen=True)
class ResultReport:
    """What the RIS is told about one AI result (one job)."""

    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    procedure: str | None
    model_name: str
    model_version: str
    operating_point: str
    device_uid: str | None
    findings: tuple[ClassFinding, ...]
    observed_at: datetime

    def __post_init__(self) -> None:
        if not self.findings:
            raise ValueError("findings must name at least one class")
        if self.observed_at.tzinfo is None:
            raise ValueError("observed_at must be timezone-aware")

    @property
    def positive(self) -> bool:
        return any(f.present for f in self.findings)

    def summary(self) -> str:
        """One line a RIS shows in its result view."""
        present = [f for f in self.findings if f.present and f.name != "any"]
        if not any(f.present for f in self.findings):
            top = max(self.findings, key=lambda f: f.probability)
            return (f"AI triage: no intracranial hemorrhage suspected (highest {top.name} "
                    f"{top.probability:.2f}); not a diagnosis")
        parts = ", ".join(f"{f.name} {f.probability:.2f}" for f in present) or "any"
        return f"AI triage: intracranial hemorrhage suspected ({parts}); not a diagnosis"

    def notice(self) -> str:
        """The intended-use statement, worded as the SR's comment (``research_notice``)."""
        return (
            f"Model {self.model_name} {self.model_version}: research use only. Not a medical "
            "device, not for clinical use or diagnosis; findings are unverified and every study "
            "must still be read."
        )


def build_oru(report: ResultReport, *, envelope: Envelope, control_id: str | None = None,
              now: datetime | None = None) -> tuple[str, str]:
    """Build the ``ORU^R01`` result message; returns ``(message, control_id)``."""
    stamp = _stamp(now or utcnow())
    observed = _stamp(report.observed_at)
    control_id = control_id or new_control_id()
    accession = report.accession_number or ""
    b = _Builder()
    _header(b, envelope, ORU, control_id, stamp)
    b.segment("PID", {1: "1", 3: report.patient_id, 5: person_name(report.patient_name)})
    b.segment("ORC", {1: "RE", 2: accession, 3: accession, 9: stamp})
    b.segment("OBR", {1: "1", 2: accession, 3: accession, 4: ("", report.procedure or ""),
                      7: observed, 22: stamp, 24: "CT", 25: "P"})
    _zds(b, report.study_uid, envelope)
    obx: list[dict[int, FieldValue]] = [
        {2: "TX", 3: ("ICH-AI", "AI triage result", "L"), 5: report.summary()},
    ]
    for sub_id, f in enumerate(report.findings, start=1):
        code, label = f"ICH-{f.name.upper()}", CLASS_LABELS.get(f.name, f.name)
        obx.append({2: "CWE", 3: (code, label, "L"), 4: str(sub_id), 5: PRESENT if f.present else ABSENT,
                    8: "A" if f.present else "N"})
        obx.append({2: "NM", 3: (f"{code}-P", f"{label} probability", "L"), 4: str(sub_id),
                    5: f"{f.probability:.3f}", 6: ("1", "", "UCUM")})
    obx.append({2: "TX", 3: ("ICH-AI-MODEL", "Algorithm", "L"),
                5: f"{report.model_name} {report.model_version}, operating point {report.operating_point}"})
    obx.append({2: "TX", 3: ("ICH-AI-NOTICE", "Intended use", "L"), 5: report.notice()})
    for i, fields in enumerate(obx, start=1):
        # OBX-18 Equipment Instance Identifier: the model's Device UID, as in the SR.
        b.segment("OBX", {1: str(i), 11: "P", 14: observed, 18: report.device_uid, **fields})
    return str(b.message), control_id


# -- acknowledgements ------------------------------------------------------------------------
#: MSA-1 (HL7 table 0008): original mode AA/AE/AR, enhanced mode CA/CE/CR.
ACCEPTED = frozenset({"AA", "CA"})
REFUSED = frozenset({"AE", "AR", "CE", "CR"})


@dataclass(frozen=True)
class Ack:
    """The RIS's answer to one message."""

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED


def _first(message: hl7.Message, segment: str, *fields: str) -> str:
    """First non-empty of ``fields`` (accessor suffixes like ``F3``) of ``segment``, unescaped."""
    try:
        seg = message.segment(segment)
    except KeyError:
        return ""
    for f in fields:
        number = int(f[1:])
        if number < len(seg) and str(seg[number]).strip():
            return message.unescape(str(seg[number]))
    return ""


def parse_ack(reply: str | hl7.Message, control_id: str) -> Ack:
    """Read an ACK (HL7 v2.5.1 section 2.9) for ``control_id``; `HL7Error` if it is none.

    The error text is MSA-3 (kept for older systems) or the ERR segment's user message
    (ERR-8), diagnostic (ERR-7) or error code (ERR-3).
    """
    try:
        message = reply if isinstance(reply, hl7.Message) else hl7.parse(reply.replace("\n", "\r"))
    except (HL7Exception, IndexError) as exc:
        raise HL7Error(f"reply is not an HL7 message ({exc})") from None
    try:
        msa = message.segment("MSA")
    except KeyError:
        raise HL7Error("reply has no MSA segment") from None
    code = str(msa(1)) if len(msa) > 1 else ""
    acked = str(msa(2)) if len(msa) > 2 else ""
    if acked != control_id:
        raise HL7Error(f"ACK for control id {acked!r}, sent {control_id!r}")
    if code not in ACCEPTED | REFUSED:
        raise HL7Error(f"ACK code {code!r} is not in HL7 table 0008")
    text = _first(message, "MSA", "F3") or _first(message, "ERR", "F8", "F7", "F3")
    return Ack(code=code, control_id=acked, text=text[:500])


def check_ack(reply: str, control_id: str) -> str:
    """Return ``MSA-1`` of an accepting ACK for ``control_id``, else raise `HL7Error`."""
    ack = parse_ack(reply, control_id)
    if not ack.accepted:
        detail = f": {ack.text}" if ack.text else ""
        raise HL7Error(f"RIS answered {ack.code}{detail}", final=True)
    return ack.code


def send_priority_update(
    settings: Settings,
    update: PriorityUpdate,
    *,
    attempts: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Send one update now, without the outbox; returns the ACK code.

    Returns None when no RIS is configured. A missing ACK is retried with backoff; a
    refusal (``AE``/``AR``) is final. Notifications go through ``outbox.py`` instead,
    which keeps the message until it is acknowledged.
    """
    from triage_node.notify.mllp import Endpoint, exchange

    if not settings.hl7_host:
        return None
    message, control_id = build_orm(update, envelope=Envelope.from_settings(settings))
    endpoint = Endpoint.from_settings(settings)
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            code = check_ack(exchange(endpoint, message), control_id)
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
