"""ICH triage node: DICOM/DICOMweb triage of non-contrast head CT for hemorrhage."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ich-triage-node")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

# RSNA 2019 class order, used everywhere (model outputs, labels, SR, API).
CLASSES = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
SUBTYPES = CLASSES[1:]

# Celery queues (lanes): the worker takes from ``stat`` before ``routine``.
QUEUE_STAT = "stat"
QUEUE_ROUTINE = "routine"
QUEUES = (QUEUE_STAT, QUEUE_ROUTINE)
