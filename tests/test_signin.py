"""Signing in to the operator pages, in process, through the simulated Entra ID's own pages: the ID
token is validated (each kind of bad token refused with a 401 page saying why, logged without the
token), sessions live server-side (idle and absolute timeouts, sign-out ends them everywhere and
at Entra ID), roles are re-read within the hour, guests stay out, and the cookies are strict."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
import weakref
from urllib.parse import parse_qs, urlsplit

import pytest

from sandbox.entra_idtokens import SPOILS
from sandbox.stack import CLIENT_ID, OPERATOR_ROLE, TENANT, TENANT_DOMAIN, USER_NAME, USER_USERNAME, seed_users
from shared.web import sessions
from shared.storage.store import SESSIONS
from tests.helpers import body, merge_row, rows
from shared.web.signin import session_token
from tests.signin_helpers import Browser, EntraBrowser, keys_of
from tests.test_security import JWT, everything_logged

SITE = "https://bookings.example"
"""The pages' address in Azure (TLS ends at the front end; the app sees the host's name)."""


@pytest.fixture
def person(world):
    browser = EntraBrowser(world)
    yield browser
    browser.close()


def text(response) -> str:
    return response.get_body().decode() if hasattr(response, "get_body") else response.text


def live_sessions(world) -> list[dict]:
    return rows(world, SESSIONS)


def rewind(world, field: str, seconds: float) -> None:
    """Move a stored session's clock back, as if that much time had passed (no sleeping)."""
    for row in live_sessions(world):
        merge_row(world, SESSIONS, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"],
                                    field: float(row[field]) - seconds})


# -- signing in ------------------------------------------------------------------------------------

def test_signing_in_at_entra_id_starts_a_server_side_session_and_opens_the_page(world, person):
    page = person.sign_in("/api/pages/jobs")

    assert page.status_code == 200 and USER_NAME in text(page)
    [row] = live_sessions(world)
    assert row["Oid"] and row["Roles"] == f'["{OPERATOR_ROLE}"]' and row["Guest"] is False
    cookie_value = person.app.values["bi_session"]
    assert cookie_value not in str(row) and row["PartitionKey"] != cookie_value, "the table holds no token"
    token = session_token(f"bi_session={cookie_value}", keys_of(world), secure=False)
    assert len(base64.urlsafe_b64decode(token + "==")) >= 32, "at least 256 random bits"
    assert row["PartitionKey"] == hashlib.sha256(token.encode()).hexdigest()
    assert "bi_signin" not in person.app.values, "the flow cookie is deleted after its callback"
    assert any(c.startswith("bi_signin=;") and "Max-Age=0" in c for c in person.app.set_cookies)


def test_a_tenant_configured_by_domain_name_signs_in_with_guid_tokens(world, person):
    """Entra names a tenant by its GUID whatever name it was asked by: in the issuer the app
    validates ID tokens against, in `tid` and `iss`."""
    from shared.web.oidc import provider
    from shared.settings import get_settings

    world.configure(AZURE_TENANT_ID=TENANT_DOMAIN)
    world.monkeypatch.setattr("shared.upstream.auth._providers", {})

    found = provider(get_settings())
    page = person.sign_in("/api/pages/jobs")

    assert found.tenant_id == TENANT and found.issuer.endswith(f"/{TENANT}/v2.0")
    assert page.status_code == 200 and USER_NAME in text(page)
    [row] = live_sessions(world)
    assert row["Tid"] == TENANT
    world.sync_calendars()  # the app's own tokens come from the tenant named by its domain too
    assert body(world.host.http("GET", "status"))["lastSync"]["outcome"] == "succeeded"


def test_the_sign_in_keeps_no_refresh_token_and_no_token_cache(world, person):
    start = person.get("/api/pages/bookings")
    authorize = person.get(start.headers["Location"]).headers["Location"]
    scopes = parse_qs(urlsplit(authorize).query)["scope"][0].split()
    assert "offline_access" not in scopes and {"openid", "profile"} <= set(scopes)
    before = len(world.sandbox.entra._refresh_tokens)

    person.follow(person.entra.get(authorize))

    assert len(world.sandbox.entra._refresh_tokens) == before, "Entra issued no refresh token"
    from shared.web import signin

    assert not [name for name in vars(signin) if isinstance(getattr(signin, name), dict)
                and any(hasattr(v, "get_accounts") for v in getattr(signin, name).values())]


