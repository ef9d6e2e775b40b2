"""DCMTK's storage and verification tools as peers (PS3.4 Annex A and B).

``StoreSCP`` is DCMTK's ``storescp`` receiving into a folder; ``storescu`` and
``echoscu`` send C-STORE and C-ECHO. All run with ``TCP_NODELAY=1`` so delayed-ACK
stalls never distort timings.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from triage_node.peers.process import free_port, require_binary, spawn, terminate, wait_until

__all__ = [
    "DCMTK_ENV",
    "STORESCU_PROPOSAL",
    "UNCOMPRESSED",
    "StoreSCP",
    "echoscu",
    "storescu",
    "transfer_syntax_proposal",
]

#: Environment for DCMTK tools: disable Nagle so small PDUs are not held back by
#: delayed ACKs (DCMTK reads ``TCP_NODELAY`` from the environment).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


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
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = spawn(
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
        terminate(self.process)
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
