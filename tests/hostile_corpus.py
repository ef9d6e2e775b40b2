"""A corpus of malformed DICOM objects for the hostile-input tests and the fuzzer.

Each case is a whole Part 10 file (preamble, File Meta Information, data set, PS3.10
7.1) built from one valid CT slice by editing its bytes, so the damage is exactly what
the case names and nothing else. Every case must be refused by the node: a Storage
failure status over DIMSE (PS3.4 Table B.2-1) or an HTTP 4xx / a Failed SOP item over
STOW-RS (PS3.18 10.5.3), never success and never a crash.

Over DIMSE the peer sends only the data set: the file meta is rebuilt by the receiver
from the request. `HostileCase.dimse_file` is therefore a file whose File Meta
Information is intact (so pynetdicom's ``send_c_store(path)`` can announce it) and whose
data set carries the damage; cases whose damage lives in the file meta itself
(``dimse=False``) are only sent over STOW-RS, except a bogus transfer syntax, which a
DIMSE peer can only propose during association negotiation.

Use ``python -m tests.hostile_corpus DIR`` to write the files for inspection.
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from tests.ingest_support import ct_dataset, part10
from triage_node.ingest.store import dataset_offset

#: Explicit VR Little Endian VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = struct.pack("<HH", 0x7FE0, 0x0010)
ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian data element; ``length`` overrides the true length."""
    size = len(value) if length is None else length
    if vr in LONG_VRS:
        return struct.pack("<HH", group, elem) + vr + b"\x00\x00" + struct.pack("<I", size) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", size & 0xFFFF) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" * (len(raw) % 2)


@dataclass(frozen=True)
class Base:
    """A valid slice split into its parts, for the cases to edit."""

    data: bytes
    meta_end: int
    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def meta(self) -> bytes:
        return self.data[: self.meta_end]

    @property
    def body(self) -> bytes:
        return self.data[self.meta_end :]

    def with_body(self, body: bytes) -> bytes:
        return self.meta + body

    def replace_element(self, tag: tuple[int, int], new: bytes) -> bytes:
        """The file with the (top-level, short-VR) element ``tag`` replaced by ``new``."""
        body = self.body
        start = body.find(struct.pack("<HH", *tag))
        assert start >= 0, f"tag {tag} not found"
        length = struct.unpack("<H", body[start + 6 : start + 8])[0]
        return self.meta + body[:start] + new + body[start + 8 + length :]

    def insert_before(self, tag: tuple[int, int], new: bytes) -> bytes:
        body = self.body
        start = body.find(struct.pack("<HH", *tag))
        assert start >= 0, f"tag {tag} not found"
        return self.meta + body[:start] + new + body[start:]


def base_slice(size: int = 32, seed: int = 0) -> Base:
    """A valid CT slice in Explicit VR Little Endian, with new UIDs."""
    study, series = generate_uid(), generate_uid()
    ds = ct_dataset(study, series, 0, size=size, seed=seed)
    data = part10(ds)
    from io import BytesIO

    from pydicom import dcmread

    meta = dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    return Base(data, dataset_offset(data, meta), study, series, str(ds.SOPInstanceUID))


def _meta_with_transfer_syntax(base: Base, transfer_syntax: str) -> bytes:
    """The file with TransferSyntaxUID (0002,0010) replaced and the group length fixed."""
    meta = bytearray(base.meta)
    start = meta.find(struct.pack("<HH", 0x0002, 0x0010))
    length = struct.unpack("<H", meta[start + 6 : start + 8])[0]
    new = element(0x0002, 0x0010, b"UI", _uid_value(transfer_syntax))
    meta[start : start + 8 + length] = new
    group_length = len(meta) - 132 - 12
    meta[132 + 8 : 132 + 12] = struct.pack("<I", group_length)
    return bytes(meta) + base.body


def _deep_sequence(depth: int) -> bytes:
    """``depth`` nested sequences of undefined length (PS3.5 7.5.2), in a private tag."""
    head = struct.pack("<HH", 0x0009, 0x1010) + b"SQ\x00\x00" + struct.pack("<I", UNDEFINED)
    return head + ITEM * 0 + (ITEM + head) * (depth - 1) + ITEM + (ITEM_END + SEQUENCE_END) * depth


