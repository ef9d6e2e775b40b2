"""Shared pytest fixtures: real throwaway servers (see `triage_node.peers`).

Fixtures
--------
``postgres_server`` / ``postgres_url`` (session)
    A PostgreSQL 15 cluster and the URL of its ``triage`` database.
``postgres_db`` (function)
    URL of a fresh, empty database on the session server, dropped afterwards.
``redis_server`` / ``redis_url``
    A `RedisServer` (with ``restart()``) and its URL; function scope, so a test that
    restarts or fills Redis never leaks into the next one.
``orthanc``
    An `OrthancServer` (``.dicom_port``, ``.http_url``, ``.dicomweb_url``, ``.aet``,
    ``.stop()``, ``.start()``), function scope.
``storescp``
    Factory: ``storescp(aet="STORESCP", folder=None, extra_args=())`` starts a DCMTK
    storage SCP and returns a `StoreSCP` (``.folder``, ``.port``, ``.files()``).
``triton_server``
    Factory: ``triton_server(repository, **kwargs)`` starts the Triton server from the
    ``nvidia-pytriton`` wheel and returns the running `TritonServer` (``.grpc_url``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from triage_node.peers import OrthancServer, PostgresServer, RedisServer, StoreSCP

# Tests share 2 CPU cores with other work: keep torch/BLAS from spawning a thread per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# There is no default secret_key: the tests' own Settings (and the commands they run in
# this process) get one random per run; subprocesses get theirs from tests/node_process.py.
os.environ.setdefault("TRIAGE_SECRET_KEY", "test-run-" + os.urandom(12).hex())


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg2://postgres@127.0.0.1:PORT/triage`` (shared by the session)."""
    return postgres_server.url()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a new empty database for this test only."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    server = OrthancServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(aet: str = "STORESCP", folder: Path | None = None, extra_args=(), port=None) -> StoreSCP:
        folder = folder or tmp_path_factory.mktemp("storescp") / "in"
        scp = StoreSCP(folder, aet=aet, port=port, extra_args=extra_args)
        started.append(scp)
        return scp.start()

    try:
        yield start
    finally:
        for scp in started:
            scp.stop()


@pytest.fixture
def triton_server() -> Iterator[Callable[..., object]]:
    from worker.inference.triton_server import TritonServer

    started: list[TritonServer] = []

    def start(repository: Path | str, **kwargs) -> TritonServer:
        server = TritonServer(repository, **kwargs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
