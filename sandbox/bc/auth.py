"""Who may call: a bearer token for Business Central's audience, issued for the tenant in the
URL, and an environment that exists.

BC answers 401 ``Authentication_InvalidCredentials`` ("The server has rejected the client
credentials") for a missing, expired or wrong-audience token, and 404 for an unknown
environment, before it looks at the rest of the path.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from sandbox.bc import odata
from sandbox.bc.wire import ApiResponse, json_response
from sandbox.tokens import BC_AUDIENCE, InvalidToken, verify

Context = tuple[str, str, str]
"""(tenant, environment, API root) of an accepted request."""


def _claims(request: Request) -> dict | Response:
    try:
        claims = verify(request.headers.get("authorization"), BC_AUDIENCE)
    except InvalidToken as error:
        body = {"error": {"code": "Authentication_InvalidCredentials",
                          "message": f"The server has rejected the client credentials. {error}"}}
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
    tenant = request.path_params.get("tenant") or str(claims.get("tid", ""))
    environment = request.path_params["environment"]
    if not environment_exists(tenant, environment):
        return json_response(ApiResponse(404, {"error": {
            "code": "EnvironmentNotFound",
            "message": f"Environment '{environment}' does not exist for tenant '{tenant}'."}}))
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
