"""The Entra simulator against the real msal, used exactly as the app uses it, over HTTPS; and the
application permissions it grants, as Graph and Business Central enforce them."""

from __future__ import annotations

import ssl
import uuid

import httpx
import msal
import pytest
import requests
import trustme

from sandbox import tokens
from sandbox.bc import BcSimulator
from sandbox.bc.auth import entra_applications, register_app
from sandbox.entra import EntraSimulator
from sandbox.graph import GraphSimulator
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


# Application permissions (roles) ----------------------------------------------------------------------

ENVIRONMENT = "production"
BUSINESS = "roles-check@contoso.onmicrosoft.com"


def claims_of(result: dict, audience: str) -> dict:
    return tokens.verify(f"Bearer {result['access_token']}", audience)


def new_client(sim: EntraSimulator, **kwargs) -> str:
    client_id = str(uuid.uuid4())
    sim.register_client(TENANT, client_id, SECRET, **kwargs)
    return client_id


def test_tokens_carry_exactly_the_permissions_the_app_needs_by_default(entra) -> None:
    _, url = entra
    app = confidential_app(url, SECRET)
    graph = claims_of(app.acquire_token_for_client(scopes=[GRAPH_SCOPE]), tokens.GRAPH_AUDIENCE)
    bc = claims_of(app.acquire_token_for_client(scopes=[BC_SCOPE]), tokens.BC_AUDIENCE)
    assert graph["roles"] == ["Bookings.Read.All", "BookingsAppointment.ReadWrite.All"]
    assert bc["roles"] == ["API.ReadWrite.All"] and bc["idtyp"] == "app"


def test_roles_are_granted_per_audience_and_an_audience_without_any_gets_a_token_without_roles(entra) -> None:
    sim, url = entra
    client_id = new_client(sim, roles={tokens.GRAPH_AUDIENCE: [tokens.BOOKINGS_READ]})
    app = confidential_app(url, SECRET, client_id=client_id)
    assert claims_of(app.acquire_token_for_client(scopes=[GRAPH_SCOPE]), tokens.GRAPH_AUDIENCE)["roles"] == [
        "Bookings.Read.All"]
    assert "roles" not in claims_of(app.acquire_token_for_client(scopes=[BC_SCOPE]), tokens.BC_AUDIENCE)


def test_a_role_change_reaches_the_next_token_not_the_one_already_issued(entra) -> None:
    sim, url = entra
    client_id = new_client(sim)
    app = confidential_app(url, SECRET, client_id=client_id)
    before = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    sim.set_roles(TENANT, client_id, tokens.GRAPH_AUDIENCE, [tokens.BOOKINGS_MANAGE])

    assert app.acquire_token_for_client(scopes=[GRAPH_SCOPE])["access_token"] == before["access_token"]
    fresh = confidential_app(url, SECRET, client_id=client_id).acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert claims_of(fresh, tokens.GRAPH_AUDIENCE)["roles"] == ["Bookings.Manage.All"]
    assert sim.roles(TENANT, client_id)[tokens.BC_AUDIENCE] == ("API.ReadWrite.All",)


def test_roles_are_checked_when_granted(entra) -> None:
    sim, _ = entra
    with pytest.raises(ValueError):
        new_client(sim, roles={"https://management.azure.com": ["user_impersonation"]})
    with pytest.raises(TypeError):
        new_client(sim, roles={tokens.BC_AUDIENCE: "API.ReadWrite.All"})
    with pytest.raises(KeyError):
        sim.set_roles(TENANT, "ffffffff-0000-4000-8000-000000000000", tokens.BC_AUDIENCE, [])


def test_managed_identity_tokens_carry_its_app_role_assignments(entra, monkeypatch) -> None:
    sim, url = entra
    for name, value in sim.managed_identity_env(url).items():
        monkeypatch.setenv(name, value)

    def bc_token() -> dict:
        client = msal.ManagedIdentityClient(msal.SystemAssignedManagedIdentity(), http_client=requests.Session())
        return claims_of(client.acquire_token_for_client(resource=tokens.BC_AUDIENCE), tokens.BC_AUDIENCE)

    assert bc_token()["roles"] == ["API.ReadWrite.All"]
    sim.set_managed_identity_roles(tokens.BC_AUDIENCE, [])
    try:
        assert "roles" not in bc_token()
    finally:
        sim.set_managed_identity_roles(tokens.BC_AUDIENCE, tokens.APP_ROLES[tokens.BC_AUDIENCE])
    assert sim.managed_identity_roles[tokens.GRAPH_AUDIENCE] == tokens.APP_ROLES[tokens.GRAPH_AUDIENCE]


