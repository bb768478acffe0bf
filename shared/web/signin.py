"""Who may use the operator pages: people of the tenant, signed in with their Microsoft 365 account.

The app signs people in itself, with MSAL's authorization-code flow with PKCE, because App Service
Authentication ("Easy Auth") is not supported on the Flex Consumption plan: its documentation says
unauthenticated callers are not even blocked when it is turned on. So a request's
`X-MS-CLIENT-PRINCIPAL` header proves nothing here and is never read.

A sign-in keeps MSAL's flow (state, nonce, PKCE verifier) in a short-lived signed cookie, deleted
by the callback. The callback redeems the code at Entra ID's token endpoint with a throw-away MSAL
client and token cache (no `offline_access`: the app keeps no refresh token of anyone), validates
the ID token itself (`shared.web.oidc`: signature, issuer, audience, tenant, times, nonce), and starts
a server-side session (`shared.web.sessions`); the browser gets its token in a signed cookie.

`authorise` then lets in members of the app's tenant holding the app role `PAGES_ALLOWED_ROLE`
(default `Invoicing.Operator`); guests only with `PAGES_ALLOW_GUESTS`. Roles are re-read within the
hour by a silent sign-in (`prompt=none`), and signing out deletes the session and ends the Entra
ID session too (`end_session_url`)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import threading
import warnings
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlencode

import msal
import requests
from itsdangerous import BadSignature, URLSafeTimedSerializer

from shared.web.oidc import DiscoveryFailed, InvalidIdToken, nonce_hash, provider, validate
from shared.web.sessions import ABSOLUTE_SECONDS, Principal
from shared.settings import PAGES_CALLBACK_PATH, Settings
from shared.web.signing_keys import SigningKeys

log = logging.getLogger(__name__)

SESSION_COOKIE = "bi_session"
FLOW_COOKIE = "bi_signin"
FLOW_SECONDS = 600
PAGES_PREFIX = "/api/pages"
CALLBACK_PATH = PAGES_CALLBACK_PATH
"""Where Entra ID sends people back: a Web redirect URI of the app registration (infra outputs it)."""
SILENT_ERRORS = frozenset({"login_required", "interaction_required", "consent_required", "account_selection_required"})
"""What Entra answers a silent sign-in (`prompt=none`) it cannot complete without the person."""

__all__ = ["Principal", "SignInFailed", "SilentSignInFailed", "NotAllowed", "begin", "complete", "authorise"]


class SignInFailed(Exception):
    """The sign-in did not complete. `reason` is a code the pages explain (`entra-error`, `flow`,
    `state`, `redeem`, `unreachable`, `id-token`); `detail` the specifics (never a token)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, " ".join(detail.split())[:300]


class SilentSignInFailed(Exception):
    """A silent sign-in (roles re-read) needs the person: sign in again interactively."""

    def __init__(self, next_path: str):
        super().__init__(next_path)
        self.next_path = next_path


class NotAllowed(Exception):
    """Signed in, but not someone these pages are for: `reason` is `tenant`, `guest` or `role`."""

    def __init__(self, reason: str, role: str | None = None):
        super().__init__(reason)
        self.reason, self.role = reason, role


@dataclass(frozen=True)
class Completed:
    principal: Principal
    next_path: str
    renews: str | None
    """The session key a silent sign-in renewed (its start time carries over), or None."""


# -- cookies -------------------------------------------------------------------------------------

def cookie_name(name: str, secure: bool) -> str:
    """`__Host-` prefixed over HTTPS: the browser then holds it only for this exact host, Secure,
    with `Path=/`, so neither a sibling subdomain nor plain HTTP can plant or read it."""
    return f"__Host-{name}" if secure else name


