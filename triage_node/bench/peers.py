"""Real DICOM peers for benchmarks: DCMTK ``storescp``/``storescu`` and Orthanc.

Each runs from its Debian binary in a temporary directory on a free loopback port,
like the test fixtures (``tests/servers.py``), but without depending on ``tests``.
Also writes the synthetic CT slices the benchmarks send.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "DCMTK_ENV",
    "OrthancPeer",
    "PeerError",
    "StoreSCPPeer",
    "echo",
    "free_port",
    "storescu",
    "write_ct_slices",
]

#: DCMTK reads TCP_NODELAY from the environment (DESIGN.md: the 40 ms delayed-ACK stall).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class PeerError(RuntimeError):
    """A peer could not be found or started."""


def _binary(name: str, *search: str) -> str:
    for folder in search:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PeerError(f"{name} not found (Debian packages dcmtk, orthanc)")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(check: Callable[[], bool], what: str, process: subprocess.Popen | None,
          timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        if process is not None and process.poll() is not None:
            raise PeerError(f"{what} exited with {process.returncode}")
        time.sleep(0.1)
    raise PeerError(f"{what} not ready after {timeout:.0f} s")


def _terminate(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


def echo(port: int, called_aet: str, host: str = "127.0.0.1", calling_aet: str = "BENCH") -> bool:
    """One C-ECHO with DCMTK ``echoscu``; True on success."""
    proc = subprocess.run(
        [_binary("echoscu"), "-aet", calling_aet, "-aec", called_aet, "-to", "5", host, str(port)],
        capture_output=True, timeout=15, env=DCMTK_ENV, check=False,
    )
    return proc.returncode == 0


def storescu(paths: Sequence[Path | str], port: int, called_aet: str, host: str = "127.0.0.1",
             calling_aet: str = "BENCH", extra_args: Sequence[str] = (),
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Send files in one association with DCMTK ``storescu`` (TCP_NODELAY=1)."""
    return subprocess.run(
        [_binary("storescu"), "-aet", calling_aet, "-aec", called_aet, *extra_args,
         host, str(port), *[str(p) for p in paths]],
        capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV, check=False,
    )


class StoreSCPPeer:
    """DCMTK ``storescp`` writing every object it receives into a temporary folder."""

    aet = "STORESCP"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bench-storescp-"))
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> StoreSCPPeer:
        self.process = subprocess.Popen(
            [_binary("storescp"), "-aet", self.aet, "+xa", "-dhl", "-od", str(self.root),
             str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV,
        )
        _wait(lambda: echo(self.port, self.aet), "storescp", self.process)
        return self

    def stop(self) -> None:
        _terminate(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


class OrthancPeer:
    """Orthanc with its default storage (SQLite index + files), DICOM only."""

    aet = "ORTHANC"

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bench-orthanc-"))
        self.port = free_port()
        self.http_port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            # Orthanc's default, stated: fsync() after each write to the storage area.
            "SyncStorageArea": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SaveJobs": False,
            "Plugins": [],
        }
        self.config_path = self.root / "orthanc.json"
        self.config_path.write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> OrthancPeer:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [_binary("Orthanc", "/usr/sbin"), str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            )
        finally:
            log.close()
        _wait(lambda: echo(self.port, self.aet), "Orthanc", self.process)
        return self

    def stop(self) -> None:
        _terminate(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


def write_ct_slices(folder: Path, n: int, size: int = 512, seed: int = 0) -> list[Path]:
    """Write ``n`` axial CT slices (one new study and series) as Explicit VR LE files.

    A water cylinder with a skull ring and noise, 16-bit signed, intercept -1024:
    the size and encoding of a real head CT slice (about 0.5 MB at 512x512).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    base = np.where(r < 0.8, 1064, 24).astype(np.int16)
    base[(r >= 0.8) & (r < 0.88)] = 2024
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        pixels = (base + rng.normal(0, 8, base.shape)).astype(np.int16)
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "CT"
        ds.BodyPartExamined = "HEAD"  # so the node's series selection takes it for triage
        ds.PatientName = "Bench^Phantom"
        ds.PatientID = "BENCH0001"
        ds.StudyDate = "20260101"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-125.0, -125.0, 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [250 / size, 250 / size]
        ds.SliceThickness = 5.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
