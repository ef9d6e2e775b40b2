"""Throwaway real servers for the test-suite.

Each server runs from its Debian (or wheel) binary in a temporary directory on free
loopback ports, is checked for readiness with a real request, and is torn down by its
owner (normally a pytest fixture in ``tests/conftest.py``). A missing binary is an error
that names the package to install (``bash scripts/test.sh`` installs all of them); no
test is skipped because a server is absent.

Servers
-------
``PostgresServer``
    ``initdb`` + ``pg_ctl`` from PostgreSQL 15, run as the ``postgres`` system user
    (``initdb`` refuses root), trust authentication, TCP on 127.0.0.1.
``RedisServer``
    ``redis-server`` without persistence; ``restart()`` loses every key, as a real
    Redis without RDB/AOF does.
``OrthancServer``
    Orthanc 1.10 with the DICOMweb plugin, a PACS that accepts C-STORE from any AE.
``StoreSCP`` / ``storescu``
    DCMTK's storage SCP and SCU (PS3.4 Annex B, Storage Service Class), with
    ``TCP_NODELAY=1`` so delayed-ACK stalls never distort timings.
``dciodvfy``
    dicom3tools' IOD verifier (checks against PS3.3 module tables).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = [
    "DciodvfyResult",
    "OidcProvider",
    "OrthancServer",
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "StoreSCP",
    "dciodvfy",
    "echoscu",
    "free_port",
    "port_open",
    "require_binary",
    "storescu",
    "transfer_syntax_proposal",
    "wait_until",
]

#: Debian package providing each binary, for the error message when it is missing.
PACKAGES = {
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
    "redis-server": "redis-server",
    "Orthanc": "orthanc",
    "storescp": "dcmtk",
    "storescu": "dcmtk",
    "echoscu": "dcmtk",
    "dciodvfy": "dicom3tools",
    "node": "nodejs",
}

#: Environment for DCMTK tools: disable Nagle so small PDUs are not held back by
#: delayed ACKs (DCMTK reads ``TCP_NODELAY`` from the environment).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")


class ServerError(RuntimeError):
    """A test server could not be found, started or stopped."""


def require_binary(name: str, *search: str | Path) -> str:
    """Return the path of executable ``name`` or raise `ServerError`.

    Parameters
    ----------
    name : str
        Executable name.
    *search : str or Path
        Extra directories searched before ``PATH``.
    """
    for folder in search:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        package = PACKAGES.get(name, "?")
        raise ServerError(
            f"{name} not found: install the Debian package {package!r} "
            "(bash scripts/test.sh installs every test dependency)"
        )
    return found


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool],
    what: str,
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``check`` until it returns true, or raise `ServerError`.

    Exceptions from ``check`` count as "not yet". When ``process`` exits first, the
    error says so at once instead of waiting for the deadline; ``log`` adds the tail of
    the server's log to the message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
        if process is not None and process.poll() is not None:
            tail = _log_tail(log) if log else ""
            raise ServerError(f"{what}: process exited with {process.returncode}\n{tail}")
        if time.monotonic() > deadline:
            tail = _log_tail(log) if log else ""
            raise ServerError(f"{what}: not ready after {timeout:.0f} s ({last_error!r})\n{tail}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _spawn(argv: Sequence[str], log_path: Path, **popen: object) -> subprocess.Popen:
    """Start a server process with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **popen)


