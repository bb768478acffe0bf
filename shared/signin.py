"""Who may use the operator pages: people of the tenant, signed in with their Microsoft 365 account.

The app signs people in itself, with MSAL's authorization-code flow with PKCE, because App Service
Authentication ("Easy Auth") is not supported on the Flex Consumption plan: its documentation says
unauthenticated callers are not even blocked when it is turned on. So a request's
`X-MS-CLIENT-PRINCIPAL` header proves nothing here and is never read.

A sign-in keeps MSAL's flow (state, nonce, PKCE verifier) in a short-lived signed cookie; the
callback redeems the code at Entra ID's token endpoint (the app authenticates as the app
registration), MSAL checks the ID token's issuer, audience, expiry and nonce, and the app checks
the tenant and, if `PAGES_ALLOWED_ROLE` is set, the user's app role. The session is then a signed
cookie (HttpOnly, SameSite=Lax, Secure over HTTPS) valid for `SESSION_SECONDS`; every form
carries a CSRF token derived from it.

The signing key is random, made once and kept in the storage account (`pages/signing-key`), so
there is no secret setting to manage and every instance signs alike."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import threading
import warnings
from dataclasses import dataclass
from http.cookies import SimpleCookie

import msal
import requests
from azure.core.exceptions import ResourceExistsError
from itsdangerous import BadSignature, URLSafeTimedSerializer

from shared.settings import Settings
from shared.store import Store

log = logging.getLogger(__name__)

SESSION_COOKIE = "bi_session"
FLOW_COOKIE = "bi_signin"
SESSION_SECONDS = 8 * 3600
FLOW_SECONDS = 600
SIGNING_KEY_BLOB = "pages/signing-key"
PAGES_PREFIX = "/api/pages"
CALLBACK_PATH = f"{PAGES_PREFIX}/signin/callback"
"""Where Entra ID sends people back: a Web redirect URI of the app registration (infra outputs it)."""


class SignInFailed(Exception):
    """The sign-in did not complete; the message says why in words a person can act on."""


class NotAllowed(Exception):
    """Signed in, but not someone these pages are for (another tenant, or without the app role)."""


@dataclass(frozen=True)
class Principal:
    """A verified user: from an ID token MSAL checked, carried in the signed session cookie."""
    oid: str
    tid: str
    name: str
    username: str
    roles: tuple[str, ...]
    sid: str

    def as_dict(self) -> dict:
        return {"oid": self.oid, "tid": self.tid, "name": self.name, "username": self.username,
                "roles": list(self.roles), "sid": self.sid}

    @classmethod
    def from_dict(cls, data: dict) -> Principal:
        return cls(str(data["oid"]), str(data["tid"]), str(data.get("name") or ""), str(data.get("username") or ""),
                   tuple(str(r) for r in data.get("roles") or ()), str(data["sid"]))


# -- the signing key -----------------------------------------------------------------------------

_keys: dict[int, bytes] = {}
_key_lock = asyncio.Lock()


async def signing_key(store: Store) -> bytes:
    """The key every instance signs sessions with: made by whichever instance needs it first."""
    cached = _keys.get(id(store))
    if cached:
        return cached
    async with _key_lock:
        if id(store) not in _keys:
            key = await store.read_blob(SIGNING_KEY_BLOB)
            if not key:
                try:
                    await store.write_blob(SIGNING_KEY_BLOB, secrets.token_bytes(32), "application/octet-stream",
                                           overwrite=False)
                except ResourceExistsError:
                    pass  # another instance made it first: use theirs
                key = await store.read_blob(SIGNING_KEY_BLOB)
            _keys[id(store)] = key
    return _keys[id(store)]


def _serializer(key: bytes, purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(key, salt=f"bookings-invoicing/{purpose}")


# -- cookies -------------------------------------------------------------------------------------

def read_cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    jar = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 - a malformed Cookie header is the same as none
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None


def cookie(name: str, value: str, max_age: int, secure: bool) -> str:
    """A Set-Cookie value scoped to the pages: HttpOnly, SameSite=Lax (the sign-in callback is a
    top-level GET from Entra ID, so Strict would drop the flow cookie), Secure over HTTPS."""
    parts = [f"{name}={value}", f"Path={PAGES_PREFIX}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def session_cookie(principal: Principal, key: bytes, secure: bool) -> str:
    return cookie(SESSION_COOKIE, _serializer(key, "session").dumps(principal.as_dict()), SESSION_SECONDS, secure)


def principal_of(cookie_header: str | None, key: bytes) -> Principal | None:
    """The signed-in user of a request, or None (no session, a forged or an expired one)."""
    value = read_cookie(cookie_header, SESSION_COOKIE)
    if not value:
        return None
    try:
        return Principal.from_dict(_serializer(key, "session").loads(value, max_age=SESSION_SECONDS))
    except (BadSignature, KeyError, TypeError, ValueError):
        return None


def csrf_token(principal: Principal, key: bytes) -> str:
    """Bound to the session: a form from another session, or from another site, does not carry it."""
    return hmac.new(key, f"csrf:{principal.sid}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(principal: Principal, key: bytes, supplied: str | None) -> bool:
    return bool(supplied) and hmac.compare_digest(csrf_token(principal, key), supplied or "")


def safe_next(path: str | None) -> str:
    """Only a path of these pages may be returned to after signing in (no open redirect)."""
    if path and path.startswith(PAGES_PREFIX + "/") and "//" not in path and "\\" not in path:
        return path
    return f"{PAGES_PREFIX}/bookings"


# -- MSAL ----------------------------------------------------------------------------------------

_apps: dict[tuple, msal.ConfidentialClientApplication] = {}
_apps_lock = threading.Lock()


def _sign_in_app(settings: Settings) -> msal.ConfidentialClientApplication:
    """The app registration as a confidential client, one per process (MSAL caches discovery)."""
    key = (settings.authority_host, settings.tenant_id, settings.client_id, settings.client_secret,
           settings.federated_identity_client_id)
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            from shared.auth import confidential_client

            # The app registration redeems the code with the same credential it uses for Graph and BC.
            app = _apps[key] = confidential_client(settings)
        return app


async def begin(settings: Settings, key: bytes, redirect_uri: str, next_path: str | None, secure: bool
                ) -> tuple[str, str]:
    """(URL to send the browser to, Set-Cookie keeping the flow) for a new sign-in."""
    def initiate() -> dict:
        # The code comes back in the query, not as a cross-site form post: a POST from Entra ID
        # would not carry the SameSite=Lax flow cookie (and SameSite=None needs HTTPS, which a local
        # run has not). PKCE, the client secret and single use make a leaked code worthless, and
        # the callback answers with a redirect under `Referrer-Policy: same-origin`.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="response_mode='form_post' is recommended")
            return _sign_in_app(settings).initiate_auth_code_flow(scopes=[], redirect_uri=redirect_uri,
                                                                  response_mode="query")

    try:
        flow = await asyncio.to_thread(initiate)
    except (requests.RequestException, ValueError) as error:
        raise SignInFailed(f"Microsoft Entra ID could not be reached to sign in ({error.__class__.__name__}).") \
            from None
    auth_uri = flow.pop("auth_uri")
    kept = _serializer(key, "flow").dumps({"flow": flow, "next": safe_next(next_path)})
    return auth_uri, cookie(FLOW_COOKIE, kept, FLOW_SECONDS, secure)


async def complete(settings: Settings, key: bytes, cookie_header: str | None, params: dict[str, str]
                   ) -> tuple[Principal, str]:
    """Redeem the callback's code; (the verified user, the page to return to)."""
    if params.get("error"):
        raise SignInFailed(f"Microsoft Entra ID did not sign you in: {params.get('error_description') or params['error']}")
    kept = read_cookie(cookie_header, FLOW_COOKIE)
    try:
        state = _serializer(key, "flow").loads(kept or "", max_age=FLOW_SECONDS)
        flow, next_path = state["flow"], state["next"]
    except (BadSignature, KeyError, TypeError):
        raise SignInFailed("The sign-in took too long or was started in another browser; please sign in again.") \
            from None

    def redeem() -> dict:
        return _sign_in_app(settings).acquire_token_by_auth_code_flow(flow, params)

    try:
        result = await asyncio.to_thread(redeem)
    except (requests.RequestException, ValueError) as error:
        # msal raises ValueError for a state mismatch: a callback that is not this browser's sign-in.
        raise SignInFailed(f"The sign-in could not be completed ({str(error).splitlines()[0][:200]}).") from None
    if "error" in result:
        description = (result.get("error_description") or "").splitlines()
        raise SignInFailed(f"Microsoft Entra ID refused the sign-in: {result['error']}"
                           f"{': ' + description[0] if description else ''}")
    claims = result.get("id_token_claims") or {}
    principal = Principal(oid=str(claims.get("oid") or claims.get("sub") or ""), tid=str(claims.get("tid") or ""),
                          name=str(claims.get("name") or ""), username=str(claims.get("preferred_username") or ""),
                          roles=tuple(str(r) for r in claims.get("roles") or ()), sid=secrets.token_urlsafe(16))
    if not principal.oid:
        raise SignInFailed("The ID token names no user.")
    log.info("operator signed in", extra={"event": "pages_signed_in", "user_oid": principal.oid})
    return principal, next_path


def authorise(principal: Principal, settings: Settings) -> None:
    """Raise `NotAllowed` unless the user belongs to the app's tenant (and holds the app role)."""
    if not settings.tenant_id or principal.tid.lower() != settings.tenant_id.lower():
        raise NotAllowed("Your account belongs to another organisation than this app's.")
    role = settings.pages_allowed_role
    if role and role not in principal.roles:
        raise NotAllowed(f"Your account does not hold the app role '{role}'. An administrator can assign it in the "
                         "Entra admin center: Enterprise applications → this app → Users and groups.")