def cookie(name: str, value: str, max_age: int, secure: bool) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Lax (the sign-in callback is a top-level GET from
    Entra ID, so Strict would drop the flow cookie), Secure and `__Host-` except on loopback HTTP."""
    path = "/" if secure else PAGES_PREFIX
    parts = [f"{cookie_name(name, secure)}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def read_cookie(header: str | None, name: str, secure: bool) -> str | None:
    if not header:
        return None
    jar = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:  # a malformed Cookie header is the same as none
        return None
    morsel = jar.get(cookie_name(name, secure))
    return morsel.value if morsel else None


def _serializer(keys: SigningKeys, purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(keys.oldest_first, salt=f"bookings-invoicing/{purpose}",
                                  signer_kwargs={"digest_method": hashlib.sha256})


def session_cookie(token: str, keys: SigningKeys, secure: bool) -> str:
    return cookie(SESSION_COOKIE, _serializer(keys, "session").dumps(token), ABSOLUTE_SECONDS, secure)


def session_token(cookie_header: str | None, keys: SigningKeys, secure: bool) -> str | None:
    """The session token a request carries, if the app signed it (with any key in force)."""
    value = read_cookie(cookie_header, SESSION_COOKIE, secure)
    if not value:
        return None
    try:
        token = _serializer(keys, "session").loads(value, max_age=ABSOLUTE_SECONDS)
    except BadSignature:
        return None
    return token if isinstance(token, str) else None


def csrf_token(session_key: str, keys: SigningKeys) -> str:
    """Bound to the session: a form from another session, or from another site, does not carry it."""
    return hmac.new(keys.signing, f"csrf:{session_key}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(session_key: str, keys: SigningKeys, supplied: str | None) -> bool:
    return bool(supplied) and any(
        hmac.compare_digest(hmac.new(key, f"csrf:{session_key}".encode(), hashlib.sha256).hexdigest(), supplied or "")
        for key in keys.keys)


def safe_next(path: str | None) -> str:
    """Only a path of these pages may be returned to after signing in (no open redirect)."""
    if path and path.startswith(PAGES_PREFIX + "/") and "//" not in path and "\\" not in path \
            and not path.startswith(CALLBACK_PATH) and all(32 < ord(c) < 127 for c in path):
        return path
    return f"{PAGES_PREFIX}/bookings"


# -- MSAL ----------------------------------------------------------------------------------------

_http_cache: dict = {}
"""MSAL's HTTP cache, shared by the sign-in clients of the process: tenant discovery once a day."""
_http_cache_lock = threading.Lock()


def _sign_in_client(settings: Settings) -> msal.ConfidentialClientApplication:
    """A confidential client for one sign-in, with its own token cache that is dropped with it:
    the app keeps nobody's tokens. No `offline_access`, so Entra issues no refresh token."""
    from shared.upstream.auth import confidential_client

    with _http_cache_lock:
        return confidential_client(settings, token_cache=msal.TokenCache(), exclude_scopes=["offline_access"],
                                   http_cache=_http_cache)


async def begin(settings: Settings, keys: SigningKeys, redirect_uri: str, next_path: str | None, secure: bool,
                silent: Principal | None = None, renews: str | None = None) -> tuple[str, str]:
    """(URL to send the browser to, Set-Cookie keeping the flow) for a new sign-in; `silent`: the
    user whose roles are re-read without a prompt (`prompt=none` with their `login_hint`)."""
    def initiate() -> dict:
        # The code comes back in the query, not as a cross-site form post: a POST from Entra ID
        # would not carry the SameSite=Lax flow cookie (and SameSite=None needs HTTPS, which a local
        # run has not). PKCE, the client credential and single use make a leaked code worthless,
        # and the callback answers with a redirect under `Referrer-Policy: same-origin`.
        extra = {"prompt": "none", "login_hint": silent.username} if silent else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended")
            return _sign_in_client(settings).initiate_auth_code_flow(scopes=[], redirect_uri=redirect_uri,
                                                                     response_mode="query", **extra)

    try:
        flow = await asyncio.to_thread(initiate)
    except (requests.RequestException, ValueError) as error:
        raise SignInFailed("unreachable", error.__class__.__name__) from None
    auth_uri = flow.pop("auth_uri")
    kept = _serializer(keys, "flow").dumps({"flow": flow, "next": safe_next(next_path), "silent": bool(silent),
                                            "renews": renews})
    return auth_uri, cookie(FLOW_COOKIE, kept, FLOW_SECONDS, secure)


def end_flow_cookie(secure: bool) -> str:
    """The flow cookie, deleted: it served its one callback."""
    return cookie(FLOW_COOKIE, "", 0, secure)