def _terminate(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; always reaps the process."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


# --------------------------------------------------------------------------- PostgreSQL


def _postgres_bindir() -> Path:
    """Directory with ``initdb``/``pg_ctl``: PostgreSQL 15 first, then ``pg_config``."""
    default = Path("/usr/lib/postgresql/15/bin")
    if (default / "initdb").exists():
        return default
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    return Path(require_binary("initdb")).parent


class PostgresServer:
    """A throwaway PostgreSQL cluster owned by the ``postgres`` system user.

    Parameters
    ----------
    database : str
        Database created at start (``triage``).
    user : str
        System user that owns the cluster; ``initdb`` refuses to run as root.
    """

    def __init__(self, database: str = "triage", user: str = "postgres") -> None:
        self.database = database
        self.user = user
        self.port = free_port()
        self.bindir = _postgres_bindir()
        self.root: Path | None = None
        self._running = False

    # The cluster directory must be owned by ``user``; pytest's tmp_path lives under a
    # root-only 0700 folder, so the cluster gets its own folder under the system temp dir.
    def _run_as_owner(self, args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0 and self.user != "root":
            command = [require_binary("runuser"), "-u", self.user, "--", *command]
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if proc.returncode != 0:
            raise ServerError(
                f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def start(self) -> PostgresServer:
        """Create the cluster (first call only), start it and create the database."""
        first_start = self.root is None
        if first_start:
            self.root = Path(tempfile.mkdtemp(prefix="triage-pg-"))
            if os.geteuid() == 0:
                owner = pwd.getpwnam(self.user)
                os.chown(self.root, owner.pw_uid, owner.pw_gid)
            os.chmod(self.root, 0o700)
            self._run_as_owner(
                [
                    str(self.bindir / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", "postgres",
                    "-A", "trust",
                    "-E", "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        # fsync off: a test cluster trades durability for speed; nothing outlives it.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run_as_owner(
            [
                str(self.bindir / "pg_ctl"),
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-o", options,
                "-w", "-t", "60",
                "start",
            ]
        )
        self._running = True
        if first_start:
            self.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown); the cluster directory is kept."""
        if not self._running:
            return
        self._run_as_owner(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
        )
        self._running = False

    def cleanup(self) -> None:
        """Stop the server and delete the cluster."""
        try:
            self.stop()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL of ``database`` (default: the one created at start)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database or self.database}"

    @property
    def dsn_base(self) -> dict[str, object]:
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres"}

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run one statement in autocommit mode and return its rows (if any)."""
        import psycopg2

        conn = psycopg2.connect(dbname=database, connect_timeout=10, **self.dsn_base)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh empty database and return its SQLAlchemy URL."""
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting any sessions still open on it."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """``redis-server`` on a free port with no persistence (no RDB, no AOF).

    The port stays the same across `restart`, so clients configured with `url`
    reconnect to the new, empty server.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="triage-redis-"))
        self.binary = require_binary("redis-server")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def start(self) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = _spawn(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.root),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--protected-mode", "yes",
            ],
            self.log_path,
            cwd=self.root,
        )
        wait_until(self.ping, "redis-server", timeout=30, process=self.process, log=self.log_path)
        return self

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def stop(self) -> None:
        _terminate(self.process)
        self.process = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port; every key is lost."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- Orthanc


