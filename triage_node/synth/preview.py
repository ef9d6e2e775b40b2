"""PNG montages of rendered series in the usual head-CT windows, for people to look at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from triage_node import SUBTYPES

__all__ = ["WINDOWS", "montage", "dose_screen"]

# name -> (center, width) in HU
WINDOWS = {"brain": (40.0, 80.0), "subdural": (80.0, 200.0), "bone": (900.0, 2500.0)}
_ABBREV = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
           "subarachnoid": "SAH", "subdural": "SDH"}


def _window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2
    return (np.clip((hu - lo) / width, 0.0, 1.0) * 255).astype(np.uint8)


def montage(
    hu: np.ndarray,
    labels: np.ndarray,
    window: str,
    path: Path,
    masks: np.ndarray | None = None,
    tile: int = 256,
    max_tiles: int = 24,
) -> Path:
    """Write a grid of slices in a named window, captioned with the slice labels.

    Parameters
    ----------
    hu : ndarray (Z, rows, cols)
        HU slices in instance order.
    labels : ndarray bool (Z, 6)
        Slice labels in CLASSES order.
    window : {"brain", "subdural", "bone"}
        Display window.
    path : Path
        Output PNG.
    masks : ndarray uint8 (Z, rows, cols), optional
        Blood bit masks; their outlines are drawn in red.
    tile, max_tiles : int
        Tile size in pixels and the most slices shown (evenly spaced).
    """
    center, width = WINDOWS[window]
    z = hu.shape[0]
    idx = np.unique(np.linspace(0, z - 1, min(z, max_tiles)).round().astype(int))
    cols = 6
    rows = int(np.ceil(len(idx) / cols))
    sheet = Image.new("RGB", (cols * tile, rows * tile), "black")
    draw = ImageDraw.Draw(sheet)
    for n, k in enumerate(idx):
        grey = _window(hu[k], center, width)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if masks is not None and masks[k].any():
            m = masks[k] > 0
            edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            rgb[edge] = (255, 40, 40)
        img = Image.fromarray(rgb).resize((tile, tile), Image.Resampling.BILINEAR)
        x0, y0 = (n % cols) * tile, (n // cols) * tile
        sheet.paste(img, (x0, y0))
        found = [_ABBREV[s] for i, s in enumerate(SUBTYPES) if labels[k, 1 + i]]
        draw.text((x0 + 4, y0 + 3), f"{k + 1}/{z} {' '.join(found)}", fill=(255, 220, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=False)
    return path


def dose_screen(lines: Sequence[tuple[str, ...]], size: int = 512) -> np.ndarray:
    """An 8-bit "Dose Report" screen like the ones scanners append to a study."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    draw.text((16, 16), "Dose Report", fill=255)
    y = 48
    for row in lines:
        x = 16
        for cell in row:
            draw.text((x, y), str(cell), fill=230)
            x += size // max(len(row), 1)
        y += 18
    return np.asarray(img, dtype=np.uint8)
