"""An analytic adult head phantom in Hounsfield units.

The phantom lives in *head coordinates* (millimetres, LPS-like axes: +x patient
left, +y posterior, +z superior, origin near the thalami). It is evaluated point
by point, so an axial slice at any tilt and resolution can be painted without a
3-D volume. Structures and typical densities (HU):

==========================  ==========
air                          -1000
scalp / muscle / globe        15-50 (fat -90)
skull (tables / diploe)      1500-1900 / 600-1000
CSF (sulci, cisterns,          0-12
ventricles)
grey matter                   35-45
white matter                  22-30
falx, tentorium               45-60 (thin, partial volume)
pineal / choroid calcium     100-400
==========================  ==========

Painting is done on a :class:`Canvas` (one chunk of slices, each with a few
sub-slices for slice-thickness integration). Small structures are painted only
inside their bounding box (:meth:`Canvas.block`), which keeps a 32-slice series
well under a second. What is painted, one subject's head, is drawn by
``triage_node.synth.anatomy``.
"""

from __future__ import annotations

import numpy as np

from triage_node.synth.anatomy import Anatomy, floor_z, tentorium_z

__all__ = ["Canvas", "Tissue", "paint_anatomy"]


class Tissue:
    """Tissue codes written to :attr:`Canvas.tissue` (used by the lesion painters)."""

    AIR = 0
    SOFT = 1
    BONE = 2
    CSF = 3  # extra-axial: sulci, fissures, basal cisterns
    VENTRICLE = 4
    GREY = 5
    WHITE = 6
    DEEP_GREY = 7
    CALCIUM = 8
    DURA = 9  # falx and tentorium


PARENCHYMA = (Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY)


class Canvas:
    """HU, tissue and blood canvases for a chunk of slices with sub-slices.

    Parameters
    ----------
    origins : ndarray, shape (n, 3)
        Head coordinates of compute pixel (row 0, col 0) of each slice (sub-slice 0).
    e_row, e_col : ndarray, shape (3,)
        Head-coordinate step of one compute pixel down a column / along a row.
    normal : ndarray, shape (3,)
        Head-coordinate unit normal of the slices.
    sub_offsets : ndarray, shape (S,)
        Sub-slice offsets along the normal (mm), for slice-thickness integration.
    shape : (int, int)
        Compute grid (rows, cols).
    gravity : ndarray, shape (3,)
        Head-coordinate unit vector pointing down (patient posterior when supine).
    """

    def __init__(self, origins, e_row, e_col, normal, sub_offsets, shape, gravity):
        self.origins = np.asarray(origins, dtype=np.float64)
        self.e_row = np.asarray(e_row, dtype=np.float64)
        self.e_col = np.asarray(e_col, dtype=np.float64)
        self.normal = np.asarray(normal, dtype=np.float64)
        self.sub = np.asarray(sub_offsets, dtype=np.float64)
        self.gravity = np.asarray(gravity, dtype=np.float64)
        self.rows, self.cols = shape
        n, s = len(self.origins), len(self.sub)
        self.hu = np.full((n, s, self.rows, self.cols), -1000.0, dtype=np.float32)
        self.tissue = np.zeros((n, s, self.rows, self.cols), dtype=np.uint8)
        self.blood = np.zeros((n, s, self.rows, self.cols), dtype=np.uint8)
        self._pix = float(np.linalg.norm(self.e_row))
        basis = np.stack([self.e_row, self.e_col], axis=1)  # 3x2
        self._proj = np.linalg.pinv(basis)  # 2x3: head vector -> (row, col)

    def coords(self, ks: slice, _ss: slice, rs: slice, cs: slice):
        """Head coordinates (x, y, z) of a block, each of shape (k, S, r, c), float32."""
        o = self.origins[ks].astype(np.float32)
        r = np.arange(rs.start, rs.stop, dtype=np.float32)
        c = np.arange(cs.start, cs.stop, dtype=np.float32)
        s = self.sub.astype(np.float32)
        out = []
        for axis in range(3):
            v = (
                o[:, axis, None, None, None]
                + (s * np.float32(self.normal[axis]))[None, :, None, None]
                + (r * np.float32(self.e_row[axis]))[None, None, :, None]
            ) + (c * np.float32(self.e_col[axis]))[None, None, None, :]
            out.append(v)
        return out

    def full(self):
        """Block covering the whole chunk."""
        return slice(0, len(self.origins)), slice(None), slice(0, self.rows), slice(0, self.cols)

    def block(self, center, radius):
        """Block of slices/rows/cols that a sphere (head coordinates) can touch, or None."""
        c = np.asarray(center, dtype=np.float64)
        dist = (c - self.origins) @ self.normal
        reach = radius + np.abs(self.sub).max() + self._pix
        ks = np.flatnonzero(np.abs(dist) < reach)
        if ks.size == 0:
            return None
        rc = (c - self.origins[ks]) @ self._proj.T  # (k, 2) row, col
        m = radius / self._pix + 2
        r0 = int(max(np.floor(rc[:, 0].min() - m), 0))
        r1 = int(min(np.ceil(rc[:, 0].max() + m), self.rows))
        c0 = int(max(np.floor(rc[:, 1].min() - m), 0))
        c1 = int(min(np.ceil(rc[:, 1].max() + m), self.cols))
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(int(ks[0]), int(ks[-1]) + 1), slice(None), slice(r0, r1), slice(c0, c1)

    def paint(self, blk, mask, hu, tissue=None):
        """Set HU (scalar or array over the mask) and tissue code where ``mask``."""
        view = self.hu[blk]
        if np.ndim(hu):
            view[mask] = hu[mask]
        else:
            view[mask] = hu
        if tissue is not None:
            self.tissue[blk][mask] = tissue


