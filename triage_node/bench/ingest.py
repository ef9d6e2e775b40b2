"""Ingest benchmark: the same slices sent with ``storescu`` to this SCP, DCMTK ``storescp`` and Orthanc.

Every target receives each round's slices in one association from DCMTK ``storescu``
(``TCP_NODELAY=1``). This node runs its real listener with its database writes
(SQLite in a temporary data directory, ``synchronous=FULL``), with and without
TCP_NODELAY on accepted sockets, once more with a store that discards the bytes
(its association handling alone, next to a bare pynetdicom SCP), and once with a
store that does only the durable writes (the floor of the node's durability order).
Each round sends a new series (new UIDs), so no target ever sees a duplicate; the
order of the targets rotates from round to round; the median of the rounds is
reported, with each receiver's CPU time per image.
"""

from __future__ import annotations

import itertools
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from triage_node.config import REPO_ROOT, load_settings
from triage_node.db import schema
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.ingest.incoming import IncomingObject
from triage_node.ingest.scp import StorageSCP
from triage_node.ingest.store import SUCCESS, InstanceStore, StoreOutcome
from triage_node.peers import OrthancServer, StoreSCP, free_port, storescu
from triage_node.synth.ct_series import write_ct_slices
from triage_node.timeutil import utcnow

if TYPE_CHECKING:
    from pynetdicom.events import EventHandlerType

__all__ = ["run_ingest_benchmark"]

JSON_PATH = REPO_ROOT / "docs" / "bench" / "ingest.json"
#: Whether each receiver makes an object durable (fsync) before answering C-STORE.
FSYNC_BEFORE_RESPONSE = {
    "triage-node": True,
    "triage-node, no TCP_NODELAY": True,
    "triage-node listener, bytes discarded": False,
    "durable floor: spool write, 3 fsyncs, 1-row SQLite commit": True,
    "pynetdicom, bytes discarded": False,
    "DCMTK storescp": False,
    "Orthanc": True,  # SyncStorageArea, and its SQLite index
}
NODE = "triage-node"
NODE_NO_NODELAY = "triage-node, no TCP_NODELAY"
LISTENER = "triage-node listener, bytes discarded"
FLOOR = "durable floor: spool write, 3 fsyncs, 1-row SQLite commit"
MINIMAL = "pynetdicom, bytes discarded"
STORESCP = "DCMTK storescp"
ORTHANC = "Orthanc"


class _Discarded:
    """An object's fragments, dropped as they arrive."""

    def write(self, fragment: memoryview) -> None:
        pass

    def result(self) -> _Discarded:
        return self

    def discard(self) -> None:
        pass


class _DiscardingStore:
    """Stands in for `InstanceStore`: takes the data set's fragments and answers success.

    With it, the node's listener shows what its association handling alone costs,
    next to pynetdicom's (the MINIMAL row) on the same input.
    """

    def __init__(self, store: InstanceStore) -> None:
        self.session_factory = store.session_factory

    def below_watermark(self) -> bool:
        return False

    def begin(self, **_context: Any) -> _Discarded:
        return _Discarded()

    def finish(self, _incoming: _Discarded, **_context: Any) -> StoreOutcome:
        return StoreOutcome(status=SUCCESS, study_uid=None, series_uid=None, sop_uid=None,
                            stored=False, duplicate=False, version=0)


class _DurableFloorStore:
    """What the durability order alone costs per object, in the node's own listener.

    Each object is written to the spool as it arrives, fsynced, renamed, its folder
    fsynced, and one row committed to SQLite (WAL, synchronous=FULL) before the
    response: the node's sequence of waits, without its header parse, digest, checks
    or ORM. No receiver that keeps that order can answer faster on this machine.
    """

    def __init__(self, store: InstanceStore) -> None:
        self.session_factory = store.session_factory
        self.spool = store.spool
        self._db = sqlite3.connect(
            store.settings.data_dir / "floor.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS objects (id INTEGER PRIMARY KEY, path TEXT)")
        self._names = itertools.count(1)

    def below_watermark(self) -> bool:
        return False

    def close(self) -> None:
        self._db.close()

    def begin(self, **_context: Any) -> IncomingObject:
        return IncomingObject(self.spool, hash_from=1 << 62)  # nothing to hash

    def finish(self, incoming: IncomingObject, **_context: Any) -> StoreOutcome:
        path = self.spool.publish(incoming.sync(), "1", "1", str(next(self._names)))
        incoming.discard()
        self._db.execute("BEGIN")
        self._db.execute("INSERT INTO objects (path) VALUES (?)", (str(path),))
        self._db.execute("COMMIT")
        return StoreOutcome(status=SUCCESS, study_uid=None, series_uid=None, sop_uid=None,
                            stored=True, duplicate=False, version=1)


