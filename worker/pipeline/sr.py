"""DICOM Structured Report of one triage result (IHE AI Results, TID 1500).

The report is a Comprehensive 3D SR (PS3.3 A.35.13) by default, or the class a destination
asks for (``worker.pipeline.sr_classes``), whose content tree is a TID 1500 Measurement Report:

- Procedure Reported (TID 1500 row 4): the examination, LOINC 24725-4 "Head CT" (CID 100);
  not the algorithm.
- Observer context (TID 1002/1004): a device observer with the model card's Device UID.
- One TID 1501 Measurement Group per class (``any`` and the five subtypes), each with a
  Tracking Identifier (TID 4108), the Finding (121071) as a coded concept, the Algorithm
  Identification (TID 4019: model name and version; the operating point and the source of
  its thresholds, model card or a site calibration's digest, as parameters), a qualitative
  evaluation (CODE: finding -> Present/Absent at the operating point, CID 240),
  the study probability as a measurement (TID 300, DCM 122157 "Probability", UCUM "1"),
  the key source slices as "Source of Measurement" images (TID 1501 row 11), and the
  overlay images as "Best illustration of finding" (DCM 121080; TID 1501 is extensible).
- A Comment (DCM 121106) saying what the weights are for: pipeline verification only when
  the model card's intended use says they come from synthetic phantoms, otherwise research
  use only, not a medical device, not for clinical use.

The header carries VerificationFlag UNVERIFIED (PS3.3 C.17.2), the source's Study Instance
UID, a new Series, the model card's Device UID in the General Equipment module, and a
Contributing Equipment Sequence item (PS3.3 C.12.1) that names the algorithm (Manufacturer,
Manufacturer's Model Name, Software Versions).

The coded concepts, and the table of which finding code each class gets, are in
``worker.pipeline.sr_codes``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Protocol

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage_node import CLASSES
from triage_node.logs import get_logger
from triage_node.setting_types import SRClass
from worker.pipeline.sr_classes import highdicom_class, to_basic_text
from worker.pipeline.sr_codes import (
    ABSENT,
    BEST_ILLUSTRATION,
    CODES,
    COMMENT,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    PROCEDURE_CT_HEAD,
    overlay_class,
)

log = get_logger(__name__)

#: Manufacturer written into every object this node creates.
MANUFACTURER = "ICH triage node (open source)"
#: Series numbers of what the node writes (kept clear of scanner series numbers).
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902

#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
#: de-identified sources often lack and highdicom requires to be present.
TYPE2_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class PredictionLike(Protocol):
    """What the SR needs of ``worker.pipeline.inference_core.StudyPrediction``."""

    study_probs: np.ndarray
    decision: Mapping[str, bool]
    thresholds: np.ndarray
    operating_point: str


class CardLike(Protocol):
    """What the writers need of ``worker.inference.card.ModelCard``."""

    name: str
    version: str
    device_uid: str
    intended_use: str


class ReportError(ValueError):
    """The inputs cannot make a valid report (no sources, mixed studies, ...)."""


def reference_header(ds: Dataset) -> Dataset:
    """Header copy of a source image, ready to be a highdicom reference.

    Pixel data is left out; SOPClassUID / SOPInstanceUID come from the File Meta
    Information (PS3.10 7.1) when the dataset lacks them (normal for de-identified files);
    each missing type 2 attribute of ``TYPE2_ATTRIBUTES`` is added empty. The source
    dataset is never modified.
    """
    out = Dataset()
    for elem in ds:
        if elem.keyword in _PIXEL_KEYWORDS:
            continue
        out.add(copy.deepcopy(elem))
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = copy.deepcopy(meta)
        if "SOPClassUID" not in out and "MediaStorageSOPClassUID" in meta:
            out.SOPClassUID = meta.MediaStorageSOPClassUID
        if "SOPInstanceUID" not in out and "MediaStorageSOPInstanceUID" in meta:
            out.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not out.get(keyword):
            raise ReportError(f"source image lacks {keyword}")
    for keyword in TYPE2_ATTRIBUTES:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def trained_on_synthetic(card: CardLike) -> bool:
    """True when the model card's intended use says its weights come from synthetic phantoms only.

    The intended use decides, not the training record: real weights may have seen phantoms
    as extra data and are not pipeline-verification weights for that.
    """
    return "synthetic" in (getattr(card, "intended_use", "") or "").lower()


def synthetic_notice(card: CardLike) -> str:
    return (
        f"Model {card.name} {card.version} was trained on synthetic phantoms for pipeline "
        "verification only; not for clinical use. Findings are unverified."
    )


def research_notice(card: CardLike) -> str:
    return (
        f"Model {card.name} {card.version}: research use only. Not a medical device, not for "
        "clinical use or diagnosis; findings are unverified and every study must still be read."
    )


def threshold_parameter(card: CardLike) -> str:
    """``thresholds=site:<digest>`` when a site calibration set them, else ``thresholds=model-card``.

    Read as ``card.site`` (``worker.inference.site.SiteThresholds``); a card object without that
    attribute uses the card's own thresholds.
    """
    site = getattr(card, "site", None)
    return f"thresholds=site:{site.digest}" if site is not None else "thresholds=model-card"


def algorithm_identification(card: CardLike, operating_point: str) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification: model name, version, and the operating point and
    :func:`threshold_parameter` as Algorithm Parameters (DCM 111002, TEXT)."""
    return hd.sr.AlgorithmIdentification(
        name=card.name,
        version=str(card.version),
        parameters=[f"operating_point={operating_point}", threshold_parameter(card)],
    )


