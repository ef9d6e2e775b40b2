"""Series selection for non-contrast head CT: hard filters, kernel and thickness ranking,
custom rules files, series without ImageType decided by geometry, lossy-compressed originals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid

from triage_node.db.models import SelectionDecision, Series, Study
from triage_node.studies import geometry
from triage_node.studies.selection import KernelClass, classify_kernel, select_series
from triage_node.studies.selection_rules import DEFAULT_RULES_PATH, RulesError, load_rules

SELECTED = SelectionDecision.selected
REJECTED = SelectionDecision.rejected


def series(number: int = 2, **overrides) -> Series:
    values = dict(
        series_uid=generate_uid(), series_number=number, modality="CT",
        description="HEAD W/O CONTRAST", body_part="HEAD", protocol_name="Routine Head",
        image_type="ORIGINAL\\PRIMARY\\AXIAL", convolution_kernel="H30s",
        slice_thickness=5.0, contrast_agent=None, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_count=32, window_width=None,
    )
    values.update(overrides)
    return Series(**values)


STUDY = Study(study_uid="1.2.3", study_description="CT HEAD")


def decide(*items: Series, study: Study | None = STUDY, rules=None):
    return {s.series_number: (d, why) for s, d, why in select_series(study, list(items), rules)}


def test_typical_study_selects_the_brain_kernel_axial_series():
    result = decide(
        series(1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER", description="Topogram 0.6 T20s",
               instance_count=2),
        series(2, convolution_kernel="H30s", slice_thickness=5.0),
        series(3, convolution_kernel="H70h", slice_thickness=5.0, description="HEAD BONE"),
        series(4, convolution_kernel="H30s", slice_thickness=0.75, instance_count=200),
        series(501, image_type="DERIVED\\SECONDARY\\OTHER", description="Dose Report",
               convolution_kernel=None, instance_count=1),
    )
    assert result[2][0] is SELECTED
    assert "soft-tissue kernel H30s" in result[2][1] and "5 mm" in result[2][1]
    assert [n for n, (d, _) in result.items() if d is SELECTED] == [2]
    assert "LOCALIZER" in result[1][1]
    assert "DERIVED" in result[501][1] and "SECONDARY" in result[501][1]
    assert "bone kernel H70h" in result[3][1] and "preferred" in result[3][1]
    assert "0.75 mm (thin)" in result[4][1]


def test_every_series_gets_a_decision_and_a_reason():
    items = [series(n) for n in range(1, 6)]
    result = select_series(STUDY, items)
    assert [s for s, _, _ in result] == items
    assert sum(d is SELECTED for _, d, _ in result) == 1
    assert all(why for _, _, why in result)


def test_thin_series_only_when_nothing_else_exists():
    result = decide(series(4, slice_thickness=0.625, instance_count=240))
    assert result[4][0] is SELECTED and "only thin candidates" in result[4][1]
    result = decide(series(4, slice_thickness=0.625), series(5, slice_thickness=8.0))
    assert result[5][0] is SELECTED and result[4][0] is REJECTED


def test_bone_kernel_is_a_fallback_by_default_and_can_be_refused(tmp_path):
    result = decide(series(3, convolution_kernel="BONE"))
    assert result[3][0] is SELECTED and "only bone-kernel" in result[3][1]
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    data["kernel"]["bone_policy"] = "reject"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    result = decide(series(3, convolution_kernel="BONE"), rules=load_rules(path))
    assert result[3] == (REJECTED, "bone kernel BONE")


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("H30s", KernelClass.soft), ("H31s", KernelClass.soft), ("J40s", KernelClass.soft),
        ("Hr38\\3", KernelClass.soft), ("Br40", KernelClass.soft), ("FC21", KernelClass.soft),
        ("FC26", KernelClass.soft), ("STANDARD", KernelClass.soft), ("SOFT", KernelClass.soft),
        ("UB", KernelClass.soft), ("B", KernelClass.soft),
        ("H70h", KernelClass.bone), ("Hr64", KernelClass.bone), ("J70h", KernelClass.bone),
        ("FC30", KernelClass.bone), ("FC35", KernelClass.bone), ("BONE", KernelClass.bone),
        ("BONEPLUS", KernelClass.bone), ("LUNG", KernelClass.bone), ("D", KernelClass.bone),
        ("XYZ", KernelClass.unknown), (None, KernelClass.unknown),
    ],
)
def test_kernel_names_of_the_main_vendors(kernel, expected):
    assert classify_kernel(series(convolution_kernel=kernel, description="HEAD"),
                           load_rules())[0] is expected


def test_window_width_and_description_decide_when_the_kernel_is_unknown():
    rules = load_rules()
    assert classify_kernel(series(convolution_kernel="XYZ", window_width=80), rules)[0] is KernelClass.soft
    assert classify_kernel(series(convolution_kernel="XYZ", window_width=2500), rules)[0] is KernelClass.bone
    assert classify_kernel(series(convolution_kernel=None, description="Head Bone"), rules)[0] is KernelClass.bone
    result = decide(series(2, convolution_kernel="XYZ", window_width=2500),
                    series(3, convolution_kernel="XYZ", window_width=100))
    assert result[3][0] is SELECTED and "brain window width 100" in result[3][1]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"modality": "MR"}, "modality MR"),
        ({"image_type": "DERIVED\\SECONDARY\\AXIAL"}, "DERIVED"),
        ({"image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"}, "LOCALIZER"),
        ({"image_type": "ORIGINAL\\PRIMARY\\REFORMATTED"}, "REFORMATTED"),
        ({"image_type": "ORIGINAL\\PRIMARY\\OTHER"}, "not AXIAL"),
        ({"image_type": "SECONDARY\\PRIMARY\\AXIAL"}, "SECONDARY"),
        ({"image_type": None}, "no ImageType, and no ImageOrientationPatient"),
        ({"contrast_agent": "Omnipaque 350"}, "contrast agent present"),
        ({"description": "CTA HEAD"}, "contrast in description"),
        ({"description": "HEAD POST CONTRAST"}, "contrast in description"),
        ({"body_part": "CHEST", "description": "Thorax"}, "body part CHEST is not a head"),
        ({"body_part": None, "description": "Abdomen", "protocol_name": None},
         "not identified as a head"),
        ({"description": "Patient Protocol"}, "non-diagnostic"),
        ({"description": "HEAD COR MPR"}, "non-diagnostic"),
        ({"instance_count": 3}, "3 instances, fewer than 10"),
        ({"slice_thickness": 15.0}, "outside 0.5-10 mm"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, "not a CT image storage class"),
    ],
)
def test_hard_filters_reject_with_a_reason(overrides, reason):
    result = decide(series(2, **overrides), study=Study(study_uid="1.2.9"))
    assert result[2][0] is REJECTED
    assert reason in result[2][1]


@pytest.mark.parametrize(
    "description",
    ["HEAD W/O CONTRAST", "CT Head without contrast", "Brain non-contrast", "NCCT HEAD",
     "HEAD WO CONTRAST 5mm", "Kopf nativ", "Head No IV Contrast"],
)
def test_negated_contrast_in_descriptions_is_not_contrast(description):
    assert decide(series(2, description=description))[2][0] is SELECTED


def test_head_recognised_from_description_protocol_or_study_without_body_part():
    assert decide(series(2, body_part=None, description="Brain 5mm"))[2][0] is SELECTED
    assert decide(series(2, body_part=None, description="Axial 5mm",
                         protocol_name="Stroke protocol"))[2][0] is SELECTED
    anonymous = Study(study_uid="1.2.4", study_description="CT CRANIUM")
    assert decide(series(2, body_part=None, description="Axial", protocol_name=None),
                  study=anonymous)[2][0] is SELECTED


def test_unknown_anatomy_is_refused_unless_the_rules_accept_it(tmp_path):
    bare = Study(study_uid="1.2.5", study_description=None)
    item = series(2, body_part=None, description=None, protocol_name=None)
    assert decide(item, study=bare)[2][0] is REJECTED
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    data["anatomy"]["accept_unknown"] = True
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    assert decide(item, study=bare, rules=load_rules(path))[2][0] is SELECTED


def test_preferred_thickness_wins_over_more_slices_and_ties_break_stably():
    result = decide(series(2, slice_thickness=2.5, instance_count=60),
                    series(3, slice_thickness=5.0, instance_count=30),
                    series(4, slice_thickness=7.0, instance_count=20))
    assert [n for n, (d, _) in result.items() if d is SELECTED] == [2]
    assert result[4][0] is REJECTED


def test_no_candidate_means_nothing_selected():
    result = decide(series(1, modality="SR"), series(2, body_part="CHEST"))
    assert all(d is REJECTED for d, _ in result.values())


def test_rules_file_errors_name_the_key(tmp_path):
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    del data["kernel"]["soft"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RulesError, match="kernel.soft"):
        load_rules(path)
    path.write_text("kernel: [unclosed")
    with pytest.raises(RulesError, match="not valid YAML"):
        load_rules(path)
    with pytest.raises(RulesError, match="No such file"):
        load_rules(tmp_path / "missing.yaml")


def test_rules_are_reread_when_the_file_changes(tmp_path):
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_rules(path).min_instances == 10
    data["min_instances"] = 40
    path.write_text(yaml.safe_dump(data))
    import os
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    assert load_rules(path).min_instances == 40


def test_shipped_rules_file_is_valid():
    rules = load_rules()
    assert Path(rules.source) == DEFAULT_RULES_PATH.resolve()
    assert rules.thickness_preferred == (2.5, 5.0)


# -- without ImageType: geometry decides ------------------------------------------------

AXIAL = "1\\0\\0\\0\\1\\0"
SAGITTAL = "0\\1\\0\\0\\0\\-1"
CORONAL = "1\\0\\0\\0\\0\\-1"
BARE_STUDY = Study(study_uid="1.2.6", study_description=None)


def tilted(degrees: float) -> str:
    """Axial orientation with the gantry tilted about the patient's left-right axis."""
    t = math.radians(degrees)
    return "\\".join(f"{v:.6f}" for v in (1, 0, 0, 0, math.cos(t), -math.sin(t)))