@pytest.mark.parametrize("kind", sorted(SPOILS))
def test_every_kind_of_bad_id_token_is_refused_with_a_reason_and_logged_without_the_token(world, person, kind,
                                                                                          caplog):
    caplog.set_level(logging.INFO)
    world.sandbox.entra.spoil_id_tokens(kind)

    page = person.sign_in()

    assert page.status_code == 401, (kind, text(page))
    assert "ID token" in text(page) and "Sign in" in text(page)
    assert live_sessions(world) == [] and "bi_session" not in person.app.values
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "pages_signin_failed"]
    assert record.reason == "id-token" and record.detail in {
        "issuer": "issuer", "audience": "audience", "tenant": "tenant", "expired": "expired",
        "not-yet-valid": "not-yet-valid", "signature": "signature", "unknown-key": "key",
        "unsigned": "signature", "nonce": "nonce", "no-oid": "malformed"}[kind]
    logged = everything_logged(caplog.records)
    assert not JWT.findall(logged), "no token in the logs"


def test_a_good_token_after_a_bad_one_signs_in(world, person):
    world.sandbox.entra.spoil_id_tokens("expired")
    assert person.sign_in().status_code == 401
    assert person.sign_in().status_code == 200


def test_an_error_from_entra_is_shown_as_text_on_a_401_page(world, person):
    crafted = '<meta http-equiv="refresh" content="0;url=https://evil.example/">%s %(x)s 100%'
    page = person.get(f"/api/pages/signin/callback?error=access_denied&error_description={crafted}")
    assert page.status_code == 401
    html = text(page)
    assert "<meta http-equiv" not in html and "&lt;meta http-equiv=&#34;refresh&#34;" in html
    assert "access_denied" in html


def test_a_callback_without_its_sign_in_is_refused(world, person):
    page = person.get("/api/pages/signin/callback?code=1.Afake&state=forged")
    assert page.status_code == 401 and "another browser" in text(page)
    assert live_sessions(world) == []


# -- sessions ----------------------------------------------------------------------------------------

def test_signing_out_ends_the_session_everywhere_and_at_entra_id(world, person):
    person.sign_in()
    copied = person.app.header()
    page = person.get("/api/pages/setup")
    signed_out = person.app_request("POST", "/api/pages/signout", form={"csrf": person.csrf_of(text(page))})

    assert signed_out.status_code == 200 and live_sessions(world) == []
    end_session = re.search(r'<a class="button" id="end-session" data-continue="1" href="([^"]+)"', text(signed_out))
    assert end_session, text(signed_out)
    ending = urlsplit(end_session.group(1).replace("&amp;", "&"))
    assert ending.path == f"/{TENANT}/oauth2/v2.0/logout"
    assert parse_qs(ending.query)["logout_hint"], "Entra ends this account's session without asking which"
    landed = person.entra.get(end_session.group(1).replace("&amp;", "&"))
    assert landed.status_code == 302, "no account picker"
    back = person.follow(landed)
    assert back.status_code == 200 and "You are signed out" in text(back)
    replay = world.host.http("GET", "pages/bookings", key=False, headers={"cookie": copied})
    assert replay.status_code == 302 and "/api/pages/signin" in replay.headers["Location"], \
        "a copied cookie is worthless after sign-out"
    silent = person.get("/api/pages/signin?renew=1")
    assert "prompt=none" not in silent.headers["Location"], "nothing left to renew"


def test_without_the_login_hint_claim_entra_asks_which_account_to_sign_out_of(world, person):
    world.sandbox.entra.set_optional_claims(TENANT, CLIENT_ID, [])
    try:
        page = person.sign_in("/api/pages/setup")
    finally:
        world.sandbox.entra.set_optional_claims(TENANT, CLIENT_ID, ["login_hint"])
    signed_out = person.app_request("POST", "/api/pages/signout", form={"csrf": person.csrf_of(text(page))})
    end_session = re.search(r'id="end-session" data-continue="1" href="([^"]+)"', text(signed_out)).group(1)

    asked = person.entra.get(end_session.replace("&amp;", "&"))

    assert "logout_hint" not in end_session
    assert asked.status_code == 200 and "Which account do you want to sign out of?" in asked.text
    assert "You are signed out" in text(person.follow(asked)), "the person picks the account, and is back"


