"""The result report in the SR storage class a destination accepts (PS3.3 A.35).

Many installed PACS store only the older SR classes, so each destination names the class
it gets (``Destination.sr_class``). The content is the same TID 1500 Measurement Report in
every class that allows its value types:

==================  ==========================  ==============================================
class               SOP Class UID               how it is made
==================  ==========================  ==============================================
comprehensive-3d    1.2.840.10008.5.1.4.1.1.88.34  ``highdicom.sr.Comprehensive3DSR`` (default)
comprehensive       1.2.840.10008.5.1.4.1.1.88.33  ``highdicom.sr.ComprehensiveSR``
enhanced            1.2.840.10008.5.1.4.1.1.88.22  ``highdicom.sr.EnhancedSR``
basic-text          1.2.840.10008.5.1.4.1.1.88.11  Comprehensive SR, then each NUM content item
                                                   becomes a TEXT item of the same concept
==================  ==========================  ==============================================

The report has no spatial coordinates, so the first three differ only in the SOP class;
highdicom checks the content against each class. Basic Text SR allows no NUM (PS3.3
Table A.35.1-2), and no library writes that class, so the conversion is ours: the
probability keeps its concept name (DCM 122157 "Probability") and its algorithm
modifiers, and its value is written as text (``0.873``).
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from triage_node.setting_types import SRClass

__all__ = ["BASIC_TEXT_SR", "SR_CLASS_UIDS", "highdicom_class", "to_basic_text"]

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

#: SOP Class UID of each SR class (PS3.4 Table B.5-1).
SR_CLASS_UIDS: dict[SRClass, str] = {
    SRClass.comprehensive_3d: "1.2.840.10008.5.1.4.1.1.88.34",
    SRClass.comprehensive: "1.2.840.10008.5.1.4.1.1.88.33",
    SRClass.enhanced: "1.2.840.10008.5.1.4.1.1.88.22",
    SRClass.basic_text: BASIC_TEXT_SR,
}

_HIGHDICOM: dict[SRClass, type[hd.sr.ComprehensiveSR] | type[hd.sr.Comprehensive3DSR] | type[hd.sr.EnhancedSR]] = {
    SRClass.comprehensive_3d: hd.sr.Comprehensive3DSR,
    SRClass.comprehensive: hd.sr.ComprehensiveSR,
    SRClass.enhanced: hd.sr.EnhancedSR,
    # Basic Text starts as Comprehensive SR (same modules, no 3D coordinates)
    SRClass.basic_text: hd.sr.ComprehensiveSR,
}


def highdicom_class(sr_class: SRClass) -> type:
    """The highdicom document class that builds ``sr_class`` (Comprehensive SR for basic-text)."""
    return _HIGHDICOM[SRClass(sr_class)]


def _numeric_text(item: Dataset) -> str:
    value = item.MeasuredValueSequence[0].NumericValue if item.get("MeasuredValueSequence") else None
    return "" if value is None else format(float(value), ".6g")


def _convert_numbers(items: DicomSequence) -> int:
    converted = 0
    for item in items:
        if item.get("ValueType") == "NUM":
            item.TextValue = _numeric_text(item)
            item.ValueType = "TEXT"
            for keyword in ("MeasuredValueSequence", "NumericValueQualifierCodeSequence"):
                if keyword in item:
                    delattr(item, keyword)
            converted += 1
        if "ContentSequence" in item:
            converted += _convert_numbers(item.ContentSequence)
    return converted


def to_basic_text(report: Dataset) -> Dataset:
    """Turn a Comprehensive SR written by :func:`worker.pipeline.sr.build_sr` into Basic Text SR.

    Changes the object in place (and returns it): SOP Class UID in the dataset and the File
    Meta Information, and every NUM content item into a TEXT item (see the module docstring).
    """
    if report.SOPClassUID != SR_CLASS_UIDS[SRClass.comprehensive]:
        raise ValueError(f"expected a Comprehensive SR, got SOP class {report.SOPClassUID}")
    _convert_numbers(report.ContentSequence)
    report.SOPClassUID = BASIC_TEXT_SR
    meta = getattr(report, "file_meta", None)
    if meta is not None:
        meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    return report
