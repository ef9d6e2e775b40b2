"""CT image formation effects: point spread, kernels, correlated noise, streaks.

Quantum noise in filtered back-projection CT is spatially correlated (its noise
power spectrum vanishes at zero frequency and peaks at mid frequencies for soft
kernels); a Gaussian-filtered white field is a close and cheap stand-in. Its
standard deviation scales with ``1/sqrt(slice thickness)``. The bone kernel is an
edge-enhancing (sharp) reconstruction: higher, finer-grained noise.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KERNELS", "reconstruct", "resample_matrix", "separable", "skull_base_streaks"]

# name -> (noise std at 5 mm in HU, edge-enhancement gain, PSF sigma in mm)
KERNELS = {
    "brain": (4.0, 0.0, 0.5),
    "bone": (14.0, 1.5, 0.3),
}


def resample_matrix(n_out: int, n_in: int, psf_px: float, gain: float = 0.0) -> np.ndarray:
    """One axis of the compute-grid -> image operator: interpolation, PSF, kernel.

    Parameters
    ----------
    n_out, n_in : int
        Output and input sizes along the axis (same field of view, pixel-area grids).
    psf_px : float
        Gaussian PSF sigma in output pixels (0: interpolation only).
    gain : float
        Edge-enhancement gain of a sharp kernel (unsharp mask).

    Returns
    -------
    ndarray, float32 (n_out, n_in)
    """
    u = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = u - lo
    op = np.zeros((n_out, n_in))
    np.add.at(op, (np.arange(n_out), lo), 1 - w)
    np.add.at(op, (np.arange(n_out), hi), w)

    def gauss(sigma: float) -> np.ndarray:
        i = np.arange(n_out)
        g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
        return g / g.sum(axis=1, keepdims=True)

    if psf_px > 0.05:
        op = gauss(psf_px) @ op
    if gain:
        op = (1 + gain) * op - gain * (gauss(2.0 * psf_px + 1.0) @ op)
    return op.astype(np.float32)


def reconstruct(
    hu_c: np.ndarray,
    rows: int,
    fov_mm: float,
    thickness_mm: float,
    kernel: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Image formation from the compute grid: noise, interpolation, PSF and kernel.

    White noise is added on the compute grid and passes through the same operator
    as the anatomy (``A X A^T`` per slice), so the image noise is spatially
    correlated with the kernel's texture; its standard deviation is scaled to the
    kernel's level at ``thickness_mm``.

    Parameters
    ----------
    hu_c : ndarray, (Z, n, n)
        Noise-free HU on the compute grid.
    rows : int
        Output matrix size.
    fov_mm, thickness_mm : float
        Field of view and slice thickness.
    kernel : {"brain", "bone"}
        Reconstruction kernel.
    rng : numpy.random.Generator
        Noise source.

    Returns
    -------
    ndarray, float32 (Z, rows, rows)
    """
    std5, gain, psf_mm = KERNELS[kernel]
    pixel = fov_mm / rows
    op = resample_matrix(rows, hu_c.shape[-1], psf_mm / pixel, gain)
    noise_gain = float(np.sqrt((op.astype(np.float64) ** 2).sum(axis=1)).mean() ** 2)
    std = std5 * np.sqrt(5.0 / max(thickness_mm, 0.3)) / noise_gain
    out = np.empty((hu_c.shape[0], rows, rows), dtype=np.float32)
    for z0 in range(0, hu_c.shape[0], 16):  # bounded temporaries for thin series
        x = rng.standard_normal(hu_c[z0:z0 + 16].shape, dtype=np.float32)
        x *= np.float32(std)
        x += hu_c[z0:z0 + 16]
        out[z0:z0 + 16] = separable(op, x)
    return out


def separable(op: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``op @ x[k] @ op.T`` for every slice ``k``, as two large GEMMs."""
    z, n, _ = x.shape
    m = op.shape[0]
    y = (x.reshape(z * n, n) @ op.T).reshape(z, n, m)
    y = np.ascontiguousarray(y.transpose(0, 2, 1)).reshape(z * m, n) @ op.T
    return np.ascontiguousarray(y.reshape(z, m, m).transpose(0, 2, 1))


def skull_base_streaks(
    hu: np.ndarray,
    anchors: np.ndarray,
    weights: np.ndarray,
    strength: float,
    pixel_mm: float,
    rng: np.random.Generator,
) -> None:
    """Add beam-hardening streaks between dense skull-base bones, in place.

    The dark band between the petrous ridges (the interpetrous "Hounsfield bar")
    plus fainter alternating radial streaks from each ridge, on the slices that cut
    the ridges. A classic mimic of posterior-fossa pathology.

    Parameters
    ----------
    hu : ndarray, shape (Z, rows, cols)
        Noise-free HU at compute resolution, modified in place.
    anchors : ndarray, shape (Z, 2, 2)
        (row, col) of the left and right petrous ridges on each slice.
    weights : ndarray, shape (Z,)
        0-1 strength per slice (0 where a slice misses the ridges).
    strength : float
        Peak darkening in HU.
    pixel_mm : float
        Pixel spacing of ``hu``.
    rng : numpy.random.Generator
        Source of the streak angles.
    """
    rows, cols = hu.shape[1:]
    rr, cc = np.mgrid[0:rows, 0:cols].astype(np.float32)
    px = np.float32(pixel_mm)
    for k in np.flatnonzero(weights > 0.05):
        (r0, c0), (r1, c1) = anchors[k]
        dr, dc = r1 - r0, c1 - c0
        length = np.hypot(dr, dc) + 1e-6
        t = ((rr - r0) * np.float32(dr) + (cc - c0) * np.float32(dc)) / np.float32(length**2)
        dist = np.abs((rr - r0) * np.float32(dc) - (cc - c0) * np.float32(dr)) * np.float32(pixel_mm / length)
        seg = np.clip(1.0 - np.abs(2 * t - 1) ** 6, 0.0, 1.0)
        field = np.float32(-strength) * seg * np.exp(-((dist / np.float32(4.0)) ** 2))
        for r_a, c_a in ((r0, c0), (r1, c1)):
            dy, dx = rr - np.float32(r_a), cc - np.float32(c_a)
            decay = np.exp(-np.hypot(dy, dx) * (px / np.float32(70.0))) * np.float32(0.45 * strength)
            for _ in range(3):
                ang = rng.uniform(0, np.pi)
                sign = np.float32(rng.choice([-1.0, 0.6]))
                d = np.abs(dy * np.float32(np.sin(ang)) - dx * np.float32(np.cos(ang))) * (px / np.float32(1.2))
                field += sign * decay * np.exp(-(d * d))
        soft = (hu[k] > -300) & (hu[k] < 300)
        hu[k] += np.float32(weights[k]) * field * soft