@dataclass(frozen=True)
class HostileCase:
    """One malformed object.

    Attributes
    ----------
    name : str
        Short identifier (also the file name).
    why : str
        What is wrong with it.
    data : bytes
        The whole Part 10 file, as a STOW-RS part.
    dimse : bool
        True when the damage survives a DIMSE transfer (it lies in the data set).
    negotiation : bool
        True when a DIMSE peer could only propose it at association time (an unknown
        transfer syntax), where the node must not accept a presentation context.
    """

    name: str
    why: str
    data: bytes
    dimse: bool = True
    negotiation: bool = False


def _cases(base: Base) -> list[HostileCase]:
    rng = random.Random(7)
    body = base.body
    pixel_at = body.rfind(PIXEL_DATA)
    name_elem = (0x0010, 0x0010)
    cases: list[Callable[[], HostileCase]] = [
        lambda: HostileCase("empty", "zero bytes", b"", dimse=False),
        lambda: HostileCase("preamble_only", "preamble and DICM prefix, nothing else",
                            b"\x00" * 128 + b"DICM", dimse=False),
        lambda: HostileCase("random_bytes", "4 KiB of random bytes",
                            bytes(rng.getrandbits(8) for _ in range(4096)), dimse=False),
        lambda: HostileCase("truncated_in_file_meta", "cut inside the File Meta Information",
                            base.data[:150], dimse=False),
        lambda: HostileCase("truncated_in_header", "cut 40 bytes into the data set",
                            base.data[: base.meta_end + 40]),
        lambda: HostileCase("truncated_in_element_value", "cut inside an element's value",
                            base.data[: base.meta_end + body.find(b"CT HEAD") + 3]),
        lambda: HostileCase("truncated_in_pixel_data", "pixel data cut 100 bytes short",
                            base.data[:-100]),
        lambda: HostileCase("truncated_in_element_length", "cut inside the 4-byte length of Pixel Data (found by the fuzzer)",
                            base.data[: base.meta_end + pixel_at + 9]),
        lambda: HostileCase("garbage_data_set", "valid file meta, random data set",
                            base.with_body(bytes(rng.getrandbits(8) for _ in range(2048)))),
        lambda: HostileCase("wrong_vr_rows_as_ul", "Rows (0028,0010) as UL with 2 bytes",
                            base.replace_element((0x0028, 0x0010), element(0x0028, 0x0010, b"UL", b"\x00\x02"))),
        lambda: HostileCase("wrong_vr_unknown_code", "an element whose VR is 'ZZ'",
                            base.insert_before(name_elem, element(0x0009, 0x0010, b"ZZ", b"HOSTILE "))),
        lambda: HostileCase("wrong_vr_sop_class_unknown_code", "SOPClassUID (0008,0016) with VR 'TI' (found by the fuzzer)",
                            base.data.replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00TI", 1)),
        lambda: HostileCase("wrong_vr_study_uid_as_sequence", "StudyInstanceUID (0020,000D) encoded as SQ",
                            base.replace_element((0x0020, 0x000D), element(0x0020, 0x000D, b"SQ", b"\x01" * 16))),
        lambda: HostileCase("wrong_vr_rows_as_text", "Rows (0028,0010) as DS 'abc'",
                            base.replace_element((0x0028, 0x0010), element(0x0028, 0x0010, b"DS", b"abc "))),
        lambda: HostileCase("absurd_length_short_vr", "a LO value declared 65534 bytes long",
                            base.insert_before(name_elem, element(0x0009, 0x1001, b"LO", b"x", length=0xFFFE))),
        lambda: HostileCase("absurd_length_long_vr", "an OB value declared 2 GiB long",
                            base.insert_before(name_elem, element(0x0009, 0x1002, b"OB", b"\x00" * 8,
                                                                 length=0x7FFFFFF0))),
        lambda: HostileCase("declared_4gb_element", "an UN value declared 0xFFFFFFFE bytes (4 GiB)",
                            base.insert_before(name_elem, element(0x0009, 0x1003, b"UN", b"\x00" * 8,
                                                                 length=0xFFFFFFFE))),
        lambda: HostileCase("declared_4gb_pixel_data", "Pixel Data declared 0xFFFFFFFE bytes",
                            base.with_body(body[:pixel_at] + element(0x7FE0, 0x0010, b"OW", body[pixel_at + 12 :],
                                                                      length=0xFFFFFFFE))),
        lambda: HostileCase("undefined_length_native_pixels", "native Pixel Data with undefined length and no delimiter",
                            base.with_body(body[:pixel_at] + element(0x7FE0, 0x0010, b"OW", body[pixel_at + 12 :],
                                                                      length=UNDEFINED))),
        lambda: HostileCase("deep_sequences", "sequences nested 5000 deep",
                            base.insert_before(name_elem, _deep_sequence(5000))),
        lambda: HostileCase("unterminated_sequence", "a sequence of undefined length never closed",
                            base.insert_before(name_elem, _deep_sequence(3)[:-16])),
        lambda: HostileCase("bogus_transfer_syntax", "TransferSyntaxUID 1.2.3.4.5.6.7 (no such syntax)",
                            _meta_with_transfer_syntax(base, "1.2.3.4.5.6.7"), dimse=False, negotiation=True),
        lambda: HostileCase("non_uid_transfer_syntax", "TransferSyntaxUID 'explicit-le'",
                            _meta_with_transfer_syntax(base, "explicit-le"), dimse=False),
        lambda: HostileCase("big_endian_transfer_syntax", "Explicit VR Big Endian (retired) announced, little endian data",
                            _meta_with_transfer_syntax(base, "1.2.840.10008.1.2.2"), dimse=False, negotiation=True),
        lambda: HostileCase("pixel_data_too_short", "Rows x Columns 512 x 512, 32 x 32 pixels sent",
                            base.replace_element((0x0028, 0x0010), element(0x0028, 0x0010, b"US", struct.pack("<H", 512)))
                            .replace(struct.pack("<HH", 0x0028, 0x0011) + b"US\x02\x00" + struct.pack("<H", 32),
                                     struct.pack("<HH", 0x0028, 0x0011) + b"US\x02\x00" + struct.pack("<H", 512))),
        lambda: HostileCase("pixel_data_too_long", "32 x 32 pixels announced, a megabyte sent",
                            base.with_body(body[:pixel_at] + element(0x7FE0, 0x0010, b"OW", b"\x00" * (1 << 20)))),
        lambda: HostileCase("pixel_data_odd_length", "Pixel Data of odd length",
                            base.with_body(body[:pixel_at] + element(0x7FE0, 0x0010, b"OW", body[pixel_at + 12 :] + b"\x00"))),
        lambda: HostileCase("study_uid_path_traversal", "StudyInstanceUID '../../x'",
                            base.replace_element((0x0020, 0x000D), element(0x0020, 0x000D, b"UI", _uid_value("../../x")))),
        lambda: HostileCase("series_uid_non_uid_characters", "SeriesInstanceUID with letters and a shell metacharacter",
                            base.replace_element((0x0020, 0x000E),
                                                 element(0x0020, 0x000E, b"UI", _uid_value("1.2.840.abc;rm -rf")))),
        lambda: HostileCase("series_uid_absolute_path", "SeriesInstanceUID '/etc/passwd'",
                            base.replace_element((0x0020, 0x000E), element(0x0020, 0x000E, b"UI", _uid_value("/etc/passwd")))),
        lambda: HostileCase("study_uid_too_long", "StudyInstanceUID of 80 digits",
                            base.replace_element((0x0020, 0x000D), element(0x0020, 0x000D, b"UI", _uid_value("1." + "2" * 78)))),
        lambda: HostileCase("study_uid_embedded_nul", "StudyInstanceUID with a NUL in the middle",
                            base.replace_element((0x0020, 0x000D), element(0x0020, 0x000D, b"UI", b"1.2.3\x00/../4\x00"))),
        lambda: HostileCase("missing_study_uid", "no StudyInstanceUID",
                            base.replace_element((0x0020, 0x000D), b"")),
        lambda: HostileCase("meta_group_length_lies", "FileMetaInformationGroupLength larger than the file",
                            base.data[:140] + struct.pack("<I", 0x7FFFFFF0) + base.data[144:], dimse=False),
    ]
    return [make() for make in cases]


def build_corpus(folder: Path | None = None, size: int = 32, seed: int = 0) -> list[HostileCase]:
    """Build every case (new UIDs each call); write ``<name>.dcm`` files to ``folder`` if given."""
    cases = _cases(base_slice(size=size, seed=seed))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            (folder / f"{case.name}.dcm").write_bytes(case.data)
    return cases


def dimse_file(case: HostileCase, folder: Path) -> Path:
    """Write the case for ``send_c_store(path)``; only for ``case.dimse``."""
    path = folder / f"{case.name}.dcm"
    path.write_bytes(case.data)
    return path


if __name__ == "__main__":  # pragma: no cover - manual inspection
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    for c in build_corpus(out):
        print(f"{c.name:40s} {len(c.data):>9d} bytes  {c.why}")
