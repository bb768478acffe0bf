"""Signing out at the simulated Entra ID: ``GET|POST /{tenant}/oauth2/v2.0/logout``, as the
Microsoft identity platform's OpenID Connect page describes it (`sandbox/FIDELITY.md`, "Entra ID"):

- with ``logout_hint`` ("Enables sign-out to occur without prompting the user to select an
  account. To use `logout_hint`, enable the `login_hint` optional claim in your client
  application"), the hinted account's session ends at once;
- without one, a browser signed in to the tenant is asked which account to sign out of ("Pick an
  account"), even when it is signed in with one account only (the strictest reading); the chosen
  account's session ends and the browser's other accounts stay signed in;
- then the browser goes to ``post_logout_redirect_uri`` when it is a registered redirect URI of
  the tenant's apps, else to "You signed out of your account".

An ID token carries ``login_hint`` only when the app registration asks for that optional claim
(`set_optional_claims`). Front-channel logout (Entra calling each signed-in app's registered
LogoutUrl) is not simulated."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sandbox.entra_oauth import match_key
from sandbox.entra_pages import escape, form_of, hidden_fields, logged_out_page, page
from sandbox.entra_signin import SSO_COOKIE

OPTIONAL_ID_TOKEN_CLAIMS = ("login_hint",)
"""The optional ID token claims the simulator knows (those the app may ask for)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class UserSignOut:
    """Sign-out and the ``login_hint`` optional claim of `EntraSimulator` (which provides the lock,
    the registered clients, the users and the browser's single sign-on session)."""

    _lock: threading.Lock
    _clients: dict
    _users: dict
    _sso_key: bytes
    _sso_users: Callable[[Request], set[tuple[str, str]]]
    _sso_value: Callable[[set[tuple[str, str]]], str]

    def set_optional_claims(self, tenant: str, client_id: str, id_token: Iterable[str]) -> None:
        """The optional claims an app registration asks for in its ID tokens (its manifest's
        ``optionalClaims.idToken``): so far only ``login_hint``. KeyError for an unknown client."""
        claims = tuple(dict.fromkeys(id_token))
        unknown = set(claims) - set(OPTIONAL_ID_TOKEN_CLAIMS)
        if unknown:
            raise ValueError(f"unknown optional claim(s) {sorted(unknown)}; known: {OPTIONAL_ID_TOKEN_CLAIMS}")
        with self._lock:
            self._clients[(tenant.lower(), client_id.lower())].optional_claims = claims

    def _optional_claims(self, tenant: str, client_id: str) -> tuple[str, ...]:
        with self._lock:
            client = self._clients.get((tenant.lower(), client_id.lower()))
            return client.optional_claims if client else ()

    def login_hint_of(self, user: Any) -> str:
        """The account's ``login_hint`` claim: opaque to the app, which sends it back as is."""
        payload = _b64(json.dumps([user.tenant.lower(), user.oid]).encode())
        return f"{payload}.{_b64(hmac.new(self._sso_key, b'hint:' + payload.encode(), hashlib.sha256).digest())}"

    def _hinted(self, hint: str | None) -> tuple[str, str] | None:
        """(tenant, oid) of a ``logout_hint`` this simulator issued, or None."""
        payload, _, mac = (hint or "").partition(".")
        expected = _b64(hmac.new(self._sso_key, b"hint:" + payload.encode(), hashlib.sha256).digest())
        if not payload or not hmac.compare_digest(mac, expected):
            return None
        tenant, oid = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(tenant), str(oid)

    async def _logout(self, request: Request) -> Response:
        tenant = request.path_params["tenant"].lower()
        params = dict(request.query_params) if request.method == "GET" else form_of(await request.body())
        signed_in = self._sso_users(request)
        here = sorted(key for key in signed_in if key[0] == tenant)
        chosen = self._hinted(params.get("logout_hint"))
        if chosen is None and here:
            return self._sign_out_picker(tenant, params, here)
        ending = {chosen} if chosen else set()
        target = params.get("post_logout_redirect_uri")
        if target and self._is_redirect_uri(tenant, params.get("client_id"), target):
            response: Response = RedirectResponse(target, status_code=302, headers={"Cache-Control": "no-store"})
        else:
            response = logged_out_page()
        kept = signed_in - ending
        if kept:
            response.set_cookie(SSO_COOKIE, self._sso_value(kept), path="/", httponly=True, samesite="lax")
        else:
            response.delete_cookie(SSO_COOKIE, path="/", httponly=True, samesite="lax")
        return response

    def _sign_out_picker(self, tenant: str, params: dict[str, str], accounts: list[tuple[str, str]]) -> Response:
        """ "Pick an account" to sign out of: one button per account the browser is signed in with."""
        with self._lock:
            users = [self._users.get(t, {}).get(oid) for t, oid in accounts]
        request = {name: value for name, value in params.items() if name != "logout_hint"}
        buttons = "\n".join(
            f"<li><button type=\"submit\" name=\"logout_hint\" value=\"{escape(self.login_hint_of(user))}\">"
            f"<span class=\"name\">{escape(user.name)}</span> <span class=\"username\">{escape(user.username)}</span>"
            "</button></li>" for user in users if user is not None)
        body = ("<h1 id=\"heading\">Pick an account</h1>\n<p>Which account do you want to sign out of?</p>\n"
                f"<form method=\"post\" action=\"/{escape(tenant)}/oauth2/v2.0/logout\" aria-labelledby=\"heading\">\n"
                f"{hidden_fields(request)}\n<ul aria-label=\"Accounts\">\n{buttons}\n</ul>\n</form>")
        return page("Sign out", body)

    def _is_redirect_uri(self, tenant: str, client_id: str | None, uri: str) -> bool:
        wanted = match_key(uri)
        with self._lock:
            registered = [u for (t, c), client in self._clients.items() if t == tenant.lower()
                          and (not client_id or c == client_id.lower()) for u in client.redirect_uris]
        return wanted is not None and any(match_key(u) == wanted for u in registered)
