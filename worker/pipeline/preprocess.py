"""One preprocessing path for training and serving: DICOM series -> HU volume -> CNN inputs.

The same functions build the cached training arrays (``worker.model.data``) and the
inputs the worker sends to the inference backend, so there is no train/serve skew.

References
----------
- PS3.3 C.7.6.2 Image Plane Module: ImagePositionPatient (0020,0032), ImageOrientationPatient
  (0020,0037), PixelSpacing (0028,0030). The slice normal is the cross product of the row
  and column direction cosines; slices are ordered by the projection of their position on it.
- PS3.3 C.11.1 Modality LUT Module: RescaleSlope (0028,1053), RescaleIntercept (0028,1052).
- PS3.10 7.1: the File Meta Information carries MediaStorageSOPClassUID /
  MediaStorageSOPInstanceUID, used when de-identified datasets lack SOPClassUID.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeGuard

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset

from triage_node.logs import get_logger
from worker.pipeline.input_frame import HEAD_WINDOW, SEARCH_STEP, InputFrame, find_head_frame, plan_inputs

log = get_logger(__name__)

#: Named windows as (center, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    # the brain window of the CT-ICH images (Hssayeni et al. 2020), which the shipped
    # weights were trained on; its -20..100 HU range holds fresh blood (50-90 HU)
    "brain_wide": (40.0, 120.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
    "soft_tissue": (40.0, 380.0),
}
#: Windows of the "windows" variant, in channel order.
DEFAULT_WINDOWS: tuple[str, str, str] = ("brain", "subdural", "bone")
Variant = Literal["windows", "adjacent", "mixed"]
VARIANTS: tuple[str, ...] = ("windows", "adjacent", "mixed")
Crop = Literal["centred", "head"]
CROPS: tuple[str, ...] = ("centred", "head")


def is_crop(value: str) -> TypeGuard[Crop]:
    """True when ``value`` names a :data:`Crop` (a command-line or config value)."""
    return value in CROPS


_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData


class SeriesError(ValueError):
    """A series cannot be turned into a volume (no images, mixed geometry, ...)."""


@dataclass(frozen=True)
class Volume:
    """A CT series as a HU volume sorted along the slice normal.

    Attributes
    ----------
    hu : ndarray, float32 [Z, H, W]
        Hounsfield units after the Modality LUT (and the RSNA fix where it applies).
    sop_uids : tuple of str
        SOPInstanceUID of each slice, in volume order.
    positions : ndarray, float64 [Z, 3]
        ImagePositionPatient of each slice, in volume order.
    normal : ndarray, float64 [3]
        Unit slice normal (row cosine x column cosine).
    spacing : tuple of float
        (slice spacing from positions, row spacing, column spacing) in mm.
    missing_slices : int
        Number of slices missing from gaps along the normal (gap > 1.5 x median spacing).
    datasets : tuple of Dataset
        Source headers in volume order, pixel data removed (for SR / overlay writers).
    """

    hu: np.ndarray
    sop_uids: tuple[str, ...]
    positions: np.ndarray
    normal: np.ndarray
    spacing: tuple[float, float, float]
    missing_slices: int = 0
    datasets: tuple[Dataset, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise SeriesError(f"hu must be [Z,H,W], got shape {self.hu.shape}")
        if len(self.sop_uids) != self.hu.shape[0] or len(self.positions) != self.hu.shape[0]:
            raise SeriesError("sop_uids and positions must have one entry per slice")

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU to 0..1 through a linear window (PS3.3 C.11.2.1.2, without the 0.5 offsets).

    Parameters
    ----------
    hu : ndarray
        Values in HU.
    center, width : float
        WindowCenter and WindowWidth in HU.

    Returns
    -------
    ndarray, float32
        ``clip((hu - (center - width/2)) / width, 0, 1)``.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    low = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _header_only(ds: Dataset) -> Dataset:
    """Copy of ``ds`` without pixel data; SOPClassUID/SOPInstanceUID filled from file meta."""
    hdr = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            hdr.add(elem)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        hdr.file_meta = FileMetaDataset(meta)
        if "SOPClassUID" not in hdr and "MediaStorageSOPClassUID" in meta:
            hdr.SOPClassUID = meta.MediaStorageSOPClassUID
        if "SOPInstanceUID" not in hdr and "MediaStorageSOPInstanceUID" in meta:
            hdr.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return hdr


def needs_rsna_fix(ds: Dataset) -> bool:
    """True for the RSNA 2019 files whose stored values are offset (BitsStored 12, unsigned, intercept > -100)."""
    return (
        int(getattr(ds, "BitsStored", 16)) == 12
        and int(getattr(ds, "PixelRepresentation", 0)) == 0
        and float(getattr(ds, "RescaleIntercept", 0.0)) > -100
    )


def to_hu(ds: Dataset) -> np.ndarray:
    """Pixel data of one slice in HU (Modality LUT, PS3.3 C.11.1), with the RSNA fix.

    The RSNA fix: for BitsStored 12, PixelRepresentation 0 and RescaleIntercept > -100,
    stored values are shifted by +1000, values >= 4096 wrap by -4096, and the intercept
    becomes -1000.
    """
    px = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if needs_rsna_fix(ds):
        px = px + 1000.0
        px[px >= 4096.0] -= 4096.0
        intercept = -1000.0
    return px * np.float32(slope) + np.float32(intercept)


def _read(item: str | os.PathLike | Dataset) -> Dataset:
    if isinstance(item, Dataset):
        return item
    return pydicom.dcmread(item, force=True)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of ImageOrientationPatient (row cosines x column cosines)."""
    iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
    if iop.shape != (6,):
        raise SeriesError(f"ImageOrientationPatient must have 6 values, got {iop.shape}")
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise SeriesError("degenerate ImageOrientationPatient")
    return n / norm


