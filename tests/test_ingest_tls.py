"""DICOM TLS (PS3.15 B.1) with real peers: DCMTK storescu over TLS and a pynetdicom TLS SCU."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from tests.ingest_support import ct_dataset, running_node, write_series
from triage_node.db.models import Instance
from triage_node.ingest.store import SUCCESS
from triage_node.peers import DCMTK_ENV, require_binary

AET = "TRIAGE_NODE"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=Triage Test CA", cwd=d)
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:ct-scanner")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
                 cwd=d)
    # A second CA whose client certificate the node must not trust.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
             "rogue.crt", "-days", "2", "-subj", "/CN=rogue", cwd=d)
    return d


def _tls_settings(pki: Path) -> dict:
    return {"tls_cert": pki / "server.crt", "tls_key": pki / "server.key", "tls_ca": pki / "ca.crt"}


def _storescu_tls(pki: Path, port: int, files: list[Path], key: str, cert: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_binary("storescu"), "-aet", "MODALITY", "-aec", AET,
         "+tls", str(pki / key), str(pki / cert), "+cf", str(pki / "ca.crt"),
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120, env=DCMTK_ENV, check=False,
    )


def test_storescu_over_tls_with_a_client_certificate(pki: Path, tmp_path: Path) -> None:
    files = write_series(tmp_path / "in", 3)
    with running_node(**_tls_settings(pki)) as node:
        proc = _storescu_tls(pki, node.port, files, "client.key", "client.crt")
        assert proc.returncode == 0, proc.stderr
        with node.session_factory() as s:
            assert len(s.scalars(select(Instance)).all()) == 3


def test_client_certificate_from_another_ca_is_refused(pki: Path, tmp_path: Path) -> None:
    files = write_series(tmp_path / "in", 1)
    with running_node(**_tls_settings(pki)) as node:
        proc = _storescu_tls(pki, node.port, files, "rogue.key", "rogue.crt")
        assert proc.returncode != 0
        with node.session_factory() as s:
            assert s.scalars(select(Instance)).all() == []


def _client_context(pki: Path, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if with_cert:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return context


def _scu() -> AE:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae


def test_pynetdicom_tls_scu_with_and_without_a_client_certificate(pki: Path) -> None:
    with running_node(**_tls_settings(pki)) as node:
        assoc = _scu().associate("127.0.0.1", node.port, ae_title=AET,
                                 tls_args=(_client_context(pki, True), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_store(ct_dataset(generate_uid(), generate_uid(), 0)).Status == SUCCESS
        assoc.release()
        refused = _scu().associate("127.0.0.1", node.port, ae_title=AET,
                                   tls_args=(_client_context(pki, False), "127.0.0.1"))
        assert not refused.is_established
        plain = _scu().associate("127.0.0.1", node.port, ae_title=AET)
        assert not plain.is_established


def test_tls_without_a_ca_accepts_clients_without_certificates(pki: Path) -> None:
    with running_node(tls_cert=pki / "server.crt", tls_key=pki / "server.key") as node:
        assoc = _scu().associate("127.0.0.1", node.port, ae_title=AET,
                                 tls_args=(_client_context(pki, False), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == SUCCESS
        assoc.release()


@pytest.mark.timeout(60)
def test_a_silent_peer_does_not_hold_the_tls_accept_loop(
    pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from triage_node.ingest import tls

    monkeypatch.setattr(tls._ServerContext, "handshake_timeout", 1.0)
    with running_node(**_tls_settings(pki)) as node:
        silent = socket.create_connection(("127.0.0.1", node.port))
        try:
            assoc = _scu().associate("127.0.0.1", node.port, ae_title=AET,
                                     tls_args=(_client_context(pki, True), "127.0.0.1"))
            assert assoc.is_established
            assoc.release()
        finally:
            silent.close()
