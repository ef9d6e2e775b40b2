"""The listener with real peers: DCMTK storescu/echoscu and a pynetdicom SCU."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from tests.ingest_support import (
    ALL_TRANSFER_SYNTAXES,
    Node,
    associate_rq,
    ct_dataset,
    dataset_bytes,
    p_data,
    part10,
    pdv,
    running_node,
    write_series,
)
from triage_node.db.models import AuditEvent, Instance, Series
from triage_node.ingest.admission import (
    ASSOCIATE_RJ_CALLED_AE,
    ASSOCIATE_RJ_CALLING_AE,
    ASSOCIATE_RJ_LOCAL_LIMIT,
)
from triage_node.ingest.inflate import inflate_part10
from triage_node.ingest.store import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from triage_node.peers import DCMTK_ENV, echoscu, require_binary, storescu

AET = "TRIAGE_NODE"


def wait_for(check: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def scu(calling: str = "MODALITY", contexts: tuple = (CTImageStorage, MRImageStorage)) -> AE:
    ae = AE(ae_title=calling)
    for uid in contexts:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae


def rejection(assoc) -> tuple[int, int, int]:
    primitive = assoc.acceptor.primitive
    return (primitive.result, primitive.result_source, primitive.diagnostic)


def incoming_files(node: Node) -> list[Path]:
    """Temporary files of objects being received (``.incoming`` in the spool)."""
    return sorted((node.settings.spool_dir / ".incoming").iterdir())


def instance_rows(node: Node) -> list[Instance]:
    with node.session_factory() as s:
        return list(s.scalars(select(Instance).order_by(Instance.id)))


#: storescu's options that propose each syntax (else it converts to an uncompressed one).
PROPOSE = {
    DeflatedExplicitVRLittleEndian: ("-xd",),
    JPEGLosslessSV1: ("-xs",),
    JPEGLSLossless: ("-xt",),
    JPEGLSNearLossless: ("-xu",),
    JPEG2000Lossless: ("-xv",),
    JPEG2000: ("-xw",),
    RLELossless: ("-xr",),
}

# storescu has no option for JPEG Lossless Process 14 (non-SV1): a DCMTK profile does it.
PROCESS14_PROFILE = """
[[TransferSyntaxes]]
[Process14]
TransferSyntax1 = 1.2.840.10008.1.2.4.57
[[PresentationContexts]]
[CTProcess14]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\Process14
[[Profiles]]
[Process14]
PresentationContexts = CTProcess14
"""


def storescu_proposal(transfer_syntax: str, folder: Path) -> tuple[str, ...]:
    if transfer_syntax == JPEGLossless:
        config = folder / "process14.cfg"
        config.write_text(PROCESS14_PROFILE)
        return ("--config-file", str(config), "Process14")
    return PROPOSE.get(transfer_syntax, ())


@pytest.mark.parametrize("transfer_syntax", ALL_TRANSFER_SYNTAXES, ids=lambda ts: ts.name)
def test_storescu_in_every_transfer_syntax_is_stored_byte_for_byte(
    tmp_path: Path, transfer_syntax: str
) -> None:
    files = write_series(tmp_path / "in", 3, transfer_syntax)
    series_uid = dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    extra = storescu_proposal(transfer_syntax, tmp_path)
    with running_node() as node:
        proc = subprocess.run(
            [require_binary("storescu"), "-aet", "MODALITY", "-aec", AET, *extra,
             "127.0.0.1", str(node.port), *map(str, files)],
            capture_output=True, text=True, timeout=120, env=DCMTK_ENV, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        rows = instance_rows(node)
        assert len(rows) == 3
        # A deflated data set is kept inflated (triage_node.ingest.inflate).
        deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
        kept = ExplicitVRLittleEndian if deflated else transfer_syntax
        assert {r.transfer_syntax for r in rows} == {str(kept)}
        by_sop = {r.sop_uid: Path(r.path) for r in rows}
        for path in files:
            sent = path.read_bytes()
            sent = inflate_part10(sent, 2**30) if deflated else sent
            sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            # No re-encoding: the data set on disk is the one that was sent.
            assert dataset_bytes(by_sop[sop].read_bytes()) == dataset_bytes(sent)
        assert wait_for(lambda: node.finished) == [[series_uid]]
        assert node.stored == [series_uid] * 3


def test_storescu_into_postgresql(tmp_path: Path, postgres_db: str) -> None:
    write_series(tmp_path / "in", 4)
    with running_node(database_url=postgres_db) as node:
        proc = storescu(tmp_path / "in", "127.0.0.1", node.port, AET)
        assert proc.returncode == 0, proc.stderr
        with node.session_factory() as s:
            assert s.scalars(select(Series.instance_count)).one() == 4


def test_c_echo() -> None:
    with running_node() as node:
        assert echoscu("127.0.0.1", node.port, AET)


def test_unknown_calling_ae_is_rejected_permanently_with_reason_3() -> None:
    with running_node(allowed_callers=["CT_SCANNER@127.0.0.1/32"]) as node:
        assoc = scu("INTRUDER").associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.is_rejected
        assert rejection(assoc) == ASSOCIATE_RJ_CALLING_AE == (0x01, 0x01, 0x03)
        with node.session_factory() as s:
            [event] = s.scalars(
                select(AuditEvent).where(AuditEvent.action == "association.rejected")
            ).all()
        assert event.actor == "ae:INTRUDER@127.0.0.1" and event.outcome == "failed"
        assert event.detail["reason"] == "calling AE title not recognised"
        good = scu("CT_SCANNER").associate("127.0.0.1", node.port, ae_title=AET)
        assert good.is_established
        assert good.send_c_echo().Status == SUCCESS
        good.release()


def test_known_ae_from_a_network_not_on_the_list_is_rejected() -> None:
    with running_node(allowed_callers=["CT_SCANNER@10.1.0.0/16"]) as node:
        assoc = scu("CT_SCANNER").associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.is_rejected and rejection(assoc) == ASSOCIATE_RJ_CALLING_AE


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_empty_allow_list_admits_loopback_only() -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    with running_node(dicom_host="0.0.0.0") as node:
        local = scu("ANY_AE").associate("127.0.0.1", node.port, ae_title=AET)
        assert local.is_established
        local.release()
        remote = scu("ANY_AE").associate(address, node.port, ae_title=AET)
        assert remote.is_rejected and rejection(remote) == ASSOCIATE_RJ_CALLING_AE
    with running_node(dicom_host="0.0.0.0", allowed_callers=[f"*@{address}/32"]) as node:
        remote = scu("ANY_AE").associate(address, node.port, ae_title=AET)
        assert remote.is_established
        remote.release()


def test_wrong_called_ae_is_rejected_with_reason_7() -> None:
    with running_node() as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title="SOMEONE_ELSE")
        assert assoc.is_rejected
        assert rejection(assoc) == ASSOCIATE_RJ_CALLED_AE == (0x01, 0x01, 0x07)


def test_association_cap_refuses_the_extra_association() -> None:
    with running_node(max_associations=1) as node:
        first = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert first.is_established
        second = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert second.is_rejected and rejection(second) == (0x02, 0x03, 0x02)
        first.release()


def test_edge_cases_get_their_status_and_the_association_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Send files as they are, announcing the SOP class/instance of their file meta
    # (as a PACS forwarding files does), so a data set can disagree with its request.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    study, series = generate_uid(), generate_uid()
    good = ct_dataset(study, series, 0)
    traversal = ct_dataset(study, series, 1)
    traversal.SOPInstanceUID = "../../x"
    changed = ct_dataset(study, series, 0, sop_uid=good.SOPInstanceUID, seed=99)
    # The file meta says CT (so storescu and pynetdicom use the CT context) but the
    # data set says MR: the data set does not match the SOP class (PS3.4 B.2.3).
    mismatched = ct_dataset(study, series, 2)
    mismatched.SOPClassUID = MRImageStorage
    paths = {}
    for name, ds in (("good", good), ("traversal", traversal), ("changed", changed),
                     ("mismatched", mismatched)):
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(part10(ds))
    # pydicom fills the file meta from the data set: put CT back into the meta only.
    written = dcmread(paths["mismatched"])
    written.file_meta.MediaStorageSOPClassUID = CTImageStorage
    written.save_as(paths["mismatched"], enforce_file_format=False)
    with running_node() as node:
        # Only CT is proposed, so the MR data set can only travel on the CT context.
        assoc = scu(contexts=(CTImageStorage,)).associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.is_established
        statuses = {
            name: assoc.send_c_store(paths[name]).Status
            for name in ("good", "traversal", "good", "changed", "mismatched")
        }
        # The last send of "good" (a duplicate) is what the dict keeps.
        assert statuses == {
            "good": SUCCESS,
            "traversal": INVALID_UID,
            "changed": SUCCESS,
            "mismatched": DATASET_DOES_NOT_MATCH_SOP_CLASS,
        }
        assert assoc.is_established
        assoc.release()
        rows = instance_rows(node)
        assert [(r.sop_uid, r.version) for r in rows] == [
            (good.SOPInstanceUID, 1), (good.SOPInstanceUID, 2)
        ]
        assert not any(".." in str(p) for p in node.settings.spool_dir.rglob("*"))
        with node.session_factory() as s:
            actions = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
        assert actions == ["instance.stored", "instance.rejected", "instance.duplicate",
                           "instance.new_version", "instance.rejected"]


def test_other_storage_classes_are_stored_or_refused_by_setting(tmp_path: Path) -> None:
    mr = ct_dataset(generate_uid(), generate_uid(), 0)
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    with running_node(unknown_storage_class="store") as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.send_c_store(mr).Status == SUCCESS
        assoc.release()
        assert instance_rows(node)[0].sop_class_uid == MRImageStorage
    with running_node(unknown_storage_class="reject") as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=AET)
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert CTImageStorage in accepted and MRImageStorage not in accepted
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(mr)
        assoc.release()
        assert instance_rows(node) == []


def test_watermark_answers_a700_and_refuses_new_associations() -> None:
    study, series = generate_uid(), generate_uid()
    with running_node() as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.send_c_store(ct_dataset(study, series, 0)).Status == SUCCESS
        # The disk "fills up" mid-association: free space is now below the watermark.
        node.store.settings = node.settings.model_copy(update={"min_free_disk_mb": 1 << 40})
        assert assoc.send_c_store(ct_dataset(study, series, 1)).Status == OUT_OF_RESOURCES
        assert assoc.is_established
        assoc.release()
        refused = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert refused.is_rejected
        assert rejection(refused) == ASSOCIATE_RJ_LOCAL_LIMIT == (0x02, 0x03, 0x02)
        assert len(instance_rows(node)) == 1
        files = [p for p in node.settings.spool_dir.rglob("*") if p.is_file()]
        assert len(files) == 1  # never a half-written file


def test_aborted_association_still_reports_its_series() -> None:
    study, series = generate_uid(), generate_uid()
    with running_node() as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.send_c_store(ct_dataset(study, series, 0)).Status == SUCCESS
        assoc.abort()
        assert wait_for(lambda: node.finished) == [[series]]


def test_a_silent_association_is_aborted_and_keeps_what_it_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from triage_node.ingest import association

    monkeypatch.setattr(association, "IDLE_TIMEOUT_S", 0.5)
    study, series = generate_uid(), generate_uid()
    with running_node() as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.send_c_store(ct_dataset(study, series, 0)).Status == SUCCESS
        assert wait_for(lambda: assoc.is_aborted)
        assert wait_for(lambda: node.finished) == [[series]]
        assert len(instance_rows(node)) == 1
        assert node.scp.admission.open_count() == 0


def test_stop_disconnects_open_associations() -> None:
    with running_node() as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.is_established
        node.scp.stop()
        assert wait_for(lambda: not assoc.is_established)
        assert node.scp.admission.open_count() == 0


def test_an_object_over_max_object_mb_aborts_the_association_with_an_audit_row() -> None:
    study, series = generate_uid(), generate_uid()
    with running_node(max_object_mb=1) as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert assoc.send_c_store(ct_dataset(study, series, 0)).Status == SUCCESS
        big = ct_dataset(study, series, 1, size=1024)  # 2 MiB of pixel data
        assoc.send_c_store(big)
        assert wait_for(lambda: assoc.is_aborted)
        with node.session_factory() as s:
            aborted = s.scalars(select(AuditEvent).where(AuditEvent.action == "association.aborted")).one()
        assert "larger than 1 MiB" in aborted.detail["reason"] and aborted.outcome == "failed"
        assert len(instance_rows(node)) == 1  # the object before it stays stored
        # Its first MiB was written as it arrived: the temporary file went with the abort.
        assert wait_for(lambda: incoming_files(node) == [])
        again = scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert again.send_c_store(ct_dataset(study, series, 2)).Status == SUCCESS
        again.release()


def test_a_connection_lost_inside_an_object_leaves_no_temporary_file() -> None:
    """The data set is written as it arrives; cut short, its file is deleted and nothing is stored."""
    ds = ct_dataset(generate_uid(), generate_uid(), 0, size=256)
    data = dataset_bytes(part10(ds))
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    context.context_id = 1
    command = encode(_c_store_rq(ds), True, True)
    with running_node() as node, socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(associate_rq([context]))
        assert sock.recv(1)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(p_data(pdv(1, 0x03, command), pdv(1, 0x00, data[:60_000])))
        assert len(wait_for(lambda: incoming_files(node))) == 1  # the bytes so far are on disk
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        assert wait_for(lambda: node.scp.admission.open_count() == 0)
        assert incoming_files(node) == [] and instance_rows(node) == []


def _c_store_rq(ds: Dataset) -> Dataset:
    command = Dataset()
    command.AffectedSOPClassUID = ds.SOPClassUID
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = ds.SOPInstanceUID
    return command
