"""Test-only Celery app: defines a task under the worker's name ``worker.triage_job``
that records what it received, so the tests can consume the node's messages with a
real worker process (configured from `triage_node.queue.celery_config`, as the worker
is)."""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

from triage_node.config import load_settings
from triage_node.queue import TASK_NAME, celery_config

app = Celery("probe")
app.conf.update(celery_config(load_settings()))
app.conf.task_ignore_result = True


@app.task(name=TASK_NAME, bind=True)
def triage_job(self, job_id: int, version: int) -> None:  # type: ignore[no-untyped-def]
    queue = (self.request.delivery_info or {}).get("routing_key", "?")
    with open(Path(os.environ["PROBE_OUT"]), "a") as out:
        out.write(f"{job_id} {version} {queue}\n")
