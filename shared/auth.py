"""Access tokens for Graph and Business Central, from Entra ID.

With `AZURE_CLIENT_SECRET` (or `AZURE_CLIENT_CERTIFICATE_PATH`) the app uses the client
credentials of its app registration; without either it uses the Function App's managed identity
(`AZURE_CLIENT_ID` then names a user-assigned identity, if any). MSAL keeps tokens in its
in-memory cache, so one `TokenProvider` per process asks Entra ID about once an hour per scope.

Tokens and secrets are never logged."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import msal
import requests

from shared.http import UpstreamError
from shared.settings import Settings, SettingsError

log = logging.getLogger(__name__)


class AuthenticationFailed(UpstreamError):
    """Entra ID refused to issue a token; the message says why (never the secret)."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__("Entra ID", None, "TokenRefused", message)
        self.retryable_override = retryable

    def __str__(self) -> str:
        return self.message


def _certificate_credential(path: str) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        pem = Path(path).read_bytes()
        certificate = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as error:
        raise SettingsError(f"Setting AZURE_CLIENT_CERTIFICATE_PATH: cannot read a PEM certificate "
                            f"with its private key at {path!r} ({error.__class__.__name__}).") from None
    return {"private_key": pem.decode(), "thumbprint": certificate.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - the thumbprint Entra ID expects
            "public_certificate": pem.decode()}


def client_credential(settings: Settings) -> str | dict:
    """The app registration's credential as MSAL takes it: the secret, or the certificate."""
    return settings.client_secret or _certificate_credential(settings.client_certificate_path)


class TokenProvider:
    """Tokens per scope for one identity. Thread-safe; MSAL calls run off the event loop."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._lock = threading.Lock()
        self._app = self._build()
        self._cached: dict[str, tuple[str, float]] = {}
        self._scope_locks: dict[str, threading.Lock] = {}
        self.tokens_acquired = 0

    @property
    def uses_managed_identity(self) -> bool:
        return not (self._settings.client_secret or self._settings.client_certificate_path)

    def _build(self):
        settings = self._settings
        session = requests.Session()  # honours REQUESTS_CA_BUNDLE: trust comes from the environment
        if self.uses_managed_identity:
            identity = (msal.UserAssignedManagedIdentity(client_id=settings.client_id)
                        if settings.client_id else msal.SystemAssignedManagedIdentity())
            return msal.ManagedIdentityClient(identity, http_client=session)
        settings.require("tenant_id", "client_id")
        return msal.ConfidentialClientApplication(
            settings.client_id,
            client_credential=client_credential(settings),
            authority=f"{settings.authority_host}/{settings.tenant_id}",
            instance_discovery=None if settings.is_public_authority else False,
            http_client=session,
        )

    def _acquire(self, scope: str) -> str:
        # One request to Entra ID per scope at a time: concurrent callers wait and reuse it.
        with self._scope_locks.setdefault(scope, threading.Lock()):
            cached = self._cached.get(scope)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            return self._acquire_now(scope)

    def _acquire_now(self, scope: str) -> str:
        with self._lock:
            app = self._app
        if isinstance(app, msal.ManagedIdentityClient):
            result = app.acquire_token_for_client(resource=scope.removesuffix("/.default"))
        else:
            result = app.acquire_token_for_client(scopes=[scope])
        token = result.get("access_token") if isinstance(result, dict) else None
        if token:
            lifetime = float(result.get("expires_in") or 300)
            with self._lock:
                self._cached[scope] = (token, time.monotonic() + max(lifetime - 300, lifetime / 2))
                self.tokens_acquired += result.get("token_source") == "identity_provider"
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
           settings.client_secret, settings.client_certificate_path)
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            provider = _providers[key] = TokenProvider(settings)
        return provider
