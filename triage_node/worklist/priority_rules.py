"""The priority rules: class order, the weighted score and the automatic class.

Pure functions of one study's inputs and the settings, with no database: which class
is more urgent (`CLASS_RANK`, which the worklist's SQL ordering shares), the score
``max_c(weight_c * p_c)`` (`weighted_score`), the class the node would give before any
manual floor (`automatic_priority`), and ageing (`effective_score`). Kept apart from
``triage_node.worklist.priority``, which reads the current results, applies a person's
floor, stores the entry and audits each change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from triage_node import CLASSES
from triage_node.config import Settings
from triage_node.db.models import PriorityClass
from triage_node.timeutil import as_utc, utcnow

__all__ = [
    "CLASS_RANK",
    "PriorityError",
    "PriorityInputs",
    "automatic_priority",
    "effective_score",
    "more_urgent",
    "parse_class",
    "waiting_hours",
    "weighted_score",
]

#: Rank of each class, 0 = most urgent (the SQL ordering uses the same numbers).
CLASS_RANK: dict[str, int] = {
    PriorityClass.stat_ai.value: 0,
    PriorityClass.stat_order.value: 1,
    PriorityClass.routine.value: 2,
}
#: Requested Procedure Priority values (PS3.3 C.4.11) that make a STAT order.
STAT_ORDER_VALUES = frozenset({"STAT", "HIGH", "URGENT"})
#: Scores are stored rounded so that float noise never causes an audited "change".
SCORE_DIGITS = 6


class PriorityError(ValueError):
    """A priority request that cannot be honoured (unknown class, unknown study)."""


def parse_class(value: str | PriorityClass) -> PriorityClass:
    """Return the `PriorityClass` named by ``value`` (its value, e.g. ``"STAT-AI"``, or name)."""
    if isinstance(value, PriorityClass):
        return value
    for member in PriorityClass:
        if value in (member.value, member.name):
            return member
    raise PriorityError(
        f"unknown priority class {value!r}: expected one of "
        + ", ".join(m.value for m in PriorityClass)
    )


def more_urgent(a: str | PriorityClass, b: str | PriorityClass) -> PriorityClass:
    """The more urgent of two classes."""
    a, b = parse_class(a), parse_class(b)
    return a if CLASS_RANK[a.value] <= CLASS_RANK[b.value] else b


@dataclass(frozen=True)
class PriorityInputs:
    """What the automatic priority is computed from (one study).

    Attributes
    ----------
    positive : bool or None
        Study decision of the current results; None when there is no result yet.
    probabilities : mapping of str to float
        Per-class study probabilities (element-wise maximum over current results).
    requested_priority : str or None
        Requested Procedure Priority of the order, if the ingest side captured it.
    calling_ae : str or None
        Calling AE title the study arrived from.
    """

    positive: bool | None
    probabilities: Mapping[str, float]
    requested_priority: str | None = None
    calling_ae: str | None = None


def weighted_score(probabilities: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``max_c(weight_c * p_c)``; classes without a weight count with weight 1.

    Parameters
    ----------
    probabilities : mapping of str to float
        Per-class probabilities in [0, 1]; unknown class names are refused.
    weights : mapping of str to float
        ``settings.subtype_weights``.
    """
    best = 0.0
    for name, p in probabilities.items():
        if name not in CLASSES:
            raise PriorityError(f"unknown class {name!r} in probabilities")
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise PriorityError(f"probability of {name} is {p}, outside [0, 1]")
        best = max(best, float(weights.get(name, 1.0)) * p)
    return round(best, SCORE_DIGITS)


def automatic_priority(inputs: PriorityInputs, settings: Settings) -> tuple[PriorityClass, float]:
    """Class and score the node would give, before any manual floor.

    Returns
    -------
    (PriorityClass, float)
        STAT-AI for a positive result, STAT-order for a STAT order or a STAT calling AE,
        routine otherwise; the weighted score.
    """
    score = weighted_score(inputs.probabilities, settings.subtype_weights)
    if inputs.positive:
        return PriorityClass.stat_ai, score
    requested = (inputs.requested_priority or "").strip().upper()
    if requested in STAT_ORDER_VALUES or (
        inputs.calling_ae is not None and inputs.calling_ae.strip() in settings.stat_calling_aes
    ):
        return PriorityClass.stat_order, score
    return PriorityClass.routine, score


def waiting_hours(received_at: datetime, now: datetime | None = None) -> float:
    """Hours between ``received_at`` and ``now`` (naive datetimes are UTC)."""
    return max(0.0, (as_utc(now or utcnow()) - as_utc(received_at)).total_seconds() / 3600.0)


def effective_score(score: float, received_at: datetime, settings: Settings,
                    now: datetime | None = None) -> float:
    """Stored score plus ageing (the value the worklist is ordered by within a class)."""
    return score + settings.ageing_per_hour * waiting_hours(received_at, now)
