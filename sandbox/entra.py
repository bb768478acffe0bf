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
  Federated credentials and the managed identity are `sandbox.entra_identities`.

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
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qs, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sandbox import tokens
from sandbox.entra_identities import (
    KNOWN_AUDIENCES,
    RegisteredClient,
    Roles,
    WorkloadIdentities,
    granted_roles,
    oauth_error,
    oauth_fault_body,
)
from sandbox.entra_signin import OAuthError, UserSignIn
from sandbox.entra_signout import UserSignOut
from sandbox.entra_tenants import TenantByGuid, TenantNamesAndKeys
from sandbox.faults import FaultMiddleware, FaultPlan

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


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


class EntraSimulator(UserSignIn, UserSignOut, TenantNamesAndKeys, WorkloadIdentities):
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
        self._managed_identity_roles = granted_roles(managed_identity_roles)
        self.tokens_issued: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], RegisteredClient] = {}
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
        granted = granted_roles(roles)
        with self._lock:
            self._tenants.add(tenant.lower())
            key = (tenant.lower(), client_id.lower())
            old = self._clients.get(key)
            self._clients[key] = RegisteredClient(tenant, client_id, secret, granted, old.redirect_uris if old else [],
                                         old.federated_credentials if old else [], old.optional_claims if old else ())

    def set_roles(self, tenant: str, client_id: str, audience: str, roles: Iterable[str]) -> None:
        """Grant exactly `roles` to a registered client on `audience` (an empty list revokes all);
        tokens issued from now on carry them. KeyError for an unknown client."""
        granted = granted_roles({audience: roles})[audience]
        with self._lock:
            self._clients[(tenant.lower(), client_id.lower())].roles[audience] = granted

    def roles(self, tenant: str, client_id: str) -> dict[str, tuple[str, ...]]:
        """The permissions a registered client holds, per audience."""
        with self._lock:
            return dict(self._clients[(tenant.lower(), client_id.lower())].roles)

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
            return oauth_error(400, "invalid_tenant", 90002,
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
            return oauth_error(400, "unsupported_grant_type", 70003,
                                "The app requested an unsupported grant type "
                                f"'{form.get('grant_type', '')}'.")
        if not client_id:
            return oauth_error(400, "invalid_request", 900144,
                                "The request body must contain the following parameter: 'client_id'.")
        if not self._known_tenant(tenant):
            return oauth_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        with self._lock:
            client = self._clients.get((tenant.lower(), client_id.lower()))
        if client is None:
            return oauth_error(401, "invalid_client", 700016,
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
            return oauth_error(refused.status, refused.error, refused.code, refused.description)
        body = self.user_tokens(grant, _issuer(request, tenant), client_info=form.get("client_info") == "1",
                                lifetime_seconds=self.token_lifetime_seconds)
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _client_credentials(self, client: RegisteredClient, form: dict[str, str]) -> JSONResponse:
        scopes = form.get("scope", "").split()
        if len(scopes) != 1:
            return oauth_error(400, "invalid_scope", 70011,
                                "The provided value for the input parameter 'scope' is not valid. "
                                "The client credentials flow takes exactly one '<resource>/.default' scope.")
        audience = _audience_of_scope(scopes[0])
        if audience is None:
            return oauth_error(400, "invalid_scope", 1002012,
                                f"The provided value for scope {scopes[0]} is not valid. Client "
                                "credential flows must have a scope value with /.default suffixed "
                                "to the resource identifier (application ID URI).")
        access_token = self._issue(audience, client.tenant, client.client_id, client.roles)
        return JSONResponse(
            {"token_type": "Bearer", "expires_in": self.token_lifetime_seconds,
             "ext_expires_in": self.token_lifetime_seconds, "access_token": access_token},
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate(self, client: RegisteredClient, secret: str | None, form: dict[str, str]) -> JSONResponse | None:
        assertion = form.get("client_assertion")
        if assertion:
            if form.get("client_assertion_type") != _ASSERTION_TYPE:
                return oauth_error(400, "invalid_request", 700025,
                                    "client_assertion_type must be "
                                    f"'{_ASSERTION_TYPE}'.")
            claims = _jwt_claims(assertion)
            if claims is None:
                return oauth_error(401, "invalid_client", 700027,
                                    "Client assertion failed signature validation.")
            if client.client_id not in (claims.get("iss"), claims.get("sub")):
                return self._federated(client, assertion, claims)
            if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
                return oauth_error(401, "invalid_client", 700021,
                                    "Client assertion application identifier doesn't match "
                                    "'client_id' parameter.")
            if claims.get("exp") is not None and claims["exp"] < time.time():
                return oauth_error(401, "invalid_client", 700024,
                                    "Client assertion is not within its valid time range.")
            return None
        if not secret:
            return oauth_error(401, "invalid_client", 7000218,
                                "The request body must contain the following parameter: "
                                "'client_assertion' or 'client_secret'.")
        if client.secret is None or not secrets.compare_digest(secret, client.secret):
            return oauth_error(401, "invalid_client", 7000215,
                                "Invalid client secret provided. Ensure the secret being sent in "
                                f"the request is the client secret value, not the client secret ID, "
                                f"for a secret added to app '{client.client_id}'.")
        return None


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
