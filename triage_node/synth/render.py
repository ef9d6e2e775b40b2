"""Render a :class:`StudySpec` as an axial CT series in HU, with slice labels.

Geometry follows the scanner (PS3.3 C.7.6.2, Image Plane Module): the image rows
run along patient +x (``ImageOrientationPatient`` row cosines ``1\\0\\0``); with a
gantry tilt of ``t`` degrees the column cosines are ``0\\cos t\\sin t`` and the
slice normal is ``0\\-sin t\\cos t``. The table moves along z, so consecutive
``ImagePositionPatient`` values differ by ``(0, 0, spacing / cos t)`` and their
projection on the normal by ``spacing``. Each image is centred on the isocentre
(x = y = 0); the head sits wherever :attr:`StudySpec.head_center` puts it.

The phantom is painted on a compute grid of at most 256 x 256 pixels covering the
same field of view, with a few sub-slices per slice (slice-thickness integration,
i.e. partial volume), then interpolated to the output matrix, blurred by the
PSF, streaked, and given correlated noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from triage_node import SUBTYPES
from triage_node.synth.lesions import paint_lesion
from triage_node.synth.noise import reconstruct, resample_matrix, separable, skull_base_streaks
from triage_node.synth.phantom import Canvas, paint_anatomy
from triage_node.synth.spec import StudySpec

__all__ = ["RenderedSeries", "render_axial", "MIN_BLOOD_MM2", "HU_MIN", "HU_MAX"]

MIN_BLOOD_MM2 = 4.0
"""Blood area (mm^2) a slice must show to be labelled positive (~20 pixels at 512)."""
HU_MIN, HU_MAX = -1024.0, 3071.0
COMPUTE_MAX = 256
_POINTS_PER_CHUNK = 3_500_000


@dataclass(frozen=True)
class RenderedSeries:
    """One axial series: HU, labels, blood masks and geometry.

    Attributes
    ----------
    hu : ndarray, float32 (Z, rows, cols)
        Integer-valued HU in [-1024, 3071]; outside the reconstruction circle -1024.
    labels : ndarray, bool (Z, 6)
        Per-slice labels in :data:`triage_node.CLASSES` order (``any`` = OR).
    masks : ndarray, uint8 (Z, rows, cols)
        Bit ``i`` set where subtype ``SUBTYPES[i]`` blood is visible: it fills at least
        half the slice thickness, the noise-free pixel reads 40-100 HU, and no bone
        lies within one compute pixel.
    positions : ndarray, float (Z, 3)
        ``ImagePositionPatient`` of each slice (mm), in instance order.
    orientation : tuple of 6 float
        ``ImageOrientationPatient``.
    pixel_spacing : tuple of 2 float
        (row spacing, column spacing) in mm.
    slice_thickness : float
        Nominal slice thickness (mm); slices are contiguous along the normal.
    tilt_deg : float
        Gantry/detector tilt.
    fov_mm : float
        Reconstruction diameter.
    fov_mask : ndarray, bool (rows, cols)
        Pixels inside the reconstructed circle.
    kernel : str
        Reconstruction kernel ("brain" or "bone").
    clean : ndarray or None
        Noise-free HU on the compute grid (only with ``keep_clean=True``).
    """

    hu: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    positions: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    tilt_deg: float
    fov_mm: float
    fov_mask: np.ndarray
    kernel: str = "brain"
    clean: np.ndarray | None = None

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row cosines x column cosines)."""
        o = np.asarray(self.orientation)
        return np.cross(o[:3], o[3:])

    def with_kernel(self, kernel: str, seed: int) -> RenderedSeries:
        """The same slices reconstructed with another kernel (needs ``clean``)."""
        if self.clean is None:
            raise ValueError("with_kernel needs a series rendered with keep_clean=True")
        rng = np.random.default_rng([seed, 7])
        rows = self.hu.shape[-1]
        hu = _finish(reconstruct(self.clean, rows, self.fov_mm, self.slice_thickness, kernel, rng), self.fov_mask)
        return RenderedSeries(
            hu=hu, labels=self.labels, masks=self.masks, positions=self.positions,
            orientation=self.orientation, pixel_spacing=self.pixel_spacing,
            slice_thickness=self.slice_thickness, tilt_deg=self.tilt_deg, fov_mm=self.fov_mm,
            fov_mask=self.fov_mask, kernel=kernel, clean=None,
        )