def deidentified(number: int = 2, **overrides) -> Series:
    """A series as an RSNA-challenge export has it: no ImageType, names, kernel or thickness."""
    values = dict(
        image_type=None, body_part=None, description=None, protocol_name=None,
        convolution_kernel=None, slice_thickness=None, window_width=80.0,
        image_orientation=AXIAL, rows=512, columns=512,
        pixel_spacing_row=0.488281, pixel_spacing_column=0.488281,
        slice_spacing=5.0, slice_spacing_deviation=0.02,
    )
    values.update(overrides)
    return series(number, **values)


def test_series_without_image_type_is_selected_by_its_geometry_and_the_reason_says_so():
    verdict, why = decide(deidentified(), study=BARE_STUDY)[2]
    assert verdict is SELECTED
    assert why.startswith("no ImageType: axial by orientation, 5.0 mm spacing, 250 mm field of view; ")
    assert "brain window width 80" in why


def test_gantry_tilt_is_still_axial():
    verdict, why = decide(deidentified(image_orientation=tilted(20)), study=BARE_STUDY)[2]
    assert verdict is SELECTED and "axial by orientation (tilted 20°)" in why
    verdict, why = decide(deidentified(image_orientation=tilted(45)), study=BARE_STUDY)[2]
    assert verdict is REJECTED and "oblique by orientation (45° from axial, at most 30°)" in why


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"image_orientation": SAGITTAL}, "no ImageType, and sagittal by orientation (90° from axial"),
        ({"image_orientation": CORONAL}, "no ImageType, and coronal by orientation (90° from axial"),
        ({"image_orientation": "1\\0\\0\\1\\0\\0"}, "no ImageOrientationPatient to tell the plane"),
        ({"image_orientation": None}, "no ImageOrientationPatient"),
        ({"slice_spacing_deviation": 2.5}, "slice spacing inconsistent (a gap departs 2.5 mm from the median 5.0 mm)"),
        ({"slice_spacing": 0.0, "slice_spacing_deviation": 0.0}, "slice spacing inconsistent"),
        ({"slice_spacing": None, "slice_spacing_deviation": None}, "no slice spacing"),
        ({"pixel_spacing_row": 0.2, "pixel_spacing_column": 0.2}, "a 102 mm field of view is not head-sized (150-320 mm)"),
        ({"pixel_spacing_row": 0.9, "pixel_spacing_column": 0.9}, "a 461 mm field of view is not head-sized"),
        ({"rows": 512, "columns": 1024}, "a 250 x 500 mm field of view is not head-sized"),
        ({"pixel_spacing_row": None, "pixel_spacing_column": None}, "no Rows, Columns and PixelSpacing"),
    ],
)
def test_series_without_image_type_that_is_not_an_axial_head_stack_is_rejected(overrides, reason):
    verdict, why = decide(deidentified(**overrides), study=BARE_STUDY)[2]
    assert verdict is REJECTED
    assert reason in why


