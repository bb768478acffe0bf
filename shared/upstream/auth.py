"""Access tokens for Graph and Business Central, from Entra ID, as the app registration.

The app always acts as its app registration (`AZURE_CLIENT_ID`), the identity Business Central's
*Microsoft Entra Applications* page lists. It proves it is that app in one of two ways:
- **a federated credential** (the default in Azure, no secret anywhere): the app registration
  trusts the Function App's user-assigned managed identity (`AZURE_FEDERATED_IDENTITY_CLIENT_ID`);
  the app asks that identity for a token for `api://AzureADTokenExchange` and presents it as the
  client assertion (Microsoft's "configure an application to trust a managed identity");
- **a client secret** (`AZURE_CLIENT_SECRET`, a Key Vault reference in Azure), which must be rotated.
Certificates are not offered: Flex Consumption cannot load them. Nor is the managed identity used
as the client itself: Business Central's documentation registers app registrations, not managed
identities.

MSAL keeps tokens in its in-memory caches (the app's and the managed identity's), so one
`TokenProvider` per process asks Entra ID about once an hour per scope. Tokens and secrets are
never logged."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import msal
import requests

from shared.upstream.errors import UpstreamError, UpstreamThrottled, parse_retry_after
from shared.settings import Settings, SettingsError

log = logging.getLogger(__name__)

TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"  # noqa: S105 - an audience, not a secret
"""The audience of a managed identity's token that an app registration's federated credential accepts."""


MSAL_DEFAULT_THROTTLE_SECONDS = 5.0
"""How long msal serves a 429 without `Retry-After` from its cache (`RetryAfterParser(5)`)."""


class TokenThrottled(UpstreamThrottled):
    """Entra ID answered the app's token request 429: it (and msal, which serves that answer from
    its cache meanwhile) is not asked again before `retry_after` seconds (Entra: `Retry-After: 60`)."""

    def __init__(self, seconds: float):
        super().__init__("Entra ID", 429, "TokenThrottled",
                         f"Entra ID is throttling the app's token requests; asked again in {seconds:.0f} s")
        self.retry_after = seconds


class _ThrottleAware(requests.Session):
    """The HTTP client msal uses: remembers until when Entra ID asked (429, `Retry-After`) not to
    be asked again, which msal's own answer does not say. Honours REQUESTS_CA_BUNDLE like any Session."""

    def __init__(self) -> None:
        super().__init__()
        self.throttled_until = 0.0

    def request(self, method, url, *args, **kwargs):
        response = super().request(method, url, *args, **kwargs)
        if response.status_code == 429:
            seconds = parse_retry_after(response.headers.get("Retry-After"))
            self.throttled_until = time.monotonic() + (MSAL_DEFAULT_THROTTLE_SECONDS if seconds is None else seconds)
        return response

    def throttled_for(self) -> float:
        return max(0.0, self.throttled_until - time.monotonic())


