"""``triage-node explain``: the heat map of every slice of a labelled data set, for audit.

The served models run over every labelled series through the serving path (the card's
framing, windows and size by :func:`worker.model.data.record_inputs`, ONNX Runtime,
:func:`worker.pipeline.inference_core.run_study`); each slice's class maps are computed from
the ``features`` output and put back on the slice's own Rows x Columns grid by
:func:`worker.pipeline.explain.slice_heatmaps`, the function the worker's overlays use. Per
slice ``OUT/<SOPInstanceUID>.npz`` holds one float32 map per class (keys in CLASSES order),
``probs`` [6] (the served per-slice probabilities) and ``frame`` [y0, x0, side] (the part of
the slice the CNN saw); ``OUT/png/<SOPInstanceUID>_<class>.png`` shows the slice in the
brain window with the map blended, the bleed mask outlined in cyan and the hottest pixel
marked in green; ``OUT/index.csv`` lists them all.

Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016):
on slices labelled ``any`` = 1 that have a non-empty bleed mask, a hit is when the hottest
pixel of the ``any`` map lies in the mask, or within ``tolerance`` pixels of it (Zhang et al.
used 15). Masks come from the CT-ICH layout (``<n>_HGE_Seg.jpg``, bleed above 127) or from a
folder of ``<SOPInstanceUID>.png`` (any non-zero pixel is bleed) that a site draws for its
own DICOM data. ``OUT/pointing_game.json`` holds n, hits, the hit rate and its
Clopper-Pearson 95 % interval. The map is the feature map upsampled bilinearly, so its
hottest pixel lies on the lattice of feature-cell centres, ``frame.side / feature_map_size``
pixels apart on the slice: at tolerance 0 a bleed smaller than a cell is hit only when a
cell centre falls inside it, and half a cell is the tolerance that asks no more of the map
than its resolution.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from triage_node import CLASSES
from triage_node.logs import get_logger
from worker.inference.card import json_safe, load_model_card
from worker.model import physionet
from worker.model.data import SeriesRecord, index_dataset, load_record, record_inputs
from worker.model.metrics import clopper_pearson
from worker.pipeline.explain import METHODS, blood_region, overlay, slice_heatmaps
from worker.pipeline.inference_core import onnx_callables, run_study
from worker.pipeline.preprocess import WINDOWS, SeriesError, Volume, window

log = get_logger(__name__)

INDEX_FILE = "index.csv"
POINTING_FILE = "pointing_game.json"
PNG_DIR = "png"
#: CT-ICH mask JPEGs: bleed above this grey level (JPEG ringing around the edges stays below).
CTICH_MASK_LEVEL = 127
#: Masks of ``--masks DIR``: any non-zero pixel is bleed.
FOLDER_MASK_LEVEL = 0
MASK_COLOUR = (0, 255, 255)
PEAK_COLOUR = (0, 255, 0)


def hottest_pixel(heat: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the map's maximum, the first in row-major order on ties; None where the map is zero everywhere."""
    h = np.asarray(heat)
    if h.ndim != 2:
        raise ValueError(f"heat must be [rows, columns], got {h.shape}")
    if h.size == 0 or not float(h.max()) > 0.0:
        return None
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    return int(y), int(x)


