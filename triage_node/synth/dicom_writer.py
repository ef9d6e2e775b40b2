"""Write synthetic series as DICOM files the way scanners do.

Two header profiles:

``scanner``
    A complete CT Image IOD (PS3.3 A.3): Patient, General Study, Patient Study,
    General Series, Frame of Reference, General Equipment, General Acquisition,
    General Image, Image Plane, Image Pixel, CT Image, VOI LUT and SOP Common
    modules with every type 1 and type 2 attribute; the dose summary is a
    Secondary Capture Image (PS3.3 A.8.1) with the SC Equipment module.
``rsna``
    The RSNA 2019 challenge's de-identified layout: no PatientName, no
    SliceThickness, WindowCenter/WindowWidth as multi-valued strings, SOPClassUID
    only in the file meta information, and on some files BitsStored 12 with
    PixelRepresentation 0 and RescaleIntercept -1024.

Transfer syntaxes (PS3.5 section 10 and annex A.4): Explicit and Implicit VR
Little Endian, JPEG Lossless SV1 (1.2.840.10008.1.2.4.70, our own encoder in
:mod:`triage_node.synth.jpeg_lossless`), JPEG 2000 lossless (pylibjpeg-openjpeg)
and RLE Lossless (pydicom/pylibjpeg-rle).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from triage_node.synth.jpeg_lossless import encode_jpeg_lossless

__all__ = [
    "MANUFACTURER",
    "TRANSFER_SYNTAXES",
    "PixelEncoding",
    "StudyHeader",
    "SeriesHeader",
    "ct_dataset",
    "sc_dataset",
    "save",
]

MANUFACTURER = "ICH Triage Synthetic Phantom"
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg2000-lossless": JPEG2000Lossless,
    "rle": RLELossless,
}


@dataclass(frozen=True)
class PixelEncoding:
    """How HU become stored values (PS3.3 C.7.6.3 and C.11.1.1.2).

    ``HU = stored * RescaleSlope + RescaleIntercept``; pixels outside the
    reconstruction circle hold ``padding`` (a stored value, written as
    PixelPaddingValue), or the stored value of -1024 HU when ``padding`` is None.
    """

    signed: bool
    bits_stored: int
    intercept: float
    padding: int | None

    def __post_init__(self) -> None:
        if self.bits_stored not in (12, 16):
            raise ValueError(f"bits_stored must be 12 or 16, got {self.bits_stored}")
        lo, hi = self.stored_range
        if not lo <= -1024 - self.intercept and 3071 - self.intercept <= hi:
            raise ValueError(f"HU -1024..3071 do not fit {self}")
        if self.padding is not None and not lo <= self.padding <= hi:
            raise ValueError(f"padding {self.padding} does not fit {self}")

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1

    @property
    def padding_hu(self) -> float:
        """HU value of the pixels outside the reconstruction circle."""
        return -1024.0 if self.padding is None else self.padding + self.intercept

    def to_stored(self, hu: np.ndarray, fov_mask: np.ndarray) -> np.ndarray:
        """Stored values for integer-valued HU; padding outside ``fov_mask``."""
        dtype = np.int16 if self.signed else np.uint16
        out = np.rint(hu - self.intercept).astype(np.int32)
        out[..., ~fov_mask] = -1024 - int(self.intercept) if self.padding is None else self.padding
        return out.astype(dtype)


@dataclass(frozen=True)
class StudyHeader:
    """Patient, study, equipment and frame-of-reference attributes of one study."""

    study_uid: str
    frame_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    institution: str
    station: str
    model: str
    profile: str = "scanner"


@dataclass(frozen=True)
class SeriesHeader:
    """Series-level attributes."""

    series_uid: str
    number: int
    description: str
    image_type: tuple[str, ...]
    kernel: str
    window: tuple[float, float]
    time: str
    slice_thickness: float | None = None
    tilt_deg: float = 0.0


def _file_meta(sop_class: str, sop_uid: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICHTRIAGE_SYN"
    return meta


def _common(study: StudyHeader, series: SeriesHeader, sop_class: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(series.image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = series.time
    ds.ContentTime = series.time
    ds.AccessionNumber = study.accession
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = study.station
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = study.model
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = study.age
    ds.BodyPartExamined = "HEAD"
    ds.SoftwareVersions = "synth-1"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    return ds


def _pixel_module(ds: Dataset, rows: int, cols: int, enc: PixelEncoding) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = enc.bits_stored
    ds.HighBit = enc.bits_stored - 1
    ds.PixelRepresentation = 1 if enc.signed else 0


def ct_dataset(
    study: StudyHeader,
    series: SeriesHeader,
    sop_uid: str,
    instance: int,
    stored: np.ndarray,
    enc: PixelEncoding,
    position: np.ndarray,
    orientation,
    pixel_spacing,
    slice_location: float,
    rng: np.random.Generator,
) -> Dataset:
    """A CT Image (PS3.3 A.3) dataset for one slice, in the study's header profile.

    Parameters
    ----------
    stored : ndarray (rows, cols)
        Stored pixel values (already encoded with ``enc``).
    position, orientation, pixel_spacing :
        ImagePositionPatient, ImageOrientationPatient, PixelSpacing (C.7.6.2).
    rng : numpy.random.Generator
        Chooses profile-level quirks (RSNA window formatting).
    """
    ds = _common(study, series, CTImageStorage, sop_uid)
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = series.time
    ds.ScanOptions = "AXIAL MODE" if series.tilt_deg else "HELICAL MODE"
    if series.slice_thickness is not None:
        ds.SliceThickness = _ds(series.slice_thickness)
    ds.KVP = 120
    ds.DataCollectionDiameter = 250
    ds.ReconstructionDiameter = _ds(pixel_spacing[0] * stored.shape[1])
    ds.DistanceSourceToDetector = 949.075
    ds.DistanceSourceToPatient = 541
    ds.GantryDetectorTilt = _ds(series.tilt_deg)
    ds.TableHeight = 160
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 250
    ds.ExposureTime = 1000
    ds.Exposure = 250
    ds.FilterType = "HEAD FILTER"
    ds.ConvolutionKernel = series.kernel
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(slice_location)
    _pixel_module(ds, stored.shape[0], stored.shape[1], enc)
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    if enc.padding is not None:
        ds.add_new(0x00280120, "SS" if enc.signed else "US", enc.padding)
    ds.WindowCenter = _ds(series.window[0])
    ds.WindowWidth = _ds(series.window[1])
    ds.RescaleIntercept = _ds(enc.intercept)
    ds.RescaleSlope = 1
    if "LOCALIZER" not in series.image_type:  # a scout's values are not HU (C.8.2.1.1.8)
        ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    if study.profile == "rsna":
        _rsna(ds, rng)
    return ds


def _rsna(ds: Dataset, rng: np.random.Generator) -> None:
    """Reduce a dataset to the RSNA 2019 de-identified attribute set."""
    keep = {
        "SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
        "StudyID", "ImagePositionPatient", "ImageOrientationPatient", "SamplesPerPixel",
        "PhotometricInterpretation", "Rows", "Columns", "PixelSpacing", "BitsAllocated",
        "BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth",
        "RescaleIntercept", "RescaleSlope", "PixelData", "ImageType",
    }
    for elem in list(ds):
        if elem.keyword not in keep:
            del ds[elem.tag]
    wc, ww = float(ds.WindowCenter), float(ds.WindowWidth)
    if rng.random() < 0.5:
        ds.WindowCenter = [f"{wc:05.0f}", f"{wc:05.0f}"]
        ds.WindowWidth = [f"{ww:05.0f}", f"{ww:05.0f}"]
    else:
        ds.WindowCenter = [_ds(wc), _ds(wc)]
        ds.WindowWidth = [_ds(ww), _ds(ww)]


def sc_dataset(
    study: StudyHeader, series: SeriesHeader, sop_uid: str, instance: int, pixels: np.ndarray
) -> Dataset:
    """A Secondary Capture Image (PS3.3 A.8.1) holding an 8-bit dose-summary screen."""
    ds = _common(study, series, SecondaryCaptureImageStorage, sop_uid)
    ds.ConversionType = "WSD"
    ds.InstanceNumber = instance
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    if study.profile == "rsna":
        del ds.PatientName
    return ds


def _ds(value: float) -> str:
    """A DS string of at most 16 characters (PS3.5 table 6.2-1)."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def save(ds: Dataset, path: Path, syntax: str, pixels: np.ndarray, sop_class: str) -> None:
    """Encode ``pixels`` in ``syntax`` and write ``ds`` as a DICOM Part 10 file.

    ``sop_class`` goes to the file meta information (PS3.10 section 7.1), which is
    its only place in the RSNA profile. The file is written to a temporary name in
    the same directory and renamed, so a reader never sees a partial file.
    """
    ds.file_meta = _file_meta(sop_class, ds.SOPInstanceUID, syntax)
    if syntax == JPEGLosslessSV1:
        frame = encode_jpeg_lossless(pixels, precision=int(ds.BitsStored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    elif syntax in (JPEG2000Lossless, RLELossless):
        ds.compress(syntax, pixels, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "",
                    generate_instance_uid=False)
    tmp = path.with_name(path.name + ".part")
    ds.save_as(tmp, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    os.replace(tmp, path)
