"""The values passed between the HTTP layer, ``$batch`` and the API, and their JSON form.

An `ApiRequest` is one API call whether it came over HTTP or inside a ``$batch`` body, so both
paths run exactly the same code; an `ApiResponse` becomes either an HTTP response or one entry of
a batch answer. Bodies are parsed strictly (``NaN`` is not JSON), and a missing body is told
apart from a malformed one because BC answers them differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from sandbox.bc.errors import BcError

JSON_TYPE = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8"
INNER_JSON_TYPE = "application/json; odata.metadata=minimal"

NO_BODY = object()
BAD_BODY = object()


@dataclass
class ApiRequest:
    """One API call, from HTTP or from inside a ``$batch``; `path` is relative to ``/api/v2.0/``."""

    method: str
    tenant: str
    environment: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    service_root: str
    """Absolute ``…/v2.0/{tenant}/{environment}/api/v2.0``, for links and ``@odata.context``."""
    refusal: Any = None
    """A `BcError` to answer instead of running the call (set while parsing a ``$batch``)."""


@dataclass
class ApiResponse:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def error_response(error: BcError) -> ApiResponse:
    return ApiResponse(error.status, {"error": {"code": error.code, "message": error.message}})


def json_response(response: ApiResponse) -> Response:
    headers = {"OData-Version": "4.0", **response.headers}
    if response.body is None:
        return Response(status_code=response.status, headers=headers)
    content = json.dumps(response.body, ensure_ascii=False).encode()
    return Response(content, status_code=response.status, headers=headers, media_type=JSON_TYPE)


def parse_json(raw: bytes | str | None) -> Any:
    if raw is None or (isinstance(raw, (bytes, str)) and not raw.strip()):
        return NO_BODY
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return BAD_BODY


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
