"""The clients one worker process keeps (database, model card, inference backend).

Built once per process (``worker_process_init``, or on first use under the solo pool) and
handed to every step of a job (`worker.pipeline.run`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from triage_node.config import Settings
from triage_node.db.session import make_engine, make_sessionmaker
from triage_node.logs import get_logger
from worker.inference.base import InferenceBackend

log = get_logger(__name__)

#: The audit trail's actor for everything a worker does.
ACTOR = "worker"


class JobError(RuntimeError):
    """A job cannot run (missing rows, no images); retrying will not help."""


@dataclass
class WorkerContext:
    """Clients of one worker process, built once (``worker_process_init``).

    Attributes
    ----------
    settings : Settings
    engine : Engine
    session_factory : sessionmaker
    card : ModelCard
        The served models' card (classes, input, thresholds, CAM head).
    backend : InferenceBackend
        Checked against ``card`` when built.
    head_weight : ndarray [6, C]
        Linear head of the slice CNN, for the CAM heat maps.
    """

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    card: Any
    backend: InferenceBackend
    head_weight: np.ndarray

    @property
    def results_dir(self) -> Path:
        return self.settings.data_dir.resolve() / "results"

    def close(self) -> None:
        self.backend.close()
        self.engine.dispose()


def build_context(settings: Settings, backend: InferenceBackend | None = None) -> WorkerContext:
    """Build the clients of one process: DB engine, model card, inference backend.

    Raises
    ------
    worker.inference.ModelMismatch
        The backend serves models that do not match the model card.
    worker.inference.BackendUnavailable
        Triton cannot be reached.
    triage_node.db.schema.SchemaOutOfDate
        The database misses migrations.
    """
    from triage_node.db.schema import require_current
    from worker.inference import make_backend
    from worker.inference.card import load_model_card

    card = load_model_card(settings.model_card)
    weight, _bias = card.head_weights()
    engine = make_engine(settings.effective_database_url)
    require_current(engine)
    if backend is None:
        backend = make_backend(settings, card)
    else:
        backend.check(card)
    return WorkerContext(settings, engine, make_sessionmaker(engine), card, backend, weight)


_CTX: WorkerContext | None = None
_CTX_PID: int | None = None


def init_context(settings: Settings) -> WorkerContext:
    """Build this process's context (replacing one inherited through fork)."""
    global _CTX, _CTX_PID
    _CTX = build_context(settings)
    _CTX_PID = os.getpid()
    log.info("worker.process_ready", backend=_CTX.backend.name, model_version=_CTX.card.version)
    return _CTX


def get_context() -> WorkerContext:
    """This process's context, built on first use (the solo pool has no process-init signal)."""
    if _CTX is None or _CTX_PID != os.getpid():
        from triage_node.config import get_settings

        return init_context(get_settings())
    return _CTX


def close_context() -> None:
    global _CTX
    if _CTX is not None and _CTX_PID == os.getpid():
        _CTX.close()
    _CTX = None


