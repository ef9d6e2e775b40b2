"""The square part of a slice that the slice CNN sees, and the way back from it.

Two framings exist. ``centred`` pads the slice with air to a centred square (the field of
view decides the scale, as before). ``head`` finds the head in the series and frames it
with a small margin, so the head fills the input whatever the scanner's field of view, the
matrix or the rendering of a training image: a 650-pixel JPEG of one hospital and a
512-pixel DICOM slice of another give the model the same scale. The frame is found once
per series (the union of every slice's head box), so neighbouring slices stay aligned for
the adjacent-slice channels and a slice near the vertex stays small, as it is.

Heat maps are computed in the frame; :meth:`InputFrame.to_image` puts them back on the
slice's own rows x columns grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

#: Window the head is found in (HU center, width): the brain window of the CT-ICH images.
HEAD_WINDOW: tuple[float, float] = (40.0, 120.0)
#: A pixel belongs to the head above this windowed value (about -8 HU in HEAD_WINDOW).
HEAD_LEVEL = 0.1
#: Fraction of the head box added on every side.
HEAD_MARGIN = 0.06
#: Sub-sampling step of the search: one pixel in four is plenty to find a head.
SEARCH_STEP = 4
#: Smallest connected region, as a fraction of the searched image, that can be a head.
MIN_HEAD_AREA = 0.01


@dataclass(frozen=True)
class InputFrame:
    """A square of ``side`` pixels with its top-left corner at row ``y0``, column ``x0``.

    The square may reach beyond the image; what lies outside is air.
    """

    y0: int
    x0: int
    side: int

    @classmethod
    def centred(cls, rows: int, columns: int) -> InputFrame:
        """The image padded to a centred square (the ``centred`` framing)."""
        s = max(rows, columns)
        return cls((rows - s) // 2, (columns - s) // 2, s)

    def _overlap(self, rows: int, columns: int) -> tuple[slice, slice, slice, slice] | None:
        ys, xs = max(self.y0, 0), max(self.x0, 0)
        ye, xe = min(self.y0 + self.side, rows), min(self.x0 + self.side, columns)
        if ye <= ys or xe <= xs:
            return None
        return slice(ys, ye), slice(xs, xe), slice(ys - self.y0, ye - self.y0), slice(xs - self.x0, xe - self.x0)

    def crop(self, image: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """The frame's pixels of ``image`` [H, W] as [side, side]; outside the image, ``fill``."""
        img = np.asarray(image, dtype=np.float32)
        out = np.full((self.side, self.side), fill, dtype=np.float32)
        ov = self._overlap(*img.shape)
        if ov is not None:
            iy, ix, fy, fx = ov
            out[fy, fx] = img[iy, ix]
        return out

    def to_image(self, heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """A square map in the frame (any side) on the image grid [H, W]; zero outside the frame."""
        big = resize(np.asarray(heat, dtype=np.float32), self.side)
        out = np.zeros(shape, dtype=np.float32)
        ov = self._overlap(*shape)
        if ov is not None:
            iy, ix, fy, fx = ov
            out[iy, ix] = big[fy, fx]
        return out

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.y0, self.x0, self.side)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float image to [size, size] (Pillow filters over the whole footprint when shrinking)."""
    if img.shape == (size, size):
        return np.asarray(img, dtype=np.float32)
    return np.asarray(Image.fromarray(np.asarray(img, dtype=np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR))


def head_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) of the largest connected region of a 2-D mask, or None if it is too small.

    A 5x5 opening first removes thin structures such as the table or head-rest arcs, and
    the thin bridges where they touch the head.
    """
    opened = ndimage.binary_opening(mask, structure=np.ones((5, 5), bool))
    labels, n = ndimage.label(opened)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    k = int(np.argmax(sizes))
    if sizes[k] < MIN_HEAD_AREA * mask.size:
        return None
    sl = ndimage.find_objects(labels)[k]
    return sl[0].start, sl[1].start, sl[0].stop, sl[1].stop


def find_head_frame(windowed: np.ndarray, rows: int, columns: int, step: int = SEARCH_STEP, margin: float = HEAD_MARGIN) -> InputFrame:
    """The ``head`` framing of a series.

    Parameters
    ----------
    windowed : ndarray [Z, h, w]
        The series in :data:`HEAD_WINDOW` (0..1), sub-sampled by ``step`` (``img[:, ::step, ::step]``).
    rows, columns : int
        Size of the full-resolution slices.

    Returns
    -------
    InputFrame
        A square around the slices' head boxes (their union, less the outermost 10 % of
        edges on each side in series of five slices or more), ``margin`` wider on each side;
        the centred framing when no slice shows a head.
    """
    boxes = [b for b in (head_box(np.asarray(s) > HEAD_LEVEL) for s in windowed) if b is not None]
    if not boxes:
        return InputFrame.centred(rows, columns)
    b = np.asarray(boxes, dtype=np.float64) * step
    # the outer 10 % of the slices' edges are ignored: one slice where the head rest still
    # touches the head must not widen the frame of the whole series
    q = 0.1 if len(b) >= 5 else 0.0
    y0, x0 = np.quantile(b[:, 0], q), np.quantile(b[:, 1], q)
    y1, x1 = min(np.quantile(b[:, 2], 1 - q), rows), min(np.quantile(b[:, 3], 1 - q), columns)
    side = float(max(y1 - y0, x1 - x0) * (1 + 2 * margin))
    side = max(side, 0.25 * max(rows, columns))  # never zoom into a speck
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    s = int(round(side))
    return InputFrame(int(round(cy - s / 2)), int(round(cx - s / 2)), s)


WindowSlice = Callable[[int, str], np.ndarray]


def plan_inputs(window_slice: WindowSlice, n_slices: int, plan: Sequence[tuple[int, str]], size: int, frame: InputFrame) -> np.ndarray:
    """CNN inputs [N, 3, size, size] (0..1) of a series from a windowing function.

    Parameters
    ----------
    window_slice : callable
        ``(slice index, window name) -> [H, W]`` in 0..1 (air is 0 in every window).
    n_slices : int
    plan : sequence of (slice offset, window name)
        One entry per channel; a neighbour beyond either end repeats the edge slice, so a
        one- or two-slice study gets the same input layout as a long one.
    size : int
    frame : InputFrame
        The part of each slice that is cropped (outside the slice: air) and resized.
    """
    out = np.empty((n_slices, len(plan), size, size), dtype=np.float32)
    cache: dict[tuple[int, str], np.ndarray] = {}
    for s in range(n_slices):
        for c, (offset, name) in enumerate(plan):
            key = (min(max(s + offset, 0), n_slices - 1), name)
            if key not in cache:
                cache[key] = resize(frame.crop(window_slice(*key), 0.0), size)
            out[s, c] = cache[key]
        for key in [k for k in cache if k[0] < s - 1]:  # neighbours behind s-1 are done
            del cache[key]
    return out