def test_geometry_does_not_override_the_other_filters():
    assert "body part CHEST" in decide(deidentified(body_part="CHEST"), study=BARE_STUDY)[2][1]
    assert "3 instances" in decide(deidentified(instance_count=3), study=BARE_STUDY)[2][1]
    assert "contrast" in decide(deidentified(description="CTA HEAD"), study=BARE_STUDY)[2][1]
    # With ImageType present, ImageType decides and the geometry is not consulted.
    verdict, why = decide(deidentified(image_type="ORIGINAL\\PRIMARY\\AXIAL", body_part="HEAD",
                                       image_orientation=SAGITTAL))[2]
    assert verdict is SELECTED and "ImageType" not in why


def test_a_head_sized_field_of_view_stands_for_anatomy_only_when_the_rules_say_so(tmp_path):
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    data["geometry"]["identifies_head"] = False
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    verdict, why = decide(deidentified(), study=BARE_STUDY, rules=load_rules(path))[2]
    assert verdict is REJECTED and "not identified as a head" in why
    # Named anatomy still counts without ImageType.
    assert decide(deidentified(), study=STUDY, rules=load_rules(path))[2][0] is SELECTED


def test_geometry_rules_are_optional_and_checked(tmp_path):
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    del data["geometry"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_rules(path).field_of_view_mm == (150.0, 320.0)
    data["geometry"] = {"field_of_view_mm": [300, 100]}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RulesError, match="geometry.field_of_view_mm"):
        load_rules(path)


