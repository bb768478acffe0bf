"""Entra ID's rules for what a sign-in request names: redirect URIs (which are allowed, how they
are matched), scopes (which resource an access token is for) and PKCE, and its OAuth errors."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from sandbox import tokens

OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
DEFAULT_DELEGATED = {tokens.GRAPH_AUDIENCE: ("User.Read",), tokens.BC_AUDIENCE: ("Financials.ReadWrite.All",)}
"""What ``<resource>/.default`` (and, for Graph, a request of OpenID scopes alone) grants a user."""
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
_NOT_IN_REDIRECT_URIS = "!$'(),;*"


class OAuthError(Exception):
    """A refusal in Entra's vocabulary: OAuth ``error``, the AADSTS number and its text."""

    def __init__(self, error: str, code: int, description: str, status: int = 400):
        super().__init__(f"AADSTS{code}: {description}")
        self.error, self.code, self.description, self.status = error, code, description, status


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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


def match_key(uri: str) -> tuple | None:
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


def returned_uri(uri: str) -> str:
    """A redirect URI without a path is answered with a trailing slash."""
    parts = urlsplit(uri)
    return parts._replace(path="/").geturl() if not parts.path else uri


def split_scope(scope: str) -> tuple[str, str]:
    """``https://graph.microsoft.com/User.Read`` → (Graph, ``User.Read``); ``User.Read`` is Graph's."""
    if "://" in scope:
        resource, _, permission = scope.rpartition("/")
        return resource.rstrip("/"), permission
    return tokens.GRAPH_AUDIENCE, scope


def requested_resources(scopes: Iterable[str], tenant: str) -> dict[str, list[str]]:
    """The permissions asked for per resource; OAuthError for a resource Entra does not know."""
    resources: dict[str, list[str]] = {}
    for scope in scopes:
        if scope in OIDC_SCOPES:
            continue
        resource, permission = split_scope(scope)
        if resource not in (tokens.GRAPH_AUDIENCE, tokens.BC_AUDIENCE):
            raise OAuthError("invalid_resource", 500011,
                             f"The resource principal named {resource} was not found in the tenant named "
                             f"{tenant}. This can happen if the application has not been installed by the "
                             "administrator of the tenant or consented to by any user in the tenant.")
        resources.setdefault(resource, []).append(permission)
    return resources


def access_scopes(scopes: tuple[str, ...], tenant: str) -> tuple[str, tuple[str, ...], str]:
    """(audience, delegated permissions, answered ``scope``) of the access token a request asks for."""
    resources = requested_resources(scopes, tenant)
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


def pkce_matches(verifier: str | None, challenge: str, method: str) -> bool:
    if not verifier:
        return False
    if method == "S256":
        computed = _b64(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
        return secrets.compare_digest(computed, challenge)
    return secrets.compare_digest(verifier, challenge)
