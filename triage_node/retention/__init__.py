"""Retention: what the node deletes, when, and the record it keeps of it.

`policy` turns the ``retention_*`` settings into ages and watermarks and measures disk
use; `eligibility` decides which studies, result files and rows may go and why;
`deletion` deletes them in audited batches; `hold` sets the legal hold. The scheduled
cleaner (``worker.retention``) and ``triage-node retention`` call `run` and `plan`.
"""

from triage_node.retention.deletion import ACTION, RunReport, plan, run
from triage_node.retention.eligibility import Plan, StudyVerdict
from triage_node.retention.hold import UnknownStudy, set_legal_hold
from triage_node.retention.policy import DiskUse, Policy, disk_use, spool_bytes

__all__ = [
    "ACTION", "DiskUse", "Plan", "Policy", "RunReport", "StudyVerdict", "UnknownStudy",
    "disk_use", "plan", "run", "set_legal_hold", "spool_bytes",
]
