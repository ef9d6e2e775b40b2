"""The DIMSE statuses the node answers and interprets, named as PS3.4 and PS3.7 name them.

One home so that no module writes a status as a bare number: a C-STORE response, a STOW-RS
FailureReason (PS3.18 Table 10.5.3-3 uses the same codes) and an outbox row's refusal all
say ``StoreStatus.OUT_OF_RESOURCES``, never ``0xA700``. Members are ints, so pynetdicom,
JSON and the database take them as they are.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """Storage Service Class statuses (PS3.4 Table B.2-1; PS3.7 Annex C for the general ones)."""

    SUCCESS = 0x0000
    #: Failure: Processing failure (PS3.7 C.4.2): the node's own error, the object is not kept.
    PROCESSING_FAILURE = 0x0110
    #: Refused: Out of Resources (A700-A7FF): free disk below the watermark, the retention
    #: quota reached, or the inflation budget of all connections in use (try again later).
    OUT_OF_RESOURCES = 0xA700
    #: Refused: Out of Resources, the database could not record the instance.
    OUT_OF_RESOURCES_DATABASE = 0xA701
    #: Refused: Out of Resources, a deflated data set inflates past ``max_object_mb``.
    OUT_OF_RESOURCES_TOO_LARGE = 0xA702
    #: Error: Data Set does not match SOP Class (A900-A9FF); also an instance whose UIDs
    #: are missing, or that would file a series under another study or patient.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand (C000-CFFF): the header cannot be parsed.
    CANNOT_UNDERSTAND = 0xC000
    #: Error: Cannot understand, a UID is not a UID (PS3.5 9.1) and cannot become a path.
    CANNOT_UNDERSTAND_INVALID_UID = 0xC001

    @property
    def hex(self) -> str:
        """``0xA700``: how PS3.4 and the audit trail write it."""
        return f"0x{int(self):04X}"
