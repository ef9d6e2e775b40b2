"""Reading what the node needs of a received object's header, and refusing bad ones.

Only the header is parsed (pixels are never decoded or re-encoded); the checks here turn
malformed input into the Storage Service Class statuses of PS3.4 Annex B.2.3 (Table
B.2-1), raised as :class:`Refused` for :class:`triage_node.ingest.store.InstanceStore`
to answer and audit.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from triage_node.dicom_status import StoreStatus
from triage_node.ingest.inflate import is_deflated
from triage_node.ingest.spool import InvalidUID, validate_uid
from triage_node.ingest.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES

# -- Storage Service Class statuses, by their names in this package -----------------
SUCCESS = StoreStatus.SUCCESS
OUT_OF_RESOURCES = StoreStatus.OUT_OF_RESOURCES
DATABASE_UNAVAILABLE = StoreStatus.OUT_OF_RESOURCES_DATABASE
OBJECT_TOO_LARGE = StoreStatus.OUT_OF_RESOURCES_TOO_LARGE
DATASET_DOES_NOT_MATCH_SOP_CLASS = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
CANNOT_UNDERSTAND = StoreStatus.CANNOT_UNDERSTAND
INVALID_UID = StoreStatus.CANNOT_UNDERSTAND_INVALID_UID


class Refused(Exception):
    """Internal: a validation step refuses the object with a status and a reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """The parts of a header the node records (parsed once, before pixels)."""

    ds: Dataset
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    dataset_offset: int
    #: Set when the object came in another transfer syntax than it is kept in
    #: (Deflated Explicit VR Little Endian: `triage_node.ingest.inflate`).
    received_transfer_syntax: str | None = None


def dataset_offset(data: bytes, meta: Dataset | None) -> int:
    """Byte offset where the data set starts, after preamble and file meta (PS3.10 7.1).

    Uses FileMetaInformationGroupLength (0002,0000), whose element is 12 bytes long in
    Explicit VR Little Endian; 0 when the file has no preamble or group length.
    """
    if data[128:132] != b"DICM" or meta is None:
        return 0
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        return 0
    offset = 132 + 12 + int(group_length)
    return offset if offset <= len(data) else 0


