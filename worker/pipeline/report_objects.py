"""Steps 4-5 of a job: key slices, heat maps, the overlay series and the SR reports.

Everything is written under ``<data_dir>/results/<job_id>/``. The UIDs derive from
(study, series, job, version) (`object_uid`), so a re-run after a crash rewrites the same
objects instead of adding new ones.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triage_node.setting_types import Destination, SRClass
from worker.files import write_atomic
from worker.pipeline.claim import Claim
from worker.pipeline.context import WorkerContext

#: Namespace of the name-based UUIDs behind the node's derived UIDs.
UID_NAMESPACE = uuid.UUID("6f1c2a9e-3b7d-5c4e-9a81-0d2f4b6e8c13")


def object_uid(*parts: object) -> str:
    """A UID derived from ``parts``: the same inputs, the same UID.

    A name-based (SHA-1, version 5) UUID in the ``2.25`` form of PS3.5 B.2, so re-running
    a job writes objects with the same SOP/Series Instance UIDs and the PACS replaces
    rather than duplicates them.
    """
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def _write_dataset(ds: Any, path: Path) -> Path:
    """Write a DICOM file atomically (temp file, fsync, replace), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_atomic(path, lambda fh: ds.save_as(fh, enforce_file_format=True), 0o600)


@dataclass(frozen=True)
class WrittenObjects:
    """The SR and overlay files of one job, with their UIDs and the key slices shown.

    ``sr_*`` is the primary report (Comprehensive 3D SR referencing the overlays), the one
    the result row names; ``sr_variants`` holds it and every other report a destination
    asked for, by (SR class, references the overlays), as (SOP Instance UID, path).
    """

    sr_path: Path
    sr_sop_uid: str
    sr_series_uid: str
    overlay_paths: tuple[Path, ...]
    overlay_sop_uids: tuple[str, ...]
    overlay_series_uid: str | None
    key_slices: dict[str, list[int]]
    sr_variants: dict[tuple[SRClass, bool], tuple[str, Path]] = field(default_factory=dict)

    @property
    def overlays(self) -> list[tuple[str, Path]]:
        return list(zip(self.overlay_sop_uids, self.overlay_paths, strict=True))

    def for_destination(self, destination: Destination) -> list[tuple[str, Path]]:
        """What one destination gets: the overlays if it takes them, then its report."""
        variant = report_variant(destination, bool(self.overlay_sop_uids))
        sr = self.sr_variants.get(variant, (self.sr_sop_uid, self.sr_path))
        return [*(self.overlays if destination.send_overlays else []), sr]


PRIMARY_REPORT = (SRClass.comprehensive_3d, True)


def report_variant(destination: Destination, have_overlays: bool = True) -> tuple[SRClass, bool]:
    """(SR class, references the overlays) of the report ``destination`` gets.

    A destination that does not take the overlay series gets a report that does not
    reference it, so that no reference dangles in that archive.
    """
    return SRClass(destination.sr_class), bool(destination.send_overlays and have_overlays)


def write_objects(ctx: WorkerContext, claim_: Claim, volume: Any, prediction: Any, frame: Any) -> WrittenObjects:
    """Key slices, heat maps, the overlay series and the SR, written under ``results/<job_id>/``.

    Key slices are the top ``settings.key_slices_per_class`` slices of each positive
    class (:func:`worker.pipeline.overlay.select_key_slices`); each gets a CAM heat map
    (:func:`worker.pipeline.overlay.compute_heatmaps`, on the slice grid through the
    input ``frame``) and one Secondary Capture image.
    All UIDs derive from (study, series, job id, version).
    """
    from worker.pipeline.overlay import build_overlays, compute_heatmaps, overlay_keys, select_key_slices
    from worker.pipeline.sr import build_sr

    card = ctx.card
    base = (claim_.study_uid, claim_.series_uid, claim_.job_id, claim_.version)
    # results/ holds patient data: 0700 like the spool (mkdir(parents=True) would give
    # the intermediate folder the umask's 0755).
    ctx.results_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ctx.results_dir.chmod(0o700)
    out_dir = ctx.results_dir / str(claim_.job_id)
    key_slices = select_key_slices(prediction.slice_probs, prediction.decision, ctx.settings.key_slices_per_class)
    keys = overlay_keys(key_slices)
    heatmaps = compute_heatmaps(prediction.features, ctx.head_weight, key_slices, frame, volume.hu)
    overlay_series_uid = object_uid(*base, "overlay-series")
    overlays = build_overlays(
        volume.datasets, volume.hu, prediction, card, key_slices, heatmaps,
        series_instance_uid=overlay_series_uid,
        sop_instance_uids=[object_uid(*base, "overlay", name, i) for name, i in keys],
    )
    sr_series_uid = object_uid(*base, "sr-series")
    variants = {PRIMARY_REPORT} | {report_variant(d, bool(overlays)) for d in ctx.settings.destinations}
    reports: dict[tuple[SRClass, bool], tuple[str, Path]] = {}
    for sr_class, with_overlays in sorted(variants, key=lambda v: (v != PRIMARY_REPORT, v)):
        primary = (sr_class, with_overlays) == PRIMARY_REPORT
        sr = build_sr(
            volume.datasets, prediction, card, overlays if with_overlays else [], key_slices,
            series_instance_uid=sr_series_uid,
            # each class is its own SOP instance; the primary keeps the UID it always had
            sop_instance_uid=object_uid(*base, "sr") if primary
            else object_uid(*base, "sr", str(sr_class), "overlays" if with_overlays else "no-overlays"),
            sr_class=sr_class,
        )
        name = "sr.dcm" if primary else f"sr_{sr_class}{'' if with_overlays else '_no-overlays'}.dcm"
        reports[(sr_class, with_overlays)] = (str(sr.SOPInstanceUID), _write_dataset(sr, out_dir / name))
    overlay_paths = tuple(
        _write_dataset(ds, out_dir / f"overlay_{i:02d}.dcm") for i, ds in enumerate(overlays)
    )
    for stale in out_dir.glob("overlay_*.dcm"):  # left by an earlier run with more overlays
        if stale not in overlay_paths:
            stale.unlink(missing_ok=True)
    sr_sop_uid, sr_path = reports[PRIMARY_REPORT]
    return WrittenObjects(
        sr_path=sr_path,
        sr_sop_uid=sr_sop_uid,
        sr_series_uid=sr_series_uid,
        overlay_paths=overlay_paths,
        overlay_sop_uids=tuple(str(ds.SOPInstanceUID) for ds in overlays),
        overlay_series_uid=overlay_series_uid if overlays else None,
        key_slices={k: [int(i) for i in v] for k, v in key_slices.items()},
        sr_variants=reports,
    )


