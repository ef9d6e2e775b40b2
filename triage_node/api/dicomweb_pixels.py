"""DICOMweb pixel resources (PS3.18 8.3, 9.5 and 10.4): frames and rendered images, so
a web viewer (OHIF, or any client of the DICOMweb standard) can show what the node holds.

- ``GET .../instances/{instance}/frames/{frames}`` (``frames`` is ``1`` or ``1,3,5``):
  ``multipart/related``, one part per frame. By default (no Accept, ``*/*``, or
  ``type="application/octet-stream"`` or ``type="*/*"`` without a transfer syntax) each
  frame is native little-endian pixel data (Explicit VR Little Endian, 1.2.840.10008.1.2.1), decoded
  with pydicom and the pylibjpeg plugins when the object is stored compressed.
  ``transfer-syntax=*``, the stored transfer syntax, or the stored syntax's own media
  type (``image/jpeg``, ``image/jls``, ``image/jp2``, ``image/dicom-rle``) get the
  frames as stored, without decoding; each part names its transfer syntax
  (PS3.18 8.7.3.5), as OHIF's image loader expects.
- ``GET .../instances/{instance}/rendered`` and ``.../frames/{frame}/rendered``:
  ``image/jpeg`` (default) or ``image/png`` (Accept header or ``accept`` query
  parameter), the first frame of the instance or the frame asked for. Monochrome
  images go through the Modality LUT and a window: ``window=center,width[,function]``
  (PS3.18 8.3.5.1.2; LINEAR, LINEAR_EXACT or SIGMOID), else the image's first
  WindowCenter/WindowWidth and VOILUTFunction (PS3.3 C.11.2.1.2), else its min-max.
  ``viewport=vw,vh[,sx,sy,sw,sh]`` crops and scales to fit; ``quality`` sets JPEG quality.

Mounted with `triage_node.api.dicomweb_read` under each DICOMweb prefix; every resource
needs a viewer token.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pydicom
from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from triage_node.api.deps import SessionDep
from triage_node.api.dicomweb_held import HeldInstance
from triage_node.api.dicomweb_read import Viewer, instance_or_404, transfer_syntax

router = APIRouter(tags=["dicomweb"])

OCTET_STREAM = "application/octet-stream"
#: Transfer syntaxes whose Pixel Data is native little-endian, sent without decoding.
NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, "1.2.840.10008.1.2.1.99"})
#: Media type of each compressed transfer syntax's frames (PS3.18 Table 8.7.3-2).
COMPRESSED_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
RENDERED_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG"}
WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class PixelDecodeError(Exception):
    """The stored pixel data could not be decoded (no plugin for its transfer syntax)."""


# -- Accept negotiation ----------------------------------------------------------------
@dataclass(frozen=True)
class MediaRange:
    media_type: str
    params: dict[str, str]
    q: float


def parse_accept(value: str | None) -> list[MediaRange]:
    """The Accept header's media ranges, most preferred first (RFC 9110 12.5.1)."""
    ranges = []
    for item in _split_outside_quotes(value or "*/*", ","):
        fields = _split_outside_quotes(item, ";")
        media_type = fields[0].strip().lower()
        if not media_type:
            continue
        params: dict[str, str] = {}
        for field in fields[1:]:
            key, _, raw = field.partition("=")
            params[key.strip().lower()] = raw.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(media_type, params, q))
    return sorted(ranges, key=lambda r: -r.q)  # stable: equal q keep the client's order


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class FrameEncoding:
    """How frames go out: the part media type, its transfer syntax, and whether to decode."""

    media_type: str
    transfer_syntax: str
    decode: bool


def negotiate_frames(accept: str | None, stored: str) -> FrameEncoding:
    """Pick the frames' representation for ``accept`` (PS3.18 8.7.3.5 and Table 8.7.3-2).

    Raises
    ------
    HTTPException
        406 when no range in ``accept`` can be served for ``stored``.
    """
    stored_native = stored in NATIVE_LITTLE_ENDIAN
    native = FrameEncoding(OCTET_STREAM, ExplicitVRLittleEndian, decode=not stored_native)
    as_stored = FrameEncoding(
        OCTET_STREAM if stored_native else COMPRESSED_MEDIA_TYPES.get(stored, OCTET_STREAM),
        ExplicitVRLittleEndian if stored_native else stored, decode=False,
    )
    for wanted in parse_accept(accept):
        if wanted.media_type in ("*/*", "multipart/*"):
            return native
        if wanted.media_type != "multipart/related":
            continue
        part_type = wanted.params.get("type", OCTET_STREAM).lower()
        syntax = wanted.params.get("transfer-syntax")
        if part_type == OCTET_STREAM:
            if syntax in (None, ExplicitVRLittleEndian):
                return native
            if syntax == "*" or syntax == stored:
                # OHIF asks for this and decodes by the part's transfer-syntax parameter.
                return FrameEncoding(OCTET_STREAM, as_stored.transfer_syntax, decode=False)
        elif part_type == "*/*":
            if syntax in (None, ExplicitVRLittleEndian):
                return native
            if syntax == "*" or syntax == as_stored.transfer_syntax:
                return as_stored
        elif part_type == "image/*" and not stored_native:
            if syntax in (None, "*", as_stored.transfer_syntax):
                return as_stored
        elif part_type == as_stored.media_type and syntax in (None, "*", as_stored.transfer_syntax):
            return as_stored
    raise HTTPException(
        406, f"frames are stored as {stored}; ask for application/octet-stream (decoded) or "
        f"transfer-syntax=* (as stored)",
    )


