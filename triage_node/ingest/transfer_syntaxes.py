"""Which transfer syntaxes the node accepts for storage (PS3.5 Section 10, Annex A.4).

Native syntaxes always; compressed ones only where a decoder is installed, decided once at
import (what is installed does not change while the node runs). The listener offers them
(`triage_node.ingest.scp`), the header check refuses anything else
(`triage_node.ingest.header`), and the conformance statement lists them (`worker.docgen`).
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "COMPRESSED_TRANSFER_SYNTAXES", "NATIVE_TRANSFER_SYNTAXES", "decodable"]

#: Transfer syntaxes the node always accepts (PS3.5 Section 10): pydicom reads them
#: without a plugin (a deflated data set is inflated on arrival, `triage_node.ingest.inflate`).
NATIVE_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1
    ImplicitVRLittleEndian,  # 1.2.840.10008.1.2
    DeflatedExplicitVRLittleEndian,  # 1.2.840.10008.1.2.1.99
)

#: Compressed transfer syntaxes (PS3.5 Annex A.4), accepted only where a decoder is
#: installed (pylibjpeg-libjpeg: JPEG Lossless and JPEG-LS; pyjpegls: JPEG-LS;
#: pylibjpeg-openjpeg: JPEG 2000; RLE needs none).
COMPRESSED_TRANSFER_SYNTAXES = (
    JPEGLossless,  # 1.2.840.10008.1.2.4.57 (Process 14)
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70 (Process 14, selection value 1)
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    JPEG2000,  # 1.2.840.10008.1.2.4.91
    RLELossless,  # 1.2.840.10008.1.2.5
)


def decodable(syntaxes: Iterable[str]) -> tuple[UID, ...]:
    """The transfer syntaxes of ``syntaxes`` that pydicom can decode with what is installed."""
    found = []
    for uid in syntaxes:
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:  # pydicom has no decoder of its own for this syntax
            available = False
        if available:
            found.append(UID(uid))
    return tuple(found)


#: Transfer syntaxes accepted for storage, decided once at import: what is installed
#: does not change while the node runs.
ACCEPTED_TRANSFER_SYNTAXES = NATIVE_TRANSFER_SYNTAXES + decodable(COMPRESSED_TRANSFER_SYNTAXES)