class OrthancServer:
    """Orthanc with the DICOMweb plugin, acting as the PACS in tests.

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
    """

    def __init__(self, aet: str = "ORTHANC", config: dict | None = None,
                 users: dict[str, str] | None = None) -> None:
        self.aet = aet
        self.auth = next(iter(users.items())) if users else None
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="triage-orthanc-"))
        self.binary = require_binary("Orthanc", "/usr/sbin")
        plugin = ORTHANC_PLUGIN_DIR / "libOrthancDicomWeb.so"
        if not plugin.exists():
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
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }
        if users:
            settings.update(AuthenticationEnabled=True, RegisteredUsers=dict(users))
        settings.update(config or {})
        self.config_path = self.root / "orthanc.json"
        self.config_path.write_text(json.dumps(settings, indent=2))
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root (QIDO-RS, WADO-RS, STOW-RS; PS3.18)."""
        return self.http_url + "/dicom-web"

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
        self.process = _spawn(
            [self.binary, str(self.config_path)],
            self.log_path,
            cwd=self.root,
        )
        wait_until(self._ready, "Orthanc", timeout=60, process=self.process, log=self.log_path)
        return self

    def stop(self) -> None:
        """Shut Orthanc down (SIGTERM); its DICOM and HTTP ports refuse until `start`."""
        _terminate(self.process, timeout=30)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str, **kwargs: object) -> httpx.Response:
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


# --------------------------------------------------------------------------- DCMTK


def echoscu(host: str, port: int, called_aet: str, calling_aet: str = "ECHOSCU",
            timeout: float = 10) -> bool:
    """Send one C-ECHO (Verification, PS3.4 Annex A) with DCMTK; true on success."""
    proc = subprocess.run(
        [
            require_binary("echoscu"),
            "-aet", calling_aet,
            "-aec", called_aet,
            "-to", str(int(timeout)),
            host, str(port),
        ],
        capture_output=True, text=True, timeout=timeout + 5, env=DCMTK_ENV, check=False,
    )
    return proc.returncode == 0


class StoreSCP:
    """DCMTK ``storescp`` receiving into a folder.

    Accepts every storage SOP class it knows plus unknown ones (``-pm``) in every
    transfer syntax it supports (``+xa``) and writes each object as received
    (file names ``<modality>.<SOPInstanceUID>``).

    Parameters
    ----------
    folder : Path
        Output directory (created).
    aet : str
        AE title of the SCP.
    port : int, optional
        Listening port; a free one by default.
    extra_args : sequence of str
        More ``storescp`` options (e.g. ``("--refuse",)`` or ``("--sleep-during", "5")``).
    sop_classes : sequence of str, optional
        Accept only these SOP Class UIDs (plus Verification), uncompressed, through an
        association negotiation profile (``--config-file``), like an archive that stores
        only some classes; every class by default.
    """

    def __init__(self, folder: Path, aet: str = "STORESCP", port: int | None = None,
                 extra_args: Sequence[str] = (), sop_classes: Sequence[str] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_args = tuple(extra_args)
        self.sop_classes = tuple(sop_classes) if sop_classes is not None else None
        self.binary = require_binary("storescp")
        self.log_path = self.folder.parent / f"storescp-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = _spawn(
            [
                self.binary,
                "-aet", self.aet,
                *self._negotiation_args(),
                "-dhl",
                "-od", str(self.folder),
                *self.extra_args,
                str(self.port),
            ],
            self.log_path,
            env=DCMTK_ENV,
        )
        wait_until(
            lambda: echoscu(self.host, self.port, self.aet, timeout=3),
            "storescp",
            timeout=30,
            process=self.process,
            log=self.log_path,
        )
        return self

    def _negotiation_args(self) -> list[str]:
        if self.sop_classes is None:
            return ["+xa", "-pm"]
        contexts = ["VerificationSOPClass", *self.sop_classes]
        config = self.folder.parent / f"storescp-{self.port}.cfg"
        config.write_text(
            "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
            "TransferSyntax2 = OppositeEndianExplicit\nTransferSyntax3 = LittleEndianImplicit\n"
            "[[PresentationContexts]]\n[Restricted]\n"
            + "".join(f"PresentationContext{n} = {uid}\\Uncompressed\n" for n, uid in enumerate(contexts, 1))
            + "[[Profiles]]\n[Restricted]\nPresentationContexts = Restricted\n"
        )
        return ["-xf", str(config), "Restricted"]

    def stop(self) -> None:
        _terminate(self.process)
        self.process = None

    def files(self) -> list[Path]:
        """Received files, sorted by name (temporary partial files excluded)."""
        return sorted(p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: ``storescu`` option that proposes each compressed transfer syntax (plus all
#: uncompressed ones), by Transfer Syntax UID (PS3.5 Annex A).
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
}
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _dicom_files(paths: Sequence[str]) -> Iterator[Path]:
    for item in map(Path, paths):
        if item.is_dir():
            yield from (p for p in sorted(item.rglob("*")) if p.is_file())
        else:
            yield item


def transfer_syntax_proposal(paths: Sequence[str]) -> list[str]:
    """``storescu`` options that propose the compressed transfer syntax of ``paths``.

    ``storescu`` proposes only uncompressed transfer syntaxes by default and cannot
    decompress to send them, so compressed files need their syntax proposed. One
    association can carry one compressed syntax this way.

    Raises
    ------
    ValueError
        When the files use more than one compressed transfer syntax, or one that
        ``storescu`` cannot propose.
    """
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    compressed: set[str] = set()
    for path in _dicom_files(paths):
        try:
            uid = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
        except (InvalidDicomError, OSError):
            continue  # storescu itself reports files it cannot read
        if uid and uid not in UNCOMPRESSED:
            compressed.add(uid)
    if not compressed:
        return []
    if len(compressed) > 1:
        raise ValueError(
            f"storescu: files use several compressed transfer syntaxes {sorted(compressed)}; "
            "send each group separately or pass a proposal in extra_args"
        )
    (uid,) = compressed
    if uid not in STORESCU_PROPOSAL:
        raise ValueError(f"storescu: no proposal option for transfer syntax {uid}")
    return [STORESCU_PROPOSAL[uid]]


def storescu(
    files: Path | str | Iterable[Path | str],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "MODALITY",
    extra_args: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Send files or folders with DCMTK ``storescu`` in one association.

    Folders are scanned recursively (``+sd +r``). Unless ``extra_args`` has its own
    proposal (an option starting with ``-x``), the association proposes every
    uncompressed transfer syntax plus the compressed one the files use (see
    `transfer_syntax_proposal`), so files go as they are. Returns the completed process
    (check ``returncode``; output is text).
    """
    if isinstance(files, (str, Path)):
        files = [files]
    paths = [str(p) for p in files]
    if not paths:
        raise ValueError("storescu: no files given")
    scan = ["+sd", "+r"] if any(Path(p).is_dir() for p in paths) else []
    proposal = [] if any(a.startswith("-x") for a in extra_args) else transfer_syntax_proposal(paths)
    command = [
        require_binary("storescu"),
        "-aet", calling_aet,
        "-aec", called_aet,
        *scan,
        *proposal,
        *extra_args,
        host, str(port),
        *paths,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV, check=False
    )