class _NodeTarget:
    """This node's listener in this process, on a fresh data directory.

    ``receiver`` is ``"store"`` (the node's `InstanceStore`), ``"discard"``
    (`_DiscardingStore`) or ``"floor"`` (`_DurableFloorStore`).
    """

    aet = "TRIAGE_NODE"

    def __init__(self, nodelay: bool, receiver: str = "store") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bench-node-"))
        self.port = free_port()
        settings = load_settings(
            data_dir=self.root, dicom_port=self.port, ae_title=self.aet,
            allowed_callers=["*@127.0.0.1/32"], min_free_disk_mb=64,
        )
        schema.upgrade(settings.effective_database_url)
        self.engine = make_engine(settings.effective_database_url)
        store = InstanceStore(settings, make_sessionmaker(self.engine))
        receivers = {"store": lambda: store, "discard": lambda: _DiscardingStore(store),
                     "floor": lambda: _DurableFloorStore(store)}
        self.receiver = receivers[receiver]()
        # The stand-ins answer the calls the listener makes of its store, without being one.
        self.scp = StorageSCP(settings, cast(InstanceStore, self.receiver), nodelay=nodelay)

    def start(self) -> _NodeTarget:
        self.scp.start()
        return self

    def stop(self) -> None:
        self.scp.stop()
        if isinstance(self.receiver, _DurableFloorStore):
            self.receiver.close()
        self.engine.dispose()
        shutil.rmtree(self.root, ignore_errors=True)