# -- frames ----------------------------------------------------------------------------
def _frame_numbers(text: str, count: int) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise HTTPException(400, f"frame list must be numbers separated by commas: {text!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise HTTPException(400, "frame numbers start at 1")
    if any(n > count for n in numbers):
        raise HTTPException(404, f"the instance has {count} frame(s)")
    return numbers


def _read_image(instance: HeldInstance) -> pydicom.Dataset:
    if not instance.path.is_file():
        raise HTTPException(410, f"object {instance.sop_uid} is no longer on disk")
    ds = pydicom.dcmread(instance.path)
    if "PixelData" not in ds:
        raise HTTPException(404, "the instance has no pixel data (frames and rendered are for images)")
    return ds


def _frame_count(ds: pydicom.Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _decoded(ds: pydicom.Dataset, index: int, *, raw: bool) -> np.ndarray:
    """One frame as an array; ``raw`` keeps the stored colour space (no YBR to RGB)."""
    try:
        return decode_pixels(ds, index=index, raw=raw)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise PixelDecodeError(f"cannot decode {ds.file_meta.TransferSyntaxUID}: {exc}") from exc


def frame_bytes(ds: pydicom.Dataset, index: int, encoding: FrameEncoding) -> bytes:
    """Frame ``index`` (0-based) of ``ds`` in ``encoding``."""
    stored = str(ds.file_meta.TransferSyntaxUID)
    if not encoding.decode:
        if UID(stored).is_compressed:
            offsets = None
            if "ExtendedOffsetTable" in ds:
                offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            return pydicom.encaps.get_frame(ds.PixelData, index, extended_offsets=offsets,
                                            number_of_frames=_frame_count(ds))
        bits = int(ds.BitsAllocated)
        if bits % 8 == 0:
            size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
            return bytes(ds.PixelData[index * size : (index + 1) * size])
    arr = _decoded(ds, index, raw=True)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _multipart_frames(frames: list[bytes], encoding: FrameEncoding) -> Response:
    boundary = uuid.uuid4().hex
    header = f"--{boundary}\r\nContent-Type: {encoding.media_type}; transfer-syntax={encoding.transfer_syntax}\r\n\r\n"
    body = b"".join(header.encode() + frame + b"\r\n" for frame in frames) + f"--{boundary}--\r\n".encode()
    media = f'multipart/related; type="{encoding.media_type}"; boundary={boundary}'
    return Response(body, media_type=media)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}",
            summary="WADO-RS: retrieve frames")
def retrieve_frames(study_uid: str, series_uid: str, sop_uid: str, frame_list: str, request: Request,
                    session: SessionDep, _p: Viewer) -> Response:
    instance = instance_or_404(session, study_uid, series_uid, sop_uid)
    encoding = negotiate_frames(request.headers.get("accept"), transfer_syntax(instance))
    ds = _read_image(instance)
    numbers = _frame_numbers(frame_list, _frame_count(ds))
    try:
        frames = [frame_bytes(ds, n - 1, encoding) for n in numbers]
    except PixelDecodeError as exc:
        raise HTTPException(406, f"{exc}; ask for transfer-syntax=* to get the frames as stored") from None
    return _multipart_frames(frames, encoding)


# -- rendered --------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: str = "LINEAR"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` mapped to 0-255 by the window function (C.11.2.1.2.1 and C.11.2.1.3)."""
        c, w = self.center, self.width
        if self.function == "SIGMOID":
            return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        if self.function == "LINEAR_EXACT":
            return np.clip((x - c) / w + 0.5, 0, 1) * 255.0
        return np.clip((x - (c - 0.5)) / max(w - 1, 1e-6) + 0.5, 0, 1) * 255.0