def test_a_session_unused_for_30_minutes_ends(world, person):
    person.sign_in()
    rewind(world, "LastSeenAt", sessions.IDLE_SECONDS - 120)
    assert person.get("/api/pages/jobs").status_code == 200, "used within the half hour: still alive"
    rewind(world, "LastSeenAt", sessions.IDLE_SECONDS + 1)

    answer = person.get("/api/pages/jobs")

    assert answer.status_code == 302 and answer.headers["Location"].startswith("/api/pages/signin?")
    assert live_sessions(world) == []


def test_a_session_ends_8_hours_after_sign_in_however_busy(world, person):
    person.sign_in()
    rewind(world, "CreatedAt", sessions.ABSOLUTE_SECONDS + 1)

    assert person.get("/api/pages/jobs").status_code == 302
    assert live_sessions(world) == []


def test_the_domain_clock_decides_the_timeouts(world):
    async def scenario():
        from shared.runtime import runtime

        store = await runtime().store()
        principal = sessions.Principal("oid-1", TENANT, "Ada", "ada@contoso.example", (OPERATOR_ROLE,))
        start = 1_900_000_000.0
        token, _ = await sessions.start(store, principal, start)
        alive = await sessions.find(store, token, start + sessions.IDLE_SECONDS - 1)
        busy = [await sessions.find(store, token, start + minutes * 60) for minutes in range(25, 8 * 60, 25)]
        late = await sessions.find(store, token, start + sessions.ABSOLUTE_SECONDS)
        return alive, busy, late

    alive, busy, late = world.host.run(scenario(), 60)
    assert alive[0] is not None and all(session is not None for session, _ in busy)
    assert late == (None, "expired")


def test_sessions_nobody_can_use_any_more_are_deleted_at_the_next_sign_in(world, monkeypatch):
    monkeypatch.setattr("shared.web.sessions._pruned", weakref.WeakKeyDictionary())

    async def scenario():
        from shared.runtime import runtime

        store = await runtime().store()
        principal = sessions.Principal("oid-2", TENANT, "Ada", "ada@contoso.example", (OPERATOR_ROLE,))
        start = time.time() - sessions.ABSOLUTE_SECONDS - 60
        await sessions.start(store, principal, start)  # 8 hours old
        await sessions.start(store, principal, time.time() - sessions.IDLE_SECONDS - 60)  # unused for 31 minutes
        sessions._pruned.clear()  # the next sign-in of this process prunes again
        fresh, _ = await sessions.start(store, principal, time.time())
        return fresh

    fresh = world.host.run(scenario(), 60)
    assert [row["PartitionKey"] for row in live_sessions(world)] == [sessions.token_key(fresh)]


def test_roles_are_read_again_within_the_hour_silently(world, person):
    person.sign_in()
    [first] = live_sessions(world)
    rewind(world, "RolesAt", sessions.RENEW_SECONDS + 1)

    page = person.get("/api/pages/jobs")
    assert page.status_code == 302 and "renew=1" in page.headers["Location"]
    authorize = person.get(page.headers["Location"]).headers["Location"]
    assert parse_qs(urlsplit(authorize).query)["prompt"] == ["none"]
    assert parse_qs(urlsplit(authorize).query)["login_hint"] == [USER_USERNAME]
    landed = person.follow(person.entra.get(authorize), account=None)

    assert landed.status_code == 200 and USER_NAME in text(landed), "no account picker: single sign-on"
    [renewed] = live_sessions(world)
    assert renewed["PartitionKey"] != first["PartitionKey"], "a new session id"
    assert renewed["CreatedAt"] == first["CreatedAt"], "the 8 hours still count from the first sign-in"


def test_a_removed_app_role_loses_access_within_the_hour(world, person):
    person.sign_in()
    world.sandbox.entra.add_user(TENANT, name=USER_NAME, username=USER_USERNAME, app_roles={CLIENT_ID: []})
    assert person.get("/api/pages/jobs").status_code == 200, "the roles read at sign-in hold for now"
    rewind(world, "RolesAt", sessions.ROLES_SECONDS + 1)

    landed = person.follow(person.get("/api/pages/jobs"), account=None)

    assert landed.status_code == 403 and OPERATOR_ROLE in text(landed)
    seed_users(world.sandbox.entra)


def test_a_form_sent_with_roles_older_than_the_hour_is_refused_until_they_are_read_again(world, person):
    person.sign_in()
    csrf = person.csrf_of(text(person.get("/api/pages/setup")))
    rewind(world, "RolesAt", sessions.ROLES_SECONDS + 1)

    refused = person.app_request("POST", "/api/pages/setup", form={"action": "sync", "csrf": csrf})

    assert refused.status_code == 401 and "renewed" in text(refused)