def test_slice_spacing_from_positions():
    assert geometry.slice_spacing([10.0, 0.0, 5.0, 15.0]) == (5.0, 0.0)
    median, deviation = geometry.slice_spacing([0.0, 5.0, 10.0, 20.0, 25.0])
    assert median == 5.0 and deviation == 5.0  # a missing slice
    assert geometry.slice_spacing([0.0, 5.0, None]) == (None, None)
    assert geometry.slice_spacing([0.0]) == (None, None)


def test_plane_of_an_orientation():
    assert geometry.plane(geometry.orientation(AXIAL)).name == "axial"
    assert geometry.plane(geometry.orientation(SAGITTAL)).name == "sagittal"
    assert geometry.plane(geometry.orientation(CORONAL)).name == "coronal"
    assert round(geometry.plane(geometry.orientation(tilted(15))).from_axial) == 15
    assert geometry.orientation("1\\0\\0") is None and geometry.orientation("a\\b") is None


# -- DERIVED only by lossy compression ----------------------------------------------------


def lossy(number: int = 2, **overrides) -> Series:
    """What DCMTK's dcmcjpls +en writes: DERIVED, DCM 113040 "Lossy Compression"."""
    values = dict(image_type="DERIVED\\PRIMARY\\AXIAL", derivation_codes="DCM:113040",
                  lossy_compression="ISO_14495_1")
    values.update(overrides)
    return series(number, **values)


def test_a_lossy_compressed_original_is_selected_and_the_reason_names_the_compression():
    verdict, why = decide(lossy())[2]
    assert verdict is SELECTED
    assert why.startswith("original before lossy compression (ISO_14495_1); soft-tissue kernel H30s")


@pytest.mark.parametrize(
    "overrides",
    [
        {"derivation_codes": "DCM:113040\\DCM:113076"},  # also segmented
        {"derivation_codes": None},  # derived, nobody says how
        {"lossy_compression": None},
        {"image_type": "DERIVED\\SECONDARY\\AXIAL"},
        {"image_type": "DERIVED\\PRIMARY\\AXIAL\\MPR"},
    ],
)
def test_other_derived_images_stay_rejected(overrides):
    verdict, why = decide(lossy(**overrides))[2]
    assert verdict is REJECTED and "image type" in why


def test_lossy_compressed_originals_can_be_refused_by_the_rules(tmp_path):
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    data["image_type"]["lossy_compressed_original"] = False
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    verdict, why = decide(lossy(), rules=load_rules(path))[2]
    assert verdict is REJECTED and "DERIVED" in why
