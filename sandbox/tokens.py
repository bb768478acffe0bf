"""Access tokens as the simulated Entra ID issues them and the simulated APIs check them.

Real JWTs (HS256 with a key shared by the simulators), so the app sees the same shape as in
Azure and the APIs can refuse a token meant for another audience or one that expired."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

_KEY = b"bookings-invoicing-simulators-not-a-secret"

GRAPH_AUDIENCE = "https://graph.microsoft.com"
BC_AUDIENCE = "https://api.businesscentral.dynamics.com"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(audience: str, tenant: str, client_id: str, lifetime_seconds: int = 3600) -> str:
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"aud": audience, "tid": tenant, "appid": client_id, "iat": now, "nbf": now,
              "exp": now + lifetime_seconds, "roles": ["simulated"]}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(_KEY, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


class InvalidToken(Exception):
    pass


def verify(authorization: str | None, audience: str) -> dict:
    """Check an `Authorization: Bearer …` header; return the claims or raise `InvalidToken`."""
    if not authorization or not authorization.startswith("Bearer "):
        raise InvalidToken("Bearer token is missing.")
    token = authorization[len("Bearer "):]
    try:
        header_b64, claims_b64, signature_b64 = token.split(".")
        expected = hmac.new(_KEY, f"{header_b64}.{claims_b64}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature_b64)):
            raise InvalidToken("Token signature is invalid.")
        claims = json.loads(_unb64(claims_b64))
    except (ValueError, json.JSONDecodeError) as error:
        raise InvalidToken("Token is malformed.") from error
    if claims.get("aud") != audience:
        raise InvalidToken(f"Token audience {claims.get('aud')!r} is not {audience!r}.")
    if claims.get("exp", 0) < time.time():
        raise InvalidToken("Token has expired.")
    return claims