def test_a_disabled_account_loses_access_within_the_hour(world, person):
    person.sign_in()
    world.sandbox.entra.set_user_enabled(TENANT, USER_USERNAME, False)
    try:
        rewind(world, "RolesAt", sessions.ROLES_SECONDS + 1)
        landed = person.follow(person.get("/api/pages/jobs"), account=None)
        assert "Pick an account" in text(landed), "the silent sign-in failed: Entra asks the person"
        refused = person.follow(landed, account=USER_NAME)
        assert refused.status_code == 400 and "AADSTS50057" in text(refused)
    finally:
        world.sandbox.entra.set_user_enabled(TENANT, USER_USERNAME, True)


@pytest.mark.parametrize("answer", ["interaction_required", "access_denied"])
def test_either_answer_entra_may_give_a_disabled_account_ends_its_access(world, person, answer):
    world.sandbox.entra.disabled_user_error = answer
    person.sign_in()
    world.sandbox.entra.set_user_enabled(TENANT, USER_USERNAME, False)
    try:
        rewind(world, "RolesAt", sessions.ROLES_SECONDS + 1)
        landed = person.follow(person.get("/api/pages/jobs"), account=None)
        assert getattr(landed, "status_code", 200) != 302
        assert USER_NAME not in text(landed) or "Pick an account" in text(landed)
        assert "data-booking" not in text(landed) and "Invoicing jobs</h1>" not in text(landed)
    finally:
        world.sandbox.entra.set_user_enabled(TENANT, USER_USERNAME, True)
        world.sandbox.entra.disabled_user_error = "interaction_required"


# -- who may use the pages -----------------------------------------------------------------------------

def test_a_guest_is_refused_unless_guests_are_allowed(world, person):
    world.sandbox.entra.add_user(TENANT, name="Gus Guest", username="gus_fabrikam.example#EXT#@contoso.example",
                                 app_roles={CLIENT_ID: [OPERATOR_ROLE]}, guest_of="0c8d5b3e-0000-4000-8000-00000000fab1")
    refused = person.sign_in(account="Gus Guest")
    assert refused.status_code == 403 and "Guest accounts" in text(refused)
    world.configure(PAGES_ALLOW_GUESTS="true")
    assert person.get("/api/pages/jobs").status_code == 200


@pytest.mark.parametrize("member_idp", [None, "issuer", "v1"])
def test_a_member_gets_in_whether_or_not_entra_names_the_identity_provider(world, person, member_idp):
    world.sandbox.entra.member_idp = member_idp
    try:
        assert person.sign_in().status_code == 200
    finally:
        world.sandbox.entra.member_idp = None


TID = "8f3c1e2a-0000-4000-8000-00000000e1d0"


@pytest.mark.parametrize("claims, guest", [
    ({}, False),
    ({"idp": f"https://login.microsoftonline.com/{TID}/v2.0"}, False),
    ({"idp": f"https://sts.windows.net/{TID}/"}, False),
    ({"idp": f"https://sts.windows.net/{TID.upper()}/"}, False),
    ({"idp": "https://sts.windows.net/0c8d5b3e-0000-4000-8000-00000000fab1/"}, True),
    ({"idp": "live.com"}, True),
    ({"idp": "google.com"}, True),
    ({"idp": "mail"}, True),
    ({"idp": f"https://evil.example/{TID}x/"}, True),
    ({"acct": 1}, True),
    ({"acct": 0, "idp": f"https://sts.windows.net/{TID}/"}, False),
])
def test_a_guest_is_told_by_the_tenant_idp_names_not_by_its_form(claims, guest):
    from shared.web.signin import _is_guest

    issuer = f"https://login.microsoftonline.com/{TID}/v2.0"
    assert _is_guest({"iss": issuer, "tid": TID, **claims}) is guest


def test_refusals_are_logged_with_the_reason(world, caplog):
    caplog.set_level(logging.INFO)
    Browser(world, roles=()).get("pages/bookings")
    browser = Browser(world)
    browser.post("pages/setup", {"action": "sync"}, csrf=False)
    reasons = {(r.event, r.reason) for r in caplog.records if getattr(r, "event", None) in
               ("pages_forbidden", "pages_csrf_refused")}
    assert reasons == {("pages_forbidden", "role"), ("pages_csrf_refused", "csrf")}
    assert browser.token not in everything_logged(caplog.records)


# -- cookies, headers and the redirect URI ---------------------------------------------------------------