async def complete(settings: Settings, keys: SigningKeys, cookie_header: str | None, params: dict[str, str],
                   secure: bool) -> Completed:
    """Redeem the callback's code and validate the ID token; raises `SignInFailed` (or
    `SilentSignInFailed` when a silent sign-in needs the person after all)."""
    kept = read_cookie(cookie_header, FLOW_COOKIE, secure)
    try:
        state = _serializer(keys, "flow").loads(kept or "", max_age=FLOW_SECONDS)
        flow, next_path, silent, renews = state["flow"], state["next"], state.get("silent"), state.get("renews")
    except (BadSignature, KeyError, TypeError):
        if params.get("error"):
            raise SignInFailed("entra-error", _entra_error(params)) from None
        raise SignInFailed("flow") from None
    if params.get("error"):
        if silent and params["error"] in SILENT_ERRORS and params.get("state") == flow.get("state"):
            raise SilentSignInFailed(next_path)
        raise SignInFailed("entra-error", _entra_error(params))

    def redeem() -> dict:
        return _sign_in_client(settings).acquire_token_by_auth_code_flow(flow, params)

    try:
        result = await asyncio.to_thread(redeem)
    except ValueError as error:  # msal: a state that is not this browser's sign-in
        raise SignInFailed("state", str(error).splitlines()[0][:120]) from None
    except RuntimeError as error:  # msal compares the nonce itself before the app can
        if "nonce" in str(error):
            raise SignInFailed("id-token", "nonce") from None
        raise SignInFailed("redeem", error.__class__.__name__) from None
    except requests.RequestException as error:
        raise SignInFailed("unreachable", error.__class__.__name__) from None
    if "error" in result:
        description = (result.get("error_description") or "").splitlines()
        raise SignInFailed("redeem", f"{result['error']}{': ' + description[0] if description else ''}")
    try:
        found = await asyncio.to_thread(provider, settings)
        claims = await asyncio.to_thread(validate, result.get("id_token") or "", found, str(settings.client_id),
                                         nonce_hash(flow["nonce"]))
    except DiscoveryFailed as error:
        raise SignInFailed("unreachable", str(error)) from None
    except InvalidIdToken as error:
        raise SignInFailed("id-token", error.reason) from None
    principal = Principal(oid=str(claims["oid"]), tid=str(claims["tid"]), name=str(claims.get("name") or ""),
                          username=str(claims.get("preferred_username") or ""),
                          roles=tuple(str(r) for r in claims.get("roles") or () if isinstance(r, str)),
                          guest=_is_guest(claims), login_hint=_login_hint(claims))
    return Completed(principal, next_path, renews)


def _login_hint(claims: dict) -> str:
    """The optional `login_hint` claim (the app registration asks for it: infra's hook), if it is
    one Entra could take back (opaque, but never markup or a novel)."""
    hint = claims.get("login_hint")
    return hint if isinstance(hint, str) and 0 < len(hint) <= 2048 and hint.isprintable() else ""


def _entra_error(params: dict[str, str]) -> str:
    description = (params.get("error_description") or "").splitlines()
    return f"{params.get('error', '')}{': ' + description[0] if description else ''}"


_TENANT_AUTHORITY = re.compile(r"https://[^/?#]+/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                               r"[0-9a-fA-F]{12})(/|/v2\.0/?)?")
"""An issuer naming a tenant: v1 ``https://sts.windows.net/{tid}/`` or v2 ``https://…/{tid}/v2.0``."""


def _is_guest(claims: dict) -> bool:
    """A guest (B2B) account: authenticated by another identity provider than the token's own
    tenant, or the optional `acct` claim says 1. Entra names the provider in `idp` (absent: the
    issuer) as an issuer URI in either form, v1 or v2, or as a name such as ``live.com``; so
    `idp` is compared by the tenant it names, and one that names no tenant is another provider."""
    if claims.get("acct") == 1:
        return True
    idp = claims.get("idp")
    if idp is None:
        return False
    named = _TENANT_AUTHORITY.fullmatch(str(idp))
    return named is None or named.group(1).lower() != str(claims.get("tid") or "").lower()


def authorise(principal: Principal, settings: Settings) -> None:
    """Raise `NotAllowed` unless the user is a member of the app's tenant (a guest only with
    `PAGES_ALLOW_GUESTS`) holding the app role the pages require. (With AZURE_TENANT_ID a domain
    name, the tenant is the one whose issuer validated the ID token at sign-in.)"""
    tenant = (settings.tenant_id or "").lower()
    if not tenant or ("." not in tenant and principal.tid.lower() != tenant):
        raise NotAllowed("tenant")
    if principal.guest and not settings.pages_allow_guests:
        raise NotAllowed("guest")
    role = settings.pages_need_role
    if role and role not in principal.roles:
        raise NotAllowed("role", role)


async def end_session_url(settings: Settings, post_logout_redirect_uri: str, logout_hint: str = "") -> str | None:
    """Entra ID's end-session endpoint for this sign-out, or None if discovery does not name one.
    With the account's `logout_hint` (its ID token's `login_hint`), Entra ends that account's
    session without asking which account to sign out of (OpenID Connect on the Microsoft identity
    platform: "Enables sign-out to occur without prompting the user to select an account")."""
    try:
        found = await asyncio.to_thread(provider, settings)
    except DiscoveryFailed:
        return None
    if not found.end_session_endpoint:
        return None
    query = {"post_logout_redirect_uri": post_logout_redirect_uri, **({"logout_hint": logout_hint} if logout_hint else {})}
    return f"{found.end_session_endpoint}?{urlencode(query)}"
