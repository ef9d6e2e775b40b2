"""Ingest settings: the DICOM listener (address, allow-list, limits, TLS) and series selection."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from triage_node.setting_types import UnknownStorageClassPolicy


class IngestSettings(BaseModel):
    # -- DICOM listener ------------------------------------------------------
    ae_title: str = Field("TRIAGE_NODE", description="Called AE title of the SCP")
    dicom_host: str = Field("127.0.0.1", description="Address the SCP binds")
    dicom_port: int = Field(11112, ge=1, le=65535, description="Port the SCP binds")
    allowed_callers: list[str] = Field(
        default_factory=list,
        description="Allow-list entries 'AE@ip-or-cidr' ('*' for any AE); empty: loopback only",
    )
    max_associations: int = Field(
        16, ge=1, description="Concurrent connections on the DICOM port, counted when accepted"
    )
    max_associations_per_source: int = Field(
        8, ge=1, description="Concurrent connections from one source address, counted when accepted"
    )
    association_request_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a new connection has to send its whole A-ASSOCIATE-RQ (ARTIM)"
    )
    pdu_timeout_s: float = Field(
        30.0, gt=0, description="Seconds one PDU may take from its first byte to its last"
    )
    max_stow_requests: int = Field(
        16, ge=1, description="Concurrent STOW-RS requests; one more is answered HTTP 503 with Retry-After"
    )
    unknown_storage_class: UnknownStorageClassPolicy = Field(
        UnknownStorageClassPolicy.store,
        description="What to do with non-CT storage classes: store (not triaged) or reject",
    )
    min_free_disk_mb: int = Field(
        512, ge=0, description="Below this free space the SCP answers 0xA700"
    )
    max_object_mb: int = Field(
        1024,
        ge=1,
        description="Largest object received (C-STORE data set or STOW-RS part), MiB; a larger "
        "one ends its association with A-ABORT, or its request with HTTP 413",
    )
    inflation_budget_mb: int = Field(
        256,
        ge=1,
        description="Inflated bytes of deflated objects (C-STORE and STOW-RS) held in memory at "
        "once, MiB; an object that does not fit while others are held gets 0xA700 (try again)",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate for DICOM TLS")
    tls_key: Path | None = Field(None, description="PEM private key for DICOM TLS")
    tls_ca: Path | None = Field(
        None, description="CA bundle; when set, client certificates are required"
    )
    stability_seconds: float = Field(
        10.0, gt=0, description="Series complete after this long without a new instance"
    )
    selection_rules: Path | None = Field(
        None, description="YAML file with series-selection rules; default built in"
    )
    stat_calling_aes: list[str] = Field(
        default_factory=list, description="Calling AE titles whose studies go to the stat queue"
    )

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        # PS3.5 6.2: AE is 16 characters at most, no backslash or control characters.
        if not 1 <= len(value.strip()) <= 16 or "\\" in value or not value.isprintable():
            raise ValueError("must be 1-16 printable characters without a backslash")
        return value.strip()

    @field_validator("allowed_callers")
    @classmethod
    def _check_allowed_callers(cls, value: list[str]) -> list[str]:
        for entry in value:
            ae, sep, network = entry.partition("@")
            if not sep or not ae:
                raise ValueError(f"{entry!r}: expected 'AE@ip-or-cidr' (AE may be '*')")
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r}: {exc}") from None
        return value
