"""User sign-in for the simulated Entra ID: the OpenID Connect authorization code flow with PKCE,
as msal's ``initiate_auth_code_flow`` and ``acquire_token_by_auth_code_flow`` drive it.

- ``GET /{tenant}/oauth2/v2.0/authorize`` checks the client and its redirect URI (an unknown one
  is an error page, never a redirect: the URI cannot be trusted), then the request (a bad one is
  an error sent to the redirect URI), then shows "Pick an account": one button per user of the
  tenant, in a form that posts the request back. That ``POST`` issues a single-use authorization
  code, valid `AUTH_CODE_LIFETIME_SECONDS`, bound to the client, redirect URI, user, nonce,
  scopes and PKCE challenge, and sends the browser to ``redirect_uri?code=…&state=…`` (or the
  fragment, or a form post, as ``response_mode`` asks). A ``POST`` without a choice is an
  authorize request, as Entra accepts it.
- The token endpoint (`sandbox.entra`) redeems codes and refresh tokens with `redeem_code` and
  `redeem_refresh_token` and answers with `user_tokens`: a v2.0 ID token signed RS256 (key in the
  JWKS), a delegated access token, a refresh token (``offline_access``) and ``client_info``.
- ``GET|POST /{tenant}/oauth2/v2.0/logout`` sends the browser to ``post_logout_redirect_uri`` when
  it is a registered redirect URI, else shows "You signed out of your account".

No passwords, no consent prompt (whatever is asked for counts as consented) and no SSO session:
every authorize request shows the account picker, and ``prompt=none`` fails ``login_required``.
The pages carry no script; their one stylesheet is allowed by hash in a strict CSP.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from sandbox import tokens

OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
AUTH_CODE_LIFETIME_SECONDS = 600
"""Entra: "Authorization codes are short lived. Typically, they expire after about 10 minutes." """
ID_TOKEN_LIFETIME_SECONDS = 3600
REFRESH_TOKEN_LIFETIME_SECONDS = 90 * 24 * 3600
RESPONSE_MODES = ("query", "fragment", "form_post")
PROMPTS = ("login", "none", "consent", "select_account", "create")
DEFAULT_DELEGATED = {tokens.GRAPH_AUDIENCE: ("User.Read",), tokens.BC_AUDIENCE: ("Financials.ReadWrite.All",)}
"""What ``<resource>/.default`` (and, for Graph, a request of OpenID scopes alone) grants a user."""
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
_NOT_IN_REDIRECT_URIS = "!$'(),;*"
_CHOICE_FIELDS = ("account", "action")


class OAuthError(Exception):
    """A refusal in Entra's vocabulary: OAuth ``error``, the AADSTS number and its text."""

    def __init__(self, error: str, code: int, description: str, status: int = 400):
        super().__init__(f"AADSTS{code}: {description}")
        self.error, self.code, self.description, self.status = error, code, description, status


@dataclass(frozen=True)
class User:
    tenant: str
    oid: str
    name: str
    username: str
    app_roles: Mapping[str, tuple[str, ...]]
    """Client id (lower case) → the app roles assigned to the user for that application."""

    def as_dict(self) -> dict:
        return {"tenant": self.tenant, "oid": self.oid, "name": self.name, "username": self.username,
                "app_roles": {client: list(roles) for client, roles in self.app_roles.items()}}


@dataclass
class _Code:
    tenant: str
    client_id: str
    redirect_uri: str
    redirect_uri_sent: bool
    oid: str
    scopes: tuple[str, ...]
    nonce: str | None
    challenge: str | None
    challenge_method: str
    expires_at: float
    auth_time: int | None
    redeemed: bool = False


@dataclass
class _RefreshToken:
    tenant: str
    client_id: str
    oid: str
    scopes: tuple[str, ...]
    expires_at: float


@dataclass(frozen=True)
class Grant:
    """What a redeemed code or refresh token entitles the client to."""
    client_id: str
    user: User
    consented: tuple[str, ...]
    audience: str
    permissions: tuple[str, ...]
    scope: str
    nonce: str | None
    auth_time: int | None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _error_description(code: int, description: str) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return (f"AADSTS{code}: {description} Trace ID: {uuid.uuid4()} Correlation ID: {uuid.uuid4()} "
            f"Timestamp: {now}")


