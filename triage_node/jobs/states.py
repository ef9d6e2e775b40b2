"""The states of a study job, the events that move it, and the one table of allowed moves.

A `Job` row is written by three kinds of actor at once: the node (completeness makes
new versions and supersedes old ones; an operator retries failed jobs), any number of
workers (claim, finish, fail) and the periodic sweeps (a job whose worker vanished goes
back to the queue). `TRANSITIONS` says which (state, event) pairs are allowed and where
each leads; `triage_node.jobs.transitions` is the only code that applies them, each as a
guarded UPDATE, so two actors cannot both move the same job. The table is the behaviour
the node has always had, written down; docs/ARCHITECTURE.md draws it (`mermaid_diagram`).
"""

from __future__ import annotations

from enum import StrEnum

from triage_node.db.models import JobState

__all__ = [
    "INITIAL",
    "JobState",
    "Event",
    "TRANSITIONS",
    "EVENT_NOTES",
    "sources",
    "target",
    "mermaid_diagram",
]

#: A job is created ``queued`` (completeness, `triage_node.jobs.transitions.create_version`).
INITIAL = JobState.queued


class Event(StrEnum):
    """What happens to a job; each has one audit action (``job.<action>``)."""

    claim = "claim"  # a worker starts (or restarts) the job: job.started
    finish = "finish"  # the worker recorded the result: job.done
    fail = "fail"  # the task gave up for good: job.failed
    retry = "retry"  # an operator sends a failed job again: job.retried
    requeue = "requeue"  # running past the task's time limit, its worker is gone: job.requeued
    supersede = "supersede"  # a newer version or another series took over: job.superseded


_Q, _R, _D, _F, _S = (JobState.queued, JobState.running, JobState.done, JobState.failed,
                      JobState.superseded)

#: (from state, event) -> to state. A pair that is not here is refused.
TRANSITIONS: dict[tuple[JobState, Event], JobState] = {
    # A worker claims a job that is waiting, one whose earlier run was interrupted
    # (late acknowledgement redelivers the message), or one that failed and was sent
    # again at the same version. A ``done`` job is claimed only while it has no Result
    # row (``claim`` checks that); with a result the message is skipped as "already done".
    (_Q, Event.claim): _R,
    (_R, Event.claim): _R,
    (_F, Event.claim): _R,
    (_D, Event.claim): _R,
    # The result is recorded whatever the run's state became meanwhile, unless the job
    # was superseded: requeued while its first worker was still running (queued), failed
    # by a duplicate delivery (failed), or recorded twice by two deliveries (done).
    (_Q, Event.finish): _D,
    (_R, Event.finish): _D,
    (_F, Event.finish): _D,
    (_D, Event.finish): _D,
    # A task that runs out of retries marks its job failed unless it is done or superseded.
    (_Q, Event.fail): _F,
    (_R, Event.fail): _F,
    (_F, Event.fail): _F,
    (_F, Event.retry): _Q,
    (_R, Event.requeue): _Q,
    # A new version supersedes the active jobs of the study (a failed one stays failed).
    (_Q, Event.supersede): _S,
    (_R, Event.supersede): _S,
    (_D, Event.supersede): _S,
}

#: Conditions beyond the state, shown on the diagram.
EVENT_NOTES: dict[tuple[JobState, Event], str] = {
    (_D, Event.claim): "no result row",
    (_R, Event.requeue): "started over task_time_limit_s + 60 s ago",
}


def sources(event: Event) -> tuple[JobState, ...]:
    """The states ``event`` may leave from, in `JobState` order."""
    return tuple(s for s in JobState if (s, event) in TRANSITIONS)


def target(state: JobState | str, event: Event) -> JobState | None:
    """Where ``event`` takes a job in ``state``; None when the table refuses it."""
    return TRANSITIONS.get((JobState(state), event))


def mermaid_diagram() -> str:
    """A Mermaid ``stateDiagram-v2`` of `TRANSITIONS` (one edge per pair of states)."""
    edges: dict[tuple[JobState, JobState], list[str]] = {}
    for (source, event), to in TRANSITIONS.items():
        label = event.value
        if (source, event) in EVENT_NOTES:
            label += f" ({EVENT_NOTES[source, event]})"
        edges.setdefault((source, to), []).append(label)
    lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {INITIAL.value} : create"]
    order = list(JobState)
    for (source, to) in sorted(edges, key=lambda e: (order.index(e[0]), order.index(e[1]))):
        lines.append(f"    {source.value} --> {to.value} : {', '.join(edges[source, to])}")
    lines.append(f"    {_S.value} --> [*]")
    lines.append("```")
    return "\n".join(lines)
