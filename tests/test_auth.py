"""Tokens from Entra ID: client secret, certificate, managed identity; one cache per process."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sandbox.stack import TENANT
from shared.auth import AuthenticationFailed, TokenProvider
from shared.settings import BC_SCOPE, GRAPH_SCOPE, get_settings
from tests.helpers import body


def token_for(scope: str) -> str:
    return asyncio.run(TokenProvider(get_settings()).token(scope))


def test_a_sync_asks_entra_once_per_scope_and_reuses_the_token(world):
    before = dict(world.sandbox.entra.tokens_issued)
    world.host.timer("sync_bookings")
    world.host.timer("sync_bookings")
    issued = {k: v - before.get(k, 0) for k, v in world.sandbox.entra.tokens_issued.items()}
    assert issued.get("https://graph.microsoft.com", 0) <= 1


def test_a_wrong_secret_fails_with_the_reason_and_never_the_secret(world):
    world.configure(AZURE_CLIENT_SECRET="definitely-wrong-secret")
    with pytest.raises(AuthenticationFailed) as raised:
        token_for(GRAPH_SCOPE)
    assert "invalid_client" in str(raised.value)
    assert "definitely-wrong-secret" not in str(raised.value)


def test_without_a_secret_the_managed_identity_is_used(world):
    world.monkeypatch.delenv("AZURE_CLIENT_SECRET")
    world.monkeypatch.delenv("AZURE_CLIENT_ID")
    for name, value in world.sandbox.entra.managed_identity_env(world.sandbox.servers["entra"].url).items():
        world.configure(**{name: value})
    world.graph.put_appointment(world.business_ids[0], {
        "startDateTime": {"dateTime": "2026-11-20T09:00:00Z", "timeZone": "UTC"},
        "endDateTime": {"dateTime": "2026-11-20T10:00:00Z", "timeZone": "UTC"}, "customers": []})
    world.configure(SYNC_LOOKBACK_DAYS="3650", SYNC_LOOKAHEAD_DAYS="3650")

    world.host.timer("sync_bookings")

    assert body(world.host.http("GET", "health", key=False))["lastSync"]["counts"]["fetched"] == 1
    assert token_for(BC_SCOPE)


def _self_signed(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bookings-invoicing")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    path = tmp_path / "client.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()) + certificate.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_certificate_can_replace_the_secret(world, tmp_path):
    client_id = "c0ffee00-0000-4000-8000-00000000ce27"
    world.sandbox.entra.register_client(TENANT, client_id, None)
    world.monkeypatch.delenv("AZURE_CLIENT_SECRET")
    world.configure(AZURE_CLIENT_ID=client_id, AZURE_CLIENT_CERTIFICATE_PATH=str(_self_signed(tmp_path)))
    assert token_for(GRAPH_SCOPE).count(".") == 2


def test_an_unreadable_certificate_names_the_setting(world, tmp_path):
    world.monkeypatch.delenv("AZURE_CLIENT_SECRET")
    world.configure(AZURE_CLIENT_CERTIFICATE_PATH=str(tmp_path / "missing.pem"))
    from shared.settings import SettingsError

    with pytest.raises(SettingsError, match="AZURE_CLIENT_CERTIFICATE_PATH"):
        token_for(GRAPH_SCOPE)
