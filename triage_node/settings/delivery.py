"""Delivery settings: what happens to a result once it exists.

The worklist score, notifications (webhooks, HL7 to the RIS), auto-routing, and delivery of
the SR and overlays to the PACS destinations with its retries.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from triage_node.setting_types import Destination


class DeliverySettings(BaseModel):
    # -- worklist, notifications, routing --------------------------------------
    subtype_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "any": 1.0,
            "epidural": 1.5,
            "subdural": 1.4,
            "intraparenchymal": 1.2,
            "intraventricular": 1.2,
            "subarachnoid": 1.0,
        },
        description="Worklist score weight per class: score = max over classes of weight x probability",
    )
    ageing_per_hour: float = Field(
        0.05, ge=0, description="Worklist score added per hour of waiting, so no study is starved"
    )
    webhook_urls: list[str] = Field(
        default_factory=list,
        description="URLs that receive a JSON POST (HMAC-SHA256 signed) on positive results and failures",
    )
    webhook_attempts: int = Field(4, ge=1, le=20, description="Tries per webhook delivery")
    hl7_host: str | None = Field(
        None,
        description="RIS host that receives HL7 v2 ORM^O01 priority updates and ORU^R01 AI results over MLLP",
    )
    hl7_port: int = Field(2575, ge=1, le=65535, description="RIS MLLP port")
    hl7_sending_application: str | None = Field(
        None, max_length=180, description="MSH-3 Sending Application; unset: the node's ae_title"
    )
    hl7_sending_facility: str = Field("TRIAGE", max_length=180, description="MSH-4 Sending Facility")
    hl7_receiving_application: str = Field(
        "RIS", max_length=180, description="MSH-5 Receiving Application (the RIS's name for itself)"
    )
    hl7_receiving_facility: str = Field("RIS", max_length=180, description="MSH-6 Receiving Facility")
    hl7_tls: bool = Field(
        False, description="MLLP over TLS; the node presents tls_cert/tls_key when set (mutual TLS)"
    )
    hl7_tls_ca: Path | None = Field(
        None, description="CA bundle that signs the RIS's certificate; unset: the system's CAs"
    )
    hl7_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Connect, send and ACK wait of one MLLP exchange (seconds)"
    )
    hl7_max_attempts: int = Field(
        8, ge=1, le=100,
        description="Tries per HL7 message without an ACK before it is dead-lettered (backoff as delivery_backoff_*)",
    )
    routing_rules: Path | None = Field(
        None, description="YAML/JSON file with modality auto-routing rules; none: no routing"
    )

    # -- delivery to the PACS ----------------------------------------------------
    destinations: list[Destination] = Field(
        default_factory=list,
        description="Peers that receive the SR and overlays: JSON list of {name, kind: dimse|dicomweb, "
        "ae_title, host, port, tls, tls_ca, url, token, username, password, timeout_s, sr_class, send_overlays}",
    )
    delivery_max_attempts: int = Field(
        8, ge=1, le=100, description="Tries per object and destination before it is dead-lettered"
    )
    delivery_refused_max_attempts: int = Field(
        2,
        ge=1,
        le=100,
        description="Tries after the peer refused the object (DIMSE failure status, HTTP 4xx) "
        "before it is set aside as refused",
    )
    delivery_backoff_base_s: float = Field(
        5.0, gt=0, description="First retry delay; doubles with each failed try"
    )
    delivery_backoff_cap_s: float = Field(
        600.0, gt=0, description="Longest delay between two tries"
    )
    delivery_batch_size: int = Field(
        64, ge=1, le=1000, description="Objects sent per destination in one association or request"
    )

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return value
