"""Who may call: a bearer token for Business Central's audience, issued for the tenant in the
URL, carrying the application permission ``API.ReadWrite.All``, from an app registered in the
environment's "Microsoft Entra Applications" page; and an environment that exists.

BC answers 401 ``Authentication_InvalidCredentials`` ("The server has rejected the client
credentials") for a missing, expired or wrong-audience token, and 404 for an unknown
environment, before it looks at the rest of the path. What it answers for a token without
``API.ReadWrite.All`` or from an app missing from "Microsoft Entra Applications" is not
documented: the same 401 (what is observed), or 403 (`EntraApplications.refusal_status`).

The registration list lives on the simulator's ASGI application: `entra_applications(bc)` and
`register_app(bc, tenant, environment, client_id, registered)`. Every client is registered in
every environment until a test unregisters it.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import uuid
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from sandbox.bc import odata
from sandbox.bc.wire import ApiResponse, json_response
from sandbox.tokens import BC_API_READ_WRITE, BC_AUDIENCE, InvalidToken, roles_of, verify

Context = tuple[str, str, str]
"""(tenant, environment, API root) of an accepted request."""

REJECTED = "The server has rejected the client credentials."


class EntraApplications:
    """BC's "Microsoft Entra Applications" page per environment: which client ids may call.

    `refusal_status` is the status of the answer to an unregistered app or a token without
    ``API.ReadWrite.All`` (401, as observed; 403 for the other reading)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unregistered: set[tuple[str, str, str]] = set()
        self.refusal_status = 401

    def register(self, tenant: str, environment: str, client_id: str, registered: bool = True) -> None:
        key = (tenant.lower(), environment.lower(), client_id.lower())
        with self._lock:
            if registered:
                self._unregistered.discard(key)
            else:
                self._unregistered.add(key)

    def is_registered(self, tenant: str, environment: str, client_id: str) -> bool:
        with self._lock:
            return (tenant.lower(), environment.lower(), client_id.lower()) not in self._unregistered


_state_lock = threading.Lock()


def _applications_of(app: Starlette) -> EntraApplications:
    with _state_lock:
        applications = getattr(app.state, "entra_applications", None)
        if applications is None:
            applications = app.state.entra_applications = EntraApplications()
        return applications


def entra_applications(simulator) -> EntraApplications:
    """The "Microsoft Entra Applications" list of a `BcSimulator` (kept on its ASGI app)."""
    app = simulator.app
    while not isinstance(app, Starlette):
        app = app.app
    return _applications_of(app)


def register_app(simulator, tenant: str, environment: str, client_id: str, registered: bool = True) -> None:
    """Add an app to (or, `registered=False`, remove it from) an environment's "Microsoft Entra
    Applications"; `tenant` as the API URL names it."""
    entra_applications(simulator).register(tenant, environment, client_id, registered)


def _refusal(status: int, message: str = REJECTED) -> Response:
    body = {"error": {"code": "Authentication_InvalidCredentials",
                      "message": f"{message}  CorrelationId:  {uuid.uuid4()}."}}
    headers = {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'} if status == 401 else None
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _claims(request: Request) -> dict | Response:
    try:
        claims = verify(request.headers.get("authorization"), BC_AUDIENCE)
    except InvalidToken as error:
        body = {"error": {"code": "Authentication_InvalidCredentials",
                          "message": f"{REJECTED} {error}"}}
        return Response(json.dumps(body), status_code=401, media_type="application/json",
                        headers={"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})
    tenant = request.path_params.get("tenant")
    tid = str(claims.get("tid", ""))
    if tenant and odata.is_guid(tenant) and odata.is_guid(tid) and tenant.lower() != tid.lower():
        body = {"error": {"code": "Authentication_InvalidCredentials",
                          "message": "The server has rejected the client credentials: the token was issued "
                                     "for another tenant."}}
        return Response(json.dumps(body), status_code=401, media_type="application/json")
    return claims


def authorise(request: Request, environment_exists: Callable[[str, str], bool]) -> Context | Response:
    """(tenant, environment, API root) of a request with a valid token, or the error answer."""
    claims = _claims(request)
    if isinstance(claims, Response):
        return claims
    applications = _applications_of(request.app)
    if BC_API_READ_WRITE not in roles_of(claims):
        return _refusal(applications.refusal_status)
    tenant = request.path_params.get("tenant") or str(claims.get("tid", ""))
    environment = request.path_params["environment"]
    if not environment_exists(tenant, environment):
        return json_response(ApiResponse(404, {"error": {
            "code": "EnvironmentNotFound",
            "message": f"Environment '{environment}' does not exist for tenant '{tenant}'."}}))
    client_id = str(claims.get("appid") or claims.get("azp") or "")
    if not applications.is_registered(tenant, environment, client_id):
        return _refusal(applications.refusal_status)
    prefix = f"/v2.0/{request.path_params['tenant']}/{environment}" if "tenant" in request.path_params \
        else f"/v2.0/{environment}"
    root = str(request.base_url).rstrip("/") + prefix + "/api/v2.0"
    return tenant, environment, root


def principal_of(authorization: str | None) -> str:
    """Who is calling, read from the token without checking it (for counting requests per user
    before the request is served): ``oid``, ``appid`` or ``sub``; ``""`` when unreadable."""
    try:
        payload = (authorization or "").removeprefix("Bearer ").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return ""
    if not isinstance(claims, dict):
        return ""
    return str(claims.get("oid") or claims.get("appid") or claims.get("sub") or "")
