"""Compressed transfer syntaxes end to end: accepted only where a decoder is installed,
stored as received, decoded for inference.

JPEG-LS files are encoded by DCMTK's ``dcmcjpls`` and sent by ``storescu`` to the
node's real listener; the series is then completed and triaged by ``run_job`` with a
small exported model, as the worker would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless
from sqlalchemy import select

from tests.ingest_support import dataset_bytes, encode_with_dcmtk, running_node
from tests.worker_support import build_small_repository, write_ct_series
from triage_node.config import load_settings
from triage_node.db import schema
from triage_node.db.models import Instance, JobState, Result, Series
from triage_node.ingest.scp import StorageSCP
from triage_node.ingest.store import InstanceStore
from triage_node.ingest.transfer_syntaxes import (
    ACCEPTED_TRANSFER_SYNTAXES,
    COMPRESSED_TRANSFER_SYNTAXES,
    NATIVE_TRANSFER_SYNTAXES,
)
from triage_node.peers import free_port, storescu
from triage_node.studies.completeness import CompletenessTracker
from worker.pipeline.context import build_context
from worker.pipeline.preprocess import load_series
from worker.pipeline.run import run_job

AET = "TRIAGE_NODE"
SLICES = 12
#: dcmcjpls's default NEAR: each decoded value is within 2 of the original (1 HU per value).
NEAR = 2


@pytest.fixture(scope="module")
def model_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_repository(tmp_path_factory.mktemp("model"), threshold=0.5)


def jpeg_ls_series(folder: Path, syntax: str, *, bleed: bool = True) -> tuple[list[Path], list[Path]]:
    """A head CT series written uncompressed, then each file encoded by dcmcjpls.

    Returns (the uncompressed sources, the JPEG-LS files).
    """
    sources = write_ct_series(folder / "source", slices=SLICES, bleed=bleed)
    encoded = []
    (folder / "jls").mkdir()
    for path in sources:
        out = folder / "jls" / path.name
        encode_with_dcmtk(pydicom.dcmread(path), out, syntax)
        assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        encoded.append(out)
    return sources, encoded


def test_jpeg_ls_and_the_others_are_accepted_with_their_decoders_installed() -> None:
    assert {JPEGLSLossless, JPEGLSNearLossless} <= set(ACCEPTED_TRANSFER_SYNTAXES)
    # This install has every decoder (pyproject.toml), so nothing compressed is left out.
    assert ACCEPTED_TRANSFER_SYNTAXES == NATIVE_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES


def test_the_listener_logs_what_it_accepts() -> None:
    with structlog.testing.capture_logs() as logs, running_node():
        pass
    [entry] = [e for e in logs if e["event"] == "transfer syntaxes"]
    assert JPEGLSNearLossless.name in entry["accepted"]
    assert entry["no_decoder"] == []


# Run in a fresh interpreter where pylibjpeg and pyjpegls cannot be imported, as on an
# install without them: JPEG-LS and JPEG Lossless have no decoder left (pydicom's own
# RLE decoder and Pillow's JPEG 2000 remain).
_WITHOUT_DECODERS = textwrap.dedent(
    """
    import sys
    sys.modules["pylibjpeg"] = None
    sys.modules["jpeg_ls"] = None
    from pathlib import Path
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless
    from pynetdicom import AE
    from tests.ingest_support import running_node
    from triage_node.ingest.header import CANNOT_UNDERSTAND, Refused, parse_header
    from triage_node.ingest.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES

    print("accepted", *ACCEPTED_TRANSFER_SYNTAXES)
    try:  # STOW-RS goes through the same header check
        parse_header(Path(sys.argv[1]).read_bytes())
    except Refused as exc:
        print("header", hex(exc.status), exc.reason)
    with running_node() as node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, [JPEGLSLossless])
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE_NODE")
        print("contexts", *sorted(
            (str(cx.transfer_syntax[0]), cx.result) for cx in assoc.rejected_contexts + assoc.accepted_contexts
        ))
        assoc.release()
    """
)


def test_without_a_jpeg_ls_decoder_jpeg_ls_is_refused(tmp_path: Path) -> None:
    _, [first, *_] = jpeg_ls_series(tmp_path, JPEGLSLossless)
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DECODERS, str(first)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()}
    accepted = lines["accepted"].split()
    assert JPEGLSLossless not in accepted and JPEGLSNearLossless not in accepted
    assert "1.2.840.10008.1.2.5" in accepted  # RLE: pydicom decodes it itself
    assert lines["header"] == f"0xc000 transfer syntax {JPEGLSLossless} is not accepted"
    # The JPEG-LS context is refused (0x04: transfer syntaxes not supported), the other accepted.
    assert f"('{JPEGLSLossless}', 4)" in lines["contexts"]
    assert "('1.2.840.10008.1.2.1', 0)" in lines["contexts"]


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEGLSNearLossless], ids=["lossless", "near-lossless"])
def test_a_jpeg_ls_study_sent_by_storescu_is_stored_as_sent_and_triaged(
    tmp_path: Path, model_card: Path, syntax: str
) -> None:
    sources, files = jpeg_ls_series(tmp_path, syntax)
    settings = load_settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'triage.db'}",
        model_repository=model_card.parent / "models",
        model_card=model_card,
        dicom_port=free_port(),
        min_free_disk_mb=1,
    )
    schema.upgrade(settings.effective_database_url)
    ctx = build_context(settings)
    try:
        stored: list[str] = []
        store = InstanceStore(settings, ctx.session_factory, on_stored=stored.append)
        with StorageSCP(settings, store):
            proc = storescu(files, "127.0.0.1", settings.dicom_port, AET)
        assert proc.returncode == 0, proc.stderr
        assert len(stored) == SLICES
        with ctx.session_factory() as session:
            rows = session.scalars(select(Instance)).all()
        assert {r.transfer_syntax for r in rows} == {str(syntax)}
        kept = {r.sop_uid: Path(r.path) for r in rows}
        for path in files:
            sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert dataset_bytes(kept[sop].read_bytes()) == dataset_bytes(path.read_bytes())

        # What the worker reads from the stored files is the image that was encoded.
        decoded = load_series(kept.values()).hu
        original = load_series(sources).hu
        tolerance = 0 if syntax == JPEGLSLossless else NEAR
        assert decoded.shape == original.shape
        assert float(np.abs(decoded - original).max()) <= tolerance

        tracker = CompletenessTracker(settings, ctx.session_factory, enqueuer=lambda ids: None)
        (job_id,) = tracker.complete_series(stored[0], "test").job_ids
        outcome = run_job(ctx, job_id, 1)
        assert outcome.ran and outcome.state == JobState.done
        with ctx.session_factory() as session:
            result = session.scalars(select(Result).where(Result.job_id == job_id)).one()
            reason = session.scalars(select(Series.selection_reason)).one()
        assert len(result.slice_probabilities) == SLICES
        # dcmcjpls marks near-lossless images DERIVED, by lossy compression only.
        lossy = "original before lossy compression (ISO_14495_1)"
        assert (lossy in reason) is (syntax == JPEGLSNearLossless), reason
        sr = pydicom.dcmread(Path(outcome.output_dir) / "sr.dcm")
        assert sr.StudyInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    finally:
        ctx.close()