@pytest.fixture(scope="module")
def apis(tls: TlsFiles):
    """Graph with one business and one appointment, BC with one company, both over HTTPS."""
    graph, bc = GraphSimulator(), BcSimulator()
    graph.add_business(BUSINESS)
    appointment_id = graph.put_appointment(BUSINESS, {
        "startDateTime": {"dateTime": "2030-01-02T10:00:00", "timeZone": "UTC"},
        "endDateTime": {"dateTime": "2030-01-02T11:00:00", "timeZone": "UTC"}, "customers": []})
    bc.add_company(TENANT, ENVIRONMENT)
    with ServerThread(graph.app, tls, name="graph-sim") as g, ServerThread(bc.app, tls, name="bc-sim") as b:
        yield {"graph": g.url, "bc": bc, "bc_url": b.url, "appointment": appointment_id}


def call(url: str, tls: TlsFiles, token: str, method: str = "GET", **kwargs) -> httpx.Response:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(tls.ca_bundle))) as http:
        return http.request(method, url, headers={"Authorization": f"Bearer {token}"}, **kwargs)


def token_of(url: str, client_id: str, scope: str) -> str:
    return confidential_app(url, SECRET, client_id=client_id).acquire_token_for_client(scopes=[scope])["access_token"]


def test_graph_enforces_the_roles_entra_granted(entra, apis, tls: TlsFiles) -> None:
    sim, url = entra
    reader = token_of(url, new_client(sim, roles={tokens.GRAPH_AUDIENCE: [tokens.BOOKINGS_READ]}), GRAPH_SCOPE)
    appointment = f"{apis['graph']}/v1.0/solutions/bookingBusinesses/{BUSINESS}/appointments/{apis['appointment']}"

    assert call(appointment, tls, reader).status_code == 200
    refused = call(appointment, tls, reader, "PATCH", json={"serviceNotes": "Invoiced: X"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "ErrorAccessDenied"
    writer = token_of(url, CLIENT_ID, GRAPH_SCOPE)
    assert call(appointment, tls, writer, "PATCH", json={"serviceNotes": "Invoiced: X"}).status_code == 204


def test_business_central_refuses_a_token_without_api_read_write_all(entra, apis, tls: TlsFiles) -> None:
    sim, url = entra
    token = token_of(url, new_client(sim, roles={tokens.GRAPH_AUDIENCE: tokens.APP_ROLES[tokens.GRAPH_AUDIENCE]}),
                     BC_SCOPE)
    response = call(f"{apis['bc_url']}/v2.0/{TENANT}/{ENVIRONMENT}/api/v2.0/companies", tls, token)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "Authentication_InvalidCredentials"
    assert response.json()["error"]["message"].startswith("The server has rejected the client credentials.")


def test_business_central_refuses_an_app_missing_from_microsoft_entra_applications(entra, apis, tls) -> None:
    _, url = entra
    companies = f"{apis['bc_url']}/v2.0/{TENANT}/{ENVIRONMENT}/api/v2.0/companies"
    token = token_of(url, CLIENT_ID, BC_SCOPE)
    assert call(companies, tls, token).status_code == 200

    register_app(apis["bc"], TENANT, ENVIRONMENT, CLIENT_ID, registered=False)
    try:
        refused = call(companies, tls, token)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "Authentication_InvalidCredentials"
        entra_applications(apis["bc"]).refusal_status = 403
        assert call(companies, tls, token).status_code == 403
    finally:
        entra_applications(apis["bc"]).refusal_status = 401
        register_app(apis["bc"], TENANT, ENVIRONMENT, CLIENT_ID)
    assert call(companies, tls, token).status_code == 200
