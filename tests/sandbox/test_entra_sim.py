"""The Entra simulator against the real msal, used exactly as the app uses it, over HTTPS."""

from __future__ import annotations

import msal
import pytest
import requests
import trustme

from sandbox import tokens
from sandbox.entra import EntraSimulator
from sandbox.server import ServerThread
from sandbox.tls import TlsFiles, make_tls_files

TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "0b1d2c3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
SECRET = "Ab8Q~not-a-real-secret"
CERT_CLIENT_ID = "1c2d3e4f-5061-4b7c-9d8e-0f1a2b3c4d5e"
GRAPH_SCOPE = f"{tokens.GRAPH_AUDIENCE}/.default"
BC_SCOPE = f"{tokens.BC_AUDIENCE}/.default"


@pytest.fixture(scope="module")
def tls() -> TlsFiles:
    return make_tls_files()


@pytest.fixture(scope="module")
def entra(tls: TlsFiles):
    sim = EntraSimulator()
    sim.register_client(TENANT, CLIENT_ID, SECRET)
    sim.register_client(TENANT, CERT_CLIENT_ID, None)
    with ServerThread(sim.app, tls, name="entra-sim") as server:
        yield sim, server.url


@pytest.fixture(autouse=True)
def trust_sim_ca(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in tls.trust_env().items():
        monkeypatch.setenv(name, value)


def confidential_app(url: str, credential, client_id: str = CLIENT_ID, tenant: str = TENANT):
    return msal.ConfidentialClientApplication(client_id, client_credential=credential,
                                              authority=f"{url}/{tenant}", instance_discovery=False)


def test_secret_credential_gets_a_graph_token_that_msal_then_caches(entra) -> None:
    sim, url = entra
    app = confidential_app(url, SECRET)
    before = sim.tokens_issued[tokens.GRAPH_AUDIENCE]

    first = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
    second = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    claims = tokens.verify(f"Bearer {first['access_token']}", tokens.GRAPH_AUDIENCE)
    assert claims["appid"] == CLIENT_ID and claims["tid"] == TENANT
    assert second["access_token"] == first["access_token"]
    assert sim.tokens_issued[tokens.GRAPH_AUDIENCE] == before + 1


def test_business_central_scope_gives_a_business_central_token(entra) -> None:
    _, url = entra
    result = confidential_app(url, SECRET).acquire_token_for_client(scopes=[BC_SCOPE])
    assert tokens.verify(f"Bearer {result['access_token']}", tokens.BC_AUDIENCE)["appid"] == CLIENT_ID


def test_wrong_secret_is_refused_as_invalid_client(entra) -> None:
    _, url = entra
    result = confidential_app(url, "wrong").acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert "access_token" not in result
    assert result["error"] == "invalid_client" and 7000215 in result["error_codes"]


def test_unknown_client_is_refused_as_invalid_client(entra) -> None:
    _, url = entra
    result = confidential_app(url, SECRET, client_id="ffffffff-0000-4000-8000-000000000000").acquire_token_for_client(
        scopes=[GRAPH_SCOPE])
    assert result["error"] == "invalid_client"


def test_scope_without_default_suffix_is_invalid_scope(entra) -> None:
    _, url = entra
    result = confidential_app(url, SECRET).acquire_token_for_client(scopes=["https://graph.microsoft.com/User.Read"])
    assert result["error"] == "invalid_scope"


def test_unknown_tenant_fails_at_discovery_as_in_azure(entra) -> None:
    _, url = entra
    with pytest.raises(ValueError):
        confidential_app(url, SECRET, tenant="nobody.onmicrosoft.com")


def test_certificate_credential_is_accepted_by_client_assertion(entra) -> None:
    _, url = entra
    cert = trustme.CA().issue_cert("bookings-invoicing", key_type=trustme.KeyType.RSA)
    credential = {"private_key": cert.private_key_pem.bytes().decode(),
                  "public_certificate": cert.cert_chain_pems[0].bytes().decode()}
    result = confidential_app(url, credential, client_id=CERT_CLIENT_ID).acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert tokens.verify(f"Bearer {result['access_token']}", tokens.GRAPH_AUDIENCE)["appid"] == CERT_CLIENT_ID


def test_managed_identity_endpoint_serves_msal_managed_identity_client(entra, monkeypatch) -> None:
    sim, url = entra
    for name, value in sim.managed_identity_env(url).items():
        monkeypatch.setenv(name, value)
    client = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=requests.Session())

    result = client.acquire_token_for_client(resource=tokens.GRAPH_AUDIENCE)

    claims = tokens.verify(f"Bearer {result['access_token']}", tokens.GRAPH_AUDIENCE)
    assert claims["appid"] == sim.managed_identity_client_id


def test_managed_identity_endpoint_checks_the_identity_header(entra, monkeypatch) -> None:
    sim, url = entra
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-header")
    client = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=requests.Session())

    result = client.acquire_token_for_client(resource=tokens.GRAPH_AUDIENCE)

    assert "access_token" not in result and "401" in result["error_description"]
