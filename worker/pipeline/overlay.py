"""Overlay series: key slices with the CAM heat map, as Secondary Capture images.

Each overlay is the source slice in the brain window (centre 40 HU, width 80 HU) with the
class-activation heat map blended in a colour map, the class and probabilities burned in,
and "NOT FOR DIAGNOSTIC USE" (plus "synthetic weights - pipeline verification" when the
model card says the weights come from synthetic phantoms). They are written as highdicom
``SCImage`` objects (Secondary Capture Image Storage, PS3.3 A.8.1) in a new series of the
source study, with Burned In Annotation YES (C.7.6.1.1.1 via the SC Image module),
Image Type DERIVED\\SECONDARY, a Derivation Description and a Source Image Sequence that
points at the CT slice (PS3.3 C.7.6.1, purpose DCM 121322 "Source image for image
processing operation", CID 7202).

Key slices (:func:`select_key_slices`): the top-k slices by per-slice probability for each
class found positive at the operating point (``any`` included), k =
``settings.key_slices_per_class``; a negative study gets one image, the slice with the
highest ``any`` probability.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from triage_node import CLASSES
from triage_node.logs import get_logger
from worker.pipeline.input_frame import InputFrame
from worker.pipeline.sr import (
    MANUFACTURER,
    OVERLAY_SERIES_NUMBER,
    CardLike,
    contributing_equipment,
    reference_header,
    trained_on_synthetic,
)
from worker.pipeline.sr_codes import overlay_comment

log = get_logger(__name__)

BRAIN_WINDOW = (40.0, 80.0)
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SYNTHETIC_NOTICE = "synthetic weights - pipeline verification"
#: Overlays are rendered at least this many pixels wide so that the burned-in text is legible.
MIN_RENDER_SIZE = 512
COLORMAP = "turbo"
COLOR_LOW = 0.4  # the floor maps to this point of the colour map (green), 1 to red
HEAT_FLOOR = 0.3  # heat below this leaves the CT gray
HEAT_ALPHA = 0.55  # opacity of the colour at heat 1
BODY_HU = -300.0  # no colour over air outside the head
SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")


class OverlayPrediction(Protocol):
    slice_probs: np.ndarray  # [N, 6]
    study_probs: np.ndarray  # [6]
    thresholds: np.ndarray  # [6]
    decision: Mapping[str, bool]


def select_key_slices(
    slice_probs: np.ndarray, decision: Mapping[str, bool], k: int
) -> dict[str, list[int]]:
    """Key slice indexes per class, highest per-slice probability first.

    Parameters
    ----------
    slice_probs : ndarray [N, 6]
        Per-slice probabilities in CLASSES order.
    decision : mapping
        Study decision per class at the operating point.
    k : int
        Slices per positive class (``settings.key_slices_per_class``).

    Returns
    -------
    dict
        ``{class: [slice index, ...]}`` for every positive class; for a negative study
        ``{"any": [argmax of any]}``.
    """
    probs = np.asarray(slice_probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(CLASSES) or probs.shape[0] == 0:
        raise ValueError(f"slice_probs must be [N>0, {len(CLASSES)}], got {probs.shape}")
    if k < 1:
        raise ValueError("k must be >= 1")
    out: dict[str, list[int]] = {}
    for c, name in enumerate(CLASSES):
        if decision.get(name):
            order = np.argsort(-probs[:, c], kind="stable")
            out[name] = [int(i) for i in order[: min(k, len(order))]]
    if not out:
        out["any"] = [int(np.argmax(probs[:, 0]))]
    return out


def overlay_keys(key_slices: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    """(class, slice index) of each overlay image, in the order they are written."""
    return [(name, int(i)) for name in CLASSES for i in key_slices.get(name, ())]


def compute_heatmaps(
    features: np.ndarray,
    head_weight: np.ndarray,
    key_slices: Mapping[str, Sequence[int]],
    frame: InputFrame,
    hu: np.ndarray,
) -> dict[tuple[str, int], np.ndarray]:
    """CAM heat map [H, W] (0..1, on the slice grid) for each overlay, from the CNN feature maps.

    ``features`` [N, C, h, w] and ``head_weight`` [6, C] come from the prediction and the
    model card (``card.head_weights()[0]``); each map is computed in the model's input
    ``frame``, placed back on the grid of the volume ``hu`` [N, H, W] and kept only where
    blood can be (:func:`worker.pipeline.explain.blood_region`), as ``triage-node explain``
    shows it.
    """
    from worker.pipeline.explain import blood_region, slice_heatmaps
    from worker.pipeline.input_frame import HEAD_WINDOW
    from worker.pipeline.preprocess import window

    shape = hu.shape[1:]
    return {
        (name, i): slice_heatmaps(features[i], head_weight, frame, shape, (name,),
                                  where=blood_region(window(hu[i], *HEAD_WINDOW)))[name]
        for name, i in overlay_keys(key_slices)
    }


def brain_window(hu: np.ndarray) -> np.ndarray:
    """HU -> 0..1 in the brain window."""
    center, width = BRAIN_WINDOW
    lo = center - width / 2
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / width, 0.0, 1.0)


def heat_to_image_frame(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Map a heat map to the image frame [H, W].

    A square map of another size is taken to be in the model input frame (the image padded
    to a centred square, as ``InputFrame.centred`` frames it, then resized): it is resized to the
    square side and the padding is cropped. A map already [H, W] is returned as is.
    """
    h, w = shape
    m = np.asarray(heat, dtype=np.float32)
    if m.shape == (h, w):
        return np.clip(m, 0.0, 1.0)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"heat map must be [H,W]={shape} or square, got {m.shape}")
    s = max(h, w)
    big = np.asarray(Image.fromarray(m, mode="F").resize((s, s), Image.Resampling.BILINEAR))
    y, x = (s - h) // 2, (s - w) // 2
    return np.clip(big[y : y + h, x : x + w], 0.0, 1.0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def render_overlay(
    hu: np.ndarray,
    heat: np.ndarray | None,
    lines_top: Sequence[str],
    lines_bottom: Sequence[str],
) -> np.ndarray:
    """RGB uint8 [H', W', 3]: brain window + colour-mapped heat + burned-in text.

    The image is upscaled (bilinear) to at least ``MIN_RENDER_SIZE`` pixels wide so that
    text stays legible; the scale factor is an integer.
    """
    gray = brain_window(hu)
    h, w = gray.shape
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if heat is not None:
        # Only inside the head, and only where the map is above the floor: the colour and
        # its opacity ramp up from the floor, so weak activation leaves the CT readable.
        m = heat_to_image_frame(heat, (h, w)) * (np.asarray(hu) > BODY_HU)
        t = np.clip((m - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)
        colors = matplotlib.colormaps[COLORMAP](COLOR_LOW + (1.0 - COLOR_LOW) * t)[..., :3]
        alpha = (HEAT_ALPHA * t)[..., None]
        rgb = (1.0 - alpha) * rgb + alpha * colors.astype(np.float32)
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8), mode="RGB")
    scale = render_scale((h, w))
    if scale > 1:
        img = img.resize((w * scale, h * scale), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    size = max(12, img.width // 32)
    font = _font(size)
    pad = size // 2
    y = pad
    for text in lines_top:
        draw.text((pad, y), text, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        y += int(size * 1.3)
    y = img.height - pad - int(size * 1.3) * len(lines_bottom)
    for text in lines_bottom:
        draw.text((pad, y), text, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        y += int(size * 1.3)
    return np.asarray(img, dtype=np.uint8)


def render_scale(shape: tuple[int, int]) -> int:
    return max(1, math.ceil(MIN_RENDER_SIZE / max(shape)))


_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z in the patient coordinate system


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (0020,0020) from Image Orientation (Patient) (PS3.3 C.7.6.1.1.1).

    Each direction (along a row, down a column) is written with up to three letters, the
    largest component first (components below 0.25 ignored).
    """
    iop = [float(v) for v in ds.get("ImageOrientationPatient", (1, 0, 0, 0, 1, 0))]

    def letters(vec: Sequence[float]) -> str:
        order = sorted(range(3), key=lambda a: -abs(vec[a]))
        text = "".join(_LETTERS[a][0 if vec[a] > 0 else 1] for a in order if abs(vec[a]) >= 0.25)
        return text or "L"

    return letters(iop[:3]), letters(iop[3:])


def build_overlays(
    source_datasets: Sequence[Dataset],
    hu: np.ndarray,
    prediction: OverlayPrediction,
    card: CardLike,
    key_slices: Mapping[str, Sequence[int]],
    heatmaps: Mapping[tuple[str, int], np.ndarray],
    *,
    series_instance_uid: str | None = None,
    sop_instance_uids: Sequence[str] | None = None,
    series_number: int = OVERLAY_SERIES_NUMBER,
) -> list[hd.sc.SCImage]:
    """Secondary Capture overlays of the key slices.

    Parameters
    ----------
    source_datasets : sequence of Dataset
        Headers of the series in volume order (``Volume.datasets``).
    hu : ndarray [N, H, W]
        The HU volume in the same order (``Volume.hu``).
    prediction : StudyPrediction
        ``slice_probs`` [N, 6], ``study_probs`` [6], ``thresholds`` [6], ``decision``.
    card : ModelCard
    key_slices : mapping
        From :func:`select_key_slices`.
    heatmaps : mapping
        ``{(class, slice index): heat [H, W] or [S, S] in 0..1}`` for each of
        :func:`overlay_keys`; a missing one renders the slice without colour.
    series_instance_uid, sop_instance_uids : optional
        UIDs to use (one SOP UID per overlay, in :func:`overlay_keys` order).

    Returns
    -------
    list of highdicom.sc.SCImage
        One per (class, key slice), in :func:`overlay_keys` order; ImageComments tells the
        SR writer which class each shows.
    """
    volume = np.asarray(hu)
    if volume.ndim != 3 or volume.shape[0] != len(source_datasets):
        raise ValueError(f"hu must be [N,H,W] with N={len(source_datasets)}, got {volume.shape}")
    keys = overlay_keys(key_slices)
    if sop_instance_uids is not None and len(sop_instance_uids) != len(keys):
        raise ValueError(f"need {len(keys)} SOP instance UIDs, got {len(sop_instance_uids)}")
    series_uid = series_instance_uid or hd.UID()
    synthetic = trained_on_synthetic(card)
    slice_probs = np.asarray(prediction.slice_probs, dtype=float)
    study_probs = np.asarray(prediction.study_probs, dtype=float)
    thresholds = np.asarray(prediction.thresholds, dtype=float)
    images: list[hd.sc.SCImage] = []
    for n, (name, i) in enumerate(keys):
        c = CLASSES.index(name)
        ref = reference_header(source_datasets[i])
        found = "POSITIVE" if prediction.decision[name] else "negative"
        top = [
            f"{name}: {found}  study p={study_probs[c]:.2f} (threshold {thresholds[c]:.2f})",
            f"slice {i + 1}/{len(source_datasets)}  slice p={slice_probs[i, c]:.2f}",
        ]
        bottom = [NOT_FOR_DIAGNOSTIC_USE]
        if synthetic:
            bottom.append(SYNTHETIC_NOTICE)
        heat = heatmaps.get((name, i))
        pixels = render_overlay(volume[i], heat, top, bottom)
        scale = render_scale(volume[i].shape)
        spacing = ref.get("PixelSpacing")
        pixel_spacing = (
            (float(spacing[0]) / scale, float(spacing[1]) / scale) if spacing is not None else None
        )
        row_dir, col_dir = patient_orientation(ref)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uids[n] if sop_instance_uids else hd.UID(),
            instance_number=n + 1,
            manufacturer=MANUFACTURER,
            # highdicom annotates this tuple[int, int]; it passes it on to SCImage, which takes floats (mm).
            pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
            # highdicom takes one letter per direction; oblique (tilted gantry) directions
            # need several (PS3.3 C.7.6.1.1.1), so the full values are set just below.
            patient_orientation=(row_dir[0], col_dir[0]),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[contributing_equipment(card)],
            series_description=_series_description(synthetic),
        )
        sc.PatientOrientation = [row_dir, col_dir]
        sc.DeviceUID = card.device_uid  # General Equipment (PS3.3 C.7.5.1)
        _derived_image_attributes(sc, ref, name, heat is not None)
        sc.ImageComments = overlay_comment(name, i, float(study_probs[c]))
        images.append(sc)
    log.info("overlays_built", series_uid=series_uid, count=len(images), classes=sorted(key_slices))
    return images


def _series_description(synthetic: bool) -> str:
    return "AI ICH heat maps - NOT FOR DIAGNOSTIC USE" + (" (synthetic)" if synthetic else "")


def _derived_image_attributes(sc: Dataset, ref: Dataset, class_name: str, has_heat: bool) -> None:
    """General Image module attributes of a derived, annotated image (PS3.3 C.7.6.1)."""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    # General Series (C.7.3.1): Laterality is 2C for paired body parts; the head is not one,
    # which dciodvfy can only tell from Body Part Examined.
    sc.BodyPartExamined = str(ref.get("BodyPartExamined") or "HEAD")[:16]
    what = "CAM heat map" if has_heat else "no heat map"
    sc.DerivationDescription = (
        f"Brain window (40/80 HU) of the source CT slice with AI {what} for {class_name}; "
        "class, probability and NOT FOR DIAGNOSTIC USE burned in"
    )[:1024]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
    sc.SourceImageSequence = [item]


def to_png(sc: Dataset, path: str) -> None:
    """Write an overlay's pixels as PNG (for the README, the demo and looking at it)."""
    Image.fromarray(np.asarray(sc.pixel_array, dtype=np.uint8), mode="RGB").save(path)