def pointing_hit(heat: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool:
    """One trial of the pointing game.

    Parameters
    ----------
    heat : ndarray [rows, columns]
        The class map on the slice grid.
    mask : ndarray bool [rows, columns]
        Bleed pixels of the same slice.
    tolerance : int
        A hit also when a mask pixel lies within this many pixels (Euclidean) of the
        hottest pixel.

    Returns
    -------
    bool
        True when the hottest pixel (:func:`hottest_pixel`) is in the mask or within the
        tolerance of it; a map without any heat points nowhere and misses.
    """
    m = np.asarray(mask, dtype=bool)
    if m.shape != np.shape(heat):
        raise ValueError(f"heat {np.shape(heat)} and mask {m.shape} must have the same shape")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    peak = hottest_pixel(heat)
    if peak is None:
        return False
    y, x = peak
    t = int(tolerance)
    y0, x0 = max(y - t, 0), max(x - t, 0)
    yy, xx = np.nonzero(m[y0 : y + t + 1, x0 : x + t + 1])
    return bool(((yy + y0 - y) ** 2 + (xx + x0 - x) ** 2 <= t * t).any())


def read_mask(path: Path, level: int) -> np.ndarray:
    """Bleed mask [rows, columns] of an image file: grey level above ``level``."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > level


@dataclass(frozen=True)
class PointingGame:
    """Pointing-game result of one run (see the module docstring).

    ``n`` counts the slices scored: labelled ``any`` = 1 with a usable, non-empty mask.
    ``masks_unusable`` counts mask files that could not be read or whose shape is not the
    slice's; ``masks_on_negative_slices`` non-empty masks on slices labelled ``any`` = 0
    (not scored: both say the masks and labels need a look).
    """

    method: str
    tolerance_px: int
    n: int = 0
    hits: int = 0
    positive_slices: int = 0
    positive_without_mask: int = 0
    masks_unusable: int = 0
    masks_on_negative_slices: int = 0

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.n if self.n else None

    def to_json(self) -> dict:
        lo, hi = clopper_pearson(self.hits, self.n)
        return json_safe(
            {
                "method": self.method,
                "tolerance_px": self.tolerance_px,
                "n": self.n,
                "hits": self.hits,
                "hit_rate": self.hit_rate,
                "hit_rate_ci95": [lo, hi],
                "interval": "Clopper-Pearson 95%",
                "positive_slices": self.positive_slices,
                "positive_slices_without_mask": self.positive_without_mask,
                "masks_unusable": self.masks_unusable,
                "masks_on_negative_slices": self.masks_on_negative_slices,
            }
        )

    def describe(self) -> str:
        if not self.n:
            return (f"pointing game: no slice labelled any=1 has a non-empty bleed mask "
                    f"({self.positive_slices} positive slices)")
        lo, hi = clopper_pearson(self.hits, self.n)
        return (f"pointing game ({self.method}, tolerance {self.tolerance_px} px): {self.hits}/{self.n} hits, "
                f"rate {self.hits / self.n:.3f} [95% CI {lo:.3f}, {hi:.3f}]")

    def scored(self, positive: bool, mask: np.ndarray | None, heat: np.ndarray) -> tuple[PointingGame, bool | None]:
        """This tally with one more slice, and the slice's hit (None where it is not scored)."""
        has_bleed = mask is not None and bool(mask.any())
        if not positive:
            return replace(self, masks_on_negative_slices=self.masks_on_negative_slices + has_bleed), None
        if not has_bleed or mask is None:
            return replace(self, positive_slices=self.positive_slices + 1,
                           positive_without_mask=self.positive_without_mask + 1), None
        hit = pointing_hit(heat, mask, self.tolerance_px)
        return replace(self, positive_slices=self.positive_slices + 1, n=self.n + 1, hits=self.hits + hit), hit


@dataclass(frozen=True)
class ExplainSummary:
    """What :func:`explain_dataset` wrote: slices, series explained and failed, the pointing game, the folder."""

    slices: int
    series: int
    failed_series: int
    pointing: PointingGame
    out: Path


def mask_sources(rec: SeriesRecord, masks_dir: Path | None) -> dict[str, tuple[Path, int]]:
    """{SOP UID: (mask file, grey level above which a pixel is bleed)}; a ``masks_dir`` file wins."""
    out = {sop: (p, CTICH_MASK_LEVEL) for sop, p in zip(rec.sop_uids, rec.masks, strict=False) if p is not None}
    if masks_dir is not None:
        for sop in rec.sop_uids:
            p = masks_dir / f"{sop}.png"
            if p.is_file():
                out[sop] = (p, FOLDER_MASK_LEVEL)
    return out


def slice_images(source: Volume | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slices [n, rows, columns] in input order: (brain window for the PNG, 40/120 window).

    ``source`` is the series as :func:`worker.model.data.load_record` read it. DICOM: the HU
    in WINDOWS["brain"] and in the CT-ICH window; CT-ICH: the JPEG stack itself, which is the
    40/120 window (:mod:`worker.model.physionet`), for both.
    """
    if isinstance(source, Volume):
        return window(source.hu, *WINDOWS["brain"]), window(source.hu, *physionet.JPEG_WINDOW)
    return source, source


def render_png(gray: np.ndarray, heat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """RGB uint8: the slice with the heat map blended, the mask outlined and the hottest pixel marked."""
    rgb = overlay(gray, heat)
    if mask is not None and mask.any():
        rgb[mask & ~ndimage.binary_erosion(mask)] = MASK_COLOUR
    peak = hottest_pixel(heat)
    if peak is not None:
        y, x = peak
        r = max(2, min(heat.shape) // 64)
        rgb[max(y - r, 0) : y + r + 1, x] = PEAK_COLOUR
        rgb[y, max(x - r, 0) : x + r + 1] = PEAK_COLOUR
    return rgb


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        # allow_pickle as numpy's default, named so that **arrays is not checked against it
        np.savez_compressed(fh, allow_pickle=True, **arrays)
    os.replace(tmp, path)


def save_png(path: Path, rgb: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


def explain_dataset(
    model_dir: str | Path,
    data: str | Path,
    fmt: str,
    out: str | Path,
    *,
    labels_csv: str | Path | None = None,
    threads: int = 2,
    png: bool = True,
    png_classes: Sequence[str] = ("any",),
    method: str = "cam",
    masks_dir: str | Path | None = None,
    tolerance: int = 0,
    anywhere: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExplainSummary:
    """Heat maps of every labelled slice of ``data`` in ``out``, and the pointing game.

    Parameters
    ----------
    model_dir : path
        Triton-layout model repository with ``model_card.json``.
    data, fmt, labels_csv
        The data set, as :func:`worker.model.data.index_dataset` reads it.
    out : path
        Output folder (created); files of an earlier run with the same SOP UIDs are replaced.
    threads : int
        ONNX Runtime threads.
    png, png_classes
        Whether to draw overlays, and of which classes.
    method : {"cam", "campp"}
    masks_dir : path, optional
        Folder of ``<SOPInstanceUID>.png`` masks (any non-zero pixel is bleed).
    tolerance : int
        Pointing-game tolerance in pixels.
    progress : callable, optional
        ``(series done, series total)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    unknown = [c for c in png_classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {', '.join(CLASSES)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    masks = Path(masks_dir) if masks_dir is not None else None
    if masks is not None and not masks.is_dir():
        raise FileNotFoundError(f"masks folder {masks} not found")
    out = Path(out)
    card = load_model_card(model_dir)
    weight, _bias = card.head_weights()
    slice_fn, sequence_fn = onnx_callables(str(model_dir), threads=threads)
    index = index_dataset(data, fmt, labels_csv)
    out.mkdir(parents=True, exist_ok=True)
    if png:
        (out / PNG_DIR).mkdir(exist_ok=True)
    rows: list[dict] = []
    failed, first_error = 0, ""
    game = PointingGame(method, int(tolerance))
    for k, rec in enumerate(index.series):
        try:
            source = load_record(rec)  # read once: for the inputs and for the images
            x, sop_uids, frame, shape = record_inputs(rec, card.channel_plan, card.windows, card.input_size, card.crop, source)
            gray, wide = slice_images(source)
        except (SeriesError, ValueError, OSError, AttributeError, RuntimeError) as exc:
            failed += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            log.warning("explain_series_skipped", series_index=k, error=type(exc).__name__)
            continue
        pred = run_study(x, slice_fn, sequence_fn, card)
        sources = mask_sources(rec, masks)
        path_of = dict(zip(rec.sop_uids, rec.paths, strict=False))
        for i, sop in enumerate(sop_uids):
            where = None if anywhere else blood_region(wide[i])
            maps = slice_heatmaps(pred.features[i], weight, frame, shape, CLASSES, method, where)
            mask = None
            if sop in sources:
                mask = _usable_mask(*sources[sop], shape)
                if mask is None:
                    game = replace(game, masks_unusable=game.masks_unusable + 1)
                    log.warning("explain_mask_unusable", series_index=k, slice_index=i)
            label = index.labels[sop]
            game, hit = game.scored(bool(label[0]), mask, maps["any"])
            save_npz(out / f"{sop}.npz", {**maps, "probs": pred.slice_probs[i].astype(np.float32),
                                          "frame": np.asarray(frame.as_tuple(), dtype=np.int64)})
            row = {"sop_uid": sop, "series_uid": rec.series_uid, "slice_index": i,
                   "source": _relative(path_of.get(sop), Path(data))}
            row.update({f"label_{c}": int(label[j]) for j, c in enumerate(CLASSES)})
            row.update({f"p_{c}": f"{pred.slice_probs[i, j]:.6f}" for j, c in enumerate(CLASSES)})
            row["pointing_hit"] = "" if hit is None else int(hit)
            row["npz"] = f"{sop}.npz"
            for c in png_classes:
                row[f"png_{c}"] = ""
                if png:
                    row[f"png_{c}"] = f"{PNG_DIR}/{sop}_{c}.png"
                    save_png(out / row[f"png_{c}"], render_png(gray[i], maps[c], mask))
            rows.append(row)
        log.info("explain_series_done", series_index=k, slices=len(sop_uids))
        if progress is not None:
            progress(k + 1, len(index.series))
    if not rows:
        raise ValueError(f"no labelled series could be explained ({len(index.series)} indexed, {failed} failed"
                         + (f"; first: {first_error}" if first_error else "") + ")")
    with open(out / INDEX_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / POINTING_FILE).write_text(json.dumps(game.to_json(), indent=2, allow_nan=False) + "\n")
    log.info("explain_done", slices=len(rows), failed_series=failed, pointing_n=game.n, pointing_hits=game.hits)
    return ExplainSummary(len(rows), len(index.series) - failed, failed, game, out)


def _usable_mask(path: Path, level: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The mask of one slice, or None where the file cannot be read or is not the slice's shape."""
    try:
        mask = read_mask(path, level)
    except (OSError, ValueError):
        return None
    return mask if mask.shape == tuple(shape) else None


def _relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
