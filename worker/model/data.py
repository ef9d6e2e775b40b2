"""Datasets: synthetic studies (``triage-node synth``), the RSNA 2019 layout and PhysioNet CT-ICH.

Both formats are a folder of DICOM files plus a CSV of ``ID_<SOPInstanceUID>_<class>,Label``
rows (``labels.csv`` for synth, ``stage_2_train.csv`` for RSNA). Files are grouped into series
by StudyInstanceUID / SeriesInstanceUID (PS3.3 C.7.2.1, C.7.3.1), each series is read with the
serving preprocessing (:mod:`worker.pipeline.preprocess`) and cached once as float16 arrays
so training epochs read memory-mapped inputs. Unreadable files are skipped and counted.
CT-ICH (``physionet-ich``, :mod:`worker.model.physionet`) is brain-window JPEGs, one series
per patient, turned into the same inputs by the same framing and resizing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from triage_node import CLASSES
from triage_node.logs import get_logger
from worker.model import physionet
from worker.pipeline.preprocess import (
    CROPS,
    DEFAULT_WINDOWS,
    WINDOWS,
    SeriesError,
    Volume,
    channel_plan,
    is_crop,
    load_series,
    series_inputs,
)

log = get_logger(__name__)
LABEL_FILES = {"synth": "labels.csv", "rsna": "stage_2_train.csv", "physionet-ich": physionet.LABEL_FILE}
FORMATS: tuple[str, ...] = tuple(LABEL_FILES)
#: patient-key prefix of synthetic series added to real training data (never validated on)
SYNTH_PREFIX = "synth-"
_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality"]


@dataclass
class SeriesRecord:
    """One labelled series: files and per-SOP labels [6] in CLASSES order."""

    study_uid: str
    series_uid: str
    patient_key: str
    paths: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)
    fmt: str = "synth"
    #: bleed masks per slice where the data set has them (CT-ICH), else empty
    masks: list[Path | None] = field(default_factory=list)


@dataclass
class DatasetIndex:
    series: list[SeriesRecord]
    labels: dict[str, np.ndarray]
    unreadable: int = 0
    unlabelled_files: int = 0


def read_label_csv(path: str | Path) -> dict[str, np.ndarray]:
    """``ID_<sop>_<class>,Label`` rows -> {sop: uint8[6]} (CLASSES order); duplicate rows keep the last."""
    out: dict[str, np.ndarray] = {}
    col = {c: i for i, c in enumerate(CLASSES)}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            ident = row["ID"]
            sop, _, cls = ident.rpartition("_")
            if not sop.startswith("ID_") or cls not in col:
                continue
            sop = sop[3:]
            arr = out.setdefault(sop, np.zeros(len(CLASSES), np.uint8))
            arr[col[cls]] = int(float(row["Label"]))
    return out


def _axial_series_from_studies_json(path: Path) -> set[str] | None:
    """Series UIDs whose role is ``axial`` in a synth ``studies.json`` (None if absent/unknown)."""
    if not path.is_file():
        return None
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            role = node.get("role")
            uid = node.get("series_uid") or node.get("SeriesInstanceUID") or node.get("series_instance_uid")
            if role == "axial" and isinstance(uid, str):
                found.add(uid)
            for k, v in node.items():
                if isinstance(v, str) and v == "axial" and isinstance(k, str) and k.count(".") >= 2:
                    found.add(k)  # {series_uid: role}
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(path.read_text()))
    return found or None


def index_dataset(root: str | Path, fmt: str = "synth", labels_csv: str | Path | None = None) -> DatasetIndex:
    """Find labelled series below ``root``.

    Parameters
    ----------
    root : path
        Folder searched recursively for DICOM files (any name; non-DICOM files count as unreadable).
    fmt : {"synth", "rsna", "physionet-ich"}
        Chooses the default label file name; for synth, ``studies.json`` limits training to the
        ``axial`` series (the thin series is labelled too but is a second view of the same study).
    labels_csv : path, optional
        Label file, default ``root/labels.csv`` or ``root/stage_2_train.csv``; without either,
        the label files of the immediate subfolders are merged (parallel generator outputs).
    """
    root = Path(root)
    if fmt not in LABEL_FILES:
        raise ValueError(f"format must be one of {sorted(LABEL_FILES)}, got {fmt!r}")
    if fmt == "physionet-ich":
        return index_physionet(root, labels_csv)
    if labels_csv is not None or (root / LABEL_FILES[fmt]).is_file():
        label_files = [Path(labels_csv or root / LABEL_FILES[fmt])]
    else:  # several generator outputs side by side: root/<part>/labels.csv
        label_files = sorted(root.glob(f"*/{LABEL_FILES[fmt]}"))
        if not label_files:
            raise FileNotFoundError(f"no {LABEL_FILES[fmt]} in {root} or its subfolders")
    labels: dict[str, np.ndarray] = {}
    for f in label_files:
        labels.update(read_label_csv(f))
    keep = None
    if fmt == "synth":
        for f in [root / "studies.json", *sorted(root.glob("*/studies.json"))]:
            found = _axial_series_from_studies_json(f)
            if found is not None:
                keep = (keep or set()) | found
    groups: dict[tuple[str, str], SeriesRecord] = {}
    unreadable = unlabelled = 0
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() in (".csv", ".json", ".txt", ".md"):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            sop = str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, KeyError, EOFError):
            unreadable += 1
            continue
        if sop not in labels:
            unlabelled += 1
            continue
        if keep is not None and series not in keep:
            continue
        rec = groups.get((study, series))
        if rec is None:
            patient = str(ds.get("PatientID", "") or study)
            rec = groups[(study, series)] = SeriesRecord(study, series, patient, fmt=fmt)
        rec.paths.append(p)
        rec.sop_uids.append(sop)
    log.info("dataset_indexed", series=len(groups), unreadable=unreadable, unlabelled=unlabelled, fmt=fmt)
    return DatasetIndex(list(groups.values()), labels, unreadable, unlabelled)


def index_physionet(root: Path, labels_csv: str | Path | None = None) -> DatasetIndex:
    """One series per CT-ICH patient, slices in slice order (see :mod:`worker.model.physionet`)."""
    table = physionet.read_labels(labels_csv or root / physionet.LABEL_FILE)
    series, labels, unlabelled = [], {}, 0
    for pid, slices in physionet.find_slices(root).items():
        rec = SeriesRecord(physionet.slice_uid(pid, 0, "study"), physionet.slice_uid(pid, 0, "series"), f"ctich-{pid}", fmt="physionet-ich")
        for s in slices:
            y = table.get((pid, s.number))
            if y is None:
                unlabelled += 1
                continue
            uid = physionet.slice_uid(pid, s.number)
            labels[uid] = y
            rec.paths.append(s.path)
            rec.sop_uids.append(uid)
            rec.masks.append(s.mask)
        if rec.paths:
            series.append(rec)
    log.info("dataset_indexed", series=len(series), unlabelled=unlabelled, fmt="physionet-ich")
    return DatasetIndex(series, labels, 0, unlabelled)


def load_record(rec: SeriesRecord) -> Volume | np.ndarray:
    """One indexed series as read: a HU :class:`Volume` (DICOM), or the CT-ICH brain-window stack [Z, H, W]."""
    return physionet.load_stack(rec.paths) if rec.fmt == "physionet-ich" else load_series(rec.paths)


def record_inputs(rec: SeriesRecord, plan, windows: dict[str, tuple[float, float]], size: int, crop: str,
                  source: Volume | np.ndarray | None = None):
    """(inputs [n,3,S,S], SOP UIDs in input order, frame, slice shape) of one indexed series, in its format.

    ``source``: the series already read by :func:`load_record` (read here otherwise).
    """
    if not is_crop(crop):
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
    src = load_record(rec) if source is None else source
    if isinstance(src, Volume):
        x, frame = series_inputs(src, plan, windows, size, crop)
        return x, src.sop_uids, frame, src.hu.shape[1:]
    x, frame = physionet.stack_inputs(src, plan, windows, size, crop)
    return x, tuple(rec.sop_uids), frame, src.shape[1:]


def merge_indexes(*indexes: DatasetIndex) -> DatasetIndex:
    """One index of several data sets (labels keyed by SOP UID, which do not collide)."""
    out = DatasetIndex([], {})
    for ix in indexes:
        out.series.extend(ix.series)
        out.labels.update(ix.labels)
        out.unreadable += ix.unreadable
        out.unlabelled_files += ix.unlabelled_files
    return out


class PatientKeyed(Protocol):
    """Anything split by patient: a :class:`SeriesRecord`, or a patient key alone."""

    @property
    def patient_key(self) -> str: ...


def patient_split(records: Iterable[PatientKeyed], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train/validation series, grouped so no patient is in both."""
    records = list(records)
    patients = sorted({r.patient_key for r in records})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n_val = max(1, int(round(len(patients) * val_fraction))) if len(patients) > 1 else 0
    val_p = set(patients[:n_val])
    train = [i for i, r in enumerate(records) if r.patient_key not in val_p]
    val = [i for i, r in enumerate(records) if r.patient_key in val_p]
    return train, val


