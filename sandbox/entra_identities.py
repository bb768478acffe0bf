"""Who may ask the simulated Entra ID for app-only tokens besides a secret: federated identity
credentials on a registered app, and the App Service managed identity; and the registered apps
themselves (`RegisteredClient`, with the roles granted on each audience).

A federated identity credential is checked as Graph and Entra check it when it is written (at
most 20 per app, a name of 3 to 120 letters, digits, `-` or `_`, issuer and subject of at most
600 characters, exactly one audience). A token exchange is accepted only when the presented
token's signature, time range, `iss`, `sub` and `aud` match one of the app's credentials
exactly; otherwise AADSTS700211 (issuer), 700213 (subject) or 700212 (audience). The managed
identity answers at App Service's endpoint (`X-IDENTITY-HEADER`, api-version 2019-08-01).
Errors use the shapes the real services use: OAuth's JSON for the token endpoint, App Service's
`{"statusCode", "message"}` for the managed identity."""

from __future__ import annotations

import base64
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from starlette.requests import Request
from starlette.responses import JSONResponse

from sandbox import tokens

KNOWN_AUDIENCES = (tokens.GRAPH_AUDIENCE, tokens.BC_AUDIENCE)
MSI_API_VERSION = "2019-08-01"
MAX_FEDERATED_CREDENTIALS = 20
"""Entra: "A maximum of 20 federated identity credentials can be added to an application"."""

_FIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,119}")
_FIC_LIMIT = 600
_FIC_HELP = ("Check your federated identity credential Subject, Audience and Issuer against the presented "
             "assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation")
_MSI_SELECTORS = ("client_id", "principal_id", "object_id", "mi_res_id")

# Throttling and server faults injected by FaultMiddleware, in Entra's own vocabulary.
_FAULT_ERRORS = {
    429: ("temporarily_unavailable", 90055),
    500: ("server_error", 50000),
    503: ("temporarily_unavailable", 90033),
    504: ("server_error", 50000),
}


def oauth_body(error: str, code: int, description: str) -> dict:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    return {
        "error": error,
        "error_description": (f"AADSTS{code}: {description} Trace ID: {trace_id} "
                              f"Correlation ID: {correlation_id} Timestamp: {now}"),
        "error_codes": [code],
        "timestamp": now,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


def oauth_fault_body(status: int, code: str, message: str) -> dict:
    """FaultMiddleware error body: the OAuth error shape msal parses, not Graph's."""
    error, aadsts = _FAULT_ERRORS.get(status, ("server_error", 50000))
    return oauth_body(error, aadsts, message)


def oauth_error(status: int, error: str, code: int, description: str) -> JSONResponse:
    return JSONResponse(oauth_body(error, code, description), status_code=status,
                        headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def msi_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"statusCode": status, "message": message,
                         "correlationId": str(uuid.uuid4())}, status_code=status)


Roles = Mapping[str, Iterable[str]]
"""Granted application permissions by audience, e.g. ``{tokens.BC_AUDIENCE: ["API.ReadWrite.All"]}``."""


def granted_roles(roles: Roles | None) -> dict[str, tuple[str, ...]]:
    chosen = tokens.APP_ROLES if roles is None else roles
    unknown = set(chosen) - set(KNOWN_AUDIENCES)
    if unknown:
        raise ValueError(f"unknown audience(s) {sorted(unknown)}; known: {KNOWN_AUDIENCES}")
    if any(isinstance(granted, str) for granted in chosen.values()):
        raise TypeError("roles per audience must be a list of permission names, not one string")
    return {audience: tuple(dict.fromkeys(granted)) for audience, granted in chosen.items()}


@dataclass(frozen=True)
class FederatedCredential:
    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...]
    description: str

    def as_dict(self) -> dict:
        return {"name": self.name, "issuer": self.issuer, "subject": self.subject,
                "audiences": list(self.audiences), "description": self.description}


@dataclass
class RegisteredClient:
    tenant: str
    client_id: str
    secret: str | None
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    redirect_uris: list[str] = field(default_factory=list)
    federated_credentials: list[FederatedCredential] = field(default_factory=list)
    optional_claims: tuple[str, ...] = ()
    """Optional ID token claims the app registration asks for (`set_optional_claims`)."""