def parse_window(text: str) -> Window:
    fields = [f.strip() for f in text.split(",")]
    try:
        center, width = float(fields[0]), float(fields[1])
    except (ValueError, IndexError):
        raise HTTPException(400, "window is center,width[,function]") from None
    function = fields[2].upper() if len(fields) > 2 and fields[2] else "LINEAR"
    if function not in WINDOW_FUNCTIONS or len(fields) > 3:
        raise HTTPException(400, f"window function is one of {', '.join(WINDOW_FUNCTIONS)}")
    if width < (1 if function == "LINEAR" else 1e-6):
        raise HTTPException(400, "window width must be at least 1")
    return Window(center, width, function)


def image_window(ds: pydicom.Dataset) -> Window | None:
    """The image's first window, or None when it has none."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    first = [v[0] if isinstance(v, pydicom.multival.MultiValue) else v for v in (center, width)]
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    return Window(float(first[0]), max(float(first[1]), 1.0),
                  function if function in WINDOW_FUNCTIONS else "LINEAR")


def render(ds: pydicom.Dataset, index: int, window: Window | None, image_format: str,
           viewport: tuple[int, ...] | None = None, quality: int = 90) -> bytes:
    """Frame ``index`` of ``ds`` as a PNG or JPEG (the Pillow format name)."""
    from PIL import Image

    pixels = _decoded(ds, index, raw=False)  # YBR becomes RGB
    if pixels.ndim == 3:
        image = Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)), "RGB")
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        window = window or image_window(ds)
        if window is None:
            lo, hi = float(values.min()), float(values.max())
            window = Window((lo + hi) / 2, max(hi - lo, 1.0), "LINEAR_EXACT")
        grey = window.apply(values)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
            grey = 255.0 - grey
        image = Image.fromarray(np.round(grey).astype(np.uint8), "L")
    if viewport:
        if len(viewport) == 6:
            sx, sy, sw, sh = viewport[2:]
            image = image.crop((sx, sy, sx + sw, sy + sh))
        vw, vh = viewport[:2]
        scale = min(vw / image.width, vh / image.height)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if image_format == "JPEG":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _rendered_type(request: Request, accept_param: str | None) -> str:
    for wanted in parse_accept(accept_param or request.headers.get("accept")):
        if wanted.media_type in RENDERED_TYPES:
            return wanted.media_type
        if wanted.media_type in ("*/*", "image/*"):
            return "image/jpeg"
    raise HTTPException(406, f"rendered images are {' or '.join(RENDERED_TYPES)}")


def _viewport(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise HTTPException(400, "viewport is vw,vh[,sx,sy,sw,sh]") from None
    if len(values) not in (2, 6) or any(v < 1 for v in values[:2]) or any(v < 0 for v in values[2:]) \
            or (len(values) == 6 and 0 in values[4:]):
        raise HTTPException(400, "viewport is vw,vh[,sx,sy,sw,sh] with positive sizes")
    if max(values[:2]) > 4096:
        raise HTTPException(400, "viewport is at most 4096 pixels wide and high")
    return values


def _rendered_response(request: Request, session: SessionDep, study_uid: str, series_uid: str,
                       sop_uid: str, frame: int, window: str | None, viewport: str | None,
                       quality: int, accept: str | None) -> Response:
    media_type = _rendered_type(request, accept)
    parsed_window = parse_window(window) if window else None
    parsed_viewport = _viewport(viewport)
    ds = _read_image(instance_or_404(session, study_uid, series_uid, sop_uid))
    (number,) = _frame_numbers(str(frame), _frame_count(ds))
    try:
        body = render(ds, number - 1, parsed_window, RENDERED_TYPES[media_type], parsed_viewport, quality)
    except PixelDecodeError as exc:
        raise HTTPException(406, str(exc)) from None
    return Response(body, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


Quality = Annotated[int, Query(ge=1, le=100)]


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/rendered",
            summary="WADO-RS: rendered instance (first frame)")
def rendered_instance(study_uid: str, series_uid: str, sop_uid: str, request: Request,
                      session: SessionDep, _p: Viewer, window: str | None = None,
                      viewport: str | None = None, quality: Quality = 90,
                      accept: str | None = None) -> Response:
    return _rendered_response(request, session, study_uid, series_uid, sop_uid, 1, window, viewport,
                              quality, accept)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame}/rendered",
            summary="WADO-RS: rendered frame")
def rendered_frame(study_uid: str, series_uid: str, sop_uid: str, frame: str, request: Request,
                   session: SessionDep, _p: Viewer, window: str | None = None,
                   viewport: str | None = None, quality: Quality = 90,
                   accept: str | None = None) -> Response:
    if not frame.isdigit():
        raise HTTPException(400, "a rendered frame is one frame number")
    return _rendered_response(request, session, study_uid, series_uid, sop_uid, int(frame), window,
                              viewport, quality, accept)


__all__ = ["FrameEncoding", "Window", "frame_bytes", "negotiate_frames", "parse_accept", "render", "router"]
