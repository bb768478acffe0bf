"""A throw-away certificate authority, made at run time, so the simulators speak real HTTPS.

The app trusts it only through the standard variables (SSL_CERT_FILE, REQUESTS_CA_BUNDLE):
nothing in the app knows it exists."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TlsFiles:
    ca_bundle: Path
    server_cert_chain: Path
    server_key: Path

    def trust_env(self) -> dict[str, str]:
        """Environment variables that make httpx, requests (msal) and the Azure SDK trust the CA."""
        bundle = str(self.ca_bundle)
        return {"SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle}


def make_tls_files(directory: Path | None = None) -> TlsFiles:
    directory = Path(directory or tempfile.mkdtemp(prefix="bookings-sim-tls-"))
    ca = trustme.CA(organization_name="bookings-invoicing simulators")
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    paths = TlsFiles(
        ca_bundle=directory / "ca.pem",
        server_cert_chain=directory / "server-chain.pem",
        server_key=directory / "server-key.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca_bundle))
    cert.private_key_pem.write_to_path(str(paths.server_key))
    for index, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(paths.server_cert_chain), append=index > 0)
    return paths
