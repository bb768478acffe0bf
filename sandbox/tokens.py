"""Tokens as the simulated Entra ID issues them and the simulated APIs check them.

Access tokens are real JWTs (HS256 with a key shared by the simulators), so the app sees the same
shape as in Azure and the APIs can refuse a token meant for another audience, one that expired,
or one without the application permission (`roles` claim) an operation needs. A token for an app
with no permission on the audience carries no `roles` claim at all, as Entra ID issues it.

ID tokens (user sign-in) and the managed identity's tokens for `TOKEN_EXCHANGE_AUDIENCE` (the
assertion of a federated identity credential) are signed RS256 by a `SigningKey` made at start-up,
whose public half Entra publishes as a JWK (``kid`` in the token's header), so an app can validate
them as it validates Entra's own, and Entra can check an assertion it issued itself (`SigningKey.verify`)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

_KEY = b"bookings-invoicing-simulators-not-a-secret"

GRAPH_AUDIENCE = "https://graph.microsoft.com"
BC_AUDIENCE = "https://api.businesscentral.dynamics.com"
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
"""The audience of a managed identity's token used as a federated identity credential (global Azure)."""
ENTRA_AUTHORITY = "https://login.microsoftonline.com"

BOOKINGS_READ = "Bookings.Read.All"
BOOKINGS_APPOINTMENT_READ_WRITE = "BookingsAppointment.ReadWrite.All"
BOOKINGS_READ_WRITE = "Bookings.ReadWrite.All"
BOOKINGS_MANAGE = "Bookings.Manage.All"
BC_API_READ_WRITE = "API.ReadWrite.All"

APP_ROLES: Mapping[str, tuple[str, ...]] = {
    GRAPH_AUDIENCE: (BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE),
    BC_AUDIENCE: (BC_API_READ_WRITE,),
}
"""The application permissions the app needs, per audience: what a client gets unless told otherwise."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def entra_issuer(tenant: str) -> str:
    """The v2.0 issuer of a tenant, as Entra writes it in ``iss`` (and a federated credential's issuer)."""
    return f"{ENTRA_AUTHORITY}/{tenant}/v2.0"


def issue(audience: str, tenant: str, client_id: str, lifetime_seconds: int = 3600,
          roles: Iterable[str] | None = None) -> str:
    """An app-only (v1.0) access token; `roles` None means the app's own permissions on `audience`
    (`APP_ROLES`), an empty list a token without any."""
    now = int(time.time())
    granted = list(APP_ROLES.get(audience, ()) if roles is None else roles)
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{tenant}/", "tid": tenant, "appid": client_id,
              "idtyp": "app", "ver": "1.0", "iat": now, "nbf": now, "exp": now + lifetime_seconds}
    if granted:
        claims["roles"] = granted
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(_KEY, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def issue_delegated(audience: str, tenant: str, client_id: str, *, oid: str, name: str, upn: str,
                    scopes: Iterable[str], lifetime_seconds: int = 3600) -> str:
    """A user's (delegated, v1.0) access token: ``scp`` the delegated permissions, ``oid``/``upn``
    the user, ``idtyp`` ``user``; no ``roles`` (a user's app roles are for the app's own API)."""
    now = int(time.time())
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{tenant}/", "tid": tenant, "appid": client_id,
              "idtyp": "user", "ver": "1.0", "iat": now, "nbf": now, "exp": now + lifetime_seconds,
              "oid": oid, "sub": oid, "upn": upn, "unique_name": upn, "name": name, "scp": " ".join(scopes)}
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(_KEY, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


class SigningKey:
    """An RSA key pair and a self-signed certificate for it, made when the simulator starts: it
    signs ID tokens (RS256, ``kid`` in the header) and is published in the JWKS (`jwk`)."""

    def __init__(self, subject: str = "accounts.sandbox.invalid") -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(days=1))
                       .not_valid_after(now + datetime.timedelta(days=365))
                       .sign(self._key, hashes.SHA256()))
        der = certificate.public_bytes(serialization.Encoding.DER)
        self._x5c = base64.b64encode(der).decode()
        self.kid = _b64(hashlib.sha1(der, usedforsecurity=False).digest())  # x5t (RFC 7517): SHA-1 by definition
        self.public_pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, claims: Mapping) -> str:
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(dict(claims)).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def verify(self, token: str) -> dict:
        """The claims of a JWT this key signed (RS256, its ``kid``); `InvalidToken` for anything else:
        malformed, another key, another algorithm or a signature that does not match. Times and
        audience are the caller's to check."""
        try:
            header_b64, claims_b64, signature_b64 = token.split(".")
            header = json.loads(_unb64(header_b64))
            if not isinstance(header, dict) or header.get("alg") != "RS256" or header.get("kid") != self.kid:
                raise InvalidToken("The key was not found.")
            self._key.public_key().verify(_unb64(signature_b64), f"{header_b64}.{claims_b64}".encode(),
                                          padding.PKCS1v15(), hashes.SHA256())
            claims = json.loads(_unb64(claims_b64))
        except InvalidSignature as error:
            raise InvalidToken("The signature does not match.") from error
        except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError and binascii.Error are ValueErrors
            raise InvalidToken("Token is malformed.") from error
        if not isinstance(claims, dict):
            raise InvalidToken("Token is malformed.")
        return claims

    def jwk(self, issuer: str) -> dict:
        """The public key as Entra's ``/discovery/v2.0/keys`` lists it."""
        numbers = self._key.public_key().public_numbers()

        def integer(value: int) -> str:
            return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

        return {"kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid, "n": integer(numbers.n),
                "e": integer(numbers.e), "x5c": [self._x5c], "issuer": issuer}


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


def roles_of(claims: Mapping) -> frozenset[str]:
    """The application permissions a verified token carries (none when it has no `roles` claim)."""
    roles = claims.get("roles")
    return frozenset(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else frozenset()
