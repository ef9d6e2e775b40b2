"""Settings: one pydantic-settings class for the whole node.

Defaults are the embedded ones (SQLite in the data directory, a Celery broker that
needs no server, in-process ONNX Runtime). Production points the same fields at
PostgreSQL, Redis and Triton. Values come from, in order of precedence: keyword
arguments, ``TRIAGE_*`` environment variables, the TOML file named by
``TRIAGE_CONFIG_FILE``, and the defaults. The fields, their defaults and the checks of
one section are in ``triage_node.settings`` (general, ingest, http, inference, delivery,
retention); this module composes them and keeps the sources, the checks that span
sections, and the derived values. The value types of the fields (the enumerations and
the `Destination` model) are in ``triage_node.setting_types``.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError, model_validator
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
from triage_node.settings import REPO_ROOT
from triage_node.settings.delivery import DeliverySettings
from triage_node.settings.general import DEV_SECRET, KNOWN_SECRETS, MIN_SECRET_LENGTH, GeneralSettings
from triage_node.settings.http import HttpSettings
from triage_node.settings.inference import DEFAULT_MODEL_CARD, DEFAULT_MODEL_REPOSITORY, InferenceSettings
from triage_node.settings.ingest import IngestSettings
from triage_node.settings.retention import RetentionSettings

# The names callers import from here, those defined in the section modules and the value
# types this module has always handed on included.
__all__ = [
    "CONFIG_FILE_ENV",
    "DEFAULT_MODEL_CARD",
    "DEFAULT_MODEL_REPOSITORY",
    "DEV_SECRET",
    "KNOWN_SECRETS",
    "MIN_SECRET_LENGTH",
    "REPO_ROOT",
    "Destination",
    "Environment",
    "InferenceBackend",
    "LogFormat",
    "OperatingPoint",
    "Settings",
    "SettingsError",
    "UnknownStorageClassPolicy",
    "get_settings",
    "load_settings",
    "mask_url_password",
]

CONFIG_FILE_ENV = "TRIAGE_CONFIG_FILE"


# pydantic orders the fields from the last base to the first, so the sections are listed
# in reverse: general comes first in model_fields, the JSON schema and docs/CONFIGURATION.md.
class Settings(
    RetentionSettings,
    DeliverySettings,
    InferenceSettings,
    HttpSettings,
    IngestSettings,
    GeneralSettings,
    BaseSettings,
):
    """Every setting of the node. ``docs/CONFIGURATION.md`` is generated from this."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_",
        extra="forbid",
        validate_default=True,
        env_nested_delimiter="__",
    )

    # -- checks that read fields of more than one section --------------------
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
