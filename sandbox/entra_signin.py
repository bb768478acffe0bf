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
- ``GET|POST /{tenant}/oauth2/v2.0/logout``: `sandbox.entra_signout`.

No passwords and no consent prompt (whatever is asked for counts as consented). Choosing an
account also signs the browser in to the simulator (an SSO cookie, `SSO_COOKIE`, ended by the
logout endpoint): a later ``prompt=none`` request for that user (``login_hint``) is answered with a
code and no page, as Entra's single sign-on does; without that session it fails ``login_required``,
and for a user who was disabled meanwhile ``interaction_required``. An interactive request still
shows the account picker every time.
The pages carry no script; their one stylesheet is allowed by hash in a strict CSP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox import entra_idtokens, tokens
from sandbox.entra_oauth import (OAuthError, access_scopes, check_redirect_uri, match_key, pkce_matches,
                                 requested_resources, returned_uri)
from sandbox.entra_pages import answer, error_page, form_of, picker

AUTH_CODE_LIFETIME_SECONDS = 600
"""Entra: "Authorization codes are short lived. Typically, they expire after about 10 minutes." """
REFRESH_TOKEN_LIFETIME_SECONDS = 90 * 24 * 3600
SSO_COOKIE = "sim_sso"
"""The browser's single sign-on session at the simulator (Entra's is ``ESTSAUTH``)."""
RESPONSE_MODES = ("query", "fragment", "form_post")
PROMPTS = ("login", "none", "consent", "select_account", "create")


