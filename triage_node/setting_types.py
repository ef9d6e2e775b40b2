"""The value types of the settings: their enumerations and the destination model.

Kept apart from ``triage_node.config``, which holds the one ``Settings`` class: these
are the types its fields take, and the worker's destination senders and report writers
use them (`Destination`, `DestinationKind`, `SRClass`) without reading the settings.
A `Destination` is valid once constructed (its fields are checked against its kind).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = [
    "Destination",
    "DestinationKind",
    "Environment",
    "InferenceBackend",
    "LogFormat",
    "OperatingPoint",
    "SRClass",
    "UnknownStorageClassPolicy",
    "mask_url_password",
]


class Environment(StrEnum):
    development = "development"
    production = "production"


class InferenceBackend(StrEnum):
    onnx = "onnx"
    triton = "triton"


class OperatingPoint(StrEnum):
    high_sensitivity = "high_sensitivity"
    balanced = "balanced"


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


class UnknownStorageClassPolicy(StrEnum):
    store = "store"
    reject = "reject"


class DestinationKind(StrEnum):
    dimse = "dimse"
    dicomweb = "dicomweb"


class SRClass(StrEnum):
    """SR storage class of the result report sent to a destination (PS3.3 A.35).

    The content stays a TID 1500 Measurement Report in every class that allows its value
    types; Basic Text SR has no NUM, so there each probability is a TEXT item.
    """

    comprehensive_3d = "comprehensive-3d"
    comprehensive = "comprehensive"
    enhanced = "enhanced"
    basic_text = "basic-text"


class Destination(BaseModel):
    """One PACS (or other peer) that receives the SR and overlay objects.

    DIMSE peers get C-STORE (PS3.4 Annex B) from the node's AE title, over DICOM TLS when
    ``tls`` is set; DICOMweb peers get STOW-RS (PS3.18 10.5) with a bearer token or HTTP basic
    auth. Over TLS (either kind) the node presents its own certificate (``tls_cert``,
    ``tls_key``) when it has one, for peers that require mutual TLS.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Unique name (outbox rows refer to it)"
    )
    kind: DestinationKind = Field(description="dimse (C-STORE) or dicomweb (STOW-RS)")
    ae_title: str | None = Field(None, description="Called AE title (dimse)")
    host: str | None = Field(None, description="Host name or address (dimse)")
    port: int | None = Field(None, ge=1, le=65535, description="Port (dimse)")
    tls: bool = Field(False, description="DICOM TLS (dimse); DICOMweb uses https:// URLs")
    tls_ca: Path | None = Field(
        None, description="CA bundle that verifies the peer's certificate; default: system CAs"
    )
    url: str | None = Field(None, description="DICOMweb root, e.g. http://pacs/dicom-web (dicomweb)")
    token: SecretStr | None = Field(None, description="Bearer token for DICOMweb")
    username: str | None = Field(None, description="HTTP basic auth user for DICOMweb (with password)")
    password: SecretStr | None = Field(None, description="HTTP basic auth password for DICOMweb")
    timeout_s: float = Field(30.0, gt=0, description="Connect/response timeout in seconds")
    sr_class: SRClass = Field(
        SRClass.comprehensive_3d,
        description="SR class of the report this destination gets: comprehensive-3d, "
        "comprehensive, enhanced or basic-text (for a PACS that refuses the newer classes)",
    )
    send_overlays: bool = Field(
        True, description="Also send the secondary-capture overlay series (heat maps)"
    )

    @model_validator(mode="after")
    def _check_kind_fields(self) -> Destination:
        if self.kind is DestinationKind.dimse:
            missing = [f for f in ("ae_title", "host", "port") if getattr(self, f) in (None, "")]
            if missing:
                raise ValueError(f"destination {self.name!r} (dimse) needs {', '.join(missing)}")
            ae = str(self.ae_title)
            if len(ae.strip()) > 16 or "\\" in ae or not ae.isprintable():
                raise ValueError(f"destination {self.name!r}: ae_title must be 1-16 printable characters")
            if self.token is not None or self.username is not None or self.password is not None:
                raise ValueError(f"destination {self.name!r}: token, username and password are for dicomweb")
        elif not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"destination {self.name!r} (dicomweb) needs an http(s):// url")
        if (self.username is None) != (self.password is None):
            raise ValueError(f"destination {self.name!r}: username and password go together")
        if self.token is not None and self.username is not None:
            raise ValueError(f"destination {self.name!r}: a bearer token or basic auth, not both")
        return self

    def masked(self) -> dict[str, Any]:
        """For display: token and URL password masked."""
        out = self.model_dump(mode="json")
        for secret in ("token", "password"):
            if getattr(self, secret) is not None:
                out[secret] = "********"
        if out.get("url"):
            out["url"] = mask_url_password(out["url"])
        return out


def mask_url_password(url: str) -> str:
    """``url`` with the password of its user info, if any, replaced by ``********``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:********@{host}" if ":" in creds else url