def _nodelay(event: Any) -> None:
    """EVT_CONN_OPEN of the bare SCP: TCP_NODELAY, as the node sets it."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _discard(event: Any) -> int:
    """C-STORE handler of the bare SCP: take the bytes, answer success."""
    event.encoded_dataset()
    return SUCCESS


class _MinimalPynetdicom:
    """pynetdicom's floor: a bare SCP that takes the encoded bytes and discards them.

    Same AE settings as the node (contexts, PDU size, TCP_NODELAY) but no parsing,
    no spool and no database: what pynetdicom alone costs per object on this machine.
    """

    aet = "MINIMAL"

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        from triage_node.config import UnknownStorageClassPolicy
        from triage_node.ingest.scp import MAX_PDU_SIZE, storage_contexts

        self.port = free_port()
        self.ae = AE(ae_title=self.aet)
        self.ae.supported_contexts = storage_contexts(UnknownStorageClassPolicy.store)
        self.ae.maximum_pdu_size = MAX_PDU_SIZE
        self._handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, _discard),
            (evt.EVT_CONN_OPEN, _nodelay),
        ]

    def start(self) -> _MinimalPynetdicom:
        self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=self._handlers)
        return self

    def stop(self) -> None:
        self.ae.shutdown()


def _send(files: list[Path], port: int, aet: str) -> float:
    start = time.perf_counter()
    # "-x=": every uncompressed syntax, local byte order first (storescu's default), stated
    # so that no file's meta is read for a proposal inside the timed call.
    proc = storescu(files, "127.0.0.1", port, aet, calling_aet="BENCH", extra_args=("-x=",), timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {proc.stderr[-400:]}")
    return elapsed


def _receiver_cpu_seconds(target: Any) -> float:
    """CPU time (user + system) used so far by the process that runs ``target``.

    storescp and Orthanc run in their own process (read from ``/proc``); the node's
    listeners and the bare pynetdicom SCP run in this one, whose other threads are
    idle during a turn (the sender, storescu, is a child and not counted).
    """
    process = getattr(target, "process", None)
    if process is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_ingest_benchmark(
    images: int = 200, rounds: int = 9, size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return the results (the ``docs/bench/ingest.json`` content)."""
    say = progress or (lambda _msg: None)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        sets = [write_ct_slices(work / f"round{r}", images, size=size, seed=r) for r in range(rounds)]
        factories: dict[str, Callable[[], Any]] = {
            NODE: lambda: _NodeTarget(nodelay=True),
            NODE_NO_NODELAY: lambda: _NodeTarget(nodelay=False),
            LISTENER: lambda: _NodeTarget(nodelay=True, receiver="discard"),
            FLOOR: lambda: _NodeTarget(nodelay=True, receiver="floor"),
            MINIMAL: _MinimalPynetdicom,
            STORESCP: lambda: StoreSCP(work / "storescp"),
            # Orthanc's default, stated: fsync() after each write to the storage area.
            ORTHANC: lambda: OrthancServer(config={"SyncStorageArea": True}, dicomweb=False),
        }
        # All receivers run side by side and take turns within each round, so that a
        # change in the machine's load during the run hits every receiver alike; the
        # order rotates from round to round, so that no receiver always follows the
        # same one (whose writeback or freed memory it would meet).
        targets: dict[str, Any] = {}
        try:
            for name, factory in factories.items():
                targets[name] = factory().start()
            seconds: dict[str, list[float]] = {name: [] for name in targets}
            cpu: dict[str, list[float]] = {name: [] for name in targets}
            names = list(targets)
            for r, files in enumerate(sets):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    target = targets[name]
                    # Each turn starts with no dirty pages left by the inputs or by the
                    # previous receiver, so that no one's fsyncs wait on another's writeback.
                    os.sync()
                    cpu_before = _receiver_cpu_seconds(target)
                    seconds[name].append(_send(files, target.port, target.aet))
                    cpu[name].append(_receiver_cpu_seconds(target) - cpu_before)
                    say(f"round {r + 1}: {name}: {images / seconds[name][-1]:.1f} images/s")
        finally:
            for target in targets.values():
                # Orthanc's cleanup also deletes its storage; storescp's folder goes with `work`.
                (target.cleanup if isinstance(target, OrthancServer) else target.stop)()
        results: dict[str, Any] = {}
        for name, taken in seconds.items():
            rates = [images / s for s in taken]
            results[name] = {
                "fsync_before_response": FSYNC_BEFORE_RESPONSE[name],
                "images_per_s": round(statistics.median(rates), 1),
                "rounds_images_per_s": [round(x, 1) for x in rates],
                "cpu_ms_per_image": round(1000 * statistics.median(cpu[name]) / images, 2),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    node = results[NODE]["images_per_s"]
    # The same round's rates side by side: the machine's drift between rounds cancels.
    per_round = [
        n / s for n, s in zip(results[NODE]["rounds_images_per_s"],
                              results[STORESCP]["rounds_images_per_s"], strict=True)
    ]
    ratios = {
        "node_vs_orthanc": round(node / results[ORTHANC]["images_per_s"], 2),
        "node_vs_storescp": round(node / results[STORESCP]["images_per_s"], 2),
        "node_vs_storescp_per_round": [round(x, 2) for x in per_round],
        "node_vs_storescp_median_of_rounds": round(statistics.median(per_round), 2),
        "nodelay_speedup": round(node / results[NODE_NO_NODELAY]["images_per_s"], 2),
        "node_vs_pynetdicom_floor": round(node / results[MINIMAL]["images_per_s"], 2),
        "listener_vs_pynetdicom": round(
            results[LISTENER]["images_per_s"] / results[MINIMAL]["images_per_s"], 2
        ),
        "node_vs_durable_floor": round(node / results[FLOOR]["images_per_s"], 2),
        "durable_floor_vs_storescp": round(
            results[FLOOR]["images_per_s"] / results[STORESCP]["images_per_s"], 2
        ),
    }
    load_after = os.getloadavg()
    return {
        "benchmark": "ingest",
        "date": utcnow().isoformat(timespec="seconds"),
        "images": images,
        "rounds": rounds,
        "size": f"{size}x{size}",
        "sender": "DCMTK storescu, one association per round, TCP_NODELAY=1",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        },
        "results": results,
        "ratios": ratios,
        "targets": {
            "at_least_orthanc": ratios["node_vs_orthanc"] >= 1.0,
            # Met only when both the ratio of the medians and the median of the
            # same-round ratios reach it.
            "at_least_half_storescp": min(
                ratios["node_vs_storescp"], ratios["node_vs_storescp_median_of_rounds"]
            ) >= 0.5,
        },
    }
