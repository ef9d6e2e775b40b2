"""A vectorised JPEG Lossless (Process 14, first-order prediction) encoder.

pydicom 3 decodes JPEG Lossless (transfer syntax 1.2.840.10008.1.2.4.70, "JPEG
Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
PS3.5 section 8.2.1 and 10.2) through pylibjpeg-libjpeg or GDCM, but ships no encoder
for it, and pylibjpeg-libjpeg is decode-only. This module writes the bit stream
itself with numpy, following ITU-T T.81 (ISO/IEC 10918-1):

* Annex H.1.2.1: prediction with selection value 1 (``Px = Ra``, the left neighbour);
  the first row uses ``Ra`` as well, the first column uses ``Rb`` (above), and the
  first sample uses ``2**(P - Pt - 1)``.
* Annex H.1.2.2: differences taken modulo 2**16, coded as a Huffman category SSSS
  (Table H.2) followed by SSSS additional bits (F.1.2.1.1); category 16 carries none.
* Annex K.2: code lengths from the image's own category histogram, limited to 16
  bits, and canonical codes (Annex C) in one DHT segment.
* Byte stuffing (0xFF -> 0xFF 0x00, F.1.2.3) and 1-bit padding of the last byte.

The output is one JPEG interchange-format frame per image, ready for
``pydicom.encaps.encapsulate``.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["encode_jpeg_lossless"]


def _code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code lengths (at most 16 bits) per T.81 Annex K.2 (Figures K.1-K.3).

    Parameters
    ----------
    freq : ndarray
        Occurrence count of each of the 17 difference categories.

    Returns
    -------
    ndarray
        Code length per category (0 for unused categories).
    """
    n = len(freq)
    f = [int(x) for x in freq] + [1]  # reserved symbol: no code of all 1-bits (K.2)
    codesize = [0] * (n + 1)
    others = [-1] * (n + 1)
    while True:
        live = [i for i in range(n + 1) if f[i] > 0]
        if len(live) < 2:
            break
        # V1: least frequency (largest index on ties); V2: next least.
        v1 = min(live, key=lambda i: (f[i], -i))
        v2 = min((i for i in live if i != v1), key=lambda i: (f[i], -i))
        f[v1] += f[v2]
        f[v2] = 0
        codesize[v1] += 1
        while others[v1] != -1:
            v1 = others[v1]
            codesize[v1] += 1
        others[v1] = v2
        codesize[v2] += 1
        while others[v2] != -1:
            v2 = others[v2]
            codesize[v2] += 1
    bits = [0] * 33
    for size in codesize:
        if size:
            bits[size] += 1
    # Figure K.3: limit code lengths to 16 bits.
    i = 32
    while i > 16:
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        i -= 1
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # remove the reserved code point
    # Assign lengths to symbols in order of decreasing frequency (K.2, "Sort_input").
    order = sorted(range(n), key=lambda s: (-int(freq[s]), s))
    order = [s for s in order if freq[s] > 0]
    lengths = np.zeros(n, dtype=np.int64)
    pos = 0
    for size in range(1, 17):
        for _ in range(bits[size]):
            lengths[order[pos]] = size
            pos += 1
    return lengths


def _canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, bytes]:
    """Canonical codes (T.81 Annex C) and the DHT payload BITS + HUFFVAL."""
    symbols = sorted((int(lengths[s]), s) for s in range(len(lengths)) if lengths[s] > 0)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code = 0
    prev_len = symbols[0][0]
    for k, (size, sym) in enumerate(symbols):
        if k:
            code = (code + 1) << (size - prev_len)
        codes[sym] = code
        prev_len = size
    counts = [0] * 16
    for size, _ in symbols:
        counts[size - 1] += 1
    payload = bytes(counts) + bytes(sym for _, sym in symbols)
    return codes, payload


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def encode_jpeg_lossless(image: np.ndarray, precision: int = 16) -> bytes:
    """Encode one greyscale frame as JPEG Lossless, Process 14, selection value 1.

    Parameters
    ----------
    image : ndarray
        2-D array of stored pixel values. Signed values are coded as their
        ``precision``-bit two's complement pattern, as PS3.5 section 8.2.1 asks
        for signed DICOM pixel data.
    precision : int
        Sample precision P in bits (2-16), normally the DICOM ``BitsStored``.

    Returns
    -------
    bytes
        The complete JPEG stream (SOI ... EOI).
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be 2..16, got {precision}")
    rows, cols = image.shape
    mask = (1 << precision) - 1
    x = image.astype(np.int64) & mask
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff).ravel()
    mag = np.abs(diff)
    ssss = np.zeros(mag.shape, dtype=np.int64)
    nz = mag > 0
    ssss[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    ssss = np.minimum(ssss, 16)  # -32768 -> category 16, no extra bits
    extra = np.where(diff < 0, diff + (1 << ssss) - 1, diff) & ((1 << ssss) - 1)
    extra_len = np.where(ssss == 16, 0, ssss)
    extra = np.where(ssss == 16, 0, extra)

    lengths = _code_lengths(np.bincount(ssss, minlength=17))
    codes, dht = _canonical_codes(lengths)
    sym_len = lengths[ssss] + extra_len
    sym_val = (codes[ssss] << extra_len) | extra

    # Expand every symbol into its bits, most significant first, and pack them.
    total = int(sym_len.sum())
    starts = np.cumsum(sym_len) - sym_len
    owner = np.repeat(np.arange(sym_len.size), sym_len)
    shift = sym_len[owner] - 1 - (np.arange(total) - starts[owner])
    bits = ((sym_val[owner] >> shift) & 1).astype(np.uint8)
    pad = (-total) % 8
    if pad:
        bits = np.concatenate([bits, np.ones(pad, dtype=np.uint8)])
    data = np.packbits(bits)
    ff = np.flatnonzero(data == 0xFF)
    if ff.size:
        data = np.insert(data, ff + 1, 0)

    sof = struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns, Cs, Td/Ta, Ss=predictor 1, Se, Ah/Al=Pt 0
    return b"".join(
        [
            b"\xff\xd8",
            _segment(0xFFC3, sof),
            _segment(0xFFC4, bytes([0x00]) + dht),
            _segment(0xFFDA, sos),
            data.tobytes(),
            b"\xff\xd9",
        ]
    )
