"""Acute intracranial blood in the five RSNA subtypes, painted onto a :class:`Canvas`.

Each subtype gets the morphology radiologists use to tell it apart on non-contrast
CT (acute blood 50-90 HU):

* **epidural**: biconvex lens against the inner table, limited extent (sutures).
* **subdural**: crescent along the convexity, or a thin sheet along the falx or
  the tentorium.
* **subarachnoid**: blood replacing and distending CSF in sulci, Sylvian fissures
  and basal cisterns.
* **intraparenchymal**: round or lobulated focus in grey/white matter or the basal
  ganglia, optionally with a hypodense oedema rim.
* **intraventricular**: blood in the ventricles, layering dependently (posteriorly
  in a supine patient), or a cast that fills them.

The painters set bit ``SUBTYPES.index(subtype)`` of :attr:`Canvas.blood` wherever
they place blood; labels and masks derive from those bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from triage_node import SUBTYPES
from triage_node.synth.anatomy import Anatomy, tentorium_z
from triage_node.synth.phantom import PARENCHYMA, Canvas, Tissue

__all__ = ["Lesion", "sample_lesion", "paint_lesion"]

CAVITY = (Tissue.CSF, Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY, Tissue.DURA, Tissue.VENTRICLE)


@dataclass(frozen=True)
class Lesion:
    """One haemorrhage in head coordinates.

    Attributes
    ----------
    subtype : str
        One of :data:`triage_node.SUBTYPES`.
    kind : str
        Variant: ``convexity``/``falx``/``tentorium`` (subdural), ``sulcal``/``basal``
        (subarachnoid), ``level``/``cast`` (intraventricular), ``focal`` otherwise.
    center : tuple of float
        A direction (epidural/subdural convexity, unit vector) or a point (mm).
    size : tuple of float
        Extent parameters in mm (radius, thickness, ...), see the painters.
    hu : float
        Density of the blood.
    oedema_mm : float
        Width of the hypodense rim (intraparenchymal only).
    """

    subtype: str
    kind: str
    center: tuple[float, float, float]
    size: tuple[float, ...]
    hu: float
    oedema_mm: float = 0.0

    def __post_init__(self) -> None:
        if self.subtype not in SUBTYPES:
            raise ValueError(f"subtype must be one of {SUBTYPES}, got {self.subtype!r}")
        if not 45.0 <= self.hu <= 95.0:
            raise ValueError(f"hu of acute blood must be within 45-95, got {self.hu}")


def _unit(v) -> tuple[float, float, float]:
    v = np.asarray(v, dtype=float)
    return tuple((v / np.linalg.norm(v)).tolist())


def sample_lesion(rng: np.random.Generator, subtype: str, an: Anatomy) -> Lesion:
    """Draw one lesion of ``subtype`` with a realistic location and size."""
    hu = float(rng.uniform(58, 82))
    side = float(rng.choice([-1.0, 1.0]))
    if subtype == "epidural":
        u = _unit((side, rng.uniform(-0.6, 0.6), rng.uniform(-0.1, 0.6)))
        return Lesion(subtype, "focal", u, (rng.uniform(18, 34), rng.uniform(6, 18)), hu)
    if subtype == "subdural":
        kind = rng.choice(["convexity", "convexity", "convexity", "falx", "tentorium"])
        if kind == "convexity":
            u = _unit((side, rng.uniform(-0.4, 0.5), rng.uniform(0.0, 0.7)))
            return Lesion(subtype, "convexity", u, (rng.uniform(45, 80), rng.uniform(3, 14)), hu - 4)
        if kind == "falx":
            c = (side, rng.uniform(-40, 40), rng.uniform(25, 55))
            return Lesion(subtype, "falx", c, (rng.uniform(20, 40), rng.uniform(2, 5)), hu - 4)
        c = (side * rng.uniform(15, 35), rng.uniform(30, 60), 0.0)
        return Lesion(subtype, "tentorium", c, (rng.uniform(15, 30), rng.uniform(2, 5)), hu - 4)
    if subtype == "subarachnoid":
        if rng.random() < 0.5:
            return Lesion(subtype, "basal", (0.0, -6.0, -16.0), (rng.uniform(22, 40), 0.0), hu - 6)
        normal = np.array([side, rng.uniform(-0.8, 0.8), rng.uniform(0.0, 0.9)])
        normal /= np.linalg.norm(normal)
        p = normal * (an.axes[0] - an.inner_mm - 10)
        return Lesion(subtype, "sulcal", tuple(p.tolist()), (rng.uniform(18, 35), 0.0), hu - 6)
    if subtype == "intraparenchymal":
        sites = [(side * 21, -4, 2), (side * 10, 11, 5), (side * 38, rng.uniform(-40, 40), rng.uniform(10, 40)),
                 (side * 25, rng.uniform(-50, 45), rng.uniform(25, 50)), (side * 12, 45, -42)]
        c = sites[int(rng.integers(len(sites)))]
        r = float(rng.uniform(5, 22))
        oed = float(rng.uniform(2, 6)) if rng.random() < 0.6 else 0.0
        return Lesion(subtype, "focal", (float(c[0]), float(c[1]), float(c[2])), (r, rng.uniform(0, 2 * np.pi)), hu + 3, oed)
    if subtype == "intraventricular":
        if rng.random() < 0.25:
            return Lesion(subtype, "cast", (0.0, 10.0, 8.0), (0.0,), hu)
        return Lesion(subtype, "level", (0.0, 10.0, 8.0), (rng.uniform(14, 30),), hu)
    raise ValueError(f"unknown subtype {subtype!r}")


def _convexity(cv: Canvas, an: Anatomy, les: Lesion, profile: str) -> None:
    u = np.asarray(les.center)
    a, b_ant, b_post, c_up, c_down = an.axes
    by = b_post if u[1] > 0 else b_ant
    cz = c_up if u[2] > 0 else c_down
    r_u = np.sqrt((u[0] / a) ** 2 + (u[1] / by) ** 2 + (u[2] / cz) ** 2)
    p0 = (1.0 / r_u - an.inner_mm) * u  # on the inner table along u
    radius, thick = les.size
    blk = cv.block(p0 - u * thick / 2, radius + thick)
    if blk is None:
        return
    x, y, z = cv.coords(*blk)
    dc = an.depth(x, y, z) - np.float32(an.inner_mm)
    along = x * u[0] + y * u[1] + z * u[2]
    rho2 = (x * x + y * y + z * z - along * along) / np.float32(radius * radius)
    if profile == "lens":
        t = thick * (1.0 - rho2)
    else:  # crescent: thick centre, long tapering ends
        t = thick * np.sqrt(np.clip(1.0 - rho2, 0.0, None))
    m = (along > 0) & (dc >= 0) & (dc < t)
    m &= np.isin(cv.tissue[blk], CAVITY)  # cavity tissues lie above the skull base
    _set_blood(cv, blk, m, les)


def _set_blood(cv: Canvas, blk, m, les: Lesion) -> None:
    cv.hu[blk][m] = les.hu
    cv.blood[blk][m] = np.uint8(1 << SUBTYPES.index(les.subtype))


def _sheet(cv: Canvas, an: Anatomy, les: Lesion) -> None:
    side, yc, zc = les.center
    radius, thick = les.size
    if les.kind == "falx":
        center = (side * thick / 2, yc, zc)
    else:
        xc = side
        yc2 = yc
        center = (xc, yc2, float(tentorium_z(np.array(xc), np.array(yc2))) + thick / 2)
    blk = cv.block(center, radius + thick)
    if blk is None:
        return
    x, y, z = cv.coords(*blk)
    if les.kind == "falx":
        ax = x * np.float32(np.sign(side))
        m = (ax > 0.4) & (ax < 0.4 + thick) & ((y - yc) ** 2 + (z - zc) ** 2 < radius**2)
    else:
        h = z - tentorium_z(x, y)
        m = (h > 0.5) & (h < 0.5 + thick) & ((x - center[0]) ** 2 + (y - center[1]) ** 2 < radius**2)
    m &= np.isin(cv.tissue[blk], CAVITY)
    _set_blood(cv, blk, m, les)


def _subarachnoid(cv: Canvas, an: Anatomy, les: Lesion) -> None:
    radius = les.size[0]
    blk = cv.block(les.center, radius)
    if blk is None:
        return
    x, y, z = cv.coords(*blk)
    c = les.center
    inside = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < radius**2
    tissue = cv.tissue[blk]
    m = inside & (tissue == Tissue.CSF)
    if les.kind == "sulcal":  # blood distends the sulci a little
        dc = an.depth(x, y, z) - np.float32(an.inner_mm)
        sd = an.sulcal_distance(x, y, z)
        m |= inside & (tissue == Tissue.GREY) & (sd < an.sulcus_mm / 2 + 0.9) & (dc < an.csf_mm + 16)
    _set_blood(cv, blk, m, les)


def _intraparenchymal(cv: Canvas, an: Anatomy, les: Lesion) -> None:
    radius, phase = les.size
    rim = les.oedema_mm
    blk = cv.block(les.center, radius * 1.3 + rim)
    if blk is None:
        return
    x, y, z = cv.coords(*blk)
    dx, dy, dz = x - les.center[0], y - les.center[1], z - les.center[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-3)
    ang = np.arctan2(dy, dx)
    lobes = 1.0 + 0.1 * np.sin(2.0 * ang + phase) + 0.06 * np.sin(3.0 * ang + 2.1 * phase) * (dz / dist)
    reff = np.float32(radius) * lobes.astype(np.float32)
    tissue = cv.tissue[blk]
    brain = np.isin(tissue, PARENCHYMA)
    if rim:
        oed = brain & (dist >= reff) & (dist < reff + rim)
        cv.hu[blk][oed] = np.minimum(cv.hu[blk][oed], an.white_hu - 7)
    m = (dist < reff) & (brain | (tissue == Tissue.CSF) | (tissue == Tissue.DURA))
    _set_blood(cv, blk, m, les)


def _intraventricular(cv: Canvas, an: Anatomy, les: Lesion) -> None:
    blk = cv.block(les.center, 55.0)
    if blk is None:
        return
    x, y, z = cv.coords(*blk)
    m = cv.tissue[blk] == Tissue.VENTRICLE
    if les.kind == "level":
        g = cv.gravity.astype(np.float32)
        m &= (x * g[0] + y * g[1] + z * g[2]) > np.float32(les.size[0])
    _set_blood(cv, blk, m, les)


def paint_lesion(cv: Canvas, an: Anatomy, les: Lesion) -> None:
    """Paint one lesion's blood (and oedema) onto the canvas."""
    if les.subtype == "epidural":
        _convexity(cv, an, les, "lens")
    elif les.subtype == "subdural" and les.kind == "convexity":
        _convexity(cv, an, les, "crescent")
    elif les.subtype == "subdural":
        _sheet(cv, an, les)
    elif les.subtype == "subarachnoid":
        _subarachnoid(cv, an, les)
    elif les.subtype == "intraparenchymal":
        _intraparenchymal(cv, an, les)
    else:
        _intraventricular(cv, an, les)
