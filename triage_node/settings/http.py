"""HTTP settings: the API's address and trusted proxies, CORS, the viewer link, and web sign-in (OIDC).

The OIDC checks that need ``environment`` are on ``triage_node.config.Settings``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator


class HttpSettings(BaseModel):
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
