"""Orthanc as a throwaway PACS: C-STORE/C-ECHO from any AE, DICOMweb plugin by default."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx

from triage_node.peers.process import (
    ServerError,
    free_port,
    port_open,
    require_binary,
    spawn,
    terminate,
    wait_until,
)

__all__ = ["ORTHANC_PLUGIN_DIR", "OrthancServer"]

ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")


class OrthancServer:
    """Orthanc with the DICOMweb plugin, acting as the PACS in tests and benchmarks.

    C-STORE and C-ECHO are accepted from any calling AE (``DicomAlwaysAllowStore``,
    ``DicomAlwaysAllowEcho``) and the called AE is not checked. Storage survives
    `stop`/`start`, as a real PACS's does; ports stay the same.

    Parameters
    ----------
    aet : str
        Orthanc's own AE title.
    config : dict, optional
        Extra configuration keys, merged over the defaults (e.g. ``{"StableAge": 2}``).
    users : dict, optional
        HTTP basic-auth users (name -> password): the REST API and DICOMweb then need one
        of them; this object's own requests use the first.
    dicomweb : bool
        Load the DICOMweb plugin (Debian package ``orthanc-dicomweb``); without it
        Orthanc serves DICOM and its own REST API only, as the ingest benchmark measures it.
    """

    def __init__(self, aet: str = "ORTHANC", config: dict | None = None,
                 users: dict[str, str] | None = None, dicomweb: bool = True) -> None:
        self.aet = aet
        self.auth = next(iter(users.items())) if users else None
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="triage-orthanc-"))
        self.binary = require_binary("Orthanc", "/usr/sbin")
        plugin = ORTHANC_PLUGIN_DIR / "libOrthancDicomWeb.so"
        if dicomweb and not plugin.exists():
            raise ServerError(
                f"{plugin} not found: install the Debian package 'orthanc-dicomweb' "
                "(bash scripts/test.sh installs every test dependency)"
            )
        settings = {
            "Name": f"triage-test-{self.dicom_port}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "Plugins": [str(plugin)] if dicomweb else [],
        }
        if dicomweb:
            settings["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        if users:
            settings.update(AuthenticationEnabled=True, RegisteredUsers=dict(users))
        settings.update(config or {})
        self.config_path = self.root / "orthanc.json"
        self.config_path.write_text(json.dumps(settings, indent=2))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root (QIDO-RS, WADO-RS, STOW-RS; PS3.18)."""
        return self.http_url + "/dicom-web"

    @property
    def port(self) -> int:
        """The DICOM port (`dicom_port`), under the name the other DICOM peers use."""
        return self.dicom_port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def _ready(self) -> bool:
        response = httpx.get(self.http_url + "/system", timeout=2, auth=self.auth)
        return response.status_code == 200 and port_open(self.dicom_port)

    def start(self) -> OrthancServer:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = spawn(
            [self.binary, str(self.config_path)],
            self.log_path,
            cwd=self.root,
        )
        wait_until(self._ready, "Orthanc", timeout=60, process=self.process, log=self.log_path)
        return self

    def stop(self) -> None:
        """Shut Orthanc down (SIGTERM); its DICOM and HTTP ports refuse until `start`."""
        terminate(self.process, timeout=30)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """GET on Orthanc's REST API (``path`` starts with ``/``)."""
        return httpx.get(self.http_url + path, timeout=kwargs.pop("timeout", 30), auth=self.auth, **kwargs)

    def instances(self) -> list[str]:
        """Orthanc identifiers of every stored instance."""
        response = self.get("/instances")
        response.raise_for_status()
        return list(response.json())

    def cleanup(self) -> None:
        """Kill Orthanc and delete its storage (a graceful stop takes ~3.5 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
