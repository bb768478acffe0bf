"""The HTTP contract: request/response models, problem details (RFC 9457), and the one place
where known errors become HTTP answers. The OpenAPI document is built from the same models
(`shared.web.openapi`), so the description cannot drift from what the functions accept.

A handler is `async def handler(request: ApiRequest) -> ApiResponse | BaseModel`; `endpoint()`
registers it with its models, validates the query and body with pydantic, and maps errors."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Awaitable, Callable

import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.upstream.errors import UpstreamError
from shared.settings import SettingsError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_048_576
PROBLEM_JSON = "application/problem+json"
API_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
"""On every JSON answer: never sniffed as another type, never kept by a cache (answers may hold
customer data)."""


class ProblemField(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[ProblemField] | None = None
    model_config = ConfigDict(extra="allow")


class ApiError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, errors: list[ProblemField] | None = None, **extra: Any):
        super().__init__(detail)
        self.detail, self.errors, self.extra = detail, errors, extra


class BadRequest(ApiError):
    status, title = 400, "Bad request"


class NotFound(ApiError):
    status, title = 404, "Not found"


class Conflict(ApiError):
    status, title = 409, "Conflict"


class PayloadTooLarge(ApiError):
    status, title = 413, "Payload too large"


class UnsupportedMediaType(ApiError):
    status, title = 415, "Unsupported media type"


def problem_response(status: int, title: str, detail: str, errors: list[ProblemField] | None = None,
                     headers: dict | None = None, **extra: Any) -> func.HttpResponse:
    problem = Problem(title=title, status=status, detail=detail, errors=errors, **extra)
    return func.HttpResponse(problem.model_dump_json(exclude_none=True), status_code=status,
                             mimetype=PROBLEM_JSON, headers={**API_HEADERS, **(headers or {})})


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> func.HttpResponse:
    if isinstance(body, BaseModel):
        text = body.model_dump_json(by_alias=True)
    else:
        text = json.dumps(body, default=str)
    return func.HttpResponse(text, status_code=status, mimetype="application/json",
                             headers={**API_HEADERS, **(headers or {})})


def validation_problems(error: ValidationError, prefix: str = "") -> list[ProblemField]:
    fields = []
    for item in error.errors()[:20]:
        location = ".".join(str(part) for part in item["loc"]) or "body"
        fields.append(ProblemField(field=f"{prefix}{location}", message=item["msg"][:300]))
    return fields


@dataclass
class ApiRequest:
    raw: func.HttpRequest
    query: Any = None
    body: Any = None
    route: dict = field(default_factory=dict)


@dataclass
class ApiResult:
    body: Any
    status: int = 200
    headers: dict | None = None


@dataclass
class Endpoint:
    name: str
    method: str
    route: str
    summary: str
    handler: Callable[[ApiRequest], Awaitable[Any]]
    query: type[BaseModel] | None = None
    body: Any = None
    responses: dict[int, Any] = field(default_factory=dict)
    anonymous: bool = False
    route_params: dict[str, Any] = field(default_factory=dict)
    body_doc: Any = None
    """The body schema to publish when `body` is looser than what the handler enforces."""


ENDPOINTS: list[Endpoint] = []


def endpoint(name: str, method: str, route: str, summary: str, *, query: type[BaseModel] | None = None,
             body: Any = None, responses: dict[int, Any], anonymous: bool = False,
             route_params: dict[str, Any] | None = None, body_doc: Any = None):
    """Register an HTTP handler with its models; returns the function-host entry point."""
    def register(handler: Callable[[ApiRequest], Awaitable[Any]]):
        spec = Endpoint(name, method, route, summary, handler, query, body, responses, anonymous,
                        route_params or {}, body_doc)
        ENDPOINTS.append(spec)

        async def entry(req: func.HttpRequest) -> func.HttpResponse:
            return await serve(spec, req)

        entry.__name__ = name
        entry.endpoint = spec  # type: ignore[attr-defined]
        return entry
    return register


async def serve(spec: Endpoint, req: func.HttpRequest) -> func.HttpResponse:
    """Validate, call, and map every known failure to problem+json (no stack traces leak)."""
    try:
        request = ApiRequest(raw=req, route=dict(req.route_params or {}))
        for param, annotation in spec.route_params.items():
            try:
                request.route[param] = TypeAdapter(annotation).validate_python(request.route.get(param))
            except ValidationError as error:
                raise BadRequest(f"The route parameter '{param}' is not valid.",
                                 validation_problems(error, f"{param}.")) from None
        if spec.query is not None:
            request.query = _parse_query(spec.query, req)
        if spec.body is not None:
            request.body = _parse_body(spec.body, req)
        result = await spec.handler(request)
        if isinstance(result, ApiResult):
            return json_response(result.body, result.status, result.headers)
        return json_response(result)
    except ApiError as error:
        return problem_response(error.status, error.title, error.detail, error.errors, **error.extra)
    except SettingsError as error:
        log.error("%s: %s", spec.name, error, extra={"event": "settings_error", "function": spec.name})
        return problem_response(503, "Not configured", str(error))
    except UpstreamError as error:
        log.warning("%s: %s", spec.name, error, extra={"event": "upstream_error", "function": spec.name})
        return problem_response(503, "Upstream unavailable", f"{error.service} is not answering as expected; "
                                "try again shortly.", headers={"Retry-After": "30"})
    except Exception:
        log.exception("%s failed", spec.name, extra={"event": "http_failed", "function": spec.name})
        return problem_response(500, "Internal error", "The request could not be completed; "
                                "the error was logged.")


def _parse_query(model: type[BaseModel], req: func.HttpRequest) -> BaseModel:
    params = dict(req.params or {})
    params.pop("code", None)  # the function key, when sent in the query string
    unknown = sorted(set(params) - {f.alias or name for name, f in model.model_fields.items()})
    if unknown:
        raise BadRequest(f"Unknown query parameter {', '.join(repr(u) for u in unknown)}.",
                         [ProblemField(field=u, message="unknown parameter") for u in unknown])
    try:
        return model.model_validate(params)
    except ValidationError as error:
        raise BadRequest("The query string is not valid.", validation_problems(error)) from None


def _parse_body(schema: Any, req: func.HttpRequest) -> Any:
    raw = req.get_body() or b""
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The body is larger than {MAX_BODY_BYTES} bytes.")
    content_type = (req.headers.get("content-type") or "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", "text/json") and not content_type.endswith("+json"):
        raise UnsupportedMediaType("Send the body as application/json.")
    if not raw.strip():
        raise BadRequest("The body is empty; a JSON object is expected.")
    try:
        adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
        return adapter.validate_json(raw)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise BadRequest("The body is not valid JSON.") from None
        raise BadRequest("The body is not valid.", validation_problems(error)) from None


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Status(BaseModel):
    status: str = Field(examples=["queued"])
