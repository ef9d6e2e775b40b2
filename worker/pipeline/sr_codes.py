"""Codes the triage objects carry, and reading a report back by them.

The coded concepts of the SR (PS3.16), and the tag in an overlay image's ImageComments
that tells the SR writer which class the overlay shows. Kept apart from
``worker.pipeline.sr``, which builds the report: which code stands for which finding is
a decision of its own, documented and tested on its own (the generated conformance
statement lists ``CODES``); the overlay writer and the SR builder share the overlay tag;
and the read-back (:func:`summary`) needs the codes, not the builder.

Codes (``CODES``): where a SNOMED CT concept for the subtype could be verified it is used
(sources below); for epidural and intraventricular hemorrhage no pre-coordinated concept
could be verified here, so the finding is the DICOM-listed SNOMED concept "Hemorrhage"
50960005 (CID 6335) post-coordinated with a Finding Site (TID 1501 row 7): "Brain
ventricle" 35764002 (CID 7153) for intraventricular, "Intracranial" 1101003 (CID 7151)
with the local code ``99ICHTRIAGE/EDH`` as finding for epidural.

=================  ===========================  ===========================================
class              finding (scheme, value)      source
=================  ===========================  ===========================================
any                SCT 1386000                  PS3.16 (pydicom concept dictionary)
                   Intracranial hemorrhage
epidural           99ICHTRIAGE EDH              local code; finding site SCT 1101003
                   Epidural hemorrhage          Intracranial (CID 7151)
intraparenchymal   SCT 274100004                HL7 FHIR stroke value sets
                   Cerebral hemorrhage
intraventricular   SCT 50960005 Hemorrhage      CID 6335; finding site SCT 35764002
                                                Brain ventricle (CID 7153)
subarachnoid       SCT 21454007 Subarachnoid    HL7 FHIR stroke value sets
                   intracranial hemorrhage
subdural           SCT 35486000 Subdural        public SNOMED-coded disease lists
                   intracranial hemorrhage
=================  ===========================  ===========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset

from triage_node import CLASSES

#: Local coding scheme for concepts without a verified standard code (PS3.3 8.2: "99" prefix).
LOCAL_SCHEME = "99ICHTRIAGE"
#: Prefix of ImageComments (0020,4000) on overlay images: ``<prefix> class=<c> slice=<i> p=<p>``.
OVERLAY_COMMENT_PREFIX = "ICH-TRIAGE-OVERLAY"

PROCEDURE_CT_HEAD = hd.sr.CodedConcept("24725-4", "LN", "Head CT")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
BEST_ILLUSTRATION = hd.sr.CodedConcept("121080", "DCM", "Best illustration of finding")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
_HEMORRHAGE = hd.sr.CodedConcept("50960005", "SCT", "Hemorrhage")


@dataclass(frozen=True)
class FindingCode:
    """Finding concept of one class, with an optional finding site (post-coordination)."""

    finding: hd.sr.CodedConcept
    site: hd.sr.CodedConcept | None = None


CODES: dict[str, FindingCode] = {
    "any": FindingCode(hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage")),
    "epidural": FindingCode(
        hd.sr.CodedConcept("EDH", LOCAL_SCHEME, "Epidural hemorrhage"),
        hd.sr.CodedConcept("1101003", "SCT", "Intracranial"),
    ),
    "intraparenchymal": FindingCode(hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage")),
    "intraventricular": FindingCode(_HEMORRHAGE, hd.sr.CodedConcept("35764002", "SCT", "Brain ventricle")),
    "subarachnoid": FindingCode(
        hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage")
    ),
    "subdural": FindingCode(hd.sr.CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage")),
}
assert tuple(CODES) == CLASSES


def overlay_comment(class_name: str, slice_index: int, probability: float) -> str:
    """ImageComments value that tells the SR writer what an overlay image shows."""
    return f"{OVERLAY_COMMENT_PREFIX} class={class_name} slice={slice_index} p={probability:.3f}"


def overlay_class(ds: Dataset) -> str | None:
    """Class an overlay image shows (from :func:`overlay_comment`), or None."""
    text = str(ds.get("ImageComments", "") or "")
    if not text.startswith(OVERLAY_COMMENT_PREFIX):
        return None
    for part in text.split():
        if part.startswith("class="):
            name = part[len("class="):]
            return name if name in CLASSES else None
    return None


def summary(sr: Dataset) -> dict[str, Any]:
    """Per-class (present, probability) read back from an SR written by :func:`build_sr`.

    Used by tests and by the demo to show what a PACS receives.
    """
    out: dict[str, Any] = {}
    by_code = {(c.finding.value, c.finding.scheme_designator, c.site.value if c.site else None): n
               for n, c in CODES.items()}
    for item in sr.ContentSequence:
        if item.ValueType != "CONTAINER" or item.ConceptNameCodeSequence[0].CodeValue != "126010":
            continue
        for group in item.ContentSequence:
            finding = site = present = probability = None
            for sub in group.ContentSequence:
                name = sub.ConceptNameCodeSequence[0]
                if sub.ValueType == "CODE" and name.CodeValue == "121071":
                    concept = sub.ConceptCodeSequence[0]
                    finding = (concept.CodeValue, concept.CodingSchemeDesignator)
                elif sub.ValueType == "CODE" and name.CodeValue == "363698007":
                    site = sub.ConceptCodeSequence[0].CodeValue
                elif sub.ValueType == "CODE":
                    present = sub.ConceptCodeSequence[0].CodeValue == PRESENT.value
                elif sub.ValueType == "NUM" and name.CodeValue == PROBABILITY.value:
                    probability = float(sub.MeasuredValueSequence[0].NumericValue)
                elif sub.ValueType == "TEXT" and name.CodeValue == PROBABILITY.value:  # Basic Text SR
                    probability = float(sub.TextValue)
            if finding is not None:
                out[by_code[(*finding, site)]] = {"present": present, "probability": probability}
    return out