def check_redirect_uri(uri: str) -> None:
    """The restrictions Entra puts on a Web redirect URI (reply-url.md); ValueError if broken."""
    if len(uri) > 256:
        raise ValueError("a redirect URI has at most 256 characters")
    if any(character in uri for character in _NOT_IN_REDIRECT_URIS):
        raise ValueError(f"a redirect URI has none of {_NOT_IN_REDIRECT_URIS!r} (no wildcards either)")
    parts = urlsplit(uri)
    if "#" in uri or not parts.hostname:
        raise ValueError(f"{uri!r} is not an absolute URI without a fragment")
    scheme = parts.scheme.lower()
    if not (scheme == "https" or (scheme == "http" and parts.hostname.lower() in _LOOPBACK_HOSTS)):
        raise ValueError("a redirect URI is https, or http for localhost / 127.0.0.1 only")


def _match_key(uri: str) -> tuple | None:
    """How Entra compares redirect URIs: scheme and host in any case, the path and query exactly,
    no path the same as ``/``, and the port ignored for a loopback host."""
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = parts.hostname.lower()
    return (parts.scheme.lower(), host, None if host in _LOOPBACK_HOSTS else port,
            parts.path or "/", parts.query)


def _returned(uri: str) -> str:
    """A redirect URI without a path is answered with a trailing slash."""
    parts = urlsplit(uri)
    return parts._replace(path="/").geturl() if not parts.path else uri


def _split_scope(scope: str) -> tuple[str, str]:
    """``https://graph.microsoft.com/User.Read`` → (Graph, ``User.Read``); ``User.Read`` is Graph's."""
    if "://" in scope:
        resource, _, permission = scope.rpartition("/")
        return resource.rstrip("/"), permission
    return tokens.GRAPH_AUDIENCE, scope


def _resources(scopes: Iterable[str], tenant: str) -> dict[str, list[str]]:
    """The permissions asked for per resource; OAuthError for a resource Entra does not know."""
    resources: dict[str, list[str]] = {}
    for scope in scopes:
        if scope in OIDC_SCOPES:
            continue
        resource, permission = _split_scope(scope)
        if resource not in (tokens.GRAPH_AUDIENCE, tokens.BC_AUDIENCE):
            raise OAuthError("invalid_resource", 500011,
                             f"The resource principal named {resource} was not found in the tenant named "
                             f"{tenant}. This can happen if the application has not been installed by the "
                             "administrator of the tenant or consented to by any user in the tenant.")
        resources.setdefault(resource, []).append(permission)
    return resources


def _access_scopes(scopes: tuple[str, ...], tenant: str) -> tuple[str, tuple[str, ...], str]:
    """(audience, delegated permissions, answered ``scope``) of the access token a request asks for."""
    resources = _resources(scopes, tenant)
    if len(resources) > 1:
        raise OAuthError("invalid_scope", 700022,
                         "The provided value for the input parameter scope is not valid because it contains "
                         f"more than one resource. Scope {' '.join(scopes)} is not valid.")
    oidc = [scope for scope in scopes if scope in OIDC_SCOPES and scope != "offline_access"]
    if not resources:  # OpenID scopes alone: a token for Graph (UserInfo), with User.Read
        permissions = tuple(dict.fromkeys([*oidc, *DEFAULT_DELEGATED[tokens.GRAPH_AUDIENCE]]))
        return tokens.GRAPH_AUDIENCE, permissions, " ".join(permissions)
    (audience, asked), = resources.items()
    permissions = tuple(dict.fromkeys(
        p for permission in asked for p in (DEFAULT_DELEGATED[audience] if permission == ".default" else (permission,))))
    answered = [scope for scope in scopes if scope not in OIDC_SCOPES] + oidc
    return audience, permissions, " ".join(answered)


