"""Settings: one pydantic-settings class for the whole node.

Defaults are the embedded ones (SQLite in the data directory, a Celery broker that
needs no server, in-process ONNX Runtime). Production points the same fields at
PostgreSQL, Redis and Triton. Values come from, in order of precedence: keyword
arguments, ``TRIAGE_*`` environment variables, the TOML file named by
``TRIAGE_CONFIG_FILE``, and the defaults below. The value types of the fields (the
enumerations and the `Destination` model) are in ``triage_node.setting_types``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from triage_node.setting_types import (
    Destination,
    Environment,
    InferenceBackend,
    LogFormat,
    OperatingPoint,
    UnknownStorageClassPolicy,
    mask_url_password,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "models"
DEFAULT_MODEL_CARD = REPO_ROOT / "deploy" / "triton" / "model_card.json"
CONFIG_FILE_ENV = "TRIAGE_CONFIG_FILE"
DEV_SECRET = "development-only-secret"
#: Values a site could inherit from this repository: refused as secret_key everywhere.
KNOWN_SECRETS = frozenset({DEV_SECRET, "replace-with-a-long-random-string", "changeme", "secret"})
MIN_SECRET_LENGTH = 16


class Settings(BaseSettings):
    """Every setting of the node. ``docs/CONFIGURATION.md`` is generated from this."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_",
        extra="forbid",
        validate_default=True,
        env_nested_delimiter="__",
    )

    # -- general -------------------------------------------------------------
    environment: Environment = Field(
        Environment.development, description="development or production"
    )
    data_dir: Path = Field(
        Path("triage-data"), description="Spool, SQLite database and embedded broker live here"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: LogFormat = Field(
        LogFormat.auto, description="json, console, or auto (console on a terminal)"
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Signs webhooks and salts token hashes; no default: serve, worker, token and "
        "reconcile refuse to start without one (and every command in production); at least "
        f"{MIN_SECRET_LENGTH} characters, never a value from this repository",
    )

    # -- database and queue --------------------------------------------------
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/triage.db"
    )
    broker_url: str | None = Field(
        None, description="Celery broker; default filesystem:// under <data_dir>/broker"
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; default SQLite in <data_dir>"
    )

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

    # -- HTTP API ------------------------------------------------------------
    http_host: str = Field("127.0.0.1", description="Address the API binds")
    http_port: int = Field(8080, ge=1, le=65535, description="Port the API binds")
    http_trusted_proxies: str = Field(
        "127.0.0.1",
        description="Reverse proxies (comma-separated addresses or CIDRs) whose X-Forwarded-For and "
        "X-Forwarded-Proto the API believes, so RetrieveURLs say https and the audit names the real "
        "client; only the HTTPS proxy's network (deploy/proxy), never '*' on a reachable port",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) whose browser pages may call the API and "
        "DICOMweb, e.g. a web viewer served elsewhere; empty: no cross-origin access",
    )
    viewer_url_template: str = Field(
        "http://localhost:3000/viewer?StudyInstanceUIDs={study_uid}",
        description="Link to open a study in a DICOMweb viewer ({study_uid} is replaced); "
        "empty: no viewer link on the web page",
    )

    # -- web sign-in (OpenID Connect) ----------------------------------------
    oidc_issuer: str = Field(
        "",
        description="Issuer URL of the hospital's OpenID Connect provider (its discovery "
        "document is <issuer>/.well-known/openid-configuration); empty: no OIDC sign-in, the "
        "web page takes an API token only",
    )
    oidc_client_id: str = Field("", description="Client id the node is registered with at the provider")
    oidc_client_secret: SecretStr | None = Field(
        None, description="Client secret (confidential client; PKCE is sent as well)"
    )
    oidc_scopes: str = Field(
        "openid profile email",
        description="Scopes asked for, space-separated; must include openid (add the scope that "
        "releases oidc_role_claim when the provider needs one, e.g. groups)",
    )
    oidc_role_claim: str = Field(
        "groups",
        description="Claim whose values give the role (a string or a list; a dotted path reaches "
        "into objects, e.g. realm_access.roles); read from the ID token, else from UserInfo",
    )
    oidc_role_map: dict[str, Literal["viewer", "admin"]] = Field(
        default_factory=dict,
        description="Claim value -> role on the web page (viewer or admin); the highest mapped "
        "role wins; a user with no mapped value is refused (never a default role)",
    )
    oidc_display_name: str = Field(
        "", description="Provider name on the login button ('Sign in with ...'); default: the issuer's host"
    )
    oidc_redirect_base_url: str = Field(
        "",
        description="The node's external base URL (scheme://host[:port]) behind a "
        "reverse proxy; the provider must allow <base>/auth/callback as a redirect URI; empty: "
        "the URL the request came in on. An https base also marks the session cookie Secure",
    )
    web_token_login: bool = Field(
        True,
        description="The web login page also takes a pasted API token (for machines and "
        "administrators); false needs oidc_issuer. The API's bearer tokens are not affected",
    )

    # -- inference -----------------------------------------------------------
    inference_backend: InferenceBackend = Field(
        InferenceBackend.onnx, description="onnx (in-process) or triton (gRPC)"
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC host:port")
    model_repository: Path = Field(
        DEFAULT_MODEL_REPOSITORY, description="Triton-layout model repository with model_card.json"
    )
    model_card: Path = Field(
        DEFAULT_MODEL_CARD, description="model_card.json of the served models"
    )
    operating_point: OperatingPoint = Field(
        OperatingPoint.high_sensitivity, description="high_sensitivity or balanced"
    )
    key_slices_per_class: int = Field(
        2, ge=1, le=10, description="Overlay images per positive class"
    )
    inference_threads: int = Field(
        2, ge=1, le=64, description="ONNX Runtime intra-op threads in each worker process"
    )
    inference_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of each Triton request and start-up check (seconds)"
    )
    task_time_limit_s: int = Field(
        300, ge=10, description="Hard time limit of one triage task; the soft limit is 30 s less"
    )
    worker_concurrency: int = Field(
        1, ge=1, le=32, description="Worker processes of `triage-node worker` (each loads the models)"
    )

    # -- monitoring ----------------------------------------------------------------
    worker_metrics_port: int = Field(
        0, ge=0, le=65535,
        description="Port of the worker's own /metrics (latency histograms, deliveries), "
        "summed over its pool processes; 0: not served",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's /metrics binds (no token: counts only); "
        "0.0.0.0 in a container on the monitoring network",
    )
    expected_positive_rate: dict[str, float] = Field(
        default_factory=dict,
        description="Expected share of positive studies per class at the operating point (JSON, "
        'e.g. {"any": 0.66}); overrides the model card\'s expected_positive_rate',
    )
    positive_rate_band: float = Field(
        2.0, gt=1.0, le=100.0,
        description="The positive rate alarm fires outside expected/band .. expected*band",
    )

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
    def _check_retention(self) -> Settings:
        if self.retention_disk_low_percent >= self.retention_disk_high_percent:
            raise ValueError("retention_disk_low_percent must be below retention_disk_high_percent")
        audit, images = self.retention_audit_days, self.retention_instances_days
        if audit and (images == 0 or audit < images):
            raise ValueError("retention_audit_days must be 0 (forever) or at least retention_instances_days")
        return self

    @field_validator("expected_positive_rate")
    @classmethod
    def _rates_are_shares(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, v in value.items() if not 0.0 < v < 1.0)
        if bad:
            raise ValueError(f"expected_positive_rate must be between 0 and 1 (exclusive): {', '.join(bad)}")
        return value

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        allowed = ("DEBUG", "INFO", "WARNING", "ERROR")
        if value.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.upper()

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

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: list[str]) -> list[str]:
        # A browser sends Origin as scheme://host[:port], never with a path or a slash.
        for origin in value:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r}: expected an origin like https://viewer.example:3000")
        return value

    @field_validator("viewer_url_template")
    @classmethod
    def _check_viewer_url_template(cls, value: str) -> str:
        if value and "{study_uid}" not in value:
            raise ValueError("must contain {study_uid} (or be empty for no viewer link)")
        return value

    @model_validator(mode="after")
    def _check_oidc(self) -> Settings:
        if not self.oidc_issuer:
            if not self.web_token_login:
                raise ValueError("web_token_login = false needs oidc_issuer: nobody could log in to the web page")
            return self
        if not re.fullmatch(r"https?://[^\s?#]+", self.oidc_issuer):
            raise ValueError("oidc_issuer must be an http(s):// URL without query or fragment")
        if self.environment is Environment.production and not self.oidc_issuer.startswith("https://"):
            raise ValueError("oidc_issuer must be https:// in production")
        if not self.oidc_client_id:
            raise ValueError("oidc_issuer needs oidc_client_id")
        if "openid" not in self.oidc_scopes.split():
            raise ValueError("oidc_scopes must include openid")
        if not self.oidc_role_claim.strip():
            raise ValueError("oidc_role_claim must name a claim")
        if not self.oidc_role_map:
            raise ValueError("oidc_issuer needs oidc_role_map (claim value -> viewer or admin): "
                             "without it every user would be refused")
        if self.oidc_redirect_base_url and not re.fullmatch(r"https?://[^\s?#]+", self.oidc_redirect_base_url):
            raise ValueError("oidc_redirect_base_url must be an http(s):// URL without query or fragment")
        return self

    @field_validator("secret_key")
    @classmethod
    def _refuse_known_or_short_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # In every environment: a development node is reachable on the network too.
        if value is None:
            return None
        secret = value.get_secret_value()
        if secret.strip() in KNOWN_SECRETS:
            raise ValueError("is a published example value; set a random one (TRIAGE_SECRET_KEY)")
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _refuse_default_secret_in_production(self) -> Settings:
        if self.environment is Environment.production and self.secret_key is None:
            raise ValueError("secret_key must be set (TRIAGE_SECRET_KEY) in production")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise SettingsError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    # -- derived values ------------------------------------------------------
    def require_secret(self) -> str:
        """``secret_key``'s value; `SettingsError` naming TRIAGE_SECRET_KEY when it is unset."""
        if self.secret_key is None:
            raise SettingsError(
                "TRIAGE_SECRET_KEY (secret_key) must be set: it salts the API token hashes and "
                "signs webhooks; there is no default (e.g. `openssl rand -hex 32`)"
            )
        return self.secret_key.get_secret_value()

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'triage.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        """Folder of the embedded filesystem broker (used when broker_url is unset)."""
        return self.data_dir.resolve() / "broker"

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or f"db+sqlite:///{self.data_dir.resolve() / 'results.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir.resolve() / "spool"

    def masked(self) -> dict[str, Any]:
        """Effective settings for display: secrets and URL passwords masked."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********"
            elif isinstance(value, str) and "://" in value and "@" in value:
                value = mask_url_password(value)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, StrEnum):
                value = value.value
            elif name == "destinations":
                value = [d.masked() for d in value]
            out[name] = value
        out["effective_database_url"] = mask_url_password(self.effective_database_url)
        out["effective_broker_url"] = mask_url_password(self.effective_broker_url)
        return out


class SettingsError(RuntimeError):
    """A setting is missing or has a value that is not allowed."""


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one readable message.

    The message names each offending setting by its environment variable and says
    what is allowed, so that start-up stops with something an operator can act on.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            env = f"TRIAGE_{field.upper()}" if err["loc"] else "settings"
            lines.append(f"{env} ({field}): {err['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return load_settings()
