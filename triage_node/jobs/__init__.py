"""A study job's lifecycle in one place: its states, the allowed moves, and the functions that make them.

``states`` holds `JobState`, the events and the `TRANSITIONS` table; ``transitions``
holds the only functions that write ``jobs.state`` (each a guarded UPDATE with its audit
row); ``sweep`` is the one entry point of the periodic rounds that move stuck jobs.
Nothing else in ``triage_node`` or ``worker`` assigns a job's state
(tests/test_jobs_lifecycle.py checks the source tree).

``sweep`` is not imported here: it sends tasks through `triage_node.queue`, which itself
uses the transitions.
"""

from triage_node.jobs.states import INITIAL, TRANSITIONS, Event, JobState, mermaid_diagram, sources, target
from triage_node.jobs.transitions import (
    claim_job,
    create_version,
    fail_job,
    finish_job,
    requeue_job,
    retry_job,
    supersede_job,
)

__all__ = [
    "INITIAL",
    "TRANSITIONS",
    "Event",
    "JobState",
    "claim_job",
    "create_version",
    "fail_job",
    "finish_job",
    "mermaid_diagram",
    "requeue_job",
    "retry_job",
    "sources",
    "supersede_job",
    "target",
]
