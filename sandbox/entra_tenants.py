"""Tenants and keys of the simulated Entra ID: a tenant asked by one of its domain names answers
as the tenant's GUID, as Entra does ("the GUID is the immutable tenant ID of the organization"),
and the signing key rolls over (Entra's signing-key rollover: the JWKS lists several keys and
changes over time)."""

from __future__ import annotations

import threading

from sandbox import tokens


class TenantNamesAndKeys:
    """Domain names of tenants and the signing keys of `EntraSimulator` (which provides the lock,
    the tenants and the current key)."""

    _lock: threading.Lock
    _tenants: set[str]
    _domains: dict[str, str]
    signing_key: tokens.SigningKey
    retired_keys: list[tokens.SigningKey]

    def add_tenant_domain(self, tenant: str, domain: str) -> None:
        """A domain name of a registered tenant (``contoso.onmicrosoft.com``, a verified custom
        domain): a request naming the tenant by it is served as the tenant's, and everything Entra
        answers names the tenant by its GUID, as Entra ID does ("the GUID is the immutable tenant
        ID"): the issuer and endpoints of the openid-configuration, ``iss`` and ``tid`` of every
        token, ``client_info``'s ``utid``. Idempotent; ValueError if the domain names another tenant."""
        with self._lock:
            if tenant.lower() not in self._tenants:
                raise KeyError(f"unknown tenant {tenant!r}")
            held = self._domains.get(domain.lower())
            if held is not None and held != tenant.lower():
                raise ValueError(f"{domain} is a domain of tenant {held}")
            self._domains[domain.lower()] = tenant.lower()

    def tenant_guid(self, name: str) -> str:
        with self._lock:
            return self._domains.get(name.lower(), name)

    def rotate_signing_key(self, keep_old: bool = True) -> str:
        """Sign from now on with a new key (Entra's signing-key rollover), listed first in the JWKS;
        the old one stays listed (`keep_old`, as Entra keeps a key published while tokens signed with
        it live) or is dropped. Returns the new key's ``kid``. An app that cached the JWKS meets an
        unknown ``kid`` and must fetch it again."""
        old = self.signing_key
        self.signing_key = tokens.SigningKey()
        self.retired_keys = [old, *self.retired_keys][:2] if keep_old else []
        return self.signing_key.kid

    def _verify_signed(self, token: str) -> dict:
        """The claims of a token signed by a key the JWKS lists (current or retired)."""
        for key in (self.signing_key, *self.retired_keys):
            try:
                return key.verify(token)
            except tokens.InvalidToken as refused:
                if str(refused) != "The key was not found.":
                    raise
        raise tokens.InvalidToken("The key was not found.")


class TenantByGuid:
    """ASGI middleware: a path naming a tenant by one of its domain names is served as if it named
    the tenant's GUID (`EntraSimulator.add_tenant_domain`)."""

    def __init__(self, app, resolve):
        self.app = app
        self.resolve = resolve

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            first, slash, rest = scope["path"].lstrip("/").partition("/")
            guid = self.resolve(first) if first else first
            if guid != first:
                path = f"/{guid}{slash}{rest}"
                scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)
