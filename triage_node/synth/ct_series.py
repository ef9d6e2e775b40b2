"""Plain CT slices for exercising the node: the benchmarks' phantom and the tests' factories.

Unlike :mod:`triage_node.synth.study` (anatomy, lesions, scanner header profiles), these
slices carry what a receiver, a router and the series selection look at.
`ct_slice_dataset` builds the part every CT slice shares (SOP Common, the UIDs, Image
Plane and Image Pixel modules, CT Image Storage in Explicit VR Little Endian; PS3.3 A.3,
C.7.6.2, C.7.6.3, C.8.2.1); each caller adds its own patient, study and series
attributes. `write_ct_slices` writes the benchmarks' series: a water cylinder in a skull
ring, 16-bit signed, intercept -1024.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["ct_slice_dataset", "write_ct_slices"]


def ct_slice_dataset(
    pixels: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    instance_number: int,
    position: Sequence[float],
    sop_uid: str | None = None,
    frame_uid: str | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (0.5, 0.5),
    slice_thickness: float | None = 5.0,
    bits_stored: int = 16,
    intercept: float | str = -1024,
    slope: float | str = 1,
) -> Dataset:
    """One axial CT slice (CT Image Storage) with its file meta, Explicit VR Little Endian.

    Parameters
    ----------
    pixels : ndarray (rows, columns)
        Stored values, ``int16`` (PixelRepresentation 1) or ``uint16`` (0).
    position, orientation, pixel_spacing : sequence of float
        ImagePositionPatient, ImageOrientationPatient, PixelSpacing (PS3.3 C.7.6.2),
        written as given.
    frame_uid : str, optional
        FrameOfReferenceUID; left out when None.
    slice_thickness : float, optional
        SliceThickness; left out when None.
    bits_stored : int
        BitsStored; HighBit is one less (C.7.6.3).
    intercept, slope :
        RescaleIntercept and RescaleSlope (C.8.2.1).
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.int16, np.uint16):
        raise ValueError(f"pixels: a 2-D int16 or uint16 array, not {pixels.dtype} {pixels.shape}")
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if frame_uid is not None:
        ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(pixel_spacing)
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_ct_slices(folder: Path, n: int, size: int = 512, seed: int = 0) -> list[Path]:
    """Write ``n`` axial CT slices (one new study and series) as Explicit VR LE files.

    A water cylinder with a skull ring and noise, 16-bit signed, intercept -1024:
    the size and encoding of a real head CT slice (about 0.5 MB at 512x512).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    base = np.where(r < 0.8, 1064, 24).astype(np.int16)
    base[(r >= 0.8) & (r < 0.88)] = 2024
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        pixels = (base + rng.normal(0, 8, base.shape)).astype(np.int16)
        ds = ct_slice_dataset(
            pixels, study_uid=study, series_uid=series, frame_uid=frame, instance_number=i + 1,
            position=[-125.0, -125.0, 5.0 * i], pixel_spacing=[250 / size, 250 / size],
        )
        ds.BodyPartExamined = "HEAD"  # so the node's series selection takes it for triage
        ds.PatientName = "Bench^Phantom"
        ds.PatientID = "BENCH0001"
        ds.StudyDate = "20260101"
        ds.SeriesNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
