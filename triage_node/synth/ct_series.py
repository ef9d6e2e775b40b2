"""Plain CT series for exercising the node: a water cylinder in a skull ring, nothing else.

Unlike :mod:`triage_node.synth.study` (anatomy, lesions, scanner header profiles), these
slices carry only what a receiver, a router and the series selection look at: one new
study and series per call, CT Image Storage in Explicit VR Little Endian, 16-bit signed
pixels with intercept -1024 (PS3.3 A.3, C.8.2.1). The benchmarks send them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["write_ct_slices"]


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
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.BodyPartExamined = "HEAD"  # so the node's series selection takes it for triage
        ds.PatientName = "Bench^Phantom"
        ds.PatientID = "BENCH0001"
        ds.StudyDate = "20260101"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-125.0, -125.0, 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [250 / size, 250 / size]
        ds.SliceThickness = 5.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