def check_federated_credential(name: str, issuer: str, subject: str, audiences: Iterable[str]) -> tuple[str, ...]:
    """What Graph and Entra refuse when a federated identity credential is written (not what they
    accept and only fail at token exchange: a wrong issuer, subject or audience is stored as given)."""
    if not isinstance(name, str) or not _FIC_NAME.fullmatch(name):
        raise ValueError(f"Federated Identity Credential name '{name}' is invalid: 3-120 characters, letters, "
                         "digits, '-' or '_', the first a letter or digit")
    if isinstance(audiences, str):
        raise TypeError("audiences is a list with one audience, not one string")
    chosen = tuple(audiences)
    if len(chosen) != 1:
        raise ValueError("Federated identity credentials must have exactly one audience.")
    for label, value in (("issuer", issuer), ("subject", subject), ("audience", chosen[0])):
        if not isinstance(value, str) or not value:
            raise ValueError(f"a federated identity credential needs a non-empty {label}")
        if len(value) > _FIC_LIMIT:
            raise ValueError(f"a federated identity credential's {label} has at most {_FIC_LIMIT} characters")
    return chosen


def iso_time(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return str(seconds)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%m/%d/%Y %H:%M:%S")


class WorkloadIdentities:
    """Workload identities of the simulated tenant: federated identity credentials on a registered app,
    and the App Service managed identity (its roles, its token endpoint, its token-exchange tokens).
    Mixed into `EntraSimulator`, whose lock, clients and signing key it uses."""

    def add_federated_credential(self, tenant: str, client_id: str, *, name: str, issuer: str, subject: str,
                                 audiences: Iterable[str] = (tokens.TOKEN_EXCHANGE_AUDIENCE,),
                                 description: str = "") -> None:
        """Add a federated identity credential to a registered app (Graph's
        ``POST /applications/{id}/federatedIdentityCredentials``): the app then accepts, as its
        client assertion, a token whose ``iss``, ``sub`` and ``aud`` are exactly `issuer`, `subject`
        and the one audience. To trust the simulator's managed identity: `issuer`
        ``tokens.entra_issuer(managed_identity_tenant)``, `subject` `managed_identity_principal_id`.

        KeyError for an unknown client; ValueError for what Entra refuses when the credential is
        written: a name that is not 3-120 letters, digits, ``-`` or ``_`` (the first a letter or
        digit) or is taken, not exactly one audience, an empty value or one over 600 characters, an
        issuer and subject the app already trusts, a 21st credential. A wrong issuer, subject or
        audience is accepted, as in Entra, and fails only at token exchange."""
        chosen = check_federated_credential(name, issuer, subject, audiences)
        credential = FederatedCredential(name, issuer, subject, chosen, description)
        with self._lock:
            client = self._clients[(tenant.lower(), client_id.lower())]
            held = client.federated_credentials
            if any(c.name.lower() == name.lower() for c in held):
                raise ValueError(f"the app already has a federated identity credential named {name!r}")
            if any(c.issuer == issuer and c.subject == subject for c in held):
                raise ValueError("Issuer and subject combination already exists for this application.")
            if len(held) >= MAX_FEDERATED_CREDENTIALS:
                raise ValueError(f"an application has at most {MAX_FEDERATED_CREDENTIALS} federated identity credentials")
            held.append(credential)

    def remove_federated_credential(self, tenant: str, client_id: str, name: str) -> None:
        """Delete an app's federated identity credential by name; KeyError if there is none."""
        with self._lock:
            client = self._clients[(tenant.lower(), client_id.lower())]
            kept = [c for c in client.federated_credentials if c.name.lower() != name.lower()]
            if len(kept) == len(client.federated_credentials):
                raise KeyError(f"no federated identity credential named {name!r} on {client_id}")
            client.federated_credentials = kept

    def federated_credentials(self, tenant: str, client_id: str) -> list[dict]:
        """An app's federated identity credentials (``name``, ``issuer``, ``subject``, ``audiences``…)."""
        with self._lock:
            return [c.as_dict() for c in self._clients[(tenant.lower(), client_id.lower())].federated_credentials]

    def set_managed_identity_roles(self, audience: str, roles: Iterable[str]) -> None:
        """Grant exactly `roles` to the managed identity on `audience` (app role assignments)."""
        granted = granted_roles({audience: roles})[audience]
        with self._lock:
            self._managed_identity_roles[audience] = granted

    @property
    def managed_identity_roles(self) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return dict(self._managed_identity_roles)

    def managed_identity_env(self, base_url: str) -> dict[str, str]:
        """The variables App Service / Functions set when the app has a managed identity."""
        return {"IDENTITY_ENDPOINT": f"{base_url}/msi/token", "IDENTITY_HEADER": self.identity_header}

    def _federated(self, client: RegisteredClient, assertion: str, claims: dict) -> JSONResponse | None:
        """A federated identity credential: the assertion must match one of the client's credentials
        (issuer, then subject, then audience, each compared exactly), be signed by the simulator
        (the only issuer it can check: its own managed identity) and be within its time range."""
        with self._lock:
            held = list(client.federated_credentials)
        if not held:
            return oauth_error(401, "invalid_client", 70025,
                                "Client application has no configured federated identity credentials.")
        issuer, subject = claims.get("iss"), claims.get("sub")
        audience = claims.get("aud")
        presented = [a for a in (audience if isinstance(audience, list) else [audience]) if isinstance(a, str)]
        by_issuer = [c for c in held if c.issuer == issuer]
        if not by_issuer:
            return oauth_error(401, "invalid_client", 700211,
                                "No matching federated identity record found for presented assertion issuer "
                                f"'{issuer}'. {_FIC_HELP}")
        try:
            self._verify_signed(assertion)
        except tokens.InvalidToken as refused:
            return oauth_error(401, "invalid_client", 700027,
                                f"Client assertion failed signature validation. (Reason - {refused})")
        now = time.time()
        expires, not_before = claims.get("exp"), claims.get("nbf", 0)
        if (not isinstance(expires, (int, float)) or not isinstance(not_before, (int, float))
                or expires <= now or not_before > now):
            return oauth_error(401, "invalid_client", 700024,
                                "Client assertion is not within its valid time range. Current time: "
                                f"{iso_time(now)}, assertion valid from {iso_time(not_before)}, expiry time of "
                                f"assertion {iso_time(expires)}.")
        by_subject = [c for c in by_issuer if c.subject == subject]
        if not by_subject:
            return oauth_error(401, "invalid_client", 700213,
                                "No matching federated identity record found for presented assertion subject "
                                f"'{subject}'. {_FIC_HELP}")
        if not any(a in c.audiences for c in by_subject for a in presented):
            return oauth_error(401, "invalid_client", 700212,
                                "No matching federated identity record found for presented assertion audience "
                                f"'{audience}'. {_FIC_HELP}")
        return None

    async def _managed_identity_token(self, request: Request) -> JSONResponse:
        if not secrets.compare_digest(request.headers.get("x-identity-header", ""), self.identity_header):
            return msi_error(401, "The X-IDENTITY-HEADER header is missing or does not match.")
        params = request.query_params
        if params.get("api-version") != MSI_API_VERSION:
            return msi_error(400, f"Unsupported or missing api-version; expected {MSI_API_VERSION}.")
        resource = params.get("resource")
        if not resource:
            return msi_error(400, "The 'resource' query parameter is required.")
        selectors = [name for name in _MSI_SELECTORS if params.get(name)]
        if len(selectors) > 1:
            return msi_error(400, f"Only one of {', '.join(_MSI_SELECTORS)} may be given; got {', '.join(selectors)}.")
        identity = {"client_id": self.managed_identity_client_id, "principal_id": self.managed_identity_principal_id,
                    "object_id": self.managed_identity_principal_id, "mi_res_id": self.managed_identity_resource_id}
        if selectors and params[selectors[0]].lower() != identity[selectors[0]].lower():
            return msi_error(400, "Unable to load the proper Managed Identity.")
        audience = resource.removesuffix("/.default").rstrip("/")
        lifetime = self.managed_identity_token_lifetime_seconds
        lifetime = self.token_lifetime_seconds if lifetime is None else lifetime
        now = int(time.time())
        if audience == tokens.TOKEN_EXCHANGE_AUDIENCE:
            access_token = self._issue_exchange_token(now, lifetime)
        elif audience in KNOWN_AUDIENCES:
            access_token = self._issue(audience, self.managed_identity_tenant, self.managed_identity_client_id,
                                       self._managed_identity_roles, lifetime)
        else:
            return msi_error(400, f"AADSTS500011: The resource principal named {resource} was not "
                                   "found in the tenant.")
        return JSONResponse({
            "access_token": access_token,
            "expires_on": str(now + lifetime),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": self.managed_identity_client_id,
        })

    def _issue_exchange_token(self, now: int, lifetime: int) -> str:
        """The managed identity's token for ``api://AzureADTokenExchange``: a v2.0 app token signed
        by Entra (RS256, the JWKS key), the assertion of a federated identity credential."""
        with self._lock:
            self.tokens_issued[tokens.TOKEN_EXCHANGE_AUDIENCE] += 1
        tenant, principal = self.managed_identity_tenant, self.managed_identity_principal_id
        return self.signing_key.sign({
            "aud": tokens.TOKEN_EXCHANGE_AUDIENCE, "iss": tokens.entra_issuer(tenant), "iat": now, "nbf": now,
            "exp": now + lifetime, "azp": self.managed_identity_client_id, "appid": self.managed_identity_client_id,
            "idtyp": "app", "oid": principal, "sub": principal, "tid": tenant,
            "uti": base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode(), "ver": "2.0"})
