"""The Entra simulator against the real msal, used exactly as the app uses it, over HTTPS; the
application permissions it grants, as Graph and Business Central enforce them; and user sign-in
(authorization code flow with PKCE) driven by msal and a form-filling browser."""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
import uuid
import warnings
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import msal
import pytest
import requests
import trustme

from sandbox import stack as stack_module
from sandbox import tokens
from sandbox.bc import BcSimulator
from sandbox.bc.auth import entra_applications, register_app
from sandbox.entra import EntraSimulator
from sandbox.graph import GraphSimulator
from sandbox.server import ServerThread
from sandbox.tls import TlsFiles, make_tls_files
from tests.signin_helpers import PickerForm

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


def test_a_tenant_asked_by_its_domain_name_answers_with_its_guid(entra) -> None:
    sim, url = entra
    guid = "7b2e4c1a-0000-4000-8000-00000000d0a1"
    sim.register_client(guid, CLIENT_ID, SECRET)
    sim.add_tenant_domain(guid, "fabrikam.example")

    discovery = httpx.get(f"{url}/fabrikam.example/v2.0/.well-known/openid-configuration",
                          verify=ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])).json()
    result = confidential_app(url, SECRET, tenant="fabrikam.example").acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert discovery["issuer"] == f"{url}/{guid}/v2.0" and f"/{guid}/oauth2/v2.0/token" in discovery["token_endpoint"]
    claims = tokens.verify(f"Bearer {result['access_token']}", tokens.GRAPH_AUDIENCE)
    assert claims["tid"] == guid and claims["iss"] == f"https://sts.windows.net/{guid}/"
    with pytest.raises(ValueError):
        sim.add_tenant_domain(TENANT, "fabrikam.example")


def test_a_signing_key_rollover_publishes_the_new_key_first_and_keeps_the_old_one(entra) -> None:
    sim, url = entra
    old = sim.signing_key.kid
    verify = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])

    new = sim.rotate_signing_key()
    listed = [key["kid"] for key in httpx.get(f"{url}/{TENANT}/discovery/v2.0/keys", verify=verify).json()["keys"]]
    sim.rotate_signing_key(keep_old=False)
    alone = [key["kid"] for key in httpx.get(f"{url}/{TENANT}/discovery/v2.0/keys", verify=verify).json()["keys"]]

    assert listed == [new, old] and new != old
    assert alone == [sim.signing_key.kid]


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


# User sign-in: OpenID Connect authorization code flow with PKCE -------------------------------------

CALLBACK = "http://127.0.0.1/auth/callback"  # a loopback redirect URI: any port matches it


def parse_form(page: str) -> PickerForm:
    form = PickerForm()
    form.feed(page)
    return form


def browser(tls: TlsFiles) -> httpx.Client:
    """A browser that does not follow redirects (the app's callback is not running here)."""
    return httpx.Client(verify=ssl.create_default_context(cafile=str(tls.ca_bundle)), timeout=10)


def choose(http: httpx.Client, auth_uri: str, label: str) -> httpx.Response:
    """Open the authorize URL and press the button whose accessible name contains `label`."""
    page = http.get(auth_uri)
    assert page.status_code == 200, page.text
    form = parse_form(page.text)
    button = next(b for b in form.buttons if label in b["label"])
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(auth_uri))
    return http.post(origin + form.action, data={**form.hidden, button["name"]: button["value"]})


def callback_params(response: httpx.Response, redirect_uri: str) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(redirect_uri + "?")
    return {name: values[-1] for name, values in parse_qs(urlsplit(location).query).items()}


@pytest.fixture
def stack(sandbox, monkeypatch: pytest.MonkeyPatch, trust_sim_ca):
    """The session's SandboxStack (seeded user, browser servers), its CA trusted by msal."""
    for name, value in sandbox.tls.trust_env().items():
        monkeypatch.setenv(name, value)
    sandbox.entra.register_redirect_uri(stack_module.TENANT, stack_module.CLIENT_ID, CALLBACK)
    return sandbox


def stack_app(sandbox, secret: str = stack_module.CLIENT_SECRET) -> msal.ConfidentialClientApplication:
    """The app's sign-in client, built as the app builds it from its settings."""
    env = sandbox.env()
    return msal.ConfidentialClientApplication(
        env["AZURE_CLIENT_ID"], client_credential=secret,
        authority=f"{env['AZURE_AUTHORITY_HOST']}/{env['AZURE_TENANT_ID']}", instance_discovery=False)


def start_flow(app: msal.ConfidentialClientApplication, redirect_uri: str = "http://127.0.0.1:7071/auth/callback",
               **kwargs) -> dict:
    with warnings.catch_warnings():  # msal recommends response_mode=form_post; the app reads the query
        warnings.simplefilter("ignore")
        return app.initiate_auth_code_flow(scopes=kwargs.pop("scopes", []), redirect_uri=redirect_uri, **kwargs)