@dataclass
class CachedSet:
    """Preprocessed inputs of many series, concatenated along slices.

    ``inputs`` float16 [N,3,S,S] (memory-mapped), ``labels`` uint8 [N,6], ``offsets`` [n_series+1],
    and per series: study/series UID and patient key.
    """

    inputs: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    study_uids: list[str]
    series_uids: list[str]
    patient_keys: list[str]
    meta: dict

    def series_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def __len__(self) -> int:
        return len(self.series_uids)

    def study_labels(self) -> np.ndarray:
        """[n_series, 6]: a study is positive for a class when any slice is."""
        return np.stack([self.labels[self.series_slice(i)].max(axis=0) for i in range(len(self))])


def build_cache(
    index: DatasetIndex,
    out_dir: str | Path,
    variant: str = "windows",
    size: int = 256,
    windows=DEFAULT_WINDOWS,
    progress=None,
    crop: str = "centred",
) -> CachedSet:
    """Preprocess every series once into ``out_dir`` (inputs.npy, labels.npy, series.json).

    Reuses an existing cache whose variant/size/series match. Series that fail to load are
    skipped and counted in ``meta["failed_series"]``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = channel_plan(variant, windows)
    want = {"variant": variant, "size": size, "windows": list(windows), "crop": crop, "n_series_indexed": len(index.series)}
    meta_path = out / "series.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return load_cache(out)
    n_total = sum(len(r.paths) for r in index.series)
    tmp = np.lib.format.open_memmap(out / "inputs.tmp.npy", mode="w+", dtype=np.float16, shape=(max(n_total, 1), 3, size, size))
    labels = np.zeros((max(n_total, 1), len(CLASSES)), np.uint8)
    offsets, studies, series, patients = [0], [], [], []
    failed = 0
    pos = 0
    for k, rec in enumerate(index.series):
        try:
            x, sop_uids, _, _ = record_inputs(rec, plan, WINDOWS, size, crop)
        except (SeriesError, ValueError, OSError, AttributeError, RuntimeError) as exc:
            failed += 1
            log.warning("series_skipped", series_index=k, error=type(exc).__name__)
            continue
        n = x.shape[0]
        tmp[pos : pos + n] = x.astype(np.float16)
        labels[pos : pos + n] = np.stack([index.labels[s] for s in sop_uids])
        pos += n
        offsets.append(pos)
        studies.append(rec.study_uid)
        series.append(rec.series_uid)
        patients.append(rec.patient_key)
        if progress is not None:
            progress(k + 1, len(index.series))
    tmp.flush()
    del tmp
    src = np.load(out / "inputs.tmp.npy", mmap_mode="r")
    final = np.lib.format.open_memmap(out / "inputs.npy", mode="w+", dtype=np.float16, shape=(pos, 3, size, size))
    for a in range(0, pos, 512):
        final[a : a + 512] = src[a : a + 512]
    final.flush()
    del final, src
    (out / "inputs.tmp.npy").unlink()
    np.save(out / "labels.npy", labels[:pos])
    meta = dict(
        want,
        offsets=offsets,
        study_uids=studies,
        series_uids=series,
        patient_keys=patients,
        failed_series=failed,
        unreadable_files=index.unreadable,
        unlabelled_files=index.unlabelled_files,
    )
    meta_path.write_text(json.dumps(meta))
    return load_cache(out)


def load_cache(out_dir: str | Path) -> CachedSet:
    out = Path(out_dir)
    meta = json.loads((out / "series.json").read_text())
    return CachedSet(
        inputs=np.load(out / "inputs.npy", mmap_mode="r"),
        labels=np.load(out / "labels.npy"),
        offsets=np.asarray(meta["offsets"], dtype=np.int64),
        study_uids=meta["study_uids"],
        series_uids=meta["series_uids"],
        patient_keys=meta["patient_keys"],
        meta=meta,
    )


def subset_slices(cache: CachedSet, series_idx: Iterable[int]) -> np.ndarray:
    """Slice indices belonging to the given series."""
    parts = [np.arange(cache.offsets[i], cache.offsets[i + 1]) for i in series_idx]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def dataset_counts(cache: CachedSet, fmt: str, description: str = "") -> list[dict]:
    """What the model card says of each data set the weights saw: patients, slices, positives."""
    out = []
    for synthetic in (False, True):
        idx = [i for i, k in enumerate(cache.patient_keys) if k.startswith(SYNTH_PREFIX) == synthetic]
        if not idx:
            continue
        y = cache.study_labels()[idx]
        rows = subset_slices(cache, idx)
        if synthetic or fmt == "synth":
            about: dict = {"name": "synthetic head-CT phantoms (triage-node synth)", "licence": "generated by this project"}
        elif fmt == "physionet-ich":
            about = dict(physionet.DATASET)
        else:
            about = {"name": description or fmt}
        out.append({
            **about,
            "patients": len({cache.patient_keys[i] for i in idx}),
            "series": len(idx),
            "positive_series": {c: int(y[:, k].sum()) for k, c in enumerate(CLASSES)},
            "slices": int(len(rows)),
            "positive_slices": int((cache.labels[rows, 0] > 0).sum()),
        })
    return out
