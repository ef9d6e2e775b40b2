"""Which series of a study is triaged: a non-contrast axial head CT, brain kernel first.

The rules live in a YAML file (default ``selection_rules.yaml`` beside this module,
or ``settings.selection_rules``), read by ``triage_node.studies.selection_rules``. `select_series` applies them in two steps:

1. Hard filters, each with a reason when it fails: Modality (0008,0060), SOP Class,
   ImageType (0008,0008) ``ORIGINAL\\PRIMARY\\AXIAL`` (PS3.3 C.8.2.1.1.1; never
   ``LOCALIZER`` nor ``DERIVED\\SECONDARY`` such as dose summaries; ``DERIVED`` only
   by lossy compression counts as ``ORIGINAL``), or without ImageType an axial,
   evenly spaced, head-sized stack by its geometry (`triage_node.studies.geometry`),
   descriptions of
   non-diagnostic series, head anatomy (BodyPartExamined (0018,0015), descriptions,
   protocol), no contrast (ContrastBolusAgent (0018,0010) empty, PS3.3 C.7.6.4), a
   minimum number of instances.
2. Ranking of the remaining candidates: brain/soft-tissue kernel (ConvolutionKernel
   (0018,1210), then WindowWidth (0028,1051), then description) before unknown before
   bone; SliceThickness (0018,0050) in the preferred range before thicker before thin.
   The best one is selected; every other series is rejected with a reason.

At most one series per study is selected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from triage_node.db.models import SelectionDecision, Series, Study
from triage_node.studies import geometry
from triage_node.studies.selection_rules import SelectionRules, load_rules

#: DerivationCodeSequence (0008,9215) of an image derived only by lossy compression:
#: DCM 113040 "Lossy Compression" (PS3.16 CID 7203), as recorded by the store.
LOSSY_COMPRESSION_ONLY = "DCM:113040"


class KernelClass(IntEnum):
    """Reconstruction class; lower is preferred."""

    soft = 0
    unknown = 1
    bone = 2


class ThicknessClass(IntEnum):
    """Slice-thickness class; lower is preferred."""

    preferred = 0
    unknown = 1
    thick = 2
    thin = 3


# -- classification helpers ------------------------------------------------------------


def _search(patterns: Sequence[re.Pattern[str]], *texts: str | None) -> re.Pattern[str] | None:
    for text in texts:
        if not text:
            continue
        for pattern in patterns:
            if pattern.search(text):
                return pattern
    return None


def image_type_values(image_type: str | None) -> list[str]:
    """ImageType as its values (stored backslash-separated, PS3.5 6.4)."""
    return [v.strip().upper() for v in (image_type or "").split("\\")]


def classify_kernel(series: Series, rules: SelectionRules) -> tuple[KernelClass, str]:
    """Brain/soft-tissue, bone or unknown, with the evidence used."""
    kernel = (series.convolution_kernel or "").strip()
    # ConvolutionKernel may be multi-valued (e.g. Siemens "Hr38\3"); the name is first.
    name = kernel.split("\\")[0].strip()
    if name:
        if _search(rules.kernel_bone, name):
            return KernelClass.bone, f"bone kernel {name}"
        if _search(rules.kernel_soft, name):
            return KernelClass.soft, f"soft-tissue kernel {name}"
    width = series.window_width
    if width is not None:
        if width <= rules.window_soft_max:
            return KernelClass.soft, f"brain window width {width:g}"
        if width >= rules.window_bone_min:
            return KernelClass.bone, f"bone window width {width:g}"
    if _search(rules.description_bone, series.description):
        return KernelClass.bone, "bone in description"
    if _search(rules.description_soft, series.description):
        return KernelClass.soft, "brain/soft tissue in description"
    return KernelClass.unknown, f"unknown kernel {name}" if name else "no kernel"


def classify_thickness(series: Series, rules: SelectionRules) -> tuple[ThicknessClass, str]:
    value = series.slice_thickness
    if value is None:
        return ThicknessClass.unknown, "no slice thickness"
    low, high = rules.thickness_preferred
    if low <= value <= high:
        return ThicknessClass.preferred, f"{value:g} mm"
    if value > high:
        return ThicknessClass.thick, f"{value:g} mm (thicker than preferred)"
    return ThicknessClass.thin, f"{value:g} mm (thin)"


def _has_contrast(series: Series, study: Study | None, rules: SelectionRules) -> str | None:
    if series.contrast_agent and series.contrast_agent.strip():
        return "contrast agent present (ContrastBolusAgent)"
    for text in (series.description, series.protocol_name):
        if not text:
            continue
        remainder = text
        for negation in rules.contrast_negations:
            remainder = negation.sub(" ", remainder)
        if _search(rules.contrast_description, remainder):
            return f"contrast in description or protocol {text!r}"
    return None


def _mm(value: float) -> str:
    return f"{value:.1f}"


def _fov_text(fov: tuple[float, float]) -> str:
    rows, columns = fov
    return f"{rows:.0f}" if round(rows) == round(columns) else f"{rows:.0f} x {columns:.0f}"


def _by_geometry(series: Series, rules: SelectionRules) -> tuple[str | None, str | None]:
    """For a series without ImageType: (why it is not an axial head stack, None) or
    (None, what its geometry shows)."""
    cosines = geometry.orientation(series.image_orientation)
    found = geometry.plane(cosines) if cosines else None
    if found is None:
        return "no ImageType, and no ImageOrientationPatient to tell the plane", None
    limit = rules.axial_max_tilt_deg
    if found.from_axial > limit:
        name = found.name if min(found.from_coronal, found.from_sagittal) <= limit else "oblique"
        return (f"no ImageType, and {name} by orientation ({found.from_axial:.0f}° from axial, "
                f"at most {limit:g}°)"), None
    median, deviation = series.slice_spacing, series.slice_spacing_deviation
    if median is None or deviation is None:
        return "no ImageType, and no slice spacing (slice positions missing)", None
    if median <= 0 or deviation > rules.spacing_tolerance * median:
        return (f"no ImageType, and slice spacing inconsistent (a gap departs {_mm(deviation)} mm "
                f"from the median {_mm(median)} mm)"), None
    fov = geometry.field_of_view(series)
    if fov is None:
        return "no ImageType, and no Rows, Columns and PixelSpacing for the field of view", None
    low, high = rules.field_of_view_mm
    if not all(low <= side <= high for side in fov):
        return (f"no ImageType, and a {_fov_text(fov)} mm field of view is not head-sized "
                f"({low:g}-{high:g} mm)"), None
    tilt = f" (tilted {found.from_axial:.0f}°)" if found.from_axial >= 1 else ""
    return None, (f"no ImageType: axial by orientation{tilt}, {_mm(median)} mm spacing, "
                  f"{_fov_text(fov)} mm field of view")


def _lossy_original(series: Series, rules: SelectionRules) -> bool:
    """DERIVED only because it was lossy compressed (PS3.3 C.7.6.1.1.2, C.7.6.1.1.5)."""
    return (
        rules.lossy_compressed_original
        and series.lossy_compression is not None
        and series.derivation_codes == LOSSY_COMPRESSION_ONLY
    )


def _image_type(series: Series, rules: SelectionRules) -> tuple[str | None, str | None]:
    """(why ImageType, or the geometry in its absence, excludes the series, None) or
    (None, evidence worth naming in the selection reason, if any)."""
    if not (series.image_type or "").strip():
        return _by_geometry(series, rules)
    values = image_type_values(series.image_type)
    lossy_original = values[0] == "DERIVED" and _lossy_original(series, rules)
    if lossy_original:
        values[0] = "ORIGINAL"
    banned = sorted(set(values) & rules.image_type_reject)
    if banned:
        return f"image type {series.image_type} ({', '.join(banned)})", None
    if values[0] not in rules.image_type_value1 or len(values) < 2 or (
        values[1] not in rules.image_type_value2
    ):
        return f"image type {series.image_type} is not ORIGINAL\\PRIMARY", None
    if not set(values[2:]) & rules.image_type_axial:
        return f"image type {series.image_type} is not AXIAL", None
    if lossy_original:
        return None, f"original before lossy compression ({series.lossy_compression})"
    if series.lossy_compression:
        return None, f"lossy compressed ({series.lossy_compression})"
    return None, None


def _anatomy(series: Series, study: Study | None, rules: SelectionRules,
             head_by_geometry: bool = False) -> str | None:
    """None when the series is a head; otherwise why not.

    ``head_by_geometry``: the series has no ImageType and a head-sized field of view,
    which stands for anatomy when nothing names it (research exports drop the names).
    """
    body = (series.body_part or "").strip().upper()
    if body:
        if body in rules.body_parts:
            return None
        return f"body part {body} is not a head"
    study_description = study.study_description if study is not None else None
    texts = (series.description, series.protocol_name, study_description)
    if _search(rules.anatomy_description, *texts):
        return None
    unnamed = not any(t and t.strip() for t in texts)
    if unnamed and (rules.accept_unknown_anatomy or head_by_geometry):
        return None
    return "not identified as a head (body part, description, protocol)"


def hard_filter(series: Series, study: Study | None, rules: SelectionRules) -> str | None:
    """The first reason that excludes ``series`` from triage, or None."""
    modality = (series.modality or "").strip().upper()
    if modality not in rules.modalities:
        return f"modality {modality or 'missing'} is not {'/'.join(sorted(rules.modalities))}"
    if rules.sop_classes and series.sop_class_uid and series.sop_class_uid not in rules.sop_classes:
        return f"SOP class {series.sop_class_uid} is not a CT image storage class"
    problem, evidence = _image_type(series, rules)
    if problem:
        return problem
    pattern = _search(rules.reject_description, series.description, series.protocol_name)
    if pattern is not None:
        return f"description {series.description or series.protocol_name!r} names a non-diagnostic series"
    head_by_geometry = rules.geometry_identifies_head and bool(evidence) and not series.image_type
    anatomy = _anatomy(series, study, rules, head_by_geometry)
    if anatomy:
        return anatomy
    contrast = _has_contrast(series, study, rules)
    if contrast:
        return contrast
    count = series.instance_count or 0
    if count < rules.min_instances:
        return f"{count} instances, fewer than {rules.min_instances}"
    thickness = series.slice_thickness
    if thickness is not None and not rules.thickness_min <= thickness <= rules.thickness_max:
        return (
            f"slice thickness {thickness:g} mm outside "
            f"{rules.thickness_min:g}-{rules.thickness_max:g} mm"
        )
    return None


@dataclass(frozen=True)
class _Candidate:
    series: Series
    kernel: KernelClass
    kernel_reason: str
    thickness: ThicknessClass
    thickness_reason: str
    evidence: str | None = None

    def key(self, rules: SelectionRules) -> tuple[Any, ...]:
        low, high = rules.thickness_preferred
        value = self.series.slice_thickness
        distance = 0.0 if value is None else min(abs(value - low), abs(value - high))
        if low <= (value or -1.0) <= high:
            distance = 0.0
        return (
            int(self.kernel),
            int(self.thickness),
            distance,
            -(self.series.instance_count or 0),
            self.series.series_number if self.series.series_number is not None else 1 << 30,
            self.series.series_uid,
        )

    def describe(self) -> str:
        ranked = f"{self.kernel_reason}, {self.thickness_reason}"
        return f"{self.evidence}; {ranked}" if self.evidence else ranked


def select_series(
    study: Study | None,
    series_list: Sequence[Series],
    rules: SelectionRules | None = None,
) -> list[tuple[Series, SelectionDecision, str]]:
    """Decide, for each series of a study, whether it is the one to triage.

    Parameters
    ----------
    study : Study or None
        The study (its StudyDescription helps to recognise a head).
    series_list : sequence of Series
        The study's series to decide on (normally the complete ones).
    rules : SelectionRules, optional
        Default: the shipped rules.

    Returns
    -------
    list of (Series, SelectionDecision, str)
        One entry per series, in the order given; at most one ``selected``. The
        reason says why a series was rejected, or what made the selected one win.
    """
    rules = rules or load_rules()
    decisions: dict[int, tuple[SelectionDecision, str]] = {}
    candidates: list[_Candidate] = []
    for index, series in enumerate(series_list):
        reason = hard_filter(series, study, rules)
        if reason is not None:
            decisions[index] = (SelectionDecision.rejected, reason)
            continue
        kernel, kernel_reason = classify_kernel(series, rules)
        if kernel is KernelClass.bone and rules.bone_policy == "reject":
            decisions[index] = (SelectionDecision.rejected, kernel_reason)
            continue
        thickness, thickness_reason = classify_thickness(series, rules)
        evidence = _image_type(series, rules)[1]
        candidates.append(
            _Candidate(series, kernel, kernel_reason, thickness, thickness_reason, evidence)
        )
    if candidates:
        ranked = sorted(candidates, key=lambda c: c.key(rules))
        best = ranked[0]
        fallback = []
        if best.kernel is KernelClass.bone:
            fallback.append("only bone-kernel candidates")
        if best.thickness is ThicknessClass.thin:
            fallback.append("only thin candidates")
        note = f" ({'; '.join(fallback)})" if fallback else ""
        for index, series in enumerate(series_list):
            if series is best.series:
                decisions[index] = (SelectionDecision.selected, best.describe() + note)
        for other in ranked[1:]:
            for index, series in enumerate(series_list):
                if series is other.series:
                    decisions[index] = (
                        SelectionDecision.rejected,
                        f"series {best.series.series_number or best.series.series_uid} preferred "
                        f"({best.describe()}) over this one ({other.describe()})",
                    )
    return [(series, *decisions[i]) for i, series in enumerate(series_list)]