def _pkce_matches(verifier: str | None, challenge: str, method: str) -> bool:
    if not verifier:
        return False
    if method == "S256":
        computed = _b64(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
        return secrets.compare_digest(computed, challenge)
    return secrets.compare_digest(verifier, challenge)


# Pages --------------------------------------------------------------------------------------------

_STYLE = ("body{font-family:'Segoe UI',system-ui,sans-serif;margin:0;background:#f2f2f2;color:#1b1b1b}"
          "main{max-width:28rem;margin:3rem auto;background:#fff;padding:2rem 2.5rem;"
          "box-shadow:0 2px 6px rgba(0,0,0,.2)}h1{font-size:1.5rem;font-weight:600}"
          "ul{list-style:none;padding:0}button{display:block;width:100%;text-align:left;padding:.75rem;"
          "margin:.25rem 0;border:1px solid #8a8886;background:#fff;font:inherit;cursor:pointer}"
          "button:hover,button:focus{background:#e6e6e6;outline:2px solid #0067b8}"
          ".username{display:block;color:#605e5c}.secondary{width:auto}.error{color:#a80000}")
_CSP = ("default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
        + "'; base-uri 'none'; frame-ancestors 'none'")
_PAGE_HEADERS = {"Content-Security-Policy": _CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                 "Cache-Control": "no-store", "Pragma": "no-cache"}


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"<title>{_escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<main>\n"
                f"{body}\n</main>\n</body>\n</html>\n")
    return HTMLResponse(document, status_code=status, headers=_PAGE_HEADERS)


def _error_page(code: int, message: str, status: int = 400) -> HTMLResponse:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = ("<h1>Sign in</h1>\n<p>Sorry, but we’re having trouble signing you in.</p>\n"
            f"<p class=\"error\" role=\"alert\">AADSTS{code}: {_escape(message)}</p>\n"
            f"<dl>\n<dt>Request Id</dt><dd>{uuid.uuid4()}</dd>\n<dt>Correlation Id</dt><dd>{uuid.uuid4()}</dd>\n"
            f"<dt>Timestamp</dt><dd>{now}</dd>\n</dl>")
    return _page("Sign in to your account", body, status)


def _hidden_fields(values: Mapping[str, str]) -> str:
    return "\n".join(f"<input type=\"hidden\" name=\"{_escape(name)}\" value=\"{_escape(value)}\">"
                     for name, value in values.items())


def _picker(tenant: str, params: Mapping[str, str], users: list[User], problem: str | None = None,
            status: int = 200) -> HTMLResponse:
    action = f"/{quote(tenant, safe='')}/oauth2/v2.0/authorize"
    request = {name: value for name, value in params.items() if name not in _CHOICE_FIELDS}
    alert = f"<p class=\"error\" role=\"alert\">{_escape(problem)}</p>\n" if problem else ""
    if users:
        accounts = "\n".join(
            f"<li><button type=\"submit\" name=\"account\" value=\"{_escape(user.oid)}\">"
            f"<span class=\"name\">{_escape(user.name)}</span> "
            f"<span class=\"username\">{_escape(user.username)}</span></button></li>" for user in users)
        choice = f"<ul aria-label=\"Accounts\">\n{accounts}\n</ul>\n"
    else:
        choice = f"<p>There are no user accounts in the directory {_escape(tenant)}.</p>\n"
    body = (f"<h1 id=\"heading\">Pick an account</h1>\n{alert}"
            f"<p>to continue to the application {_escape(params.get('client_id', ''))}</p>\n"
            f"<form method=\"post\" action=\"{_escape(action)}\" aria-labelledby=\"heading\">\n"
            f"{_hidden_fields(request)}\n{choice}"
            "<button type=\"submit\" name=\"action\" value=\"cancel\" class=\"secondary\">Cancel</button>\n</form>")
    return _page("Sign in to your account", body, status)


def _answer(redirect_uri: str, mode: str, values: Mapping[str, str]) -> Response:
    """Send the authorization response to the app as ``response_mode`` asks."""
    if mode == "form_post":  # Entra posts with a script; without one, the user continues
        body = ("<h1>Continue to the application</h1>\n"
                f"<form method=\"post\" action=\"{_escape(redirect_uri)}\">\n{_hidden_fields(values)}\n"
                "<p>Script is disabled. Select Continue to go on.</p>\n"
                "<button type=\"submit\" class=\"secondary\">Continue</button>\n</form>")
        return _page("Working...", body)
    encoded = urlencode(values)
    if mode == "fragment":
        location = f"{redirect_uri}#{encoded}"
    else:
        location = f"{redirect_uri}{'&' if urlsplit(redirect_uri).query else '?'}{encoded}"
    return RedirectResponse(location, status_code=302, headers={"Cache-Control": "no-store"})


