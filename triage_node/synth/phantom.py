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
well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Anatomy", "Canvas", "Tissue", "sample_anatomy", "paint_anatomy"]


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


@dataclass(frozen=True)
class Anatomy:
    """Per-subject anatomical parameters (all lengths in mm, densities in HU)."""

    axes: tuple[float, float, float, float, float]  # A (L-R), B ant, B post, C up, C down
    scalp_mm: float
    skull_mm: float
    csf_mm: float  # extra-axial CSF width (atrophy)
    sulcus_mm: float  # sulcal width
    ventricle_scale: float
    grey_hu: float
    white_hu: float
    bone_hu: float
    diploe_hu: float
    rotation_deg: tuple[float, float, float]  # yaw (z), pitch (x), roll (y)
    sulcal_waves: tuple[tuple[float, float, float, float, float], ...]  # kx, ky, kz, phase, amp
    pineal_hu: float  # 0 = not calcified
    choroid_hu: float  # 0 = not calcified
    basal_ganglia_hu: float  # 0 = not calcified

    def rotation(self) -> np.ndarray:
        """Rotation matrix R mapping head coordinates to patient LPS directions."""
        yaw, pitch, roll = np.deg2rad(self.rotation_deg)
        cz, sz = np.cos(yaw), np.sin(yaw)
        cx, sx = np.cos(pitch), np.sin(pitch)
        cy, sy = np.cos(roll), np.sin(roll)
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        return rz @ rx @ ry

    @property
    def inner_mm(self) -> float:
        """Depth of the inner table below the skin surface."""
        return self.scalp_mm + self.skull_mm

    def depth(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Depth below the skin along the ray from the origin (mm, > 0 inside)."""
        a, b_ant, b_post, c_up, c_down = self.axes
        iy = np.where(y > 0, np.float32(b_post**-2), np.float32(b_ant**-2))
        iz = np.where(z > 0, np.float32(c_up**-2), np.float32(c_down**-2))
        p2 = x * x
        r2 = p2 * np.float32(a**-2)
        t = y * y
        p2 += t
        t *= iy
        r2 += t
        t = z * z
        p2 += t
        t *= iz
        r2 += t
        r2 += np.float32(1e-12)
        np.divide(p2, r2, out=t)
        np.sqrt(t, out=t)
        np.sqrt(p2, out=p2)
        t -= p2
        return t

    def sulcal_distance(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate distance (mm) to the nearest sulcus.

        Sulci are the zero set of a sum of plane waves evaluated on the direction
        from the origin (projected onto a 65 mm sphere), so they run radially inward
        from the surface, narrowing with depth, as in an axial slice of cortex.
        """
        r = np.sqrt(x * x + y * y + z * z) + np.float32(1e-3)
        scale = (np.float32(65.0) + np.float32(0.35) * (r - np.float32(65.0))) / r
        xs, ys, zs = x * scale, y * scale, z * scale
        g = np.zeros_like(x)
        grad = 0.0
        for kx, ky, kz, phase, amp in self.sulcal_waves:
            g += np.float32(amp) * np.sin(kx * xs + ky * ys + kz * zs + np.float32(phase))
            grad += (amp * np.sqrt(kx * kx + ky * ky + kz * kz)) ** 2
        return np.abs(g) / (scale * np.float32(np.sqrt(grad / 2.0)))


def floor_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the skull base: anterior, middle and posterior fossa floors.

    The orbital roofs bulge up into the anterior fossa (cribriform plate lower in
    the midline); the middle fossae are bowls deep laterally (temporal lobes)
    beside the sphenoid body; the posterior fossa is a bowl around the foramen
    magnum. Curved floors cut by an axial slice give rings and crescents of bone,
    not plates.
    """
    ax = np.abs(x)
    pf_edge = 2.0 + 0.45 * ax  # petrous ridges run anteromedial to posterolateral
    post = np.clip((y - pf_edge) / 6.0 + 0.5, 0.0, 1.0)
    ant = np.clip((-28.0 - y) / 8.0 + 0.5, 0.0, 1.0)
    lateral = np.clip((ax - 10.0) / 8.0, 0.0, 1.0)
    bowl_mid = np.minimum(-52.0 + 0.02 * ((ax - 38.0) ** 2 + 0.6 * (y + 3.0) ** 2), -30.0)
    middle = -32.0 + lateral * (bowl_mid + 32.0)
    anterior = -19.0 - 0.02 * ((ax - 28.0) ** 2 + (y + 52.0) ** 2)
    bowl = np.minimum(-67.0 + 0.008 * (x * x + (y - 32.0) ** 2), -46.0)
    return (middle + post * (bowl - middle) + ant * (anterior - middle)).astype(np.float32)


def tentorium_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the tentorium cerebelli over the posterior fossa."""
    return (-20.0 - 0.22 * np.maximum(y - 8.0, 0.0) - 0.12 * np.abs(x)).astype(np.float32)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one subject's anatomy."""
    a = rng.uniform(70, 79)
    waves = []
    for _ in range(5):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        k = 2 * np.pi / rng.uniform(26, 40)
        waves.append((*(v * k).tolist(), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.7, 1.3))))
    return Anatomy(
        axes=(a, a * rng.uniform(1.12, 1.22), a * rng.uniform(1.2, 1.32), rng.uniform(84, 94), 140.0),
        scalp_mm=rng.uniform(4.5, 8.0),
        skull_mm=rng.uniform(5.0, 8.5),
        csf_mm=rng.uniform(0.8, 3.0),
        sulcus_mm=rng.uniform(0.9, 2.2),
        ventricle_scale=rng.uniform(0.8, 1.6),
        grey_hu=rng.uniform(36, 43),
        white_hu=rng.uniform(23, 29),
        bone_hu=rng.uniform(1500, 1900),
        diploe_hu=rng.uniform(600, 1000),
        rotation_deg=(rng.normal(0, 4), rng.normal(-4, 6), rng.normal(0, 3)),
        sulcal_waves=tuple(waves),
        pineal_hu=rng.uniform(120, 400) if rng.random() < 0.6 else 0.0,
        choroid_hu=rng.uniform(90, 250) if rng.random() < 0.5 else 0.0,
        basal_ganglia_hu=rng.uniform(90, 200) if rng.random() < 0.08 else 0.0,
    )


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