def test_msal_signs_the_operator_in_and_gets_her_id_token_with_her_app_role(stack, tls: TlsFiles) -> None:
    app = stack_app(stack)
    flow = start_flow(app)
    assert flow["auth_uri"].startswith(f"{stack.servers['entra-browser'].url}/{stack_module.TENANT}/oauth2/v2.0/authorize?")
    assert stack.servers["entra-browser"].url.startswith("http://127.0.0.1:")

    with browser(stack.tls) as http:
        page = http.get(flow["auth_uri"])
        assert "Pick an account" in page.text and "<script" not in page.text
        assert "script-src" not in page.headers["content-security-policy"]
        labels = [b["label"] for b in parse_form(page.text).buttons]
        assert "Ada Accountant ada@contoso.example" in labels and "Cancel" in labels
        answer = choose(http, flow["auth_uri"], stack_module.USER_NAME)
    params = callback_params(answer, "http://127.0.0.1:7071/auth/callback")
    assert params["state"] == flow["state"]

    result = app.acquire_token_by_auth_code_flow(flow, params)

    assert "error" not in result, result
    claims = result["id_token_claims"]
    with browser(stack.tls) as http:
        configuration = http.get(f"{stack.servers['entra'].url}/{stack_module.TENANT}/v2.0/.well-known/openid-configuration").json()
        jwks = http.get(configuration["jwks_uri"]).json()
    assert claims["aud"] == stack_module.CLIENT_ID and claims["iss"] == configuration["issuer"]
    assert claims["tid"] == stack_module.TENANT and claims["oid"] == stack_module.USER_OID
    assert claims["name"] == "Ada Accountant" and claims["preferred_username"] == "ada@contoso.example"
    assert claims["roles"] == [stack_module.OPERATOR_ROLE] and claims["ver"] == "2.0"
    assert claims["nbf"] <= claims["iat"] < claims["exp"] and claims["sub"] and claims["nonce"]
    header = jwt.get_unverified_header(result["id_token"])
    key = next(k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == header["kid"])
    verified = jwt.decode(result["id_token"], key.key, algorithms=["RS256"], audience=stack_module.CLIENT_ID,
                          issuer=configuration["issuer"])
    assert verified == claims and header["alg"] == "RS256"
    assert result["refresh_token"] and json.loads(base64.urlsafe_b64decode(result["client_info"] + "==")) == {
        "uid": stack_module.USER_OID, "utid": stack_module.TENANT}
    access = tokens.verify(f"Bearer {result['access_token']}", tokens.GRAPH_AUDIENCE)
    assert access["scp"].split()[-1] == "User.Read" and access["oid"] == stack_module.USER_OID
    account, = [a for a in app.get_accounts() if a["local_account_id"] == stack_module.USER_OID]
    assert account["username"] == "ada@contoso.example"


def test_the_stack_serves_what_a_browser_visits_over_plain_http(stack) -> None:
    with browser(stack.tls) as http:
        configuration = http.get(f"{stack.servers['entra'].url}/{stack_module.TENANT}/v2.0/.well-known/openid-configuration").json()
    browser_url = stack.servers["entra-browser"].url
    assert configuration["authorization_endpoint"] == f"{browser_url}/{stack_module.TENANT}/oauth2/v2.0/authorize"
    assert configuration["end_session_endpoint"] == f"{browser_url}/{stack_module.TENANT}/oauth2/v2.0/logout"
    assert configuration["token_endpoint"].startswith("https://")
    assert stack.env()["BC_WEB_CLIENT_URL"] == f"{stack.servers['bc-web'].url}/webclient"
    assert stack.servers["bc-web"].url.startswith("http://127.0.0.1:")
    ada, = [u for u in stack.entra.users(stack_module.TENANT) if u["username"] == stack_module.USER_USERNAME]
    assert ada["app_roles"] == {stack_module.CLIENT_ID.lower(): [stack_module.OPERATOR_ROLE]}


def test_an_unregistered_redirect_uri_is_an_error_page_never_a_redirect(stack) -> None:
    flow = start_flow(stack_app(stack), redirect_uri="https://evil.example/auth/callback")
    with browser(stack.tls) as http:
        page = http.get(flow["auth_uri"])
    assert page.status_code == 400 and "location" not in page.headers
    assert "AADSTS50011" in page.text and "https://evil.example/auth/callback" in page.text
    assert "<form" not in page.text


def test_a_wrong_code_verifier_is_refused_and_the_code_stays_redeemable(stack) -> None:
    app = stack_app(stack)
    flow = start_flow(app)
    with browser(stack.tls) as http:
        params = callback_params(choose(http, flow["auth_uri"], stack_module.USER_NAME),
                                 "http://127.0.0.1:7071/auth/callback")

    refused = app.acquire_token_by_auth_code_flow({**flow, "code_verifier": "x" * 43}, params)

    assert refused["error"] == "invalid_grant" and 501481 in refused["error_codes"]
    assert "id_token" not in refused
    assert "error" not in app.acquire_token_by_auth_code_flow(flow, params)


def test_a_code_redeemed_once_is_refused_the_second_time(stack) -> None:
    app = stack_app(stack)
    flow = start_flow(app)
    with browser(stack.tls) as http:
        params = callback_params(choose(http, flow["auth_uri"], stack_module.USER_NAME),
                                 "http://127.0.0.1:7071/auth/callback")

    first = app.acquire_token_by_auth_code_flow(dict(flow), params)
    second = app.acquire_token_by_auth_code_flow(dict(flow), params)

    assert "id_token" in first
    assert second["error"] == "invalid_grant" and 54005 in second["error_codes"]