def _logged_out_page() -> HTMLResponse:
    return _page("Sign out", "<h1>You signed out of your account</h1>\n"
                             "<p>It’s a good idea to close all browser windows.</p>")


def _form_of(body: bytes) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(body.decode(), keep_blank_values=True).items()}


# The simulator's half ------------------------------------------------------------------------------

class UserSignIn:
    """Users, redirect URIs, authorization codes and refresh tokens of `EntraSimulator` (which
    provides the lock, the registered clients and the tenants)."""

    _lock: threading.Lock
    _clients: dict
    _tenants: set[str]

    def _init_sign_in(self) -> None:
        self.browser_base_url: str | None = None
        """Where browsers reach the authorize and logout endpoints (``http://127.0.0.1:port``);
        None: the host the openid-configuration was asked on."""
        self.auth_code_lifetime_seconds = AUTH_CODE_LIFETIME_SECONDS
        self.signing_key = tokens.SigningKey()
        self._users: dict[str, dict[str, User]] = {}
        self._codes: dict[str, _Code] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}

    def _known_tenant(self, tenant: str) -> bool:
        with self._lock:
            return tenant.lower() in self._tenants

    # Data API

    def add_user(self, tenant: str, *, name: str, username: str, oid: str | None = None,
                 app_roles: Mapping[str, Iterable[str]] | None = None) -> dict:
        """A user of `tenant` (a member, with no password: the account picker signs them in).
        `app_roles`: per client id, the app roles assigned to the user for that application (the
        ID token's ``roles``). Adding a username again replaces that user's name and roles and
        keeps their ``oid``. Returns the user as a dict (``oid``, ``name``, ``username``…)."""
        if not name.strip() or "@" not in username:
            raise ValueError("a user needs a name and a username of the form user@domain")
        roles: dict[str, tuple[str, ...]] = {}
        for client_id, assigned in (app_roles or {}).items():
            if isinstance(assigned, str):
                raise TypeError("app roles per client must be a list of role values, not one string")
            roles[client_id.lower()] = tuple(dict.fromkeys(assigned))
        with self._lock:
            users = self._users.setdefault(tenant.lower(), {})
            existing = next((u for u in users.values() if u.username.lower() == username.lower()), None)
            if existing is not None and oid is not None and oid.lower() != existing.oid:
                raise ValueError(f"{username} is already user {existing.oid} in {tenant}")
            chosen = existing.oid if existing else (oid or str(uuid.uuid4())).lower()
            if existing is None and chosen in users:
                raise ValueError(f"oid {chosen} is taken in {tenant}")
            user = User(tenant, chosen, name, username, roles)
            users[chosen] = user
            self._tenants.add(tenant.lower())
            return user.as_dict()

    def users(self, tenant: str) -> list[dict]:
        with self._lock:
            return [user.as_dict() for user in self._users.get(tenant.lower(), {}).values()]

    def register_redirect_uri(self, tenant: str, client_id: str, uri: str) -> None:
        """Add a Web redirect URI to a registered app (idempotent). KeyError for an unknown client,
        ValueError for a URI Entra would not take (not https, except http on localhost/127.0.0.1)."""
        check_redirect_uri(uri)
        with self._lock:
            client = self._clients[(tenant.lower(), client_id.lower())]
            if uri not in client.redirect_uris:
                client.redirect_uris.append(uri)

    def redirect_uris(self, tenant: str, client_id: str) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._clients[(tenant.lower(), client_id.lower())].redirect_uris)

    # Browser-facing endpoints

    def _browser_routes(self) -> list[Route]:
        return [Route("/{tenant}/oauth2/v2.0/authorize", self._authorize, methods=["GET", "POST"]),
                Route("/{tenant}/oauth2/v2.0/logout", self._logout, methods=["GET", "POST"])]

    def _browser_base(self, request: Request) -> str:
        return (self.browser_base_url or str(request.base_url)).rstrip("/")

    async def _authorize(self, request: Request) -> Response:
        tenant = request.path_params["tenant"]
        params = dict(request.query_params) if request.method == "GET" else _form_of(await request.body())
        checked = self._check_client(tenant, params)
        if isinstance(checked, Response):
            return checked
        client, redirect_uri = checked
        mode = params.get("response_mode") or "query"
        reply = _returned(redirect_uri)
        state = {"state": params["state"]} if params.get("state") else {}
        try:
            self._check_request(tenant, params)
        except OAuthError as error:
            return _answer(reply, mode if mode in RESPONSE_MODES else "query", {
                "error": error.error, "error_description": _error_description(error.code, error.description),
                "error_uri": f"https://login.microsoftonline.com/error?code={error.code}", **state})
        users = self._listed_users(tenant, params.get("login_hint"))
        if params.get("action") == "cancel":
            return _answer(reply, mode, {
                "error": "access_denied",
                "error_description": _error_description(65004, "User declined to consent to access the app."),
                **state})
        if "account" not in params:
            return _picker(tenant, params, users)
        user = next((u for u in users if u.oid == params["account"].lower()), None)
        if user is None:
            return _picker(tenant, params, users, problem="That account is not in this directory. Pick another.",
                           status=400)
        code = self._issue_code(client, tenant, redirect_uri, "redirect_uri" in params, user, params)
        values = {"code": code, **state}
        if params.get("client_info") == "1":  # what msal asks for, and reads back from this response
            values["client_info"] = _b64(json.dumps({"uid": user.oid, "utid": user.tenant}).encode())
        return _answer(reply, mode, values)

    def _check_client(self, tenant: str, params: Mapping[str, str]) -> tuple[Any, str] | Response:
        """The client and the redirect URI to answer to, or the error page Entra shows instead."""
        if not self._known_tenant(tenant):
            return _error_page(90002, f"Tenant '{tenant}' not found. Check to make sure you have the correct "
                                      "tenant ID and are signing into the correct cloud.")
        client_id = params.get("client_id")
        if not client_id:
            return _error_page(900144, "The request body must contain the following parameter: 'client_id'.")
        with self._lock:
            client = self._clients.get((tenant.lower(), client_id.lower()))
            registered = list(client.redirect_uris) if client else []
        if client is None:
            return _error_page(700016, f"Application with identifier '{client_id}' was not found in the directory "
                                       f"'{tenant}'. This can happen if the application has not been installed by "
                                       "the administrator of the tenant or consented to by any user in the tenant. "
                                       "You may have sent your authentication request to the wrong tenant.")
        redirect_uri = params.get("redirect_uri")
        if not redirect_uri:
            if not registered:
                return _error_page(900971, "No reply address provided.")
            return client, registered[0]
        wanted = _match_key(redirect_uri)
        if wanted is None or all(_match_key(uri) != wanted for uri in registered):
            return _error_page(50011, f"The redirect URI '{redirect_uri}' specified in the request does not match "
                                      f"the redirect URIs configured for the application '{client_id}'. Make sure "
                                      "the redirect URI sent in the request matches one added to your application "
                                      "in the Azure portal. Navigate to https://aka.ms/redirectUriMismatchError to "
                                      "learn more about how to fix this.")
        return client, redirect_uri

    @staticmethod
    def _check_request(tenant: str, params: Mapping[str, str]) -> None:
        """The request's own parameters; OAuthError (sent to the redirect URI) if Entra refuses them."""
        response_type = params.get("response_type", "")
        if not response_type:
            raise OAuthError("invalid_request", 900144,
                             "The request body must contain the following parameter: 'response_type'.")
        if response_type.split() != ["code"]:
            code = 700051 if "token" in response_type.split() else 700054 if "id_token" in response_type else 70005
            raise OAuthError("unsupported_response_type", code,
                             "The provided value for the input parameter 'response_type' is not allowed for "
                             "this client. Expected value is 'code'.")
        mode = params.get("response_mode") or "query"
        if mode not in RESPONSE_MODES:
            raise OAuthError("invalid_request", 70007,
                             f"The provided value '{mode}' for the input parameter 'response_mode' is not valid.")
        scopes = params.get("scope", "").split()
        if not scopes:
            raise OAuthError("invalid_request", 900144,
                             "The request body must contain the following parameter: 'scope'.")
        _resources(scopes, tenant)
        challenge, method = params.get("code_challenge"), params.get("code_challenge_method")
        if method and not challenge:
            raise OAuthError("invalid_request", 900144,
                             "The request body must contain the following parameter: 'code_challenge'.")
        if method and method not in ("S256", "plain"):
            raise OAuthError("invalid_request", 90100,
                             f"Invalid value '{method}' for 'code_challenge_method': use 'S256' or 'plain'.")
        if challenge and not 43 <= len(challenge) <= 128:
            raise OAuthError("invalid_request", 501491, "Invalid size of Code_Challenge parameter.")
        prompt = params.get("prompt")
        if prompt and prompt not in PROMPTS:
            raise OAuthError("invalid_request", 90100, f"Invalid value '{prompt}' for the parameter 'prompt'.")
        if prompt == "none":
            raise OAuthError("login_required", 50058,
                             "A silent sign-in request was sent but no user is signed in.")

    def _listed_users(self, tenant: str, login_hint: str | None) -> list[User]:
        with self._lock:
            users = list(self._users.get(tenant.lower(), {}).values())
        hint = (login_hint or "").lower()
        return sorted(users, key=lambda user: user.username.lower() != hint)  # the hinted account first

    def _issue_code(self, client: Any, tenant: str, redirect_uri: str, redirect_uri_sent: bool, user: User,
                    params: Mapping[str, str]) -> str:
        code = "1.A" + secrets.token_urlsafe(64)
        now = time.time()
        issued = _Code(tenant.lower(), client.client_id, redirect_uri, redirect_uri_sent, user.oid,
                       tuple(params.get("scope", "").split()), params.get("nonce"), params.get("code_challenge"),
                       params.get("code_challenge_method") or "plain", now + self.auth_code_lifetime_seconds,
                       int(now) if params.get("max_age") else None)
        with self._lock:
            for stale in [c for c, held in self._codes.items() if held.expires_at + 3600 < now]:
                del self._codes[stale]
            self._codes[code] = issued
        return code

    async def _logout(self, request: Request) -> Response:
        tenant = request.path_params["tenant"]
        params = dict(request.query_params) if request.method == "GET" else _form_of(await request.body())
        target = params.get("post_logout_redirect_uri")
        if target and self._is_redirect_uri(tenant, params.get("client_id"), target):
            return RedirectResponse(target, status_code=302, headers={"Cache-Control": "no-store"})
        return _logged_out_page()

    def _is_redirect_uri(self, tenant: str, client_id: str | None, uri: str) -> bool:
        wanted = _match_key(uri)
        with self._lock:
            registered = [u for (t, c), client in self._clients.items() if t == tenant.lower()
                          and (not client_id or c == client_id.lower()) for u in client.redirect_uris]
        return wanted is not None and any(_match_key(u) == wanted for u in registered)

    # Token endpoint

    def redeem_code(self, tenant: str, client_id: str, form: Mapping[str, str]) -> Grant:
        """An authorization code for an authenticated client; OAuthError if Entra would refuse it.
        A refused code stays redeemable; a redeemed one never is again."""
        code = form.get("code")
        if not code:
            raise OAuthError("invalid_request", 900144, "The request body must contain the following parameter: 'code'.")
        redirect_uri = form.get("redirect_uri")
        with self._lock:
            issued = self._codes.get(code)
            if issued is None:
                raise OAuthError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
            if issued.tenant != tenant.lower():
                raise OAuthError("invalid_grant", 700005, "Provided Authorization Code is intended to use against "
                                                          "other tenant, thus rejected.")
            if issued.client_id.lower() != client_id.lower():
                raise OAuthError("invalid_grant", 70000, "The provided value for the 'code' parameter is not valid: "
                                                         "the code was issued to another application.")
            if issued.redeemed:
                raise OAuthError("invalid_grant", 54005, "OAuth2 Authorization code was already redeemed, please "
                                                         "retry with a new valid code or use an existing refresh token.")
            if time.time() >= issued.expires_at:
                raise OAuthError("invalid_grant", 70008, "The provided authorization code or refresh token has "
                                                         "expired due to inactivity. Send a new interactive "
                                                         "authorization request for this user and resource.")
            if issued.redirect_uri_sent and not redirect_uri:
                raise OAuthError("invalid_request", 900144,
                                 "The request body must contain the following parameter: 'redirect_uri'.")
            if redirect_uri is not None and redirect_uri != issued.redirect_uri:
                raise OAuthError("invalid_grant", 500112, f"The reply address '{redirect_uri}' does not match the "
                                                          f"reply address '{issued.redirect_uri}' provided when "
                                                          "requesting Authorization code.")
            if issued.challenge is not None and not _pkce_matches(form.get("code_verifier"), issued.challenge,
                                                                  issued.challenge_method):
                raise OAuthError("invalid_grant", 501481, "The Code_Verifier does not match the code_challenge "
                                                          "supplied in the authorization request.")
            requested = tuple(form.get("scope", "").split()) or issued.scopes
            audience, permissions, scope = _access_scopes(requested, tenant)
            issued.redeemed = True
            user = self._users[issued.tenant][issued.oid]
        return Grant(issued.client_id, user, issued.scopes, audience, permissions, scope, issued.nonce,
                     issued.auth_time)

    def redeem_refresh_token(self, tenant: str, client_id: str, form: Mapping[str, str]) -> Grant:
        """A refresh token for an authenticated client (reusable until it expires)."""
        token = form.get("refresh_token")
        if not token:
            raise OAuthError("invalid_request", 900144,
                             "The request body must contain the following parameter: 'refresh_token'.")
        with self._lock:
            held = self._refresh_tokens.get(token)
            if held is None:
                raise OAuthError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
            if held.tenant != tenant.lower() or held.client_id.lower() != client_id.lower():
                raise OAuthError("invalid_grant", 70000, "Provided grant is invalid or malformed.")
            if time.time() >= held.expires_at:
                raise OAuthError("invalid_grant", 700082, "The refresh token has expired due to inactivity.")
            requested = tuple(form.get("scope", "").split()) or held.scopes
            audience, permissions, scope = _access_scopes(requested, tenant)
            user = self._users[held.tenant][held.oid]
        return Grant(held.client_id, user, held.scopes, audience, permissions, scope, None, None)

    def user_tokens(self, grant: Grant, issuer: str, *, client_info: bool, lifetime_seconds: int) -> dict:
        """The token response for a user: access token, ID token (``openid``), refresh token
        (``offline_access``), ``client_info`` when the client asked for it."""
        user = grant.user
        body: dict[str, Any] = {
            "token_type": "Bearer", "scope": grant.scope, "expires_in": lifetime_seconds,
            "ext_expires_in": lifetime_seconds,
            "access_token": tokens.issue_delegated(grant.audience, user.tenant, grant.client_id, oid=user.oid,
                                                   name=user.name, upn=user.username, scopes=grant.permissions,
                                                   lifetime_seconds=lifetime_seconds)}
        if "offline_access" in grant.consented:
            refresh_token = "1.A" + secrets.token_urlsafe(96)
            with self._lock:
                self._refresh_tokens[refresh_token] = _RefreshToken(
                    user.tenant.lower(), grant.client_id, user.oid, grant.consented,
                    time.time() + REFRESH_TOKEN_LIFETIME_SECONDS)
            body["refresh_token"] = refresh_token
        if "openid" in grant.consented:
            body["id_token"] = self.signing_key.sign(self._id_token_claims(grant, issuer))
        if client_info:
            body["client_info"] = _b64(json.dumps({"uid": user.oid, "utid": user.tenant}).encode())
        return body

    @staticmethod
    def _id_token_claims(grant: Grant, issuer: str) -> dict:
        user, now = grant.user, int(time.time())
        subject = _b64(hashlib.sha256(f"{user.tenant.lower()}|{grant.client_id.lower()}|{user.oid}".encode()).digest())
        claims: dict[str, Any] = {"aud": grant.client_id, "iss": issuer, "iat": now, "nbf": now,
                                  "exp": now + ID_TOKEN_LIFETIME_SECONDS}
        if "profile" in grant.consented:
            claims.update(name=user.name, oid=user.oid, preferred_username=user.username)
        if "email" in grant.consented:
            claims["email"] = user.username
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        roles = user.app_roles.get(grant.client_id.lower())
        if roles:
            claims["roles"] = list(roles)
        if grant.auth_time is not None:
            claims["auth_time"] = grant.auth_time
        claims.update(sub=subject, tid=user.tenant, uti=_b64(secrets.token_bytes(16)), ver="2.0")
        return claims