def dataset_offset_from_bytes(data: bytes) -> int:
    """`dataset_offset` from the raw bytes, before any parse: the group length element
    as PS3.10 encodes it, (0002,0000) UL in Explicit VR Little Endian; 0 when it is not
    there. The parsed header's `dataset_offset` is the one to trust."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return 0
    offset = 132 + 12 + int.from_bytes(data[140:144], "little")
    return offset if offset <= len(data) else 0


def slice_position(ds: Dataset) -> float | None:
    """Position of an image along its slice normal, in mm.

    The normal is the cross product of the row and column direction cosines of
    ImageOrientationPatient (PS3.3 C.7.6.2.1.1); the position is the projection of
    ImagePositionPatient on it. None when either attribute is missing or malformed.
    """
    try:
        o = [float(v) for v in ds.ImageOrientationPatient]
        p = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(o) != 6 or len(p) != 3:
        return None
    # Plain floats: for 3-vectors this is several times faster than numpy.
    n = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
    norm = math.sqrt(n[0] ** 2 + n[1] ** 2 + n[2] ** 2)
    if not math.isfinite(norm) or norm == 0:
        return None
    value = (p[0] * n[0] + p[1] * n[1] + p[2] * n[2]) / norm
    return value if math.isfinite(value) else None


def text_value(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip()
    return text[:limit] if text else None


def int_value(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def float_value(ds: Dataset, keyword: str) -> float | None:
    """A numeric attribute as float; of a multi-valued one (WindowWidth may hold one value per
    window) the first value; None when absent, empty or not a number."""
    try:
        value = ds.get(keyword)
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0] if len(value) else None
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def requested_priority(ds: Dataset) -> str | None:
    """RequestedProcedurePriority (0040,1003), top level or in RequestAttributesSequence."""
    value = text_value(ds, "RequestedProcedurePriority", 16)
    if value:
        return value
    for item in ds.get("RequestAttributesSequence") or []:
        value = text_value(item, "RequestedProcedurePriority", 16)
        if value:
            return value
    return None


def _values(ds: Dataset, keyword: str, count: int) -> list[float] | None:
    """A multi-valued number attribute with exactly ``count`` finite values, or None."""
    value = ds.get(keyword)
    try:
        values = [float(v) for v in value] if value is not None else []
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


#: LossyImageCompression (0028,2110) value of an image that has been lossy compressed.
LOSSY_COMPRESSED = "01"


def series_geometry(ds: Dataset) -> dict[str, object]:
    """Series columns for geometry and derivation, from one instance's header.

    ImageOrientationPatient (0020,0037) as received, Rows/Columns, PixelSpacing
    (0028,0030) row and column spacing (PS3.3 C.7.6.2, C.7.6.3); DerivationCodeSequence
    (0008,9215) codes as ``scheme:value`` and LossyImageCompressionMethod (0028,2114)
    when LossyImageCompression is "01" (C.7.6.1.1.5).
    """
    cosines = _values(ds, "ImageOrientationPatient", 6)
    spacing = _values(ds, "PixelSpacing", 2)
    codes = []
    try:
        for item in ds.get("DerivationCodeSequence") or []:
            codes.append(f"{str(item.get('CodingSchemeDesignator', '')).strip()}:"
                         f"{str(item.get('CodeValue', '')).strip()}")
    except (TypeError, AttributeError):
        codes = []
    lossy = None
    if text_value(ds, "LossyImageCompression", 2) == LOSSY_COMPRESSED:
        lossy = text_value(ds, "LossyImageCompressionMethod") or "unnamed method"
    return {
        "image_orientation": "\\".join(f"{v + 0.0:g}" for v in cosines) if cosines else None,
        "rows": int_value(ds, "Rows"),
        "columns": int_value(ds, "Columns"),
        "pixel_spacing_row": spacing[0] if spacing else None,
        "pixel_spacing_column": spacing[1] if spacing else None,
        "derivation_codes": "\\".join(codes)[:128] or None,
        "lossy_compression": lossy,
    }


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _pixel_data_complete(data: bytes, position: int, implicit: bool) -> bool:
    """Check that Pixel Data (7FE0,0010), when present, is not cut short.

    pydicom reads a truncated value without complaint, so the element header at
    ``position`` (where the header parse stopped) is checked by hand: a defined
    length must fit in the file; an undefined length (encapsulated, PS3.5 A.4)
    needs the Sequence Delimitation Item after it.
    """
    if data[position : position + 4] != _PIXEL_DATA_TAG:
        return True  # no pixel data, or not at the top level
    if implicit:
        header, length = 8, int.from_bytes(data[position + 4 : position + 8], "little")
    else:
        header, length = 12, int.from_bytes(data[position + 8 : position + 12], "little")
    if length == 0xFFFFFFFF:
        return data.rfind(_SEQUENCE_DELIMITER, position + header) != -1
    return position + header + length <= len(data)


def _meta_group_length_consistent(data: bytes, meta: Dataset | None) -> bool:
    """Check FileMetaInformationGroupLength (0002,0000) against the group 0002 elements.

    The File Meta Information is always Explicit VR Little Endian (PS3.10 7.1); a group
    length that points past the elements (or past the file) would make other readers
    start the data set at the wrong byte.
    """
    if data[128:132] != b"DICM" or meta is None or meta.get("FileMetaInformationGroupLength") is None:
        return True
    position = 132
    while position + 8 <= len(data):
        group, _elem = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OL", b"OV"):
            if position + 12 > len(data):
                return True
            position += 12 + struct.unpack_from("<I", data, position + 8)[0]
        else:
            position += 8 + struct.unpack_from("<H", data, position + 6)[0]
    if position + 8 > len(data):
        return True  # cut inside the file meta: the missing UIDs refuse it
    return 132 + 12 + int(meta.FileMetaInformationGroupLength) == position


def _native_pixel_data_problem(ds: Dataset, data: bytes, position: int, implicit: bool) -> str | None:
    """Why native Pixel Data (7FE0,0010) does not fit the image attributes, or None.

    PS3.5 8.1.1: native pixel data holds Rows x Columns x SamplesPerPixel x
    NumberOfFrames cells of BitsAllocated bits, padded to an even length. A value of
    another length (or image attributes that are not numbers) cannot be decoded later.
    """
    if data[position : position + 4] != _PIXEL_DATA_TAG:
        return None
    offset = 4 if implicit else 8
    length = int.from_bytes(data[position + offset : position + offset + 4], "little")
    try:
        cells = 1
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"):
            value = int(ds[keyword].value)
            if value <= 0:
                raise ValueError(keyword)
            cells *= value
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames <= 0:
            raise ValueError("NumberOfFrames")
    except (KeyError, TypeError, ValueError) as exc:
        return f"image attributes missing or not positive integers: {exc}"
    expected = (cells * frames + 7) // 8
    expected += expected % 2
    if length != expected:
        return f"Pixel Data is {length} bytes, the image attributes need {expected}"
    return None


def parse_header(data: bytes) -> Header:
    """Parse the header of a Part 10 file (stops before Pixel Data; nothing is decoded).

    Raises
    ------
    Refused
        0xC000 when the file cannot be parsed, 0xC001 when a UID is invalid,
        0xA900 when a required UID is missing.
    """
    if is_deflated(data):
        # pydicom would inflate it in one call, without a bound: the store inflates it
        # first (`triage_node.ingest.incoming.IncomingObject.inflate`).
        raise Refused(CANNOT_UNDERSTAND, "deflated data set was not inflated before the header check")
    try:
        fp = BytesIO(data)
        ds = dcmread(fp, stop_before_pixels=True)
        # Touch every element now so that a malformed value fails here, not later.
        for _elem in ds.iterall():
            pass
        stopped_at = fp.tell()
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError,
            NotImplementedError, AttributeError, IndexError, BytesLengthException,
            struct.error, OverflowError) as exc:
        raise Refused(CANNOT_UNDERSTAND, f"header cannot be parsed: {type(exc).__name__}") from None
    except RecursionError:
        raise Refused(CANNOT_UNDERSTAND, "header cannot be parsed: sequences nested too deep") from None
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not transfer_syntax:
        raise Refused(CANNOT_UNDERSTAND, "file meta has no TransferSyntaxUID")
    if not _meta_group_length_consistent(data, meta):
        raise Refused(CANNOT_UNDERSTAND, "FileMetaInformationGroupLength does not match the file meta")
    if not _pixel_data_complete(
        data, stopped_at, implicit=transfer_syntax == ImplicitVRLittleEndian
    ):
        raise Refused(CANNOT_UNDERSTAND, "pixel data is truncated")
    # De-identified files may carry the SOP class only in the file meta (DESIGN.md).
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    uids: dict[str, str] = {}
    for keyword, value in (
        ("StudyInstanceUID", ds.get("StudyInstanceUID")),
        ("SeriesInstanceUID", ds.get("SeriesInstanceUID")),
        ("SOPInstanceUID", ds.get("SOPInstanceUID")),
        ("SOPClassUID", sop_class),
    ):
        if value is None or str(value).strip("\x00 ") == "":
            raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} is missing")
        try:
            uids[keyword] = validate_uid(str(value), keyword)
        except InvalidUID as exc:
            raise Refused(INVALID_UID, str(exc)) from None
    try:
        transfer_syntax = validate_uid(str(transfer_syntax), "TransferSyntaxUID")
    except InvalidUID as exc:
        raise Refused(INVALID_UID, str(exc)) from None

    if transfer_syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise Refused(CANNOT_UNDERSTAND, f"transfer syntax {transfer_syntax} is not accepted")
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        problem = _native_pixel_data_problem(
            ds, data, stopped_at, implicit=transfer_syntax == ImplicitVRLittleEndian
        )
        if problem:
            raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, problem)
    return Header(
        ds=ds,
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=transfer_syntax,
        dataset_offset=dataset_offset(data, meta),
    )