def test_in_azure_cookies_are_secure_host_only_and_hsts_is_sent(world):
    world.configure(PAGES_REDIRECT_URI=f"{SITE}/api/pages/signin/callback")
    person = EntraBrowser(world, base_url=SITE)
    try:
        page = person.sign_in()
    finally:
        person.close()
    assert page.status_code == 200
    assert page.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    session = next(c for c in person.app.set_cookies if c.startswith("__Host-bi_session="))
    assert "; Secure" in session and "; Path=/;" in session and "HttpOnly" in session and "Domain" not in session
    assert all(c.startswith("__Host-") and "; Secure" in c for c in person.app.set_cookies)


def test_locally_on_loopback_cookies_work_over_plain_http(world, person):
    person.sign_in()
    assert all("Secure" not in c and c.startswith("bi_") for c in person.app.set_cookies)
    assert "Strict-Transport-Security" not in person.get("/api/pages/jobs").headers


def test_the_redirect_uri_comes_from_the_setting_never_the_host_header(world):
    world.configure(PAGES_REDIRECT_URI=f"{SITE}/api/pages/signin/callback")
    answer = world.host.http("GET", "pages/signin", key=False, base_url="https://evil.example")
    assert answer.status_code == 302
    sent = parse_qs(urlsplit(answer.headers["Location"]).query)["redirect_uri"]
    assert sent == [f"{SITE}/api/pages/signin/callback"]


def test_without_the_setting_only_a_loopback_request_can_sign_in(world):
    answer = world.host.http("GET", "pages/signin", key=False, base_url="https://func-x.azurewebsites.net")
    assert answer.status_code == 503 and "PAGES_REDIRECT_URI" in text(answer)


def test_a_form_from_another_origin_than_the_configured_one_is_refused(world):
    world.configure(PAGES_REDIRECT_URI=f"{SITE}/api/pages/signin/callback")
    browser = Browser(world, base_url=SITE)
    assert browser.post("pages/setup", {"action": "sync"}).status_code == 303
    refused = browser.post("pages/setup", {"action": "sync"}, headers={"origin": "https://evil.example"})
    assert refused.status_code == 403


def test_the_json_api_is_never_sniffed_or_cached(world):
    for method, path, key, params in (("GET", "health", False, None), ("GET", "status", True, None),
                                      ("GET", "templates", True, None), ("GET", "openapi.json", False, None),
                                      ("GET", "bookings/uninvoiced", True, {"top": "0"}),
                                      ("GET", "bookings/uninvoiced", True, {"top": "1"})):
        answer = world.host.http(method, path, key=key, params=params)
        assert answer.headers["X-Content-Type-Options"] == "nosniff", path
        assert answer.headers["Cache-Control"] == "no-store", path


def test_a_sign_in_reads_entra_discovery_and_keys_once_per_process(world, person):
    """One discovery per process and day, the key set once an hour: a later sign-in costs the code
    redemption only, not a fresh discovery and key download each time."""
    person.sign_in()
    before = world.sandbox.entra.plan.stats.total_requests
    another = EntraBrowser(world)
    try:
        assert another.sign_in().status_code == 200
    finally:
        another.close()
    assert world.sandbox.entra.plan.stats.total_requests - before == 1


class _Later:
    """`time` as PyJWT's key client sees it, `seconds` later: its cool-down between two forced
    fetches of the key set has passed (no sleeping)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def monotonic(self) -> float:
        return time.monotonic() + self.seconds

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_rolled_over_key_is_fetched_on_first_sight(world, person, monkeypatch):
    """Entra rolls its signing keys over; within the hour the app keeps the key set, an ID token
    signed with a key it has not seen makes it fetch the set again, once, rather than refuse the sign-in."""
    import jwt.jwks_client

    assert person.sign_in().status_code == 200  # the key set is cached now
    world.sandbox.entra.rotate_signing_key()
    monkeypatch.setattr(jwt.jwks_client, "time", _Later(31))
    before = world.sandbox.entra.plan.stats.requests.copy()
    another = EntraBrowser(world)
    try:
        page = another.sign_in("/api/pages/jobs")
    finally:
        another.close()

    assert page.status_code == 200 and USER_NAME in text(page)
    fetched = {shape: count - before.get(shape, 0) for shape, count in world.sandbox.entra.plan.stats.requests.items()}
    assert sum(count for shape, count in fetched.items() if shape.endswith("/discovery/v2.0/keys")) == 1
