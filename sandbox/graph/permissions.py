"""Who may call: a bearer token for ``https://graph.microsoft.com`` (else 401
``InvalidAuthenticationToken``) whose `roles` claim holds one of the application permissions the
operation accepts (else 403 ``ErrorAccessDenied``, the answer of Exchange-backed workloads).

The check runs before routing, as Graph's gateway does, so a token without the permission never
learns whether a business exists. Inner ``$batch`` requests are checked one by one: the batch
itself needs only a valid token.
"""

from __future__ import annotations

import json

from sandbox import tokens
from sandbox.graph.options import GraphOptions
from sandbox.graph.wire import BUSINESSES_PATH, graph_error_body

ACCESS_DENIED = ("ErrorAccessDenied", "Access is denied. Check credentials and try again.")

_WWW_AUTHENTICATE = (b'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                     b'client_id="00000003-0000-0000-c000-000000000000"')


def roles_needed(method: str, path: str, options: GraphOptions) -> frozenset[str] | None:
    """The permissions of which a request needs one; None for paths outside Bookings.

    Reads need `read_roles`, of appointments and the calendar view `appointment_read_roles` (the
    businesses list `list_roles`); writes to customers `customer_write_roles`, to services
    `service_write_roles`, to anything else (appointments) `write_roles`."""
    path = path.rstrip("/")
    if path == BUSINESSES_PATH:
        return options.list_roles if method == "GET" else options.write_roles
    if path.startswith(BUSINESSES_PATH + "/"):
        segments = path[len(BUSINESSES_PATH) + 1:].split("/")
        collection = segments[1] if len(segments) > 1 else ""
        if method == "GET":
            return options.appointment_read_roles if collection in ("calendarView", "appointments") \
                else options.read_roles
        if collection == "customers":
            return options.customer_write_roles
        if collection == "services":
            return options.service_write_roles
        return options.write_roles
    return None


def app_only(scope) -> bool:
    """Whether the request that passed `RequireGraphPermission` carries an app-only token
    (``idtyp`` ``app``: application permissions)."""
    claims = (scope.get("state") or {}).get("graph_claims") or {}
    return claims.get("idtyp") == "app"


class RequireGraphPermission:
    """ASGI middleware: refuse a request without a valid Graph token or without the permission."""

    def __init__(self, app, options: GraphOptions):
        self.app = app
        self.options = options

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                claims = tokens.verify(authorization, tokens.GRAPH_AUDIENCE)
            except tokens.InvalidToken as error:
                await _refuse(send, 401, "InvalidAuthenticationToken", str(error),
                              [(b"www-authenticate", _WWW_AUTHENTICATE)])
                return
            scope.setdefault("state", {})["graph_claims"] = claims
            needed = roles_needed(scope["method"], scope["path"], self.options)
            if needed is not None and not needed & tokens.roles_of(claims):
                await _refuse(send, 403, *ACCESS_DENIED)
                return
        await self.app(scope, receive, send)


async def _refuse(send, status: int, code: str, message: str, headers: list | None = None) -> None:
    body = json.dumps(graph_error_body(status, code, message)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