def test_a_wrong_client_secret_is_refused_before_the_code_is_looked_at(stack) -> None:
    flow = start_flow(stack_app(stack))
    with browser(stack.tls) as http:
        params = callback_params(choose(http, flow["auth_uri"], stack_module.USER_NAME),
                                 "http://127.0.0.1:7071/auth/callback")

    refused = stack_app(stack, secret="not-the-secret").acquire_token_by_auth_code_flow(dict(flow), params)

    assert refused["error"] == "invalid_client" and 7000215 in refused["error_codes"]
    assert "id_token" in stack_app(stack).acquire_token_by_auth_code_flow(dict(flow), params)


def test_an_expired_code_is_refused(stack) -> None:
    app = stack_app(stack)
    flow = start_flow(app)
    stack.entra.auth_code_lifetime_seconds = 0
    try:
        with browser(stack.tls) as http:
            params = callback_params(choose(http, flow["auth_uri"], stack_module.USER_NAME),
                                     "http://127.0.0.1:7071/auth/callback")
    finally:
        stack.entra.auth_code_lifetime_seconds = 600
    refused = app.acquire_token_by_auth_code_flow(flow, params)
    assert refused["error"] == "invalid_grant" and 70008 in refused["error_codes"]


def test_cancel_and_prompt_none_come_back_as_errors_msal_returns(stack) -> None:
    app = stack_app(stack)
    flow = start_flow(app)
    with browser(stack.tls) as http:
        cancelled = callback_params(choose(http, flow["auth_uri"], "Cancel"), "http://127.0.0.1:7071/auth/callback")
        silent_flow = start_flow(app, prompt="none")
        silent = callback_params(http.get(silent_flow["auth_uri"]), "http://127.0.0.1:7071/auth/callback")

    assert app.acquire_token_by_auth_code_flow(flow, cancelled)["error"] == "access_denied"
    assert cancelled["error_description"].startswith("AADSTS65004:")
    assert silent["error"] == "login_required" and silent["state"] == silent_flow["state"]


def test_sign_out_returns_to_a_registered_uri_else_shows_a_page(stack) -> None:
    with browser(stack.tls) as http:
        configuration = http.get(f"{stack.servers['entra'].url}/{stack_module.TENANT}/v2.0/.well-known/openid-configuration").json()
        logout = configuration["end_session_endpoint"]
        back = http.get(logout, params={"post_logout_redirect_uri": "http://127.0.0.1:7071/auth/callback"})
        elsewhere = http.get(logout, params={"post_logout_redirect_uri": "https://evil.example/"})
    assert back.status_code == 302 and back.headers["location"] == "http://127.0.0.1:7071/auth/callback"
    assert elsewhere.status_code == 200 and "You signed out of your account" in elsewhere.text


