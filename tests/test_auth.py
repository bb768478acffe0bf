"""Tokens from Entra ID as the app registration: by federated credential (no secret) or client secret;
one cache per process."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from sandbox.stack import CLIENT_ID, FEDERATED_CREDENTIAL, TENANT
from shared.upstream.auth import AuthenticationFailed, TokenProvider
from shared.settings import BC_SCOPE, GRAPH_SCOPE, SettingsError, get_settings
from tests.helpers import body


def token_for(scope: str) -> str:
    return asyncio.run(TokenProvider(get_settings()).token(scope))


def test_a_sync_asks_entra_once_per_scope_and_reuses_the_token(world):
    before = dict(world.sandbox.entra.tokens_issued)
    world.sync_calendars()
    world.sync_calendars()
    issued = {k: v - before.get(k, 0) for k, v in world.sandbox.entra.tokens_issued.items()}
    assert issued.get("https://graph.microsoft.com", 0) <= 1


def test_a_wrong_secret_fails_with_the_reason_and_never_the_secret(world):
    world.configure(AZURE_CLIENT_SECRET="definitely-wrong-secret")
    with pytest.raises(AuthenticationFailed) as raised:
        token_for(GRAPH_SCOPE)
    assert "invalid_client" in str(raised.value)
    assert "definitely-wrong-secret" not in str(raised.value)


def secret_less(world) -> None:
    """The app as `azd up` configures it by default: no secret, the app registration trusting the
    Function App's user-assigned managed identity through a federated credential."""
    world.monkeypatch.delenv("AZURE_CLIENT_SECRET")
    for name, value in world.sandbox.trust_managed_identity().items():
        world.configure(**{name: value})


def test_with_a_federated_credential_the_app_works_without_any_secret(world):
    secret_less(world)
    world.graph.put_appointment(world.business_ids[0], {
        "startDateTime": {"dateTime": "2026-11-20T09:00:00Z", "timeZone": "UTC"},
        "endDateTime": {"dateTime": "2026-11-20T10:00:00Z", "timeZone": "UTC"}, "customers": []})
    world.configure(SYNC_LOOKBACK_DAYS="3650", SYNC_LOOKAHEAD_DAYS="3650")

    world.sync_calendars()

    status = body(world.host.http("GET", "status"))
    assert status["lastSync"]["counts"]["fetched"] == 1
    assert all(check["ok"] for check in status["checks"]), status["checks"]
    claims = json.loads(base64.urlsafe_b64decode(token_for(BC_SCOPE).split(".")[1] + "=="))
    assert claims["appid"] == CLIENT_ID, "Graph and BC see the app registration, not the managed identity"


def test_a_managed_identity_the_app_registration_does_not_trust_is_refused_with_the_reason(world):
    secret_less(world)
    world.sandbox.entra.remove_federated_credential(TENANT, CLIENT_ID, name=FEDERATED_CREDENTIAL)
    with pytest.raises(AuthenticationFailed) as raised:
        token_for(GRAPH_SCOPE)
    assert "AADSTS70025" in str(raised.value) and "invalid_client" in str(raised.value)


def test_without_a_secret_or_a_federated_credential_the_settings_are_named(world):
    world.monkeypatch.delenv("AZURE_CLIENT_SECRET")
    world.monkeypatch.delenv("AZURE_FEDERATED_IDENTITY_CLIENT_ID", raising=False)
    with pytest.raises(SettingsError, match="AZURE_FEDERATED_IDENTITY_CLIENT_ID.*AZURE_CLIENT_SECRET"):
        token_for(GRAPH_SCOPE)
    response = world.host.http("GET", "status")
    assert "AZURE_FEDERATED_IDENTITY_CLIENT_ID" in response.get_body().decode()
    anonymous = body(world.host.http("GET", "health", key=False))
    assert anonymous["failedChecks"] == ["graph", "businessCentral"], "anyone learns which check failed, not why"


def token_requests(world) -> int:
    return sum(count for shape, count in world.sandbox.entra.plan.stats.requests.items()
               if shape.startswith("POST ") and shape.endswith("/oauth2/v2.0/token"))


def test_entra_throttling_defers_the_work_without_a_request_storm(world, monkeypatch):
    """Entra ID answers a token request 429 with `Retry-After: 60`, and msal answers from that 429
    for as long: the app asks once, and the sync is put off rather than retried meanwhile."""
    monkeypatch.setattr("shared.upstream.auth._providers", {})  # no cached token: the sync must ask Entra ID
    assert world.sandbox.entra.plan.knobs.retry_after_seconds == 60
    world.sandbox.entra.plan.reset_stats()
    world.sandbox.entra.plan.script("POST", r"/oauth2/v2.0/token$", "429", times=1)

    world.sync_calendars()
    world.sync_calendars()

    assert token_requests(world) == 1, "asked once within the minute Entra ID named, however often the work runs"
    last = body(world.host.http("GET", "status"))["lastSync"]
    assert last["outcome"] != "succeeded"
    assert any("throttling the app's token requests" in e["message"] for e in last["errors"]), last["errors"]
