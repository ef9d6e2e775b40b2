"""General settings: environment, data directory, logging, the secret key, database and queue."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator

from triage_node.setting_types import Environment, LogFormat

DEV_SECRET = "development-only-secret"
#: Values a site could inherit from this repository: refused as secret_key everywhere.
KNOWN_SECRETS = frozenset({DEV_SECRET, "replace-with-a-long-random-string", "changeme", "secret"})
MIN_SECRET_LENGTH = 16


class GeneralSettings(BaseModel):
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

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        allowed = ("DEBUG", "INFO", "WARNING", "ERROR")
        if value.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value.upper()

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
