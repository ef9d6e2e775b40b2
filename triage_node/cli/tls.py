"""``triage-node tls self-signed``: a certificate for the HTTPS proxy when the site has none yet.

The proxy in docker-compose.yml (deploy/proxy) serves the web page, the API and DICOMweb
over HTTPS with the certificate the site supplies. For a demo, or the first day before the
hospital's PKI has issued one, this writes a self-signed certificate and key in the same
place; browsers will warn until it is replaced. An existing pair is never overwritten
unless ``--force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from triage_node.cli.app import app

tls_app = typer.Typer(help="Certificates for the HTTPS proxy.", no_args_is_help=True)
app.add_typer(tls_app, name="tls")

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def write_self_signed(out: Path, hosts: list[str], days: int = 825) -> tuple[Path, Path]:
    """An ECDSA P-256 certificate for ``hosts`` (DNS names or IP addresses) and its key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ICH triage node (self-signed)")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / KEY_FILE, out / CERT_FILE
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@tls_app.command("self-signed")
def self_signed(
    out: Path = typer.Option(..., "--out", help="Folder for cert.pem and key.pem (the proxy's certificate folder)."),
    host: list[str] = typer.Option(["localhost"], "--host", help="DNS name or IP address the users type; repeat for more."),
    days: int = typer.Option(825, "--days", min=1, max=3650, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pair."),
) -> None:
    """Write a self-signed certificate and key, unless the folder already has a pair."""
    if (out / CERT_FILE).exists() and (out / KEY_FILE).exists() and not force:
        typer.echo(f"{out / CERT_FILE} exists: kept (use --force to replace it)")
        return
    cert, _ = write_self_signed(out, host, days)
    typer.echo(f"wrote {cert} and its key for {', '.join(host)}: self-signed, browsers will warn until "
               "the site's own certificate replaces it")