@dataclass(frozen=True)
class User:
    tenant: str
    oid: str
    name: str
    username: str
    app_roles: Mapping[str, tuple[str, ...]]
    """Client id (lower case) → the app roles assigned to the user for that application."""
    home_tenant: str | None = None
    """A guest's home tenant (B2B): their ID tokens carry that tenant's issuer as ``idp``."""
    enabled: bool = True

    def as_dict(self) -> dict:
        return {"tenant": self.tenant, "oid": self.oid, "name": self.name, "username": self.username,
                "app_roles": {client: list(roles) for client, roles in self.app_roles.items()},
                "home_tenant": self.home_tenant, "enabled": self.enabled}


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
        self.retired_keys: list[tokens.SigningKey] = []
        """Keys rolled over from (`EntraSimulator.rotate_signing_key`), still in the JWKS."""
        self._users: dict[str, dict[str, User]] = {}
        self._codes: dict[str, _Code] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._sso_key = secrets.token_bytes(32)
        self._spoils: list[str] = []
        self.member_idp: str | None = None
        """Whether and how a member's ID token names the identity provider: None, no ``idp`` claim
        ("If the claim isn't present, it means that the value of `iss` can be used"); ``issuer``,
        ``idp`` = ``iss`` ("identical to the value of the issuer claim unless the user account isn't
        in the same tenant"); ``v1``, the tenant's v1 issuer ``https://sts.windows.net/{tid}/``, the
        form guests' home tenants are named in (the docs add that it "should always be sent in
        managed domain scenarios"; in which form for members they do not say)."""
        self.disabled_user_error = "interaction_required"
        """What ``prompt=none`` answers for a signed-in user who was disabled since (not documented;
        the other plausible reading: ``access_denied``)."""

    def _known_tenant(self, tenant: str) -> bool:
        with self._lock:
            return tenant.lower() in self._tenants

    # Data API

    def add_user(self, tenant: str, *, name: str, username: str, oid: str | None = None,
                 app_roles: Mapping[str, Iterable[str]] | None = None, guest_of: str | None = None) -> dict:
        """A user of `tenant` (with no password: the account picker signs them in); `guest_of`: a
        guest whose home is that tenant. `app_roles`: per client id, the app roles assigned to the
        user for that application (the ID token's ``roles``). Adding a username again replaces that
        user's name and roles (enabled again) and keeps their ``oid``. Returns the user as a dict
        (``oid``, ``name``, ``username``…)."""
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
            user = User(tenant, chosen, name, username, roles, guest_of)
            users[chosen] = user
            self._tenants.add(tenant.lower())
            return user.as_dict()

    def set_user_enabled(self, tenant: str, username: str, enabled: bool) -> None:
        """Disable (or enable again) a user's account: a disabled user cannot sign in, silently or
        not. KeyError for an unknown user."""
        with self._lock:
            users = self._users.get(tenant.lower(), {})
            user = next(u for u in users.values() if u.username.lower() == username.lower())
            users[user.oid] = dataclasses.replace(user, enabled=enabled)

    def spoil_id_tokens(self, kind: str, times: int = 1) -> None:
        """Make the next `times` ID tokens bad in one way (`entra_idtokens.SPOILS`): a wrong issuer,
        audience or tenant, expired, not yet valid, a bad signature or unknown key, unsigned, another
        sign-in's nonce, no ``oid``. ValueError for an unknown kind."""
        if kind not in entra_idtokens.SPOILS:
            raise ValueError(f"unknown kind of bad ID token {kind!r}; known: {sorted(entra_idtokens.SPOILS)}")
        with self._lock:
            self._spoils.extend([kind] * times)

    def reset_sign_in(self) -> None:
        """The sign-in knobs back to their defaults: no bad ID tokens pending, members' tokens
        without ``idp``, ``interaction_required`` for a disabled user (users stay as they are)."""
        with self._lock:
            self._spoils.clear()
        self.member_idp = None
        self.disabled_user_error = "interaction_required"

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
        params = dict(request.query_params) if request.method == "GET" else form_of(await request.body())
        checked = self._check_client(tenant, params)
        if isinstance(checked, Response):
            return checked
        client, redirect_uri = checked
        mode = params.get("response_mode") or "query"
        reply = returned_uri(redirect_uri)
        state = {"state": params["state"]} if params.get("state") else {}
        try:
            self._check_request(tenant, params)
        except OAuthError as error:
            return answer(reply, mode if mode in RESPONSE_MODES else "query", {
                "error": error.error, "error_description": _error_description(error.code, error.description),
                "error_uri": f"https://login.microsoftonline.com/error?code={error.code}", **state})
        if params.get("prompt") == "none":
            return self._silent(request, client, tenant, redirect_uri, reply, mode, params, state)
        users = self._listed_users(tenant, params.get("login_hint"))
        if params.get("action") == "cancel":
            return answer(reply, mode, {
                "error": "access_denied",
                "error_description": _error_description(65004, "User declined to consent to access the app."),
                **state})
        if "account" not in params:
            return picker(tenant, params, users)
        user = next((u for u in users if u.oid == params["account"].lower()), None)
        if user is None:
            return picker(tenant, params, users, problem="That account is not in this directory. Pick another.",
                          status=400)
        if not user.enabled:
            return picker(tenant, params, users, problem="AADSTS50057: The user account is disabled.", status=400)
        response = self._code_answer(client, tenant, redirect_uri, reply, mode, user, params, state)
        # The browser keeps its other accounts signed in too (Entra's "Pick an account" lists them).
        signed_in = self._sso_users(request) | {(tenant.lower(), user.oid)}
        response.set_cookie(SSO_COOKIE, self._sso_value(signed_in), path="/", httponly=True, samesite="lax")
        return response

    def _code_answer(self, client: Any, tenant: str, redirect_uri: str, reply: str, mode: str, user: User,
                     params: Mapping[str, str], state: dict) -> Response:
        code = self._issue_code(client, tenant, redirect_uri, "redirect_uri" in params, user, params)
        values = {"code": code, **state}
        if params.get("client_info") == "1":  # what msal asks for, and reads back from this response
            values["client_info"] = _b64(json.dumps({"uid": user.oid, "utid": user.tenant}).encode())
        return answer(reply, mode, values)

    def _silent(self, request: Request, client: Any, tenant: str, redirect_uri: str, reply: str, mode: str,
                params: Mapping[str, str], state: dict) -> Response:
        """``prompt=none``: a code for the user this browser is signed in as (the ``login_hint`` one
        when several are), or an error, never a page."""
        with self._lock:
            users = self._users.get(tenant.lower(), {})
            signed_in = [users[oid] for t, oid in self._sso_users(request) if t == tenant.lower() and oid in users]
        hint = (params.get("login_hint") or "").lower()
        chosen = [u for u in signed_in if u.username.lower() == hint] if hint else signed_in
        if len(chosen) != 1:
            return answer(reply, mode, {"error": "login_required", "error_description": _error_description(
                50058, "A silent sign-in request was sent but no user is signed in."), **state})
        if not chosen[0].enabled:
            return answer(reply, mode, {"error": self.disabled_user_error, "error_description": _error_description(
                50057, "The user account is disabled."), **state})
        return self._code_answer(client, tenant, redirect_uri, reply, mode, chosen[0], params, state)

    def _sso_value(self, signed_in: set[tuple[str, str]]) -> str:
        payload = _b64(json.dumps(sorted(signed_in)).encode())
        return f"{payload}.{_b64(hmac.new(self._sso_key, payload.encode(), hashlib.sha256).digest())}"

    def _sso_users(self, request: Request) -> set[tuple[str, str]]:
        """(tenant, oid) of every user this browser is signed in as (the simulator's SSO cookie)."""
        payload, _, mac = (request.cookies.get(SSO_COOKIE) or "").partition(".")
        expected = _b64(hmac.new(self._sso_key, payload.encode(), hashlib.sha256).digest())
        if not payload or not hmac.compare_digest(mac, expected):
            return set()
        try:
            return {(str(t), str(o)) for t, o in json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))}
        except (ValueError, TypeError):
            return set()

    def _check_client(self, tenant: str, params: Mapping[str, str]) -> tuple[Any, str] | Response:
        """The client and the redirect URI to answer to, or the error page Entra shows instead."""
        if not self._known_tenant(tenant):
            return error_page(90002, f"Tenant '{tenant}' not found. Check to make sure you have the correct "
                                      "tenant ID and are signing into the correct cloud.")
        client_id = params.get("client_id")
        if not client_id:
            return error_page(900144, "The request body must contain the following parameter: 'client_id'.")
        with self._lock:
            client = self._clients.get((tenant.lower(), client_id.lower()))
            registered = list(client.redirect_uris) if client else []
        if client is None:
            return error_page(700016, f"Application with identifier '{client_id}' was not found in the directory "
                                       f"'{tenant}'. This can happen if the application has not been installed by "
                                       "the administrator of the tenant or consented to by any user in the tenant. "
                                       "You may have sent your authentication request to the wrong tenant.")
        redirect_uri = params.get("redirect_uri")
        if not redirect_uri:
            if not registered:
                return error_page(900971, "No reply address provided.")
            return client, registered[0]
        wanted = match_key(redirect_uri)
        if wanted is None or all(match_key(uri) != wanted for uri in registered):
            return error_page(50011, f"The redirect URI '{redirect_uri}' specified in the request does not match "
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
        requested_resources(scopes, tenant)
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
            if issued.challenge is not None and not pkce_matches(form.get("code_verifier"), issued.challenge,
                                                                  issued.challenge_method):
                raise OAuthError("invalid_grant", 501481, "The Code_Verifier does not match the code_challenge "
                                                          "supplied in the authorization request.")
            requested = tuple(form.get("scope", "").split()) or issued.scopes
            audience, permissions, scope = access_scopes(requested, tenant)
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
            audience, permissions, scope = access_scopes(requested, tenant)
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
            claims = entra_idtokens.id_token_claims(
                client_id=grant.client_id, tenant=user.tenant, issuer=issuer, oid=user.oid, name=user.name,
                username=user.username, consented=grant.consented, nonce=grant.nonce,
                roles=user.app_roles.get(grant.client_id.lower()), auth_time=grant.auth_time,
                home_tenant=user.home_tenant, member_idp=self.member_idp)
            if "login_hint" in self._optional_claims(user.tenant, grant.client_id):
                claims["login_hint"] = self.login_hint_of(user)
            with self._lock:
                spoil = self._spoils.pop(0) if self._spoils else None
            body["id_token"] = entra_idtokens.sign(claims, self.signing_key, spoil)
        if client_info:
            body["client_info"] = _b64(json.dumps({"uid": user.oid, "utid": user.tenant}).encode())
        return body
