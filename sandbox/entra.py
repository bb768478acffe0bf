"""Simulated Entra ID: the v2.0 token endpoint, user sign-in and the App Service managed-identity
endpoint.

It speaks exactly the wire protocol msal 1.39 uses, so the app's real auth code (msal
`ConfidentialClientApplication` with `instance_discovery=False`, or `ManagedIdentityClient`)
runs unchanged against it:

- ``GET /{tenant}/v2.0/.well-known/openid-configuration``: msal's tenant discovery, done when the
  application object is built; an unknown tenant fails there, as in Azure.
- ``POST /{tenant}/oauth2/v2.0/token``: client credentials, by secret (form field or HTTP Basic)
  or by ``client_assertion`` (certificate credential; the JWT's signature is not checked, only
  that ``iss`` and ``sub`` name the client); and, with the same client authentication, the
  ``authorization_code`` and ``refresh_token`` grants of user sign-in.
- ``/{tenant}/oauth2/v2.0/authorize`` and ``/logout``: user sign-in in a browser (OpenID Connect
  authorization code flow with PKCE; `sandbox.entra_signin`). They are also served by
  `browser_app`, for a plain-HTTP server a person's browser reaches without trusting the run's
  CA; `browser_base_url` makes the openid-configuration name that server.
- ``GET /{tenant}/discovery/v2.0/keys``: the JWKS with the public key of the ID tokens (RS256).
- ``GET /msi/token?api-version=2019-08-01&resource=…`` with ``X-IDENTITY-HEADER``: what App
  Service and Azure Functions expose through ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER``.

Every token carries, in its ``roles`` claim, the application permissions granted to that client
(or to the managed identity) on the token's audience — by default exactly what the app needs
(`tokens.APP_ROLES`), changeable per client and audience at run time (`set_roles`,
`set_managed_identity_roles`). A client with no permission on an audience still gets a token,
without a ``roles`` claim, as Entra ID issues app-only tokens; the API then refuses it. A change
applies to tokens issued afterwards: a token already issued keeps its roles until it expires.

Errors use the shapes the real services use (OAuth ``{"error", "error_description",
"error_codes"}``; App Service ``{"statusCode", "message"}``) because msal branches on them.
"""

from __future__ import annotations

import base64
import binascii
import json
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
from sandbox.faults import FaultMiddleware, FaultPlan

KNOWN_AUDIENCES = (tokens.GRAPH_AUDIENCE, tokens.BC_AUDIENCE)
MSI_API_VERSION = "2019-08-01"
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

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


@dataclass
class _Client:
    tenant: str
    client_id: str
    secret: str | None
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    redirect_uris: list[str] = field(default_factory=list)


class EntraSimulator(UserSignIn):
    """Token issuer for the app's service principal and its managed identity, and sign-in of the
    tenant's users into the app (`add_user`, `register_redirect_uri`; `sandbox.entra_signin`).

    `tokens_issued` counts successful app-only tokens by audience (client credentials and managed
    identity), so tests can check that the app caches tokens instead of asking for one per call."""

    def __init__(self, plan: FaultPlan | None = None, *, identity_header: str | None = None,
                 managed_identity_tenant: str = "managed-identity-tenant",
                 managed_identity_client_id: str = "5f0e1c2a-9d7b-4c3e-8a61-6b2d7e9f0a51",
                 token_lifetime_seconds: int = 3600, managed_identity_roles: Roles | None = None):
        self.plan = plan or FaultPlan()
        self.identity_header = identity_header or secrets.token_hex(16)
        self.managed_identity_tenant = managed_identity_tenant
        self.managed_identity_client_id = managed_identity_client_id
        self.token_lifetime_seconds = token_lifetime_seconds
        self._managed_identity_roles = _granted(managed_identity_roles)
        self.tokens_issued: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], _Client] = {}
        self._tenants: set[str] = set()
        self._init_sign_in()
        router = Starlette(routes=[
            Route("/msi/token", self._managed_identity_token, methods=["GET"]),
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration,
                  methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self._token, methods=["POST"]),
            Route("/{tenant}/discovery/v2.0/keys", self._keys, methods=["GET"]),
            *self._browser_routes(),
        ])
        self.app = FaultMiddleware(router, self.plan, key_of=_tenant_of_path,
                                   error_body=oauth_fault_body)
        self.browser_app = Starlette(routes=self._browser_routes())
        """Only the endpoints a browser visits (authorize, logout), without faults: serve it over
        plain HTTP on loopback and set `browser_base_url` to that server's URL."""

    def register_client(self, tenant: str, client_id: str, secret: str | None, roles: Roles | None = None) -> None:
        """Register an app; `secret=None` makes a certificate-only app (assertions only).

        `roles`: the application permissions granted (with admin consent) per audience; None
        grants what the app needs (`tokens.APP_ROLES`); an audience left out gets tokens
        without a ``roles`` claim. Registering a client again keeps its redirect URIs."""
        granted = _granted(roles)
        with self._lock:
            self._tenants.add(tenant.lower())
            key = (tenant.lower(), client_id.lower())
            kept = self._clients[key].redirect_uris if key in self._clients else []
            self._clients[key] = _Client(tenant, client_id, secret, granted, kept)

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
        """The variables App Service / Functions set for a system-assigned identity."""
        return {"IDENTITY_ENDPOINT": f"{base_url}/msi/token", "IDENTITY_HEADER": self.identity_header}

    def _issue(self, audience: str, tenant: str, client_id: str, roles: Mapping[str, tuple[str, ...]]) -> str:
        with self._lock:
            self.tokens_issued[audience] += 1
            granted = roles.get(audience, ())
        return tokens.issue(audience, tenant, client_id, lifetime_seconds=self.token_lifetime_seconds, roles=granted)

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
        return JSONResponse({"keys": [self.signing_key.jwk(issuer)]})

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

    @staticmethod
    def _authenticate(client: _Client, secret: str | None, form: dict[str, str]) -> JSONResponse | None:
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

    async def _managed_identity_token(self, request: Request) -> JSONResponse:
        if not secrets.compare_digest(request.headers.get("x-identity-header", ""), self.identity_header):
            return _msi_error(401, "The X-IDENTITY-HEADER header is missing or does not match.")
        params = request.query_params
        if params.get("api-version") != MSI_API_VERSION:
            return _msi_error(400, f"Unsupported or missing api-version; expected {MSI_API_VERSION}.")
        resource = params.get("resource")
        if not resource:
            return _msi_error(400, "The 'resource' query parameter is required.")
        for user_assigned in ("client_id", "mi_res_id", "object_id", "principal_id"):
            if params.get(user_assigned) and params[user_assigned] != self.managed_identity_client_id:
                return _msi_error(400, "Unable to load the proper Managed Identity.")
        audience = resource.removesuffix("/.default").rstrip("/")
        if audience not in KNOWN_AUDIENCES:
            return _msi_error(400, f"AADSTS500011: The resource principal named {resource} was not "
                                   "found in the tenant.")
        access_token = self._issue(audience, self.managed_identity_tenant, self.managed_identity_client_id,
                                   self._managed_identity_roles)
        return JSONResponse({
            "access_token": access_token,
            "expires_on": str(int(time.time()) + self.token_lifetime_seconds),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": self.managed_identity_client_id,
        })


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