def load_series(items: Iterable[str | os.PathLike | Dataset]) -> Volume:
    """Read the images of one series into a :class:`Volume`.

    Parameters
    ----------
    items : iterable of path or Dataset
        The series' instances, in any order. Compressed transfer syntaxes decode through
        pydicom's pixel handlers (pylibjpeg for JPEG Lossless / JPEG 2000 / RLE).

    Returns
    -------
    Volume
        Slices sorted along the slice normal by ``dot(ImagePositionPatient, normal)``
        (PS3.3 C.7.6.2.1.1); duplicates positions keep file order.

    Raises
    ------
    SeriesError
        When no image remains or the slices disagree on Rows/Columns.
    """
    datasets = [_read(i) for i in items]
    datasets = [ds for ds in datasets if "PixelData" in ds]
    if not datasets:
        raise SeriesError("series holds no image")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise SeriesError(f"slices disagree on Rows/Columns: {sorted(shapes)}")
    first = datasets[0]
    normal = slice_normal(getattr(first, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]))
    positions = np.asarray(
        [[float(v) for v in getattr(ds, "ImagePositionPatient", [0.0, 0.0, float(i)])] for i, ds in enumerate(datasets)],
        dtype=np.float64,
    )
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    dist = dist[order]

    hu = np.stack([to_hu(ds) for ds in datasets]).astype(np.float32, copy=False)
    gaps = np.diff(dist)
    gaps = gaps[gaps > 1e-3]
    if gaps.size:
        step = float(np.median(gaps))
        missing = int(np.sum(np.maximum(np.round(gaps / step) - 1, 0)))
    else:
        step = float(getattr(first, "SliceThickness", 0.0) or 0.0)
        missing = 0
    ps = [float(v) for v in getattr(first, "PixelSpacing", [1.0, 1.0])]
    headers = tuple(_header_only(ds) for ds in datasets)
    sop_uids = tuple(str(h.get("SOPInstanceUID", "")) for h in headers)
    if missing:
        log.info("series_gap", missing_slices=missing, n_slices=len(datasets), spacing_mm=round(step, 3))
    return Volume(
        hu=hu,
        sop_uids=sop_uids,
        positions=positions,
        normal=normal,
        spacing=(step, ps[0], ps[1]),
        missing_slices=missing,
        datasets=headers,
    )


def channel_plan(variant: str, windows: Sequence[str] = DEFAULT_WINDOWS) -> list[tuple[int, str]]:
    """(slice offset, window name) for each of the three channels of a variant.

    ``windows``: one slice in three windows; ``adjacent``: slices s-1, s, s+1 in the first
    window of ``windows`` (the brain window by default); ``mixed``: s-1 brain, s subdural, s+1 bone.
    """
    if variant == "windows":
        return [(0, w) for w in windows]
    if variant == "adjacent":  # in the first window named (the brain window by default)
        w = windows[0] if windows else "brain"
        return [(-1, w), (0, w), (1, w)]
    if variant == "mixed":
        return [(-1, "brain"), (0, "subdural"), (1, "bone")]
    raise ValueError(f"unknown input variant {variant!r}; expected one of {VARIANTS}")


def make_inputs(
    volume: Volume | np.ndarray,
    variant: Variant = "windows",
    size: int = 256,
    windows: Sequence[str] = DEFAULT_WINDOWS,
) -> np.ndarray:
    """CNN inputs for every slice of a volume.

    Parameters
    ----------
    volume : Volume or ndarray [Z,H,W]
        HU volume, sorted along the normal.
    variant : {"windows", "adjacent", "mixed"}
        Channel layout (see :func:`channel_plan`); neighbours at the ends repeat the edge slice.
    size : int
        Output side; non-square slices are padded with air to a centred square, then
        resized bilinearly (windowing happens before resizing).

    Returns
    -------
    ndarray, float32 [Z, 3, size, size] in 0..1
    """
    hu = volume.hu if isinstance(volume, Volume) else np.asarray(volume, dtype=np.float32)
    inputs, _ = series_inputs(hu, channel_plan(variant, windows), WINDOWS, size, "centred")
    return inputs


def series_frame(hu: np.ndarray, crop: Crop) -> InputFrame:
    """The input frame of a HU volume [Z, H, W] (see :mod:`worker.pipeline.input_frame`)."""
    if crop == "centred":
        return InputFrame.centred(*hu.shape[1:])
    if crop != "head":
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
    small = window(hu[:, ::SEARCH_STEP, ::SEARCH_STEP], *HEAD_WINDOW)
    return find_head_frame(small, *hu.shape[1:])


def series_inputs(
    volume: Volume | np.ndarray,
    plan: Sequence[tuple[int, str]],
    windows: dict[str, tuple[float, float]],
    size: int,
    crop: Crop = "centred",
) -> tuple[np.ndarray, InputFrame]:
    """CNN inputs [Z, 3, size, size] of a HU volume for an explicit channel plan, and their frame.

    ``windows`` maps each window name of ``plan`` to (center, width) in HU (a model card's
    ``windows``); ``crop`` chooses the framing (the card's ``crop``).
    """
    hu = volume.hu if isinstance(volume, Volume) else np.asarray(volume, dtype=np.float32)
    frame = series_frame(hu, crop)
    inputs = plan_inputs(lambda i, name: window(hu[i], *windows[name]), hu.shape[0], plan, size, frame)
    return inputs, frame


def series_paths(directory: str | os.PathLike) -> list[Path]:
    """All files below ``directory`` (recursively), sorted, for :func:`load_series`."""
    return sorted(p for p in Path(directory).rglob("*") if p.is_file())