def authorize_url(url: str, tenant: str = TENANT, **params: str) -> str:
    defaults = {"client_id": CLIENT_ID, "response_type": "code", "redirect_uri": "https://app.example/callback",
                "scope": "openid profile offline_access", "state": "s1", "nonce": "n1",
                "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "code_challenge_method": "S256"}
    return f"{url}/{tenant}/oauth2/v2.0/authorize?{urlencode({**defaults, **params})}"


def test_the_account_picker_escapes_what_it_shows_and_sends_back(entra, tls: TlsFiles) -> None:
    sim, url = entra
    sim.register_redirect_uri(TENANT, CLIENT_ID, "https://app.example/callback")
    sim.add_user(TENANT, name='<script>alert("x")</script>', username="mallory@contoso.onmicrosoft.com")
    state = '"><script>alert(1)</script>'
    with browser(tls) as http:
        page = http.get(authorize_url(url, state=state))
        answer = choose(http, authorize_url(url, state=state), "mallory@")
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
    assert parse_form(page.text).hidden["state"] == state
    assert callback_params(answer, "https://app.example/callback")["state"] == state


def test_a_tenant_without_users_says_so(entra, tls: TlsFiles) -> None:
    sim, url = entra
    sim.register_client("empty.onmicrosoft.com", CLIENT_ID, SECRET)
    sim.register_redirect_uri("empty.onmicrosoft.com", CLIENT_ID, "https://app.example/callback")
    with browser(tls) as http:
        page = http.get(authorize_url(url, tenant="empty.onmicrosoft.com"))
    assert page.status_code == 200 and "There are no user accounts in the directory" in page.text
    assert [b["label"] for b in parse_form(page.text).buttons] == ["Cancel"]


def test_authorize_refuses_unknown_clients_on_a_page_and_bad_requests_by_redirect(entra, tls: TlsFiles) -> None:
    sim, url = entra
    sim.register_redirect_uri(TENANT, CLIENT_ID, "https://app.example/callback")
    with browser(tls) as http:
        unknown = http.get(authorize_url(url, client_id="ffffffff-0000-4000-8000-000000000000"))
        implicit = http.get(authorize_url(url, response_type="token"))
        no_scope = http.get(authorize_url(url, scope=""))
    assert unknown.status_code == 400 and "AADSTS700016" in unknown.text and "location" not in unknown.headers
    assert callback_params(implicit, "https://app.example/callback")["error"] == "unsupported_response_type"
    assert callback_params(no_scope, "https://app.example/callback")["error"] == "invalid_request"


def test_form_post_response_mode_posts_the_code_to_the_app(entra, tls: TlsFiles) -> None:
    sim, url = entra
    sim.register_redirect_uri(TENANT, CLIENT_ID, "https://app.example/callback")
    sim.add_user(TENANT, name="Bea Bookkeeper", username="bea@contoso.onmicrosoft.com")
    with browser(tls) as http:
        page = choose(http, authorize_url(url, response_mode="form_post"), "Bea Bookkeeper")
    form = parse_form(page.text)
    assert page.status_code == 200 and form.action == "https://app.example/callback"
    assert form.hidden["state"] == "s1" and form.hidden["code"] and [b["label"] for b in form.buttons] == ["Continue"]


def test_redirect_uris_and_users_are_checked_when_registered(entra) -> None:
    sim, _ = entra
    for bad in ("http://app.example/callback", "https://*.example/callback", "https://app.example/cb#x", "/callback"):
        with pytest.raises(ValueError):
            sim.register_redirect_uri(TENANT, CLIENT_ID, bad)
    with pytest.raises(KeyError):
        sim.register_redirect_uri(TENANT, "ffffffff-0000-4000-8000-000000000000", "https://app.example/callback")
    sim.register_redirect_uri(TENANT, CLIENT_ID, "http://localhost/callback")
    sim.register_redirect_uri(TENANT, CLIENT_ID, "http://localhost/callback")
    assert sim.redirect_uris(TENANT, CLIENT_ID).count("http://localhost/callback") == 1

    first = sim.add_user(TENANT, name="Cy", username="cy@contoso.onmicrosoft.com", app_roles={CLIENT_ID: ["A"]})
    again = sim.add_user(TENANT, name="Cy C.", username="CY@contoso.onmicrosoft.com")
    assert again["oid"] == first["oid"] and again["app_roles"] == {} and again["name"] == "Cy C."
    with pytest.raises(TypeError):
        sim.add_user(TENANT, name="Di", username="di@contoso.onmicrosoft.com", app_roles={CLIENT_ID: "A"})


# Federated identity credential: the app registration trusts the user-assigned managed identity ---------

EXCHANGE = tokens.TOKEN_EXCHANGE_AUDIENCE


@pytest.fixture
def federation(sandbox, monkeypatch: pytest.MonkeyPatch, trust_sim_ca):
    """The session's SandboxStack with CLIENT_ID trusting the managed identity, and the settings a
    secret-less app gets (the identity endpoint in this process's environment, as App Service sets it)."""
    for name, value in sandbox.tls.trust_env().items():
        monkeypatch.setenv(name, value)
    settings = sandbox.trust_managed_identity()
    for audience, roles in tokens.APP_ROLES.items():  # the app's own permissions (a test may have changed them)
        sandbox.entra.set_roles(stack_module.TENANT, stack_module.CLIENT_ID, audience, roles)
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
        monkeypatch.setenv(name, settings[name])
    return sandbox, settings


def identity_client(client_id: str) -> msal.ManagedIdentityClient:
    return msal.ManagedIdentityClient(msal.UserAssignedManagedIdentity(client_id=client_id),
                                      http_client=requests.Session())


def secret_less_app(sandbox, client_id: str, assertion) -> msal.ConfidentialClientApplication:
    """A confidential client whose only credential is an assertion callable (msal calls it per request)."""
    return msal.ConfidentialClientApplication(
        client_id, client_credential={"client_assertion": assertion},
        authority=f"{sandbox.servers['entra'].url}/{stack_module.TENANT}", instance_discovery=False)


def identity_assertion(identity_client_id: str):
    """What the app does: the user-assigned identity's token for api://AzureADTokenExchange, from msal."""
    identity = identity_client(identity_client_id)

    def assertion() -> str:
        result = identity.acquire_token_for_client(resource=EXCHANGE)
        assert "access_token" in result, result
        return result["access_token"]
    return assertion


def unverified(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def trusting_client(sandbox, **credential) -> str:
    """A new secret-less app registration in the stack's tenant, with the federated credential given
    (keyword arguments of `add_federated_credential`; none: no credential at all)."""
    client_id = str(uuid.uuid4())
    sandbox.entra.register_client(stack_module.TENANT, client_id, None)
    if credential:
        sandbox.entra.add_federated_credential(stack_module.TENANT, client_id, **{"name": "fic", **credential})
    return client_id


def test_a_secret_less_app_trusting_its_managed_identity_gets_tokens_as_the_app_registration(federation) -> None:
    sandbox, settings = federation
    entra = sandbox.entra
    assert "AZURE_CLIENT_SECRET" not in settings and settings["AZURE_CLIENT_ID"] == stack_module.CLIENT_ID
    assert settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"] == entra.managed_identity_client_id
    presented: list[str] = []
    fetch = identity_assertion(settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"])

    def assertion() -> str:
        presented.append(fetch())
        return presented[-1]
    app = secret_less_app(sandbox, settings["AZURE_CLIENT_ID"], assertion)
    exchanged = entra.tokens_issued[EXCHANGE]

    graph = claims_of(app.acquire_token_for_client(scopes=[GRAPH_SCOPE]), tokens.GRAPH_AUDIENCE)
    bc = claims_of(app.acquire_token_for_client(scopes=[BC_SCOPE]), tokens.BC_AUDIENCE)

    for claims in (graph, bc):  # the app registration, with its permissions, never the managed identity
        assert claims["appid"] == stack_module.CLIENT_ID and claims["tid"] == stack_module.TENANT
    assert graph["roles"] == list(tokens.APP_ROLES[tokens.GRAPH_AUDIENCE])
    assert bc["roles"] == list(tokens.APP_ROLES[tokens.BC_AUDIENCE])
    assert len(presented) == 2 and entra.tokens_issued[EXCHANGE] == exchanged + 1  # msal cached the MI token
    with browser(sandbox.tls) as http:
        configuration = http.get(f"{sandbox.servers['entra'].url}/{stack_module.TENANT}/v2.0/.well-known/"
                                 "openid-configuration").json()
        jwks = http.get(configuration["jwks_uri"]).json()
    header = jwt.get_unverified_header(presented[0])
    key = next(k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == header["kid"])
    mi = jwt.decode(presented[0], key.key, algorithms=["RS256"], audience=EXCHANGE,
                    issuer=f"https://login.microsoftonline.com/{stack_module.TENANT}/v2.0")
    assert mi["sub"] == mi["oid"] == entra.managed_identity_principal_id
    assert mi["azp"] == mi["appid"] == entra.managed_identity_client_id and mi["tid"] == stack_module.TENANT
    assert "roles" not in mi and mi["exp"] - mi["iat"] <= 24 * 3600
    credential, = [c for c in entra.federated_credentials(stack_module.TENANT, stack_module.CLIENT_ID)
                   if c["name"] == stack_module.FEDERATED_CREDENTIAL]
    assert credential == {"name": "api-managed-identity", "issuer": mi["iss"], "subject": mi["sub"],
                          "audiences": [EXCHANGE], "description": credential["description"]}


def test_trusting_the_managed_identity_again_keeps_one_credential(federation) -> None:
    sandbox, _ = federation
    sandbox.trust_managed_identity()
    names = [c["name"] for c in sandbox.entra.federated_credentials(stack_module.TENANT, stack_module.CLIENT_ID)]
    assert names.count(stack_module.FEDERATED_CREDENTIAL) == 1


def test_the_managed_identity_endpoint_picks_the_user_assigned_identity_by_any_documented_id(federation) -> None:
    sandbox, _ = federation
    entra = sandbox.entra
    for identity in (msal.UserAssignedManagedIdentity(client_id=entra.managed_identity_client_id.upper()),
                     msal.UserAssignedManagedIdentity(object_id=entra.managed_identity_principal_id),
                     msal.UserAssignedManagedIdentity(resource_id=entra.managed_identity_resource_id)):
        client = msal.ManagedIdentityClient(identity, http_client=requests.Session())
        result = client.acquire_token_for_client(resource=f"{EXCHANGE}/.default")
        assert unverified(result["access_token"])["sub"] == entra.managed_identity_principal_id
    other = identity_client("00000000-0000-4000-8000-0000000000ff").acquire_token_for_client(resource=EXCHANGE)
    assert "access_token" not in other and "Unable to load the proper Managed Identity" in other["error_description"]


def test_an_app_without_federated_credentials_refuses_the_managed_identity(federation) -> None:
    sandbox, settings = federation
    client_id = trusting_client(sandbox)
    app = secret_less_app(sandbox, client_id, identity_assertion(settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"]))

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert "access_token" not in result
    assert result["error"] == "invalid_client" and result["error_codes"] == [70025]
    assert "no configured federated identity credentials" in result["error_description"]


def test_a_removed_federated_credential_no_longer_lets_the_identity_in(federation) -> None:
    sandbox, settings = federation
    issuer = tokens.entra_issuer(stack_module.TENANT)
    client_id = trusting_client(sandbox, issuer=issuer, subject=sandbox.entra.managed_identity_principal_id)
    assertion = identity_assertion(settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"])
    assert "access_token" in secret_less_app(sandbox, client_id, assertion).acquire_token_for_client(scopes=[GRAPH_SCOPE])

    sandbox.entra.remove_federated_credential(stack_module.TENANT, client_id, name="fic")

    refused = secret_less_app(sandbox, client_id, assertion).acquire_token_for_client(scopes=[GRAPH_SCOPE])
    assert refused["error_codes"] == [70025]
    with pytest.raises(KeyError):
        sandbox.entra.remove_federated_credential(stack_module.TENANT, client_id, name="fic")


@pytest.mark.parametrize(("credential", "code", "named"), [
    # The classic mistake: the identity's client id where its principal (object) id belongs.
    ({"subject": "client id"}, 700213, "subject"),
    ({"subject": "principal id, upper case"}, 700213, "subject"),  # compared case-sensitively
    ({"issuer": "https://login.microsoftonline.com/{tenant}/v2.0/"}, 700211, "issuer"),  # one slash too many
    ({"issuer": "https://sts.windows.net/{tenant}/"}, 700211, "issuer"),  # the v1.0 issuer
    ({"issuer": "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"}, 700211, "issuer"),
    ({"audiences": ["api://AzureADTokenExchangeUSGov"]}, 700212, "audience"),  # another cloud's audience
])
def test_a_federated_credential_that_does_not_match_the_assertion_exactly_is_refused(
        federation, credential: dict, code: int, named: str) -> None:
    sandbox, settings = federation
    entra = sandbox.entra
    subjects = {"client id": entra.managed_identity_client_id,
                "principal id, upper case": entra.managed_identity_principal_id.upper()}
    configured = {"issuer": tokens.entra_issuer(stack_module.TENANT), "subject": entra.managed_identity_principal_id,
                  **credential}
    configured["subject"] = subjects.get(configured["subject"], configured["subject"])
    configured["issuer"] = configured["issuer"].format(tenant=stack_module.TENANT)
    client_id = trusting_client(sandbox, **configured)  # accepted when written, as in Entra
    app = secret_less_app(sandbox, client_id, identity_assertion(settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"]))

    result = app.acquire_token_for_client(scopes=[BC_SCOPE])

    assert "access_token" not in result
    assert result["error"] == "invalid_client" and result["error_codes"] == [code]
    assert result["error_description"].startswith(
        f"AADSTS{code}: No matching federated identity record found for presented assertion {named} ")


def test_an_expired_managed_identity_token_is_refused(federation) -> None:
    sandbox, settings = federation
    entra = sandbox.entra
    entra.managed_identity_token_lifetime_seconds = 1
    try:
        stale = identity_assertion(settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"])()
    finally:
        entra.managed_identity_token_lifetime_seconds = None
    time.sleep(max(0.0, unverified(stale)["exp"] - time.time()) + 0.05)
    app = secret_less_app(sandbox, stack_module.CLIENT_ID, lambda: stale)  # an assertion kept too long

    result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])

    assert "access_token" not in result
    assert result["error"] == "invalid_client" and result["error_codes"] == [700024]
    assert "not within its valid time range" in result["error_description"]


def test_an_assertion_not_signed_by_entra_is_refused(federation) -> None:
    sandbox, settings = federation
    genuine = identity_assertion(settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"])()
    claims = unverified(genuine)
    forged = tokens.SigningKey().sign(claims)  # the same claims, signed with a key Entra never published
    header, _, signature = genuine.split(".")
    payload = base64.urlsafe_b64encode(json.dumps({**claims, "exp": claims["exp"] + 3600}).encode()).rstrip(b"=")
    tampered = f"{header}.{payload.decode()}.{signature}"  # Entra's signature over other claims

    for assertion in (forged, tampered):
        result = secret_less_app(sandbox, stack_module.CLIENT_ID, lambda a=assertion: a).acquire_token_for_client(
            scopes=[GRAPH_SCOPE])
        assert "access_token" not in result
        assert result["error"] == "invalid_client" and result["error_codes"] == [700027]


def test_a_secret_less_app_redeems_a_sign_in_code_with_its_federated_credential(stack, federation) -> None:
    sandbox, settings = federation
    app = secret_less_app(sandbox, stack_module.CLIENT_ID,
                          identity_assertion(settings["AZURE_FEDERATED_IDENTITY_CLIENT_ID"]))
    flow = start_flow(app)
    with browser(sandbox.tls) as http:
        params = callback_params(choose(http, flow["auth_uri"], stack_module.USER_NAME),
                                 "http://127.0.0.1:7071/auth/callback")

    result = app.acquire_token_by_auth_code_flow(flow, params)

    assert "error" not in result, result
    assert result["id_token_claims"]["aud"] == stack_module.CLIENT_ID
    assert result["id_token_claims"]["roles"] == [stack_module.OPERATOR_ROLE]


def test_federated_credentials_are_checked_when_written(federation) -> None:
    sandbox, _ = federation
    entra, tenant = sandbox.entra, stack_module.TENANT
    client_id = trusting_client(sandbox)
    issuer = tokens.entra_issuer(tenant)
    for bad_name in ("ab", "-starts-with-a-dash", "has space", "x" * 121, "ünïcode"):
        with pytest.raises(ValueError, match="name"):
            entra.add_federated_credential(tenant, client_id, name=bad_name, issuer=issuer, subject="s")
    with pytest.raises(ValueError, match="exactly one audience"):
        entra.add_federated_credential(tenant, client_id, name="two", issuer=issuer, subject="s",
                                       audiences=[EXCHANGE, "api://other"])
    with pytest.raises(TypeError):
        entra.add_federated_credential(tenant, client_id, name="str", issuer=issuer, subject="s", audiences=EXCHANGE)
    with pytest.raises(ValueError):
        entra.add_federated_credential(tenant, client_id, name="long", issuer=issuer, subject="s" * 601)
    with pytest.raises(KeyError):
        entra.add_federated_credential(tenant, "ffffffff-0000-4000-8000-000000000000", name="fic", issuer=issuer,
                                       subject="s")
    entra.add_federated_credential(tenant, client_id, name="fic-0", issuer=issuer, subject="s-0")
    with pytest.raises(ValueError, match="already"):
        entra.add_federated_credential(tenant, client_id, name="FIC-0", issuer=issuer, subject="other")
    with pytest.raises(ValueError, match="Issuer and subject combination already exists"):
        entra.add_federated_credential(tenant, client_id, name="again", issuer=issuer, subject="s-0")
    for n in range(1, 20):
        entra.add_federated_credential(tenant, client_id, name=f"fic-{n}", issuer=issuer, subject=f"s-{n}")
    with pytest.raises(ValueError, match="at most 20"):
        entra.add_federated_credential(tenant, client_id, name="fic-20", issuer=issuer, subject="s-20")
    assert len(entra.federated_credentials(tenant, client_id)) == 20
    entra.register_client(tenant, client_id, None)  # registering again keeps them
    assert len(entra.federated_credentials(tenant, client_id)) == 20


# Single sign-on, guests, disabled accounts and bad ID tokens ---------------------------------------

def signed_in_browser(stack, app, account: str = stack_module.USER_NAME):
    """A browser that signed in once (the simulator's SSO cookie set) and the tokens of that sign-in."""
    http = browser(stack.tls)
    flow = start_flow(app)
    params = callback_params(choose(http, flow["auth_uri"], account), "http://127.0.0.1:7071/auth/callback")
    return http, app.acquire_token_by_auth_code_flow(flow, params)


def test_sign_out_asks_which_account_unless_hinted_and_ends_only_that_one(stack) -> None:
    """"To use `logout_hint`, enable the `login_hint` optional claim": the sandbox's app has it."""
    stack.entra.add_user(stack_module.TENANT, name="Bo Bookkeeper", username="bo@contoso.example",
                         app_roles={stack_module.CLIENT_ID: [stack_module.OPERATOR_ROLE]})
    app = stack_app(stack)
    http, ada = signed_in_browser(stack, app)
    try:
        bo = app.acquire_token_by_auth_code_flow(*_signed_in_again(http, app, "Bo Bookkeeper"))
        logout = f"{stack.servers['entra-browser'].url}/{stack_module.TENANT}/oauth2/v2.0/logout"
        asked = http.get(logout, params={"post_logout_redirect_uri": "http://127.0.0.1:7071/auth/callback"})
        ended = http.get(logout, params={"post_logout_redirect_uri": "http://127.0.0.1:7071/auth/callback",
                                         "logout_hint": ada["id_token_claims"]["login_hint"]})
        ada_silent = start_flow(app, prompt="none", login_hint=stack_module.USER_USERNAME)
        ada_answer = callback_params(http.get(ada_silent["auth_uri"]), "http://127.0.0.1:7071/auth/callback")
        bo_silent = start_flow(app, prompt="none", login_hint="bo@contoso.example")
        bo_answer = callback_params(http.get(bo_silent["auth_uri"]), "http://127.0.0.1:7071/auth/callback")
    finally:
        http.close()
    assert ada["id_token_claims"]["login_hint"] != bo["id_token_claims"]["login_hint"]
    assert asked.status_code == 200 and "Which account do you want to sign out of?" in asked.text
    assert stack_module.USER_NAME in asked.text and "Bo Bookkeeper" in asked.text
    assert ended.status_code == 302 and ended.headers["location"] == "http://127.0.0.1:7071/auth/callback"
    assert ada_answer["error"] == "login_required", "the hinted account's session ended"
    assert "code" in bo_answer, "the browser's other account stays signed in"


def test_an_app_that_does_not_ask_for_login_hint_gets_none(stack) -> None:
    stack.entra.set_optional_claims(stack_module.TENANT, stack_module.CLIENT_ID, [])
    try:
        http, result = signed_in_browser(stack, stack_app(stack))
        http.close()
    finally:
        stack.entra.set_optional_claims(stack_module.TENANT, stack_module.CLIENT_ID, ["login_hint"])
    assert "login_hint" not in result["id_token_claims"]


def _signed_in_again(http: httpx.Client, app, account: str) -> tuple[dict, dict]:
    flow = start_flow(app)
    return flow, callback_params(choose(http, flow["auth_uri"], account), "http://127.0.0.1:7071/auth/callback")


def test_prompt_none_signs_in_the_hinted_user_of_the_browsers_session_without_a_page(stack) -> None:
    app = stack_app(stack)
    http, _ = signed_in_browser(stack, app)
    try:
        silent = start_flow(app, prompt="none", login_hint=stack_module.USER_USERNAME)
        answer = http.get(silent["auth_uri"])
        other = start_flow(app, prompt="none", login_hint="someone.else@contoso.example")
        refused = callback_params(http.get(other["auth_uri"]), "http://127.0.0.1:7071/auth/callback")
    finally:
        http.close()
    result = app.acquire_token_by_auth_code_flow(silent, callback_params(answer, "http://127.0.0.1:7071/auth/callback"))
    assert result["id_token_claims"]["oid"] == stack_module.USER_OID, "a code, no account picker"
    assert refused["error"] == "login_required", "the hinted user is not signed in in this browser"


def test_signing_out_ends_the_browsers_session_for_prompt_none(stack) -> None:
    app = stack_app(stack)
    http, signed_in = signed_in_browser(stack, app)
    try:
        configuration = http.get(f"{stack.servers['entra'].url}/{stack_module.TENANT}/v2.0/.well-known/openid-configuration").json()
        http.get(configuration["end_session_endpoint"], params={"logout_hint": signed_in["id_token_claims"]["login_hint"]})
        silent = start_flow(app, prompt="none", login_hint=stack_module.USER_USERNAME)
        answer = callback_params(http.get(silent["auth_uri"]), "http://127.0.0.1:7071/auth/callback")
    finally:
        http.close()
    assert answer["error"] == "login_required"


@pytest.mark.parametrize("answer", ["interaction_required", "access_denied"])
def test_a_disabled_account_cannot_sign_in_silently_or_at_the_picker(stack, answer) -> None:
    app = stack_app(stack)
    http, _ = signed_in_browser(stack, app)
    stack.entra.set_user_enabled(stack_module.TENANT, stack_module.USER_USERNAME, False)
    stack.entra.disabled_user_error = answer
    try:
        silent = start_flow(app, prompt="none", login_hint=stack_module.USER_USERNAME)
        refused = callback_params(http.get(silent["auth_uri"]), "http://127.0.0.1:7071/auth/callback")
        picked = choose(http, start_flow(app)["auth_uri"], stack_module.USER_NAME)
    finally:
        http.close()
        stack.entra.set_user_enabled(stack_module.TENANT, stack_module.USER_USERNAME, True)
        stack.entra.disabled_user_error = "interaction_required"
    assert refused["error"] == answer and "AADSTS50057" in refused["error_description"]
    assert picked.status_code == 400 and "AADSTS50057" in picked.text


def test_a_guests_id_token_names_their_home_tenant_as_identity_provider(stack) -> None:
    home = "0c8d5b3e-0000-4000-8000-00000000fab1"
    stack.entra.add_user(stack_module.TENANT, name="Gus Guest", username="gus_fabrikam.example#EXT#@contoso.example",
                         guest_of=home)
    app = stack_app(stack)
    http, guest = signed_in_browser(stack, app, "Gus Guest")
    http.close()
    http, member = signed_in_browser(stack, app)
    http.close()
    named = {}
    try:
        for form in ("issuer", "v1"):
            stack.entra.member_idp = form
            http, named[form] = signed_in_browser(stack, app)
            http.close()
    finally:
        stack.entra.member_idp = None
    assert guest["id_token_claims"]["idp"] == f"https://sts.windows.net/{home}/"
    assert "idp" not in member["id_token_claims"]
    assert named["issuer"]["id_token_claims"]["idp"] == named["issuer"]["id_token_claims"]["iss"]
    assert named["v1"]["id_token_claims"]["idp"] == f"https://sts.windows.net/{named['v1']['id_token_claims']['tid']}/"


@pytest.mark.parametrize("kind, refusal", [
    ("issuer", jwt.InvalidIssuerError), ("audience", jwt.InvalidAudienceError), ("expired", jwt.ExpiredSignatureError),
    ("not-yet-valid", jwt.ImmatureSignatureError), ("signature", jwt.InvalidSignatureError),
    ("unknown-key", jwt.PyJWKClientError), ("unsigned", jwt.PyJWKClientError),
    ("no-oid", jwt.MissingRequiredClaimError), ("tenant", None), ("nonce", None)])
def test_each_kind_of_bad_id_token_is_bad_in_exactly_that_way(stack, kind, refusal) -> None:
    app = stack_app(stack)
    good = signed_in_browser(stack, app)[1]["id_token_claims"]
    stack.entra.spoil_id_tokens(kind)
    http = browser(stack.tls)
    flow = start_flow(app)
    params = callback_params(choose(http, flow["auth_uri"], stack_module.USER_NAME), "http://127.0.0.1:7071/auth/callback")
    http.close()
    if kind == "nonce":
        with pytest.raises(RuntimeError, match="nonce"):  # msal compares the nonce itself
            app.acquire_token_by_auth_code_flow(flow, params)
        return
    token = app.acquire_token_by_auth_code_flow(flow, params)["id_token"]
    issuer = f"{stack.servers['entra'].url}/{stack_module.TENANT}/v2.0"
    keys = jwt.PyJWKClient(f"{stack.servers['entra'].url}/{stack_module.TENANT}/discovery/v2.0/keys",
                           ssl_context=ssl.create_default_context(cafile=str(stack.tls.ca_bundle)))

    def check() -> dict:
        return jwt.decode(token, keys.get_signing_key_from_jwt(token).key, algorithms=["RS256"],
                          audience=stack_module.CLIENT_ID, issuer=issuer,
                          options={"require": ["iss", "aud", "exp", "nbf", "iat", "oid", "tid"]})

    if refusal is None:
        assert check()["tid"] != good["tid"]
    else:
        with pytest.raises(refusal):
            check()
    with pytest.raises(ValueError, match="unknown kind"):
        stack.entra.spoil_id_tokens("something-else")
