"""One subject's head for the phantom: its random parameters and analytic surfaces.

`sample_anatomy` draws a subject (head size, scalp, skull and extra-axial CSF widths,
ventricle size, tissue densities, head rotation, sulcal pattern, calcifications);
`Anatomy.depth` gives a point's depth below the skin, and `floor_z` / `tentorium_z` the
heights of the skull base and the tentorium. Kept apart from ``triage_node.synth.phantom``, which paints
these surfaces into Hounsfield units on a canvas: the lesion painters and the study
specification need the anatomy without the painting. Coordinates are the phantom's head
coordinates (millimetres, +x patient left, +y posterior, +z superior).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Anatomy", "floor_z", "sample_anatomy", "tentorium_z"]


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
