"""The ID tokens the simulated Entra ID issues to users who sign in, and the bad ones it can be
told to issue instead, so that tests prove an app refuses each.

A good token is a v2.0 ID token signed RS256 with the simulator's key (in its JWKS): `aud` the
client, `iss` the tenant's issuer, `iat`/`nbf`/`exp`, pairwise `sub`, `tid`, `ver` 2.0, the
authorize request's `nonce`; with `profile` `name`, `preferred_username`, `oid`; with `email`
`email`; `roles` when the user holds app roles of the client; `idp` for a guest (the home
tenant's v1 issuer), and for a member as `EntraSimulator.member_idp` says. `EntraSimulator.spoil_id_tokens(kind, times)` makes the next tokens bad in one
way of `SPOILS`."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from typing import Any

from sandbox.tokens import SigningKey

ID_TOKEN_LIFETIME_SECONDS = 3600

SPOILS = {
    "issuer": "`iss` is another tenant's issuer",
    "audience": "`aud` is another application",
    "tenant": "`tid` is another tenant",
    "expired": "`exp` passed an hour ago",
    "not-yet-valid": "`nbf` and `iat` are an hour ahead",
    "signature": "signed by another key under the published key's `kid`",
    "unknown-key": "signed by a key the JWKS does not list",
    "unsigned": "`alg` none, no signature",
    "nonce": "`nonce` of another sign-in",
    "no-oid": "without `oid`",
}
"""The bad ID tokens the simulator can issue, by kind."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def id_token_claims(*, client_id: str, tenant: str, issuer: str, oid: str, name: str, username: str,
                    consented: tuple[str, ...], nonce: str | None, roles: tuple[str, ...] | None,
                    auth_time: int | None, home_tenant: str | None, member_idp: str | None) -> dict[str, Any]:
    now = int(time.time())
    subject = _b64(hashlib.sha256(f"{tenant.lower()}|{client_id.lower()}|{oid}".encode()).digest())
    claims: dict[str, Any] = {"aud": client_id, "iss": issuer, "iat": now, "nbf": now,
                              "exp": now + ID_TOKEN_LIFETIME_SECONDS}
    if "profile" in consented:
        claims.update(name=name, oid=oid, preferred_username=username)
    if "email" in consented:
        claims["email"] = username
    if nonce is not None:
        claims["nonce"] = nonce
    if roles:
        claims["roles"] = list(roles)
    if auth_time is not None:
        claims["auth_time"] = auth_time
    if home_tenant is not None:  # a guest: authenticated by their home tenant
        claims["idp"] = f"https://sts.windows.net/{home_tenant}/"
    elif member_idp == "issuer":
        claims["idp"] = issuer
    elif member_idp == "v1":  # the form Entra names a guest's home tenant in, naming the member's own
        claims["idp"] = f"https://sts.windows.net/{tenant}/"
    claims.update(sub=subject, tid=tenant, uti=_b64(secrets.token_bytes(16)), ver="2.0")
    return claims


def sign(claims: dict[str, Any], key: SigningKey, spoil: str | None = None) -> str:
    """The ID token for `claims`, signed with `key`, or made bad as `spoil` says."""
    if spoil is None:
        return key.sign(claims)
    claims = dict(claims)
    if spoil == "issuer":
        claims["iss"] = claims["iss"].replace(claims["tid"], str(uuid.uuid4()))
    elif spoil == "audience":
        claims["aud"] = str(uuid.uuid4())
    elif spoil == "tenant":
        claims["tid"] = str(uuid.uuid4())
    elif spoil == "expired":
        claims.update(iat=claims["iat"] - 7200, nbf=claims["nbf"] - 7200, exp=claims["iat"] - 3600)
    elif spoil == "not-yet-valid":
        claims.update(iat=claims["iat"] + 3600, nbf=claims["nbf"] + 3600, exp=claims["exp"] + 3600)
    elif spoil == "nonce":
        claims["nonce"] = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    elif spoil == "no-oid":
        claims.pop("oid", None)
    elif spoil == "signature":
        forged = key.sign(claims).split(".")
        other = SigningKey().sign(claims).split(".")
        return f"{forged[0]}.{forged[1]}.{other[2]}"
    elif spoil == "unknown-key":
        return SigningKey().sign(claims)
    elif spoil == "unsigned":
        header = _b64(json.dumps({"typ": "JWT", "alg": "none"}).encode())
        return f"{header}.{_b64(json.dumps(claims).encode())}."
    else:
        raise ValueError(f"unknown kind of bad ID token {spoil!r}; known: {sorted(SPOILS)}")
    return key.sign(claims)