def _image_item(ds: Dataset, name: hd.sr.CodedConcept) -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(
        name=name,
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _group(
    tracking_uid: str,
    class_name: str,
    probability: float,
    present: bool,
    algorithm: hd.sr.AlgorithmIdentification,
    sources: Sequence[Dataset],
    overlays: Sequence[Dataset],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = CODES[class_name]
    measurement = hd.sr.Measurement(
        name=PROBABILITY,
        value=float(probability),
        unit=NO_UNITS,
        algorithm_id=algorithm,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"ICH triage: {class_name}"
        ),
        finding_type=code.finding,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(code.site)] if code.site is not None else None,
        measurements=[measurement],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=code.finding, value=PRESENT if present else ABSENT)
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]
        or None,
    )
    container = group[0]
    for ds in overlays:
        container.ContentSequence.append(_image_item(ds, BEST_ILLUSTRATION))
    return group


def build_sr(
    source_datasets: Sequence[Dataset],
    prediction: PredictionLike,
    card: CardLike,
    overlay_datasets: Sequence[Dataset],
    key_slices: Mapping[str, Sequence[int]],
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    software_version: str | None = None,
    sr_class: SRClass = SRClass.comprehensive_3d,
) -> Dataset:
    """Build the TID 1500 report of one study.

    Parameters
    ----------
    source_datasets : sequence of Dataset
        Headers of the analysed series in volume order (``Volume.datasets``); pixel data
        is not needed. Indexes in ``key_slices`` refer to this order.
    prediction : StudyPrediction
        ``study_probs`` [6] (CLASSES order), ``decision`` {class: bool}, ``thresholds``
        [6], ``operating_point``.
    card : ModelCard
        ``name``, ``version``, ``device_uid``, ``intended_use``.
    overlay_datasets : sequence of Dataset
        The overlay images (from :func:`worker.pipeline.overlay.build_overlays`); each is
        referenced in the group of the class named in its ImageComments (``any`` if none).
    key_slices : mapping of str to sequence of int
        Key slice indexes per class (:func:`worker.pipeline.overlay.select_key_slices`);
        they are the Source of Measurement images of that class's group, and of ``any``.
    series_instance_uid, sop_instance_uid : str, optional
        UIDs to use (new ones by default; pass fixed ones to make re-runs idempotent).
    sr_class : SRClass
        SR storage class (``worker.pipeline.sr_classes``); Comprehensive 3D SR by default.

    Returns
    -------
    Dataset
        A highdicom SR document of ``sr_class`` (Basic Text SR: converted from Comprehensive
        SR), same Study Instance UID as the sources, a new series, VerificationFlag UNVERIFIED.
    """
    if not source_datasets:
        raise ReportError("no source datasets")
    sources = [reference_header(ds) for ds in source_datasets]
    study_uids = {ds.StudyInstanceUID for ds in sources}
    if len(study_uids) != 1:
        raise ReportError(f"sources belong to {len(study_uids)} studies")
    probs = np.asarray(prediction.study_probs, dtype=float)
    if probs.shape != (len(CLASSES),):
        raise ReportError(f"study_probs must have shape ({len(CLASSES)},), got {probs.shape}")
    for name, indexes in key_slices.items():
        if name not in CLASSES:
            raise ReportError(f"key_slices names unknown class {name!r}")
        for i in indexes:
            if not 0 <= int(i) < len(sources):
                raise ReportError(f"key slice {i} of {name!r} outside 0..{len(sources) - 1}")
    overlays = [reference_header(ds) for ds in overlay_datasets]
    for ds in overlays:
        if ds.StudyInstanceUID not in study_uids:
            raise ReportError("an overlay image belongs to another study")

    algorithm = algorithm_identification(card, prediction.operating_point)
    sop_instance_uid = sop_instance_uid or hd.UID()
    groups = []
    for k, name in enumerate(CLASSES):
        if name == "any":
            idx = sorted({int(i) for v in key_slices.values() for i in v})
        else:
            idx = [int(i) for i in key_slices.get(name, ())]
        shown = [ds for ds in overlays if (overlay_class(ds) or "any") == name]
        groups.append(
            _group(
                # derived from the SR's UID, so that a re-run writes the same document
                generate_uid(entropy_srcs=[sop_instance_uid, "tracking", name]),
                name,
                probs[k],
                bool(prediction.decision[name]),
                algorithm,
                [sources[i] for i in idx],
                shown,
            )
        )

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=card.device_uid,
            name=card.name,
            manufacturer_name=MANUFACTURER,
            model_name=card.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CT_HEAD,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=COMMENT,
            value=synthetic_notice(card) if trained_on_synthetic(card) else research_notice(card),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )

    referenced = [sources[i] for i in sorted({int(i) for v in key_slices.values() for i in v})]
    evidence = [sources[0], *referenced, *overlays]
    evidence = list({ds.SOPInstanceUID: ds for ds in evidence}.values())
    sr = highdicom_class(sr_class)(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        record_evidence=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(card, software_version)],
        series_description=_series_description(card),
    )
    sr.ManufacturerModelName = card.name
    sr.SoftwareVersions = software_version or str(card.version)
    sr.DeviceUID = card.device_uid
    if sr_class is SRClass.basic_text:
        sr = to_basic_text(sr)
    log.info(
        "sr_built",
        sr_class=str(sr_class),
        sop_uid=sr.SOPInstanceUID,
        series_uid=sr.SeriesInstanceUID,
        study_uid=sr.StudyInstanceUID,
        positive_classes=[c for c in CLASSES if prediction.decision[c]],
        overlays=len(overlays),
    )
    return sr


def _series_description(card: CardLike) -> str:
    text = "AI ICH triage result"
    if trained_on_synthetic(card):
        text += " (synthetic weights)"
    return text[:64]


def contributing_equipment(card: CardLike, software_version: str | None = None) -> hd.ContributingEquipment:
    """Contributing Equipment Sequence item naming the algorithm (PS3.3 C.12.1.1.5).

    Purpose of reference DCM 109102 "Processing Equipment" (CID 7005). The model card's
    Device UID (a new one per retrain) goes in the General Equipment module (C.7.5.1) of
    each object instead: dciodvfy does not know it in this item, and an attribute outside
    the IOD makes the object Standard Extended, which some archives refuse.
    """
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name,
        software_versions=software_version or str(card.version),
        contribution_description=_contribution_description(card),
    )
    return item


def _contribution_description(card: CardLike) -> str:
    text = f"AI triage for intracranial hemorrhage, model {card.name} {card.version}"
    if trained_on_synthetic(card):
        text += "; synthetic weights, pipeline verification only"
    return text[:64]
