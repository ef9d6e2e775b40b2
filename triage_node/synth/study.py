"""Compose synthetic studies (localizer, axial brain, bone, thin, dose summary) on disk.

Layout written by :func:`write_dataset`::

    DIR/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    DIR/labels.csv      ID,Label rows ID_<SOPInstanceUID>_<subtype> (axial and thin only)
    DIR/studies.json    per-study truth (see :class:`StudyTruth`)
    DIR/preview/*.png   with preview=True

Everything is a pure function of ``seed``: study ``i`` draws from
``numpy.random.default_rng([seed, i])`` and its UIDs are 2.25 UUID-derived UIDs
(PS3.5 B.2) hashed from the seed, study index, role and instance
(``triage_node.synth.identity``).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage
from scipy import ndimage

from triage_node import SUBTYPES
from triage_node.logs import get_logger
from triage_node.synth.dicom_writer import (
    TRANSFER_SYNTAXES,
    PixelEncoding,
    SeriesHeader,
    StudyHeader,
    ct_dataset,
    save,
    sc_dataset,
)
from triage_node.synth.identity import series_time, study_header, synthetic_uid
from triage_node.synth.preview import dose_screen, montage
from triage_node.synth.render import RenderedSeries, render_axial
from triage_node.synth.spec import StudySpec, sample_study_spec

__all__ = [
    "StudyTruth", "SeriesTruth", "StudyPlan", "plan_study", "write_dataset", "write_study", "study_spec",
    "LABEL_SUBTYPES", "COMPONENTS",
]

log = get_logger(__name__)

LABEL_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
"""Subtype order of the rows of one image in labels.csv (the RSNA 2019 file order)."""
COMPONENTS = ("localizer", "axial", "bone", "dose")
PROFILES = ("scanner", "rsna")

# Scanner-like pixel encodings: (signed, bits stored, intercept, padding stored value).
SCANNER_ENCODINGS = (
    PixelEncoding(True, 16, -1024.0, -2000),  # padding -3024 HU
    PixelEncoding(True, 16, 0.0, -2000),
    PixelEncoding(True, 16, 0.0, -3024),
    PixelEncoding(False, 12, -1024.0, None),
    PixelEncoding(False, 16, -1024.0, None),
)
RSNA_ENCODINGS = (PixelEncoding(True, 16, -1024.0, None), PixelEncoding(False, 12, -1024.0, None))

@dataclass(frozen=True)
class SeriesTruth:
    """What was written for one series."""

    series_uid: str
    role: str  # localizer | axial | bone | thin | dose_summary
    n_instances: int
    slice_thickness: float | None
    rows: int
    transfer_syntax: str
    tilt_deg: float
    description: str
    sop_instance_uids: tuple[str, ...] = ()
    positive_slices: dict[str, int] = field(default_factory=dict)
    descending: bool = False


@dataclass(frozen=True)
class StudyTruth:
    """Per-study ground truth, one entry of studies.json."""

    index: int
    study_uid: str
    patient_id: str
    patient_name: str
    positive: bool
    subtypes: tuple[str, ...]
    lesions: tuple[dict, ...]
    profile: str
    series: tuple[SeriesTruth, ...]

    def to_json(self) -> dict:
        return asdict(self)


def _localizer(axial: RenderedSeries) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """A lateral scout: line integrals of attenuation through the axial slices."""
    mu = np.clip(axial.hu + 1000.0, 0, None) / 1000.0
    proj = mu.sum(axis=2) * axial.pixel_spacing[1]  # (Z, rows): along y
    order = np.argsort(axial.positions[:, 2])[::-1]  # superior first
    proj = proj[order]
    spacing = axial.slice_thickness
    ps = axial.pixel_spacing[0]
    reps = max(1.0, spacing / ps)
    img = ndimage.zoom(proj, (reps, 1.0), order=1, mode="nearest")
    size = axial.hu.shape[1]
    out = np.zeros((size, size), dtype=np.float32)
    top = max(0, (size - img.shape[0]) // 2)
    img = img[: size - top]
    out[top: top + img.shape[0]] = img
    out = np.clip(out * 12.0, 0, 4000).astype(np.int16)
    z_top = float(axial.positions[:, 2].max()) + top * ps
    position = np.array([0.0, -size / 2 * ps, z_top])
    return out, position, (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (ps, ps)


def _write_ct_series(out_dir: Path, study: StudyHeader, sh: SeriesHeader, series: RenderedSeries,
                     enc_choice, syntax: str, seed: int, index: int, role: str,
                     rng: np.random.Generator) -> tuple[list[str], list[Path]]:
    sdir = out_dir / study.study_uid / sh.series_uid
    sdir.mkdir(parents=True, exist_ok=True)
    uids, paths = [], []
    normal = series.normal
    for k in range(series.hu.shape[0]):
        enc = enc_choice(rng)
        uid = synthetic_uid(seed, index, role, k)
        stored = enc.to_stored(series.hu[k], series.fov_mask)
        ds = ct_dataset(study, sh, uid, k + 1, stored, enc, series.positions[k], series.orientation,
                        series.pixel_spacing, float(series.positions[k] @ normal), rng)
        path = sdir / f"{uid}.dcm"
        save(ds, path, syntax, stored, CTImageStorage)
        uids.append(uid)
        paths.append(path)
    return uids, paths


@dataclass(frozen=True)
class StudyPlan:
    """The per-study random choices of :func:`write_study`, drawn before any rendering.

    Every choice is drawn whatever the options, so options never shift the stream.
    """

    spec: StudySpec
    header: StudyHeader
    rows: int
    tilt_deg: float
    descending: bool
    thickness: float
    syntax: str  # used with transfer_syntax="mixed"
    encoding: PixelEncoding  # scanner profile
    kernels: tuple[str, str]
    rng: np.random.Generator = field(repr=False, compare=False)


def plan_study(seed: int, index: int, positive_fraction: float = 0.5, subtypes: Sequence[str] = SUBTYPES,
               profile: str = "scanner") -> StudyPlan:
    """Draw study ``index`` of a dataset: subject, lesions, header and acquisition."""
    rng = np.random.default_rng([seed, index])
    spec = sample_study_spec(rng, positive_fraction, subtypes)
    header = study_header(rng, seed, index, profile)
    rows = int(rng.choice([512] * 8 + [256, 768]))
    tilt = float(np.round(rng.uniform(-20, 20), 1)) if rng.random() < 0.35 else 0.0
    descending = bool(rng.random() < 0.5)
    thickness = float(rng.choice([5.0, 5.0, 5.0, 4.0]))
    syntax = str(rng.choice(list(TRANSFER_SYNTAXES)))
    encoding = SCANNER_ENCODINGS[int(rng.integers(len(SCANNER_ENCODINGS)))]
    kernels = (("STANDARD", "BONE"), ("H40s", "H70h"))[int(rng.integers(2))]
    return StudyPlan(spec, header, rows, tilt, descending, thickness, syntax, encoding, kernels, rng)


def write_study(
    out_dir: Path,
    index: int,
    seed: int,
    positive_fraction: float = 0.5,
    subtypes: Sequence[str] = SUBTYPES,
    thin: bool = False,
    transfer_syntax: str | None = None,
    profile: str = "scanner",
    rows: int | None = None,
    preview: bool = False,
    components: Sequence[str] = COMPONENTS,
) -> tuple[StudyTruth, list[tuple[str, np.ndarray]]]:
    """Write study ``index`` of a dataset; returns its truth and (SOP UID, labels) pairs."""
    plan = plan_study(seed, index, positive_fraction, subtypes, profile)
    rng = plan.rng
    spec, header, tilt, descending, thickness = plan.spec, plan.header, plan.tilt_deg, plan.descending, plan.thickness
    n_rows = rows or plan.rows
    key = plan.syntax if transfer_syntax == "mixed" else (transfer_syntax or "explicit")
    syntax = TRANSFER_SYNTAXES[key]
    kernels = plan.kernels
    if profile == "scanner":
        def enc_choice(_rng):
            return plan.encoding
    else:
        def enc_choice(_rng):
            return RSNA_ENCODINGS[int(_rng.random() < 0.3)]

    need_clean = "bone" in components
    axial = render_axial(spec, n_rows, thickness, None, tilt, descending=descending, keep_clean=need_clean)
    series_truth: list[SeriesTruth] = []
    label_rows: list[tuple[str, np.ndarray]] = []

    def sheader(role, number, desc, itype, kernel, window, minutes, thk):
        return SeriesHeader(synthetic_uid(seed, index, role, "series"), number, desc, itype, kernel, window,
                            series_time(header.study_time, minutes), None if profile == "rsna" else thk,
                            tilt if role != "localizer" else 0.0)

    if "localizer" in components:
        img, pos, iop, ps = _localizer(axial)
        sh = sheader("localizer", 1, "Scout", ("ORIGINAL", "PRIMARY", "LOCALIZER"), kernels[0],
                     (1500.0, 3000.0), 0, 1.0)
        enc = PixelEncoding(True, 16, 0.0, None)
        sdir = out_dir / header.study_uid / sh.series_uid
        sdir.mkdir(parents=True, exist_ok=True)
        uid = synthetic_uid(seed, index, "localizer", 0)
        ds = ct_dataset(header, sh, uid, 1, img, enc, pos, iop, ps, 0.0, rng)
        save(ds, sdir / f"{uid}.dcm", syntax, img, CTImageStorage)
        series_truth.append(SeriesTruth(sh.series_uid, "localizer", 1, sh.slice_thickness, img.shape[0],
                                        str(syntax), 0.0, sh.description, (uid,)))
    if "axial" in components:
        sh = sheader("axial", 2, f"Head {thickness:g}mm Brain", ("ORIGINAL", "PRIMARY", "AXIAL"), kernels[0],
                     (40.0, 80.0), 1, thickness)
        uids, _ = _write_ct_series(out_dir, header, sh, axial, enc_choice, syntax, seed, index, "axial", rng)
        label_rows += list(zip(uids, axial.labels, strict=True))
        series_truth.append(_truth(sh, "axial", axial, uids, syntax))
    bone = None
    if "bone" in components:
        bone = axial.with_kernel("bone", spec.noise_seed)
        sh = sheader("bone", 3, f"Head {thickness:g}mm Bone", ("ORIGINAL", "PRIMARY", "AXIAL"), kernels[1],
                     (900.0, 2500.0), 1, thickness)
        uids, _ = _write_ct_series(out_dir, header, sh, bone, enc_choice, syntax, seed, index, "bone", rng)
        series_truth.append(_truth(sh, "bone", bone, uids, syntax, labels=False))
    if thin:
        thk = float(rng.choice([0.625, 1.0, 1.25]))
        n = min(250, int(np.ceil(axial.hu.shape[0] * thickness / thk)))
        thin_s = render_axial(spec, min(n_rows, 512), thk, n, tilt, descending=descending)
        sh = sheader("thin", 4, f"Head {thk:g}mm Brain", ("ORIGINAL", "PRIMARY", "AXIAL"), kernels[0],
                     (40.0, 80.0), 1, thk)
        uids, _ = _write_ct_series(out_dir, header, sh, thin_s, enc_choice, syntax, seed, index, "thin", rng)
        label_rows += list(zip(uids, thin_s.labels, strict=True))
        series_truth.append(_truth(sh, "thin", thin_s, uids, syntax))
    if "dose" in components:
        n_ax = axial.hu.shape[0]
        ctdi = float(np.round(rng.uniform(38, 62), 2))
        lines = [("Series", "Type", "Scan Range (mm)", "CTDIvol", "DLP", "Phantom"),
                 ("1", "Scout", "-", "-", "-", "-"),
                 ("2", "Axial", f"{n_ax * thickness:.0f}", f"{ctdi:.2f}", f"{ctdi * n_ax * thickness / 10:.1f}",
                  "Head 16"),
                 ("", "", "", "Total Exam DLP:", f"{ctdi * n_ax * thickness / 10:.1f}", "")]
        img = dose_screen(lines)
        sh = sheader("dose", 999, "Dose Report", ("DERIVED", "SECONDARY", "OTHER"), "", (128.0, 256.0), 2,
                     None)
        sdir = out_dir / header.study_uid / sh.series_uid
        sdir.mkdir(parents=True, exist_ok=True)
        uid = synthetic_uid(seed, index, "dose", 0)
        ds = sc_dataset(header, sh, uid, 1, img)
        dose_syntax = syntax if syntax != TRANSFER_SYNTAXES["jpeg2000-lossless"] else TRANSFER_SYNTAXES["explicit"]
        save(ds, sdir / f"{uid}.dcm", dose_syntax, img, SecondaryCaptureImageStorage)
        series_truth.append(SeriesTruth(sh.series_uid, "dose_summary", 1, None, img.shape[0], str(dose_syntax),
                                        0.0, sh.description, (uid,)))
    if preview:
        stem = out_dir / "preview" / f"{index:04d}"
        montage(axial.hu, axial.labels, "brain", stem.with_name(f"{index:04d}_brain.png"), axial.masks)
        montage(axial.hu, axial.labels, "subdural", stem.with_name(f"{index:04d}_subdural.png"))
        shown = bone if bone is not None else axial
        montage(shown.hu, shown.labels, "bone", stem.with_name(f"{index:04d}_bone.png"))
    truth = StudyTruth(
        index=index,
        study_uid=header.study_uid,
        patient_id=header.patient_id,
        patient_name=header.patient_name,
        positive=spec.positive,
        subtypes=spec.subtypes,
        lesions=tuple({"subtype": les.subtype, "kind": les.kind, "hu": round(les.hu, 1)} for les in spec.lesions),
        profile=profile,
        series=tuple(series_truth),
    )
    return truth, label_rows


def _truth(sh: SeriesHeader, role: str, s: RenderedSeries, uids, syntax, labels: bool = True) -> SeriesTruth:
    pos = {}
    if labels:
        pos = {name: int(s.labels[:, i].sum()) for i, name in enumerate(("any",) + SUBTYPES)}
    descending = bool(len(s.positions) > 1 and (s.positions[1] - s.positions[0]) @ s.normal < 0)
    return SeriesTruth(sh.series_uid, role, len(uids), s.slice_thickness, s.hu.shape[1], str(syntax),
                       s.tilt_deg, sh.description, tuple(uids), pos, descending)


def study_spec(seed: int, index: int, positive_fraction: float = 0.5,
               subtypes: Sequence[str] = SUBTYPES) -> StudySpec:
    """The :class:`StudySpec` that :func:`write_dataset` uses for study ``index``."""
    return plan_study(seed, index, positive_fraction, subtypes).spec


def write_dataset(
    out_dir,
    studies: int,
    seed: int,
    positive_fraction: float = 0.5,
    subtypes: Sequence[str] = SUBTYPES,
    thin: bool = False,
    transfer_syntax: str | None = None,
    profile: str = "scanner",
    rows: int | None = None,
    preview: bool = False,
    components: Sequence[str] = COMPONENTS,
) -> list[StudyTruth]:
    """Write ``studies`` synthetic studies with labels.csv and studies.json.

    Parameters
    ----------
    out_dir : path-like
        Output directory (created).
    studies : int
        Number of studies.
    seed : int
        Master seed; the output is a pure function of the arguments.
    positive_fraction : float
        Probability that a study carries haemorrhage.
    subtypes : sequence of str
        Subtypes allowed in positive studies.
    thin : bool
        Also write a thin (0.625-1.25 mm) brain series of up to 250 slices (at most 512 x 512).
    transfer_syntax : str, optional
        One of ``explicit``, ``implicit``, ``jpeg-lossless``, ``jpeg2000-lossless``,
        ``rle`` or ``mixed`` (random per study); default explicit VR little endian.
    profile : {"scanner", "rsna"}
        Header profile.
    rows : int, optional
        Matrix size; by default 512 mostly, some 256 and 768.
    preview : bool
        Write PNG montages (brain, subdural, bone windows) under ``out_dir/preview``.
    components : sequence of str
        Series to write besides ``thin``: ``localizer``, ``axial``, ``bone``, ``dose``.

    Returns
    -------
    list of StudyTruth
    """
    if studies < 0:
        raise ValueError(f"studies must be >= 0, got {studies}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if transfer_syntax not in (None, "mixed", *TRANSFER_SYNTAXES):
        raise ValueError(f"transfer_syntax must be one of {('mixed', *TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")
    if rows is not None and rows not in (256, 512, 768):
        raise ValueError(f"rows must be 256, 512 or 768, got {rows}")
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise ValueError(f"components must be drawn from {COMPONENTS}, got {bad}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truths: list[StudyTruth] = []
    start = time.perf_counter()
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label"])
        for i in range(studies):
            truth, rows_ = write_study(out, i, seed, positive_fraction, subtypes, thin, transfer_syntax, profile,
                                       rows, preview, components)
            for uid, lab in rows_:
                for name in LABEL_SUBTYPES:
                    col = 0 if name == "any" else 1 + SUBTYPES.index(name)
                    writer.writerow([f"ID_{uid}_{name}", int(lab[col])])
            truths.append(truth)
            log.info("synth.study_written", index=i, positive=truth.positive, subtypes=list(truth.subtypes),
                     series=len(truth.series))
    (out / "studies.json").write_text(json.dumps([t.to_json() for t in truths], indent=1))
    log.info("synth.dataset_written", studies=studies, seconds=round(time.perf_counter() - start, 2))
    return truths