# --------------------------------------------------------------------------- dciodvfy


@dataclass(frozen=True)
class DciodvfyResult:
    """Outcome of ``dciodvfy`` on one file.

    Attributes
    ----------
    errors : list of str
        Lines ``Error - ...`` (violations of PS3.3 module requirements), prefix removed.
    warnings : list of str
        Lines ``Warning - ...``, prefix removed.
    output : str
        The whole output.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


def dciodvfy(path: Path | str, timeout: float = 120) -> DciodvfyResult:
    """Verify a DICOM file against its IOD with dicom3tools' ``dciodvfy``."""
    proc = subprocess.run(
        [require_binary("dciodvfy"), str(path)],
        capture_output=True, text=True, errors="replace", timeout=timeout, check=False,
    )
    output = proc.stdout + proc.stderr
    errors: list[str] = []
    warnings: list[str] = []
    for line in output.splitlines():
        if line.startswith("Error - "):
            errors.append(line[len("Error - "):])
        elif line.startswith("Warning - "):
            warnings.append(line[len("Warning - "):])
    if proc.returncode != 0 and not errors and "Error" in output:
        errors.append(output.strip().splitlines()[-1])
    return DciodvfyResult(errors=errors, warnings=warnings, output=output)


# --------------------------------------------------------------------------- OpenID provider

OIDC_DIR = Path(__file__).resolve().parent / "oidc"


class OidcProvider:
    """panva's ``oidc-provider`` (``tests/oidc/provider.mjs``) on a free loopback port.

    Parameters
    ----------
    clients : list of dict
        oidc-provider client metadata (``client_id``, ``client_secret``, ``redirect_uris``...).
    users : dict
        Login -> ``{"name", "email", "groups"}``; the login form takes any password.

    ``scripts/test.sh`` installs the package into ``tests/oidc/node_modules``.
    """

    def __init__(self, clients: list[dict], users: dict[str, dict], port: int | None = None) -> None:
        self.port = port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.clients = clients
        self.users = users
        self.root = Path(tempfile.mkdtemp(prefix="triage-oidc-"))
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "provider.log"

    def start(self) -> OidcProvider:
        node = require_binary("node")
        if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            raise ServerError("oidc-provider is not installed: npm install --prefix tests/oidc "
                              "(bash scripts/test.sh does)")
        config = self.root / "config.json"
        config.write_text(json.dumps({"issuer": self.issuer, "port": self.port,
                                      "clients": self.clients, "users": self.users}))
        self.process = _spawn([node, str(OIDC_DIR / "provider.mjs"), str(config)], self.log_path,
                              cwd=OIDC_DIR)
        wait_until(self.discovery, "oidc-provider", timeout=30, process=self.process, log=self.log_path)
        return self

    def discovery(self) -> dict:
        response = httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2)
        response.raise_for_status()
        return response.json()

    def cleanup(self) -> None:
        _terminate(self.process)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


_port_open = port_open  # older spelling, kept for modules that import it
