"""Class-activation heat maps from the served outputs of the slice CNN.

The slice CNN ends in global average pooling and one linear layer, so for class k
``logit_k = b_k + (1/hw) sum_{c,i,j} W[k,c] A[c,i,j]``. The Grad-CAM weight of channel c is
``mean_ij d logit_k / d A[c,i,j] = W[k,c] / hw``: the CAM ``ReLU(sum_c W[k,c] A[c])`` equals
Grad-CAM up to a positive scale, and needs no gradient, only the ``features`` output
(Zhou et al. 2016; Selvaraju et al. 2017). Grad-CAM++ (Chattopadhay et al. 2018) has a
closed form for the same head: see :func:`cam_pp`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from triage_node import CLASSES

if TYPE_CHECKING:
    from worker.pipeline.input_frame import InputFrame


def _upsample(m: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR))


def _normalise(m: np.ndarray) -> np.ndarray:
    m = np.maximum(m, 0.0)
    top = float(m.max()) if m.size else 0.0
    return (m / top).astype(np.float32) if top > 0 else np.zeros_like(m, dtype=np.float32)


def cam(features: np.ndarray, class_weights: np.ndarray, size: int) -> np.ndarray:
    """CAM of one class for one slice.

    Parameters
    ----------
    features : ndarray [C, h, w]
        The ``features`` output of the slice CNN for this slice.
    class_weights : ndarray [C]
        Row k of the linear head's weight matrix.
    size : int
        Output side (the CNN input size, or the image size).

    Returns
    -------
    ndarray float32 [size, size] in 0..1
        ReLU of the weighted channel sum, upsampled bilinearly, divided by its maximum
        (all zeros where nothing supports the class).
    """
    f = np.asarray(features, dtype=np.float32)
    w = np.asarray(class_weights, dtype=np.float32)
    if f.ndim != 3 or w.shape != (f.shape[0],):
        raise ValueError(f"features must be [C,h,w] and class_weights [C]; got {f.shape} and {w.shape}")
    m = np.maximum(np.tensordot(w, f, axes=(0, 0)), 0.0)
    return _normalise(_upsample(m, size))


def cam_pp(features: np.ndarray, class_weights: np.ndarray, size: int) -> np.ndarray:
    """Grad-CAM++ of one class for a pooled linear head, in closed form.

    With the exponential score of Grad-CAM++ and a GAP + linear head the gradient
    ``g_c = W[k,c]/hw`` is constant over space, so
    ``alpha_c = 1 / (2 + g_c * sum_ij A[c,i,j])`` and the channel weight is
    ``hw * alpha_c * ReLU(g_c)``.
    """
    f = np.asarray(features, dtype=np.float64)
    w = np.asarray(class_weights, dtype=np.float64)
    if f.ndim != 3 or w.shape != (f.shape[0],):
        raise ValueError(f"features must be [C,h,w] and class_weights [C]; got {f.shape} and {w.shape}")
    hw = f.shape[1] * f.shape[2]
    g = w / hw
    denom = 2.0 + g * f.sum(axis=(1, 2))
    alpha = np.where(np.abs(denom) > 1e-12, 1.0 / np.where(np.abs(denom) > 1e-12, denom, 1.0), 0.0)
    weights = hw * alpha * np.maximum(g, 0.0)
    m = np.maximum(np.tensordot(weights, f, axes=(0, 0)), 0.0)
    return _normalise(_upsample(m.astype(np.float32), size))


#: Heat-map methods by the name ``triage-node explain --method`` takes.
METHODS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {"cam": cam, "campp": cam_pp}


def slice_heatmaps(
    features: np.ndarray,
    head_weight: np.ndarray,
    frame: InputFrame,
    shape: tuple[int, int],
    classes: Sequence[str] = CLASSES,
    method: str = "cam",
    where: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Heat maps of one slice on the slice's own grid, one per class.

    Parameters
    ----------
    features : ndarray [C, h, w]
        The ``features`` output of the slice CNN for this slice.
    head_weight : ndarray [6, C]
        The linear head's weight (``card.head_weights()[0]``), rows in CLASSES order.
    frame : InputFrame
        The part of the slice the CNN saw; the map is computed at ``frame.side`` and placed
        back with :meth:`InputFrame.to_image` (zero outside the frame).
    shape : (rows, columns)
        The slice's Rows x Columns.
    classes : sequence of str
        Class names to map.
    method : {"cam", "campp"}
        :func:`cam` or :func:`cam_pp`.
    where : ndarray of bool [rows, columns], optional
        Where blood can be (:func:`blood_region`): the maps are zero elsewhere and scaled
        so that their maximum is 1 again.

    Returns
    -------
    dict
        ``{class: float32 [rows, columns] in 0..1}`` in the order of ``classes``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    fn = METHODS[method]
    w = np.asarray(head_weight, dtype=np.float32)
    shape = (int(shape[0]), int(shape[1]))
    maps = {name: frame.to_image(fn(features, w[CLASSES.index(name)], frame.side), shape) for name in classes}
    if where is not None:
        maps = {name: _normalise(m * where) for name, m in maps.items()}
    return maps


#: Bounds, in the 40/120 window (0..1), of what can be blood: above -18 HU (not air or fat,
#: with room for JPEG noise) and below 98 HU (not bone).
SOFT_TISSUE = (0.02, 0.98)


def blood_region(windowed: np.ndarray) -> np.ndarray:
    """Pixels of a slice where a bleed can be, from the slice in the 40/120 window (0..1).

    A class map is 8 x 8 cells over the head, so its peak can fall on the scalp, the skull or
    the air next to a bleed. Blood is soft tissue inside the skull: the pixels between the
    window's ends that the filled skull encloses. Where the skull ring is open (skull base,
    vertex) and encloses almost nothing, all soft tissue counts.
    """
    w = np.asarray(windowed, dtype=np.float32)
    soft = (w > SOFT_TISSUE[0]) & (w < SOFT_TISSUE[1])
    inside = ndimage.binary_fill_holes(w >= SOFT_TISSUE[1]) & soft
    return inside if inside.sum() > 0.02 * w.size else soft


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 [H,W,3] of a 0..1 grayscale image with a 0..1 heat map in a red-yellow ramp.

    ``heat`` is resized to ``gray``'s shape; pixels with heat < 0.2 stay gray.
    """
    g = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)
    h = np.asarray(heat, dtype=np.float32)
    if h.shape != g.shape:
        h = np.asarray(Image.fromarray(h, mode="F").resize((g.shape[1], g.shape[0]), Image.Resampling.BILINEAR))
    h = np.clip(h, 0.0, 1.0)
    color = np.stack([np.ones_like(h), h, np.zeros_like(h)], axis=-1)  # red -> yellow
    a = (alpha * (h >= 0.2) * h)[..., None]
    rgb = (1.0 - a) * g[..., None] + a * color
    return (rgb * 255.0 + 0.5).astype(np.uint8)