def _finish(hu: np.ndarray, fov: np.ndarray) -> np.ndarray:
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu[:, ~fov] = HU_MIN
    return hu


def _support(an, n_h: np.ndarray) -> float:
    a, b_ant, b_post, c_up, _ = an.axes
    b = b_post if n_h[1] > 0 else b_ant
    return float(np.sqrt((a * n_h[0]) ** 2 + (b * n_h[1]) ** 2 + (c_up * n_h[2]) ** 2))


def render_axial(
    spec: StudySpec,
    rows: int = 512,
    slice_thickness_mm: float = 5.0,
    n_slices: int | None = None,
    tilt_deg: float = 0.0,
    *,
    descending: bool = False,
    kernel: str = "brain",
    keep_clean: bool = False,
) -> RenderedSeries:
    """Render the axial series of a study.

    Parameters
    ----------
    spec : StudySpec
        The study.
    rows : int
        Matrix size (rows = columns).
    slice_thickness_mm : float
        Slice thickness; slices are contiguous (spacing along the normal = thickness).
    n_slices : int, optional
        Number of slices; by default enough to cover skull base to vertex.
    tilt_deg : float
        Gantry tilt, -30 to 30 degrees.
    descending : bool
        Instance order from vertex to skull base instead of the reverse.
    kernel : {"brain", "bone"}
        Reconstruction kernel.
    keep_clean : bool
        Keep the noise-free HU so :meth:`RenderedSeries.with_kernel` can reuse it.

    Returns
    -------
    RenderedSeries
    """
    if rows < 64 or rows > 1024:
        raise ValueError(f"rows must be within 64-1024, got {rows}")
    if not -30.0 <= tilt_deg <= 30.0:
        raise ValueError(f"tilt_deg must be within -30..30, got {tilt_deg}")
    if not 0.3 <= slice_thickness_mm <= 10.0:
        raise ValueError(f"slice_thickness_mm must be within 0.3-10, got {slice_thickness_mm}")
    an = spec.anatomy
    rot = an.rotation()
    hc = np.asarray(spec.head_center, dtype=float)
    t = np.deg2rad(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(row_dir, col_dir)
    n_h = rot.T @ normal
    spacing = float(slice_thickness_mm)
    t_head = float(hc @ normal)
    bottom = t_head - 64.0
    top = t_head + _support(an, n_h) - 0.3 * spacing
    if n_slices is None:
        n_slices = int(np.ceil((top - bottom) / spacing))
    t_k = bottom + (np.arange(n_slices) + 0.5) * spacing
    centers = (t_k / np.cos(t))[:, None] * np.array([0.0, 0.0, 1.0])  # on the isocentre line

    fov = spec.fov_mm
    ps_out = fov / rows
    crows = min(rows, COMPUTE_MAX)
    ps_c = fov / crows
    positions = centers - (rows / 2 - 0.5) * ps_out * (row_dir + col_dir)
    origins_p = centers - (crows / 2 - 0.5) * ps_c * (row_dir + col_dir)
    origins_h = (origins_p - hc) @ rot  # R^T (p - hc) for each row vector
    n_sub = int(np.clip(round(spacing / 1.6), 1, 4))
    sub = (np.arange(n_sub) + 0.5) / n_sub * spacing - spacing / 2
    e_row = rot.T @ (col_dir * ps_c)
    e_col = rot.T @ (row_dir * ps_c)
    gravity = rot.T @ np.array([0.0, 1.0, 0.0])

    chunk = max(1, _POINTS_PER_CHUNK // (n_sub * crows * crows))
    hu_c = np.empty((n_slices, crows, crows), dtype=np.float32)
    blood_c = np.zeros((n_slices, crows, crows), dtype=np.uint8)  # bit i: >= half the thickness
    for k0 in range(0, n_slices, chunk):
        k1 = min(n_slices, k0 + chunk)
        cv = Canvas(origins_h[k0:k1], e_row, e_col, n_h, sub, (crows, crows), gravity)
        paint_anatomy(cv, an)
        for les in spec.lesions:
            paint_lesion(cv, an, les)
        hu_c[k0:k1] = cv.hu.mean(axis=1)
        if cv.blood.any():
            for i in range(len(SUBTYPES)):
                half = ((cv.blood >> i) & 1).mean(axis=1) >= 0.5
                blood_c[k0:k1] |= half.astype(np.uint8) << i

    tilt_key = int(round(tilt_deg * 100)) + 10_000
    rng = np.random.default_rng([spec.noise_seed, rows, int(round(spacing * 1000)), tilt_key])
    # Beam hardening at the petrous ridges (compute resolution).
    ridges_h = np.array([[-33.0, 17.0, -45.0], [33.0, 17.0, -45.0]])
    ridges_p = ridges_h @ rot.T + hc
    dist = (ridges_p.mean(axis=0) - centers) @ normal
    weights = np.clip(1.0 - np.abs(dist) / 14.0, 0.0, 1.0)
    rel = ridges_p[None, :, :] - origins_p[:, None, :]
    anchors = np.stack([rel @ col_dir / ps_c, rel @ row_dir / ps_c], axis=-1)
    skull_base_streaks(hu_c, anchors, weights, spec.streak_hu, ps_c, rng)

    masks = np.zeros((n_slices, rows, rows), dtype=np.uint8)
    if blood_c.any():
        # Visible blood: at least half the slice thickness, blood-like density after
        # partial volume, and not drowned in the partial volume of adjacent bone.
        visible = (hu_c >= 40.0) & (hu_c <= 100.0)
        visible &= ndimage.maximum_filter(hu_c, size=(1, 3, 3)) < 400.0
        blood_c &= visible.astype(np.uint8) * np.uint8(0xFF)
        up = resample_matrix(rows, crows, 0.0)
        for i in range(len(SUBTYPES)):
            bit = ((blood_c >> i) & 1).astype(np.float32)
            for z0 in range(0, n_slices, 16):
                if bit[z0:z0 + 16].any():
                    f = separable(up, bit[z0:z0 + 16]) if rows != crows else bit[z0:z0 + 16]
                    masks[z0:z0 + 16] |= (f >= 0.5).astype(np.uint8) << i
    yy, xx = np.mgrid[0:rows, 0:rows]
    half = (rows - 1) / 2
    fov_mask = (yy - half) ** 2 + (xx - half) ** 2 <= (rows / 2) ** 2
    hu = _finish(reconstruct(hu_c, rows, fov, spacing, kernel, rng), fov_mask)

    min_px = MIN_BLOOD_MM2 / (ps_out * ps_out)
    labels = np.zeros((n_slices, 1 + len(SUBTYPES)), dtype=bool)
    for i in range(len(SUBTYPES)):
        labels[:, 1 + i] = (((masks >> i) & 1) & fov_mask).sum(axis=(1, 2)) >= min_px
    labels[:, 0] = labels[:, 1:].any(axis=1)

    order = slice(None, None, -1) if descending else slice(None)
    return RenderedSeries(
        hu=hu[order].copy() if descending else hu,
        labels=labels[order].copy(),
        masks=masks[order].copy() if descending else masks,
        positions=positions[order].copy(),
        orientation=tuple(float(v) for v in (*row_dir, *col_dir)),
        pixel_spacing=(ps_out, ps_out),
        slice_thickness=spacing,
        tilt_deg=float(tilt_deg),
        fov_mm=fov,
        fov_mask=fov_mask,
        kernel=kernel,
        clean=(hu_c[order].copy() if descending else hu_c) if keep_clean else None,
    )
