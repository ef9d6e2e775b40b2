"""Real peers on loopback for the tests and the benchmarks: PostgreSQL, Redis, Orthanc, DCMTK.

Each peer runs from its Debian (or wheel) binary in a temporary directory on free
loopback ports, is checked for readiness with a real request, and is torn down by its
owner (a pytest fixture in ``tests/conftest.py``, or the benchmark that started it). A
missing binary is an error that names the package to install.

Modules
-------
``process``
    Binaries, free ports, readiness polls, starting and stopping processes.
``postgres``
    ``PostgresServer``: ``initdb`` + ``pg_ctl`` from PostgreSQL 15, run as the
    ``postgres`` system user (``initdb`` refuses root), trust authentication.
``redis``
    ``RedisServer``: ``redis-server`` without persistence; ``restart()`` loses every key.
``orthanc``
    ``OrthancServer``: Orthanc 1.10, with the DICOMweb plugin unless told otherwise, a
    PACS that accepts C-STORE from any AE.
``dcmtk``
    ``StoreSCP``, ``storescu``, ``echoscu``: DCMTK's storage SCP and SCU (PS3.4 Annex B)
    and C-ECHO (Annex A), with ``TCP_NODELAY=1``.
``dciodvfy``
    dicom3tools' IOD verifier (checks against PS3.3 module tables).
"""

from __future__ import annotations

from triage_node.peers.dciodvfy import DciodvfyResult, dciodvfy
from triage_node.peers.dcmtk import DCMTK_ENV, StoreSCP, echoscu, storescu, transfer_syntax_proposal
from triage_node.peers.orthanc import OrthancServer
from triage_node.peers.postgres import PostgresServer
from triage_node.peers.process import (
    ServerError,
    free_port,
    port_open,
    require_binary,
    spawn,
    terminate,
    wait_until,
)
from triage_node.peers.redis import RedisServer

__all__ = [
    "DCMTK_ENV",
    "DciodvfyResult",
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
    "spawn",
    "storescu",
    "terminate",
    "transfer_syntax_proposal",
    "wait_until",
]