def _ellipsoid(q, center, semi, angle_deg: float = 0.0):
    """Normalised radius of an ellipsoid (rotated about z by ``angle_deg``)."""
    x, y, z = (q[i] - np.float32(center[i]) for i in range(3))
    if angle_deg:
        t = np.deg2rad(angle_deg)
        c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
        x, y = x * c + y * s, y * c - x * s
    return (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2


def _blob(cv: Canvas, center, semi, hu, tissue, where=None, angle=0.0, inside=1.0):
    """Paint an ellipsoid, optionally only over tissues in ``where``."""
    blk = cv.block(center, max(semi))
    if blk is None:
        return
    q = cv.coords(*blk)
    m = _ellipsoid(q, center, semi, angle) < inside
    if where is not None:
        m &= np.isin(cv.tissue[blk], where)
    cv.paint(blk, m, hu, tissue)


def paint_anatomy(cv: Canvas, an: Anatomy) -> None:
    """Paint the whole head (without lesions) onto a canvas."""
    blk = cv.block((0.0, 0.0, 0.0), max(an.axes[:3]) + 2.0)
    if blk is None:
        return
    x, y, z = cv.coords(*blk)
    hb = np.full(x.shape, -1000.0, dtype=np.float32)
    tb = np.zeros(x.shape, dtype=np.uint8)
    d = an.depth(x, y, z)
    hidx = np.flatnonzero(d > 0)
    x, y, z, d = x.ravel()[hidx], y.ravel()[hidx], z.ravel()[hidx], d.ravel()[hidx]
    sk0, sk1 = an.scalp_mm, an.inner_mm
    tbl = 0.3 * an.skull_mm
    # The skull base lies below z = -18 mm everywhere: evaluate it only there.
    low = np.flatnonzero(z < -18.0)
    under = np.full(z.shape, -1.0, dtype=np.float32)
    under[low] = floor_z(x[low], y[low]) - z[low]
    hv = np.full(hidx.shape, 38.0, dtype=np.float32)
    hc = np.full(hidx.shape, Tissue.SOFT, dtype=np.uint8)
    # Scalp: skin, a thin fat layer, galea; then the tables and diploe of the vault.
    hv[(d > 0.35 * sk0) & (d < 0.5 * sk0)] = -30.0
    dd = d - np.float32(sk0)
    skull = (dd >= 0) & (d < sk1)
    tables = skull & ((dd < tbl) | (dd > an.skull_mm - tbl))
    hv[skull] = an.diploe_hu
    hv[tables] = an.bone_hu
    hc[skull] = Tissue.BONE
    # Skull base: a bony floor under the cranial fossae, muscle and face below it.
    interior = d >= sk1
    base_bone = interior & (under > 0) & (under < 5.0)
    hv[base_bone] = an.bone_hu * 0.8
    hc[base_bone] = Tissue.BONE
    hv[interior & (under >= 5.0)] = 42.0
    cav = interior & (under <= 0)
    sel = np.flatnonzero(cav)
    idx = hidx[sel]
    cx, cy, cz = x[sel], y[sel], z[sel]
    dc = d[sel] - np.float32(sk1)
    hb.reshape(-1)[hidx] = hv
    tb.reshape(-1)[hidx] = hc
    sd = an.sulcal_distance(cx, cy, cz)
    half = np.float32(an.sulcus_mm / 2)
    depth_sulci = np.float32(an.csf_mm + 16.0)
    csf = (dc < an.csf_mm) | ((sd < half) & (dc < depth_sulci))
    grey = (dc < an.csf_mm + 3.0) | ((sd < half + 2.6) & (dc < depth_sulci + 2.6))
    # Interhemispheric fissure and falx (down to the corpus callosum in the middle).
    pf = (cy > 2.0 + 0.45 * np.abs(cx)) & (cz < tentorium_z(cx, cy))
    falx_low = np.where(np.abs(cy) < 38, 24.0, -5.0).astype(np.float32)
    fiss = (np.abs(cx) < 1.2 + 0.4 * an.csf_mm) & (cz > falx_low) & ~pf
    tent = np.abs(cz - tentorium_z(cx, cy)) < 0.7
    tent &= (cy > 2.0 + 0.45 * np.abs(cx) + 4) & (np.abs(cx) > 9 + 0.2 * (cy - 10))
    val = np.where(csf | fiss, np.float32(7.0), np.where(grey, an.grey_hu, an.white_hu)).astype(np.float32)
    code = np.where(csf | fiss, Tissue.CSF, np.where(grey, Tissue.GREY, Tissue.WHITE)).astype(np.uint8)
    # Posterior fossa: cerebellum with folia, CSF at its surface.
    pdc = dc[pf]
    folia = np.sin(np.sqrt(cx[pf] ** 2 + ((cy[pf] - 40) * 1.2) ** 2 + ((cz[pf] + 45) * 1.5) ** 2) * 2.2)
    cere = np.where(folia > 0.55, an.white_hu + 4, an.grey_hu - 1).astype(np.float32)
    val[pf] = np.where(pdc < an.csf_mm, np.float32(7.0), cere)
    code[pf] = np.where(pdc < an.csf_mm, Tissue.CSF, Tissue.GREY)
    falx = fiss & (np.abs(cx) < 0.45)
    val[falx | tent] = 52.0
    code[falx | tent] = Tissue.DURA
    hb.reshape(-1)[idx] = val
    tb.reshape(-1)[idx] = code
    cv.hu[blk] = hb
    cv.tissue[blk] = tb
    _paint_deep(cv, an)


def _paint_deep(cv: Canvas, an: Anatomy) -> None:
    v = an.ventricle_scale
    par = (Tissue.GREY, Tissue.WHITE, Tissue.CSF, Tissue.DURA)
    g = an.grey_hu - 2
    # Brainstem, cisterns, fourth ventricle and the skull-base structures.
    _blob(cv, (0, 12, -47), (13, 12, 22), an.white_hu + 5, Tissue.WHITE, where=par)
    _blob(cv, (0, 8, -18), (12, 11, 7), an.white_hu + 4, Tissue.WHITE, where=par)
    _blob(cv, (0, 8, -18), (15.5, 14.5, 6), 7.0, Tissue.CSF, where=par, inside=1.0)
    _blob(cv, (0, 8, -18), (12, 11, 7), an.white_hu + 4, Tissue.WHITE, where=(Tissue.CSF,))
    _blob(cv, (0, -13, -21), (13, 8, 5), 7.0, Tissue.CSF, where=par)
    _blob(cv, (0, 23, -14), (8, 5, 6), 7.0, Tissue.CSF, where=par)
    _blob(cv, (0, 27, -44), (6, 3.5, 6), 5.0, Tissue.VENTRICLE, where=par)
    _blob(cv, (0, 68, -58), (16, 9, 7), 7.0, Tissue.CSF, where=par)
    _blob(cv, (0, -1, -46), (10, 2.2, 16), 7.0, Tissue.CSF, where=par)
    for s in (-1, 1):
        _blob(cv, (s * 44, -6, -8), (20, 2.2, 10), 7.0, Tissue.CSF, where=par, angle=s * 12)
        # Deep grey nuclei.
        _blob(cv, (s * 12, -17, 12), (5, 9, 9), g, Tissue.DEEP_GREY, where=par)
        _blob(cv, (s * 21, -4, 2), (6.5, 14, 9), g - 1, Tissue.DEEP_GREY, where=par, angle=s * 8)
        _blob(cv, (s * 10, 11, 5), (8.5, 12, 9), g - 1, Tissue.DEEP_GREY, where=par)
        # Lateral ventricles: frontal horn, body, atrium, occipital and temporal horns.
        for c, semi in (
            ((s * (2.5 + 3 * v), -20, 16), (4 * v, 11, 6 * v)),
            ((s * (3.5 + 3.5 * v), 2, 22), (3.8 * v, 20, 4.5 * v)),
            ((s * (12 + 3 * v), 24, 11), (5.5 * v, 10, 8)),
            ((s * (15 + 3 * v), 38, 8), (2.5 * v, 9, 4.5)),
            ((s * 28, -2, -18), (2 + v, 11, 3.5)),
        ):
            _blob(cv, c, semi, 5.0, Tissue.VENTRICLE, where=par + (Tissue.DEEP_GREY,))
        if an.choroid_hu:
            _blob(cv, (s * (12 + 3 * v), 25, 10), (2.6, 3.2, 2.4), an.choroid_hu, Tissue.CALCIUM,
                  where=(Tissue.VENTRICLE,))
        if an.basal_ganglia_hu:
            _blob(cv, (s * 19, -6, 2), (2.5, 5, 4), an.basal_ganglia_hu, Tissue.CALCIUM)
        # Petrous ridges, orbits and globes.
        _blob(cv, (s * 33, 17, -45), (26, 7, 9), an.bone_hu, Tissue.BONE, angle=s * 25)
        _blob(cv, (s * 31, -64, -40), (14, 19, 13), -85.0, Tissue.SOFT, where=(Tissue.SOFT, Tissue.BONE))
        _blob(cv, (s * 32, -74, -38), (11.5, 11.5, 11.5), 12.0, Tissue.SOFT, where=(Tissue.SOFT, Tissue.BONE))
    # Septum between the frontal horns, third ventricle, pineal.
    _blob(cv, (0, -8, 18), (0.9, 30, 9), an.white_hu + 5, Tissue.WHITE, where=(Tissue.VENTRICLE,))
    _blob(cv, (0, 2, -2), (1.5 * v, 13, 9), 5.0, Tissue.VENTRICLE, where=par + (Tissue.DEEP_GREY,))
    if an.pineal_hu:
        _blob(cv, (0, 18, 0), (3, 3.5, 3), an.pineal_hu, Tissue.CALCIUM)
    # Sphenoid sinus (air in a bony shell) and ethmoid cells.
    _blob(cv, (0, -16, -50), (14, 13, 10), an.bone_hu * 0.7, Tissue.BONE, where=(Tissue.SOFT, Tissue.BONE))
    _blob(cv, (0, -16, -50), (11.5, 10.5, 7.5), -980.0, Tissue.AIR, where=(Tissue.BONE,))
    _blob(cv, (0, -62, -38), (9, 18, 12), -850.0, Tissue.AIR, where=(Tissue.SOFT, Tissue.BONE))