class AuthenticationFailed(UpstreamError):
    """Entra ID refused to issue a token; the message says why (never the secret)."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__("Entra ID", None, "TokenRefused", message)
        self.retryable_override = retryable

    def __str__(self) -> str:
        return self.message


def _managed_identity_assertion(identity_client_id: str) -> Callable[[], str]:
    """A callable MSAL calls for a fresh client assertion: the managed identity's token for
    `api://AzureADTokenExchange` (cached by MSAL's managed-identity client until near expiry)."""
    identity = msal.ManagedIdentityClient(msal.UserAssignedManagedIdentity(client_id=identity_client_id),
                                          http_client=requests.Session())

    def assertion() -> str:
        result = identity.acquire_token_for_client(resource=TOKEN_EXCHANGE_AUDIENCE)
        token = result.get("access_token") if isinstance(result, dict) else None
        if not token:
            error = result.get("error", "unknown_error") if isinstance(result, dict) else "unknown_error"
            raise AuthenticationFailed(
                f"The managed identity (AZURE_FEDERATED_IDENTITY_CLIENT_ID) got no token for "
                f"{TOKEN_EXCHANGE_AUDIENCE}: {error}. Is this user-assigned identity attached to the Function App?",
                retryable=error in ("temporarily_unavailable", "server_error"))
        return token

    return assertion


_credentials: dict[tuple, str | dict] = {}
_credentials_lock = threading.Lock()


def client_credential(settings: Settings) -> str | dict:
    """The app registration's credential as MSAL takes it: the secret, or the managed identity's
    token as a client assertion (federated credential). One per process, so the managed identity's
    token cache is shared by every client built from it."""
    settings.require("tenant_id", "client_id")
    if settings.client_secret:
        return settings.client_secret
    if settings.federated_identity_client_id:
        key = (settings.authority_host, settings.federated_identity_client_id)
        with _credentials_lock:
            credential = _credentials.get(key)
            if credential is None:
                credential = _credentials[key] = {
                    "client_assertion": _managed_identity_assertion(settings.federated_identity_client_id)}
            return credential
    raise SettingsError("Setting AZURE_FEDERATED_IDENTITY_CLIENT_ID (the managed identity the app registration "
                        "trusts) or AZURE_CLIENT_SECRET is required: the app signs in as AZURE_CLIENT_ID with one "
                        "of them.")


def confidential_client(settings: Settings, **options) -> msal.ConfidentialClientApplication:
    """The app registration as MSAL's confidential client, for the app's own tokens and for
    redeeming the codes of people who sign in to the pages (`options`: MSAL's own, such as a
    throw-away `token_cache`)."""
    options.setdefault("http_client", requests.Session())  # honours REQUESTS_CA_BUNDLE: trust from the environment
    return msal.ConfidentialClientApplication(
        settings.client_id,
        client_credential=client_credential(settings),
        authority=f"{settings.authority_host}/{settings.tenant_id}",
        instance_discovery=None if settings.is_public_authority else False,
        **options,
    )


class TokenProvider:
    """Tokens per scope for one identity. Thread-safe; MSAL calls run off the event loop."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._lock = threading.Lock()
        self._http = _ThrottleAware()
        self._app = self._build()
        self._cached: dict[str, tuple[str, float]] = {}
        self._scope_locks: dict[str, threading.Lock] = {}
        self.tokens_acquired = 0

    def _build(self) -> msal.ConfidentialClientApplication:
        return confidential_client(self._settings, http_client=self._http)

    def _acquire(self, scope: str) -> str:
        # One request to Entra ID per scope at a time: concurrent callers wait and reuse it.
        with self._scope_locks.setdefault(scope, threading.Lock()):
            cached = self._cached.get(scope)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            return self._acquire_now(scope)

    def _acquire_now(self, scope: str) -> str:
        # Entra ID answers a storm of token requests with 429 and `Retry-After: 60`, and msal keeps
        # answering from that 429 meanwhile: say so at once, so the work is put off, not retried.
        if self._http.throttled_for() > 0:
            raise TokenThrottled(self._http.throttled_for())
        with self._lock:
            app = self._app
        result = app.acquire_token_for_client(scopes=[scope])
        token = result.get("access_token") if isinstance(result, dict) else None
        if token:
            lifetime = float(result.get("expires_in") or 300)
            with self._lock:
                self._cached[scope] = (token, time.monotonic() + max(lifetime - 300, lifetime / 2))
                self.tokens_acquired += result.get("token_source") == "identity_provider"
        if not token and self._http.throttled_for() > 0:
            raise TokenThrottled(self._http.throttled_for())
        if not token:
            error = result.get("error", "unknown_error") if isinstance(result, dict) else "unknown_error"
            description = (result.get("error_description") or "") if isinstance(result, dict) else ""
            raise AuthenticationFailed(f"Entra ID refused a token for {scope}: {error}. "
                                       f"{description.splitlines()[0] if description else ''}".strip(),
                                       retryable=error in ("temporarily_unavailable", "server_error"))
        return token

    async def token(self, scope: str) -> str:
        cached = self._cached.get(scope)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        try:
            return await asyncio.to_thread(self._acquire, scope)
        except (requests.RequestException, msal.exceptions.MsalError, ValueError) as error:
            # Entra ID down, throttling or a dropped connection: as retryable as any upstream fault.
            raise UpstreamError("Entra ID", None, type(error).__name__,
                                f"no token for {scope}: {str(error).splitlines()[0][:200] if str(error) else ''}") \
                from None

    def refresh(self) -> None:
        """Forget cached tokens (after a 401): the next call asks Entra ID again."""
        with self._lock:
            self._app = self._build()
            self._cached.clear()

    def source(self, scope: str):
        """A zero-argument async callable for `ApiClient`, with `.refresh` for a 401."""
        async def get() -> str:
            return await self.token(scope)

        async def refresh() -> None:
            await asyncio.to_thread(self.refresh)

        get.refresh = refresh  # type: ignore[attr-defined]
        return get


_providers: dict[tuple, TokenProvider] = {}
_providers_lock = threading.Lock()


def token_provider(settings: Settings) -> TokenProvider:
    """The process-wide provider for these credentials (so the token cache is shared)."""
    key = (settings.authority_host, settings.tenant_id, settings.client_id,
           settings.client_secret, settings.federated_identity_client_id)
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            provider = _providers[key] = TokenProvider(settings)
        return provider
