"""The OpenID provider the login tests sign in with (it runs from ``tests/oidc``).

The other real peers (PostgreSQL, Redis, Orthanc, DCMTK, dciodvfy) live in
`triage_node.peers`, which the benchmarks share.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx

from triage_node.peers.process import ServerError, free_port, require_binary, spawn, terminate, wait_until

__all__ = ["OidcProvider"]

OIDC_DIR = Path(__file__).resolve().parent / "oidc"


class OidcProvider:
    """panva's ``oidc-provider`` (``tests/oidc/provider.mjs``) on a free loopback port.

    Parameters
    ----------
    clients : list of dict
        oidc-provider client metadata (``client_id``, ``client_secret``, ``redirect_uris``...).
    users : dict
        Login -> ``{"name", "email", "groups"}``; the login form takes any password.

    ``scripts/test.sh`` installs the package into ``tests/oidc/node_modules``.
    """

    def __init__(self, clients: list[dict], users: dict[str, dict], port: int | None = None) -> None:
        self.port = port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.clients = clients
        self.users = users
        self.root = Path(tempfile.mkdtemp(prefix="triage-oidc-"))
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "provider.log"

    def start(self) -> OidcProvider:
        node = require_binary("node")
        if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            raise ServerError("oidc-provider is not installed: npm install --prefix tests/oidc "
                              "(bash scripts/test.sh does)")
        config = self.root / "config.json"
        config.write_text(json.dumps({"issuer": self.issuer, "port": self.port,
                                      "clients": self.clients, "users": self.users}))
        self.process = spawn([node, str(OIDC_DIR / "provider.mjs"), str(config)], self.log_path,
                              cwd=OIDC_DIR)
        wait_until(self.discovery, "oidc-provider", timeout=30, process=self.process, log=self.log_path)
        return self

    def discovery(self) -> dict:
        response = httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=2)
        response.raise_for_status()
        return response.json()

    def cleanup(self) -> None:
        terminate(self.process)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
