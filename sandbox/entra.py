"""Simulated Entra ID: the v2.0 token endpoint, user sign-in and the App Service managed-identity
endpoint.

It speaks exactly the wire protocol msal 1.39 uses, so the app's real auth code (msal
`ConfidentialClientApplication` with `instance_discovery=False`, or `ManagedIdentityClient`)
runs unchanged against it:

- ``GET /{tenant}/v2.0/.well-known/openid-configuration``: msal's tenant discovery, done when the
  application object is built; an unknown tenant fails there, as in Azure.
- ``POST /{tenant}/oauth2/v2.0/token``: client credentials, by secret (form field or HTTP Basic)
  or by ``client_assertion``: a certificate credential (``iss`` = ``sub`` = the client; the JWT's
  signature is not checked), or a **federated identity credential** (`add_federated_credential`):
  a token the simulator itself issued to its managed identity for ``api://AzureADTokenExchange``,
  whose signature, time range, ``iss``, ``sub`` and ``aud`` must match one of the client's
  federated credentials exactly. With the same client authentication, the ``authorization_code``
  and ``refresh_token`` grants of user sign-in.
- ``/{tenant}/oauth2/v2.0/authorize`` and ``/logout``: user sign-in in a browser (OpenID Connect
  authorization code flow with PKCE; `sandbox.entra_signin`). They are also served by
  `browser_app`, for a plain-HTTP server a person's browser reaches without trusting the run's
  CA; `browser_base_url` makes the openid-configuration name that server.
- ``GET /{tenant}/discovery/v2.0/keys``: the JWKS with the public key of the ID tokens and of the
  managed identity's ``api://AzureADTokenExchange`` tokens (RS256).
- ``GET /msi/token?api-version=2019-08-01&resource=…`` with ``X-IDENTITY-HEADER``: what App
  Service and Azure Functions expose through ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER``. For
  Graph and Business Central it answers app-only tokens like the token endpoint's; for
  ``api://AzureADTokenExchange`` a v2.0 token signed RS256 (``iss``
  ``https://login.microsoftonline.com/{tenant}/v2.0``, ``sub`` = ``oid`` = the identity's principal
  id), the assertion an app trusting the identity sends to the token endpoint.

Every Graph or Business Central token carries, in its ``roles`` claim, the application permissions
granted to that client (or to the managed identity) on the token's audience — by default exactly
what the app needs (`tokens.APP_ROLES`), changeable per client and audience at run time
(`set_roles`, `set_managed_identity_roles`). A client with no permission on an audience still gets a token,
without a ``roles`` claim, as Entra ID issues app-only tokens; the API then refuses it. A change
applies to tokens issued afterwards: a token already issued keeps its roles until it expires.

Errors use the shapes the real services use (OAuth ``{"error", "error_description",
"error_codes"}``; App Service ``{"statusCode", "message"}``) because msal branches on them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sandbox import tokens
from sandbox.entra_signin import OAuthError, UserSignIn
from sandbox.entra_signout import UserSignOut
from sandbox.entra_tenants import TenantNamesAndKeys, TenantByGuid
from sandbox.faults import FaultMiddleware, FaultPlan

KNOWN_AUDIENCES = (tokens.GRAPH_AUDIENCE, tokens.BC_AUDIENCE)
MSI_API_VERSION = "2019-08-01"
MAX_FEDERATED_CREDENTIALS = 20
"""Entra: "A maximum of 20 federated identity credentials can be added to an application"."""
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
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


def _oauth_body(error: str, code: int, description: str) -> dict:
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
    return _oauth_body(error, aadsts, message)


def _oauth_error(status: int, error: str, code: int, description: str) -> JSONResponse:
    return JSONResponse(_oauth_body(error, code, description), status_code=status,
                        headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def _msi_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"statusCode": status, "message": message,
                         "correlationId": str(uuid.uuid4())}, status_code=status)


def _audience_of_scope(scope: str) -> str | None:
    """`https://graph.microsoft.com/.default` → `https://graph.microsoft.com`; else None."""
    if not scope.endswith("/.default"):
        return None
    audience = scope[: -len("/.default")].rstrip("/")
    return audience if audience in KNOWN_AUDIENCES else None


def _jwt_claims(assertion: str) -> dict | None:
    """The payload of a JWT, unverified (the simulator trusts any certificate)."""
    try:
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


Roles = Mapping[str, Iterable[str]]
"""Granted application permissions by audience, e.g. ``{tokens.BC_AUDIENCE: ["API.ReadWrite.All"]}``."""


def _granted(roles: Roles | None) -> dict[str, tuple[str, ...]]:
    chosen = tokens.APP_ROLES if roles is None else roles
    unknown = set(chosen) - set(KNOWN_AUDIENCES)
    if unknown:
        raise ValueError(f"unknown audience(s) {sorted(unknown)}; known: {KNOWN_AUDIENCES}")
    if any(isinstance(granted, str) for granted in chosen.values()):
        raise TypeError("roles per audience must be a list of permission names, not one string")
    return {audience: tuple(dict.fromkeys(granted)) for audience, granted in chosen.items()}


@dataclass(frozen=True)
class _FederatedCredential:
    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...]
    description: str

    def as_dict(self) -> dict:
        return {"name": self.name, "issuer": self.issuer, "subject": self.subject,
                "audiences": list(self.audiences), "description": self.description}


@dataclass
class _Client:
    tenant: str
    client_id: str
    secret: str | None
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    redirect_uris: list[str] = field(default_factory=list)
    federated_credentials: list[_FederatedCredential] = field(default_factory=list)
    optional_claims: tuple[str, ...] = ()
    """Optional ID token claims the app registration asks for (`set_optional_claims`)."""


def _check_federated_credential(name: str, issuer: str, subject: str, audiences: Iterable[str]) -> tuple[str, ...]:
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


class EntraSimulator(UserSignIn, UserSignOut, TenantNamesAndKeys):
    """Token issuer for the app's service principal and its managed identity, and sign-in of the
    tenant's users into the app (`add_user`, `register_redirect_uri`; `sandbox.entra_signin`).

    `tokens_issued` counts successful app-only tokens by audience (client credentials and managed
    identity), so tests can check that the app caches tokens instead of asking for one per call."""

    def __init__(self, plan: FaultPlan | None = None, *, identity_header: str | None = None,
                 managed_identity_tenant: str = "managed-identity-tenant",
                 managed_identity_client_id: str = "5f0e1c2a-9d7b-4c3e-8a61-6b2d7e9f0a51",
                 managed_identity_principal_id: str = "9b3d6f2e-4a1c-4e7b-8d05-3c6a9e1f7b24",
                 managed_identity_resource_id: str = (
                     "/subscriptions/00000000-0000-4000-8000-000000005a1d/resourceGroups/rg-sandbox/providers/"
                     "Microsoft.ManagedIdentity/userAssignedIdentities/id-api-sandbox"),
                 token_lifetime_seconds: int = 3600, managed_identity_roles: Roles | None = None):
        self.plan = plan or FaultPlan()
        self.identity_header = identity_header or secrets.token_hex(16)
        self.managed_identity_tenant = managed_identity_tenant
        """The tenant the managed identity lives in: its tokens' ``tid``, and the issuer of its
        ``api://AzureADTokenExchange`` tokens (`SandboxStack`: the app's tenant)."""
        self.managed_identity_client_id = managed_identity_client_id
        self.managed_identity_principal_id = managed_identity_principal_id
        """The identity's object (principal) id: ``sub`` and ``oid`` of its token-exchange tokens,
        the ``subject`` of a federated identity credential that trusts it."""
        self.managed_identity_resource_id = managed_identity_resource_id
        self.token_lifetime_seconds = token_lifetime_seconds
        self.managed_identity_token_lifetime_seconds: int | None = None
        """Lifetime of the managed identity's tokens; None: `token_lifetime_seconds`."""
        self._managed_identity_roles = _granted(managed_identity_roles)
        self.tokens_issued: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], _Client] = {}
        self._tenants: set[str] = set()
        self._domains: dict[str, str] = {}
        self._init_sign_in()
        router = Starlette(routes=[
            Route("/msi/token", self._managed_identity_token, methods=["GET"]),
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration,
                  methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self._token, methods=["POST"]),
            Route("/{tenant}/discovery/v2.0/keys", self._keys, methods=["GET"]),
            *self._browser_routes(),
        ])
        self.app = TenantByGuid(FaultMiddleware(router, self.plan, key_of=_tenant_of_path,
                                                 error_body=oauth_fault_body), self.tenant_guid)
        self.browser_app = TenantByGuid(Starlette(routes=self._browser_routes()), self.tenant_guid)
        """Only the endpoints a browser visits (authorize, logout), without faults: serve it over
        plain HTTP on loopback and set `browser_base_url` to that server's URL."""

    def register_client(self, tenant: str, client_id: str, secret: str | None, roles: Roles | None = None) -> None:
        """Register an app; `secret=None` makes an app without a secret (a certificate or a federated
        identity credential: assertions only).

        `roles`: the application permissions granted (with admin consent) per audience; None
        grants what the app needs (`tokens.APP_ROLES`); an audience left out gets tokens
        without a ``roles`` claim. Registering a client again keeps its redirect URIs and federated
        identity credentials."""
        granted = _granted(roles)
        with self._lock:
            self._tenants.add(tenant.lower())
            key = (tenant.lower(), client_id.lower())
            old = self._clients.get(key)
            self._clients[key] = _Client(tenant, client_id, secret, granted, old.redirect_uris if old else [],
                                         old.federated_credentials if old else [], old.optional_claims if old else ())

    def set_roles(self, tenant: str, client_id: str, audience: str, roles: Iterable[str]) -> None:
        """Grant exactly `roles` to a registered client on `audience` (an empty list revokes all);
        tokens issued from now on carry them. KeyError for an unknown client."""
        granted = _granted({audience: roles})[audience]
        with self._lock:
            self._clients[(tenant.lower(), client_id.lower())].roles[audience] = granted

    def roles(self, tenant: str, client_id: str) -> dict[str, tuple[str, ...]]:
        """The permissions a registered client holds, per audience."""
        with self._lock:
            return dict(self._clients[(tenant.lower(), client_id.lower())].roles)

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
        chosen = _check_federated_credential(name, issuer, subject, audiences)
        credential = _FederatedCredential(name, issuer, subject, chosen, description)
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
        granted = _granted({audience: roles})[audience]
        with self._lock:
            self._managed_identity_roles[audience] = granted

    @property
    def managed_identity_roles(self) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return dict(self._managed_identity_roles)

    def managed_identity_env(self, base_url: str) -> dict[str, str]:
        """The variables App Service / Functions set when the app has a managed identity."""
        return {"IDENTITY_ENDPOINT": f"{base_url}/msi/token", "IDENTITY_HEADER": self.identity_header}

    def _issue(self, audience: str, tenant: str, client_id: str, roles: Mapping[str, tuple[str, ...]],
               lifetime_seconds: int | None = None) -> str:
        with self._lock:
            self.tokens_issued[audience] += 1
            granted = roles.get(audience, ())
        lifetime = self.token_lifetime_seconds if lifetime_seconds is None else lifetime_seconds
        return tokens.issue(audience, tenant, client_id, lifetime_seconds=lifetime, roles=granted)

    async def _openid_configuration(self, request: Request) -> JSONResponse:
        tenant = request.path_params["tenant"]
        if not self._known_tenant(tenant):
            return _oauth_error(400, "invalid_tenant", 90002,
                                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID.")
        base = f"{str(request.base_url).rstrip('/')}/{tenant}"
        browser = f"{self._browser_base(request)}/{tenant}"
        return JSONResponse({
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": _issuer(request, tenant),
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{browser}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{browser}/oauth2/v2.0/logout",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "msgraph_host": "graph.microsoft.com",
        })

    async def _keys(self, request: Request) -> JSONResponse:
        issuer = _issuer(request, request.path_params["tenant"])
        return JSONResponse({"keys": [key.jwk(issuer) for key in (self.signing_key, *self.retired_keys)]})

    async def _token(self, request: Request) -> JSONResponse:
        tenant = request.path_params["tenant"]
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode(), keep_blank_values=True).items()}
        basic_id, basic_secret = _basic_credentials(request.headers.get("authorization"))
        client_id = form.get("client_id") or basic_id
        secret = form.get("client_secret") or basic_secret

        grant_type = form.get("grant_type")
        if grant_type not in ("client_credentials", "authorization_code", "refresh_token"):
            return _oauth_error(400, "unsupported_grant_type", 70003,
                                "The app requested an unsupported grant type "
                                f"'{form.get('grant_type', '')}'.")
        if not client_id:
            return _oauth_error(400, "invalid_request", 900144,
                                "The request body must contain the following parameter: 'client_id'.")
        if not self._known_tenant(tenant):
            return _oauth_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        with self._lock:
            client = self._clients.get((tenant.lower(), client_id.lower()))
        if client is None:
            return _oauth_error(401, "invalid_client", 700016,
                                f"Application with identifier '{client_id}' was not found in the "
                                f"directory '{tenant}'.")
        denial = self._authenticate(client, secret, form)
        if denial is not None:
            return denial
        if grant_type == "client_credentials":
            return self._client_credentials(client, form)
        try:
            redeem = self.redeem_code if grant_type == "authorization_code" else self.redeem_refresh_token
            grant = redeem(tenant, client.client_id, form)
        except OAuthError as refused:
            return _oauth_error(refused.status, refused.error, refused.code, refused.description)
        body = self.user_tokens(grant, _issuer(request, tenant), client_info=form.get("client_info") == "1",
                                lifetime_seconds=self.token_lifetime_seconds)
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _client_credentials(self, client: _Client, form: dict[str, str]) -> JSONResponse:
        scopes = form.get("scope", "").split()
        if len(scopes) != 1:
            return _oauth_error(400, "invalid_scope", 70011,
                                "The provided value for the input parameter 'scope' is not valid. "
                                "The client credentials flow takes exactly one '<resource>/.default' scope.")
        audience = _audience_of_scope(scopes[0])
        if audience is None:
            return _oauth_error(400, "invalid_scope", 1002012,
                                f"The provided value for scope {scopes[0]} is not valid. Client "
                                "credential flows must have a scope value with /.default suffixed "
                                "to the resource identifier (application ID URI).")
        access_token = self._issue(audience, client.tenant, client.client_id, client.roles)
        return JSONResponse(
            {"token_type": "Bearer", "expires_in": self.token_lifetime_seconds,
             "ext_expires_in": self.token_lifetime_seconds, "access_token": access_token},
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate(self, client: _Client, secret: str | None, form: dict[str, str]) -> JSONResponse | None:
        assertion = form.get("client_assertion")
        if assertion:
            if form.get("client_assertion_type") != _ASSERTION_TYPE:
                return _oauth_error(400, "invalid_request", 700025,
                                    "client_assertion_type must be "
                                    f"'{_ASSERTION_TYPE}'.")
            claims = _jwt_claims(assertion)
            if claims is None:
                return _oauth_error(401, "invalid_client", 700027,
                                    "Client assertion failed signature validation.")
            if client.client_id not in (claims.get("iss"), claims.get("sub")):
                return self._federated(client, assertion, claims)
            if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
                return _oauth_error(401, "invalid_client", 700021,
                                    "Client assertion application identifier doesn't match "
                                    "'client_id' parameter.")
            if claims.get("exp") is not None and claims["exp"] < time.time():
                return _oauth_error(401, "invalid_client", 700024,
                                    "Client assertion is not within its valid time range.")
            return None
        if not secret:
            return _oauth_error(401, "invalid_client", 7000218,
                                "The request body must contain the following parameter: "
                                "'client_assertion' or 'client_secret'.")
        if client.secret is None or not secrets.compare_digest(secret, client.secret):
            return _oauth_error(401, "invalid_client", 7000215,
                                "Invalid client secret provided. Ensure the secret being sent in "
                                f"the request is the client secret value, not the client secret ID, "
                                f"for a secret added to app '{client.client_id}'.")
        return None

    def _federated(self, client: _Client, assertion: str, claims: dict) -> JSONResponse | None:
        """A federated identity credential: the assertion must match one of the client's credentials
        (issuer, then subject, then audience, each compared exactly), be signed by the simulator
        (the only issuer it can check: its own managed identity) and be within its time range."""
        with self._lock:
            held = list(client.federated_credentials)
        if not held:
            return _oauth_error(401, "invalid_client", 70025,
                                "Client application has no configured federated identity credentials.")
        issuer, subject = claims.get("iss"), claims.get("sub")
        audience = claims.get("aud")
        presented = [a for a in (audience if isinstance(audience, list) else [audience]) if isinstance(a, str)]
        by_issuer = [c for c in held if c.issuer == issuer]
        if not by_issuer:
            return _oauth_error(401, "invalid_client", 700211,
                                "No matching federated identity record found for presented assertion issuer "
                                f"'{issuer}'. {_FIC_HELP}")
        try:
            self._verify_signed(assertion)
        except tokens.InvalidToken as refused:
            return _oauth_error(401, "invalid_client", 700027,
                                f"Client assertion failed signature validation. (Reason - {refused})")
        now = time.time()
        expires, not_before = claims.get("exp"), claims.get("nbf", 0)
        if (not isinstance(expires, (int, float)) or not isinstance(not_before, (int, float))
                or expires <= now or not_before > now):
            return _oauth_error(401, "invalid_client", 700024,
                                "Client assertion is not within its valid time range. Current time: "
                                f"{_iso(now)}, assertion valid from {_iso(not_before)}, expiry time of "
                                f"assertion {_iso(expires)}.")
        by_subject = [c for c in by_issuer if c.subject == subject]
        if not by_subject:
            return _oauth_error(401, "invalid_client", 700213,
                                "No matching federated identity record found for presented assertion subject "
                                f"'{subject}'. {_FIC_HELP}")
        if not any(a in c.audiences for c in by_subject for a in presented):
            return _oauth_error(401, "invalid_client", 700212,
                                "No matching federated identity record found for presented assertion audience "
                                f"'{audience}'. {_FIC_HELP}")
        return None

    async def _managed_identity_token(self, request: Request) -> JSONResponse:
        if not secrets.compare_digest(request.headers.get("x-identity-header", ""), self.identity_header):
            return _msi_error(401, "The X-IDENTITY-HEADER header is missing or does not match.")
        params = request.query_params
        if params.get("api-version") != MSI_API_VERSION:
            return _msi_error(400, f"Unsupported or missing api-version; expected {MSI_API_VERSION}.")
        resource = params.get("resource")
        if not resource:
            return _msi_error(400, "The 'resource' query parameter is required.")
        selectors = [name for name in _MSI_SELECTORS if params.get(name)]
        if len(selectors) > 1:
            return _msi_error(400, f"Only one of {', '.join(_MSI_SELECTORS)} may be given; got {', '.join(selectors)}.")
        identity = {"client_id": self.managed_identity_client_id, "principal_id": self.managed_identity_principal_id,
                    "object_id": self.managed_identity_principal_id, "mi_res_id": self.managed_identity_resource_id}
        if selectors and params[selectors[0]].lower() != identity[selectors[0]].lower():
            return _msi_error(400, "Unable to load the proper Managed Identity.")
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
            return _msi_error(400, f"AADSTS500011: The resource principal named {resource} was not "
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


def _iso(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return str(seconds)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%m/%d/%Y %H:%M:%S")


def _issuer(request: Request, tenant: str) -> str:
    """The ``issuer`` of the openid-configuration, and so the ``iss`` of the ID tokens (v2.0)."""
    return f"{str(request.base_url).rstrip('/')}/{tenant}/v2.0"


def _basic_credentials(authorization: str | None) -> tuple[str | None, str | None]:
    """RFC 6749 §2.3.1 HTTP Basic client authentication (form-encoded id and secret)."""
    if not authorization or not authorization.startswith("Basic "):
        return None, None
    try:
        decoded = base64.b64decode(authorization[len("Basic "):]).decode()
    except (ValueError, binascii.Error):
        return None, None
    client_id, _, secret = decoded.partition(":")
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


def _tenant_of_path(path: str) -> str:
    """Limits apply per tenant (the managed-identity endpoint counts as one)."""
    return path.strip("/").split("/", 1)[0] or "*"
