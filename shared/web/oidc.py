"""Entra ID as the OpenID provider of the pages' sign-in: its discovery document (issuer, signing
keys, end-session endpoint) and the validation of the ID tokens it issues.

MSAL no longer validates ID tokens (msal 1.38: "MSAL's token acquisition no longer validates the
ID token; validation is the application's responsibility"), so the app does, as Microsoft's
"ID tokens" page lists, with PyJWT and the tenant's published keys (`PyJWKClient`, one per
process, caching the key set): the signature (RS256, a key of the tenant's JWKS), `iss` (the
tenant's v2.0 issuer, from discovery), `aud` (the app's client id), `tid` (the app's tenant),
`exp`, `nbf` and `iat` (with `SKEW_SECONDS` of clock skew), and the sign-in's nonce. Anything
else is an `InvalidIdToken` naming the reason; the token itself is never logged or shown."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests

from shared.settings import Settings

if TYPE_CHECKING:
    import jwt

SKEW_SECONDS = 300
"""Clock skew allowed on `exp`, `nbf` and `iat` (Microsoft.IdentityModel's default is 5 minutes)."""
DISCOVERY_SECONDS = 24 * 3600
KEYS_SECONDS = 3600
REQUIRED_CLAIMS = ["iss", "aud", "exp", "nbf", "iat", "sub", "tid", "oid"]

REASONS = {
    "malformed": "it is not a well-formed token with the claims an ID token has",
    "key": "it is signed with a key Entra ID does not publish for the tenant",
    "signature": "its signature does not match",
    "issuer": "it was issued by another authority or tenant (iss)",
    "audience": "it was issued to another application (aud)",
    "tenant": "it names another tenant (tid)",
    "expired": "it has expired (exp)",
    "not-yet-valid": "it is not valid yet (nbf, iat)",
    "nonce": "its nonce is not this sign-in's",
    "keys-unavailable": "Entra ID's signing keys could not be read",
}
"""Why an ID token was refused, by reason code, in words for the log and the page."""


class InvalidIdToken(Exception):
    def __init__(self, reason: str):
        super().__init__(REASONS[reason])
        self.reason = reason


class DiscoveryFailed(Exception):
    """The tenant's OpenID configuration could not be read (Entra down, wrong tenant or host)."""


@dataclass(frozen=True)
class Provider:
    issuer: str
    tenant_id: str
    """The tenant's id as the issuer names it (a GUID, even when AZURE_TENANT_ID is a domain name)."""
    authorization_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None


_session = requests.Session()  # honours REQUESTS_CA_BUNDLE: trust comes from the environment
_providers: dict[tuple[str, str], tuple[float, Provider]] = {}
_key_clients: dict[str, jwt.PyJWKClient] = {}
_lock = threading.Lock()


def discovery_url(settings: Settings) -> str:
    return f"{settings.authority_host}/{settings.tenant_id}/v2.0/.well-known/openid-configuration"


def provider(settings: Settings) -> Provider:
    """The tenant's OpenID configuration, read once a day per process (blocking: call off the loop)."""
    settings.require("tenant_id")
    key = (settings.authority_host, str(settings.tenant_id).lower())
    with _lock:
        cached = _providers.get(key)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    try:
        response = _session.get(discovery_url(settings), timeout=settings.http_timeout_seconds)
        response.raise_for_status()
        document = response.json()
        issuer = str(document["issuer"])
        found = Provider(issuer, urlsplit(issuer).path.strip("/").split("/")[0],
                         str(document["authorization_endpoint"]), str(document["jwks_uri"]),
                         document.get("end_session_endpoint"))
    except (requests.RequestException, ValueError, KeyError, TypeError) as error:
        raise DiscoveryFailed(f"the OpenID configuration of tenant {settings.tenant_id} at "
                              f"{settings.authority_host} could not be read ({error.__class__.__name__})") from None
    if not issuer.startswith(settings.authority_host + "/") or not issuer.endswith("/v2.0"):
        raise DiscoveryFailed(f"the OpenID configuration names the issuer {issuer}, not a v2.0 issuer of "
                              f"{settings.authority_host}")
    with _lock:
        _providers[key] = (time.monotonic() + DISCOVERY_SECONDS, found)
    return found


def _keys(jwks_uri: str) -> jwt.PyJWKClient:
    import jwt  # PyJWT brings cryptography's X.509 (13 ms): only a sign-in needs it, not every instance's start

    with _lock:
        client = _key_clients.get(jwks_uri)
        if client is None:
            # A key Entra rolls over to is fetched on first sight (after a 30 s cool-down).
            client = _key_clients[jwks_uri] = jwt.PyJWKClient(jwks_uri, cache_jwk_set=True, lifespan=KEYS_SECONDS,
                                                             timeout=30)
        return client


def nonce_hash(nonce: str) -> str:
    """What MSAL sends as the nonce (and so what the ID token carries): the SHA-256 of its own."""
    return hashlib.sha256(nonce.encode("ascii")).hexdigest()


def validate(token: str, found: Provider, client_id: str, nonce: str) -> dict:
    """The claims of a valid ID token for this app, tenant and sign-in (`nonce` as sent in the
    authorize request); `InvalidIdToken` otherwise. Blocking (the key set may be fetched)."""
    import jwt

    try:
        if jwt.get_unverified_header(token).get("alg") != "RS256":  # no "none", no HMAC with the public key
            raise InvalidIdToken("signature")
        signing_key = _keys(found.jwks_uri).get_signing_key_from_jwt(token)
    except jwt.PyJWKClientConnectionError:
        raise InvalidIdToken("keys-unavailable") from None
    except jwt.PyJWKClientError:
        raise InvalidIdToken("key") from None
    except jwt.DecodeError:
        raise InvalidIdToken("malformed") from None
    try:
        claims = jwt.decode(token, signing_key.key, algorithms=["RS256"], audience=client_id, issuer=found.issuer,
                            leeway=SKEW_SECONDS, options={"require": REQUIRED_CLAIMS})
    except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
        raise InvalidIdToken("signature") from None
    except jwt.ExpiredSignatureError:
        raise InvalidIdToken("expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidIdToken("not-yet-valid") from None
    except jwt.InvalidAudienceError:
        raise InvalidIdToken("audience") from None
    except jwt.InvalidIssuerError:
        raise InvalidIdToken("issuer") from None
    except jwt.InvalidTokenError:  # a missing claim, a claim of the wrong type, bad encoding
        raise InvalidIdToken("malformed") from None
    if str(claims["tid"]).lower() != found.tenant_id.lower():
        raise InvalidIdToken("tenant")
    if claims.get("nonce") != nonce:
        raise InvalidIdToken("nonce")
    return claims
