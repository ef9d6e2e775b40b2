"""Retention settings: the scheduled cleaner, what it deletes after how long, and the disk limits."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, Field, model_validator


class RetentionSettings(BaseModel):
    # -- retention ---------------------------------------------------------------
    retention_enabled: bool = Field(
        True,
        description="Run the scheduled cleaner; it never deletes a study that is not yet triaged "
        "and delivered, or that is on legal hold",
    )
    retention_interval_s: float = Field(
        600.0, ge=10, description="Seconds between two runs of the scheduled cleaner"
    )
    retention_instances_days: int = Field(
        30, ge=0,
        description="Days after its last received image a finished study (images, results, "
        "outbox and worklist rows) is deleted; 0: never by age",
    )
    retention_results_days: int = Field(
        30, ge=0,
        description="Days after its job finished the SR/SC files of a delivered result are "
        "deleted (the finding stays on the worklist); 0: never by age",
    )
    retention_outbox_days: int = Field(
        7, ge=0, description="Days after delivery a delivered outbox row (DICOM, HL7) is deleted; 0: never"
    )
    retention_undelivered_days: int = Field(
        30, ge=1,
        description="Days an object given up on (dead, refused) holds its study back from "
        "deletion, for an operator to send it again",
    )
    retention_audit_days: int = Field(
        2190, ge=0,
        description="Days audit rows are kept (each pruning is itself audited); 0: forever; "
        "never shorter than retention_instances_days",
    )
    retention_disk_high_percent: float = Field(
        85.0, gt=0, le=100,
        description="Above this use of the spool's disk (or of retention_disk_quota_mb) the "
        "cleaner deletes the oldest finished studies before their age",
    )
    retention_disk_low_percent: float = Field(
        75.0, gt=0, le=100, description="The cleaner stops deleting by disk use below this"
    )
    retention_disk_quota_mb: int = Field(
        0, ge=0,
        description="Most MiB of received images the node keeps; past it the SCP answers 0xA700 "
        "and disk use is measured against it; 0: no quota, the file system's size counts",
    )
    retention_batch_studies: int = Field(
        20, ge=1, le=1000, description="Studies deleted per transaction and audit row"
    )

    @model_validator(mode="after")
    def _check_retention(self) -> Self:
        if self.retention_disk_low_percent >= self.retention_disk_high_percent:
            raise ValueError("retention_disk_low_percent must be below retention_disk_high_percent")
        audit, images = self.retention_audit_days, self.retention_instances_days
        if audit and (images == 0 or audit < images):
            raise ValueError("retention_audit_days must be 0 (forever) or at least retention_instances_days")
        return self
