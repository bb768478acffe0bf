"""`BcSimulator`: the ASGI application (with the data API of `data_api`) and BC's default limits.

HTTP requests pass the `FaultPlan` (latency, BC's limits, injected faults) first, then the token
check, then one lock around the backend, so that every call — and every ``$batch`` as a whole —
sees and leaves a consistent state, as BC's transactions do.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.bc.api import Api
from sandbox.bc.auth import authorise, principal_of
from sandbox.bc.backend import Backend
from sandbox.bc.batch import batch_answer, parse_batch, run_batch
from sandbox.bc.data_api import DataApi
from sandbox.bc.errors import BcError
from sandbox.bc.options import BcOptions, parse_query
from sandbox.bc.webclient import web_client_app
from sandbox.bc.wire import NO_BODY, ApiRequest, ApiResponse, error_response, json_response, parse_json
from sandbox.faults import FaultMiddleware, FaultPlan, Knobs

MAX_QUERY_CHARS = 2048
"""Not documented for BC online: IIS's default ``maxQueryString``, the strictest limit a front end
in the path is likely to keep (a knob: ``plan.configure(max_query_chars=None)``)."""
DEFAULT_PAGE_SIZE = 20000
"""BC's maximum page size (operational limits: "Max page size 20,000")."""


def _environment_key(path: str) -> str:
    """The FaultPlan's concurrency key: ``/{tenant}/{environment}`` (the limits are per environment)."""
    parts = path.split("/")
    if "api" in parts:
        return "/" + "/".join(parts[2:parts.index("api")]).lower()
    return path


def _principal_key(path: str, headers: dict[str, str]) -> str:
    """The rate limit's key: the calling principal (the token's ``oid``, ``appid`` or ``sub``).
    BC's docs give the limit "per user" without saying whether a user's environments share it:
    the strictest reading, they do."""
    return principal_of(headers.get("authorization"))


_MIDDLEWARE_CODES = {"TooManyRequests": "Application_TooManyRequests", "InternalServerError": "Internal_ServerError"}


def _bc_error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"code": _MIDDLEWARE_CODES.get(code, code), "message": message}}


def default_knobs() -> Knobs:
    """BC online's documented limits (operational-limits-online.md): 5 requests at a time and 95
    waiting, then 429; 6,000 requests per 5-minute sliding window, a ``$batch`` counting as each of
    its operations (the docs do not say; the strictest reading); and — the docs promising
    ``Retry-After`` only for 502/503 — half of the 429s without a ``Retry-After`` header; a
    request queued for 8 minutes is answered 503; a query string over 2,048 characters 414."""
    return Knobs(max_concurrency=5, max_queued=95, rate_limit=6000, rate_window_seconds=300.0,
                 batch_counts_each_operation=True, retry_after_omitted=0.5, queue_timeout_seconds=480.0,
                 max_query_chars=MAX_QUERY_CHARS)


class BcSimulator(DataApi):
    """Business Central API v2.0 for the tests, the demo and the benchmark.

    `app` is the ASGI application (serve it with `sandbox.server.ServerThread`; the app then uses
    ``BC_BASE_URL={server.url}/v2.0``). `plan` carries the latency, limits and faults; by default
    BC's (`default_knobs`). `options` switches the behaviours the docs leave open (`BcOptions`).
    `creates` counts records created through the API (``customers``, ``items``,
    ``salesInvoices``, ``salesInvoiceLines``), rolled-back ones excluded. Each inner request of a
    ``$batch`` costs `batch_item_ms` on top of the batch's own latency. Lists longer than
    `page_size` are paged with ``@odata.nextLink``.

    `web_app` is BC's web client as far as the app links to it (page 43 "Sales Invoice" opened on
    a draft by URL; `sandbox.bc.webclient`): serve it over plain HTTP on loopback, where a
    person's browser needs no trust in the run's CA, and set ``BC_WEB_CLIENT_URL={server.url}/webclient``."""

    def __init__(self, plan: FaultPlan | None = None, batch_item_ms: float = 0.0,
                 page_size: int = DEFAULT_PAGE_SIZE, options: BcOptions | None = None):
        self.plan = plan or FaultPlan(default_knobs())
        self.batch_item_ms = batch_item_ms
        self._lock = threading.Lock()
        self._backend = Backend(page_size, options)
        self._api = Api(self._backend)
        prefixes = ("/v2.0/{tenant}/{environment}/api/v2.0", "/v2.0/{environment}/api/v2.0")
        methods = ["GET", "POST", "PATCH", "DELETE", "PUT"]
        routes = [Route(p + "/$batch", self._batch, methods=methods) for p in prefixes]
        routes += [Route(p + "/{path:path}", self._endpoint, methods=methods) for p in prefixes]
        routes.append(Route("/{path:path}", self._not_found, methods=methods))
        self.app = FaultMiddleware(Starlette(routes=routes), self.plan, key_of=_environment_key,
                                   error_body=_bc_error_body, rate_key_of=_principal_key)
        self.web_app = web_client_app(self._backend, self._lock)

    @property
    def creates(self) -> Counter:
        return self._backend.creates

    @property
    def options(self) -> BcOptions:
        return self._backend.options

    def configure(self, **changes: Any) -> None:
        """Change `BcOptions` at run time, e.g. ``configure(code_filter_uppercases_literal=True)``."""
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self._backend.options, name):
                    raise AttributeError(f"unknown option {name!r}")
                setattr(self._backend.options, name, value)

    @property
    def page_size(self) -> int:
        return self._backend.page_size

    @page_size.setter
    def page_size(self, value: int) -> None:
        with self._lock:
            self._backend.page_size = value

    # HTTP

    def _environment_exists(self, tenant: str, environment: str) -> bool:
        with self._lock:
            return (tenant.lower(), environment.lower()) in self._backend.environments

    async def _endpoint(self, request: Request) -> Response:
        context = authorise(request, self._environment_exists)
        if isinstance(context, Response):
            return context
        tenant, environment, root = context
        if request.method == "PUT":
            return json_response(error_response(BcError(
                405, "BadRequest_MethodNotAllowed",
                "'PUT' requests are not allowed within Dynamics 365 Business Central OData web services; use PATCH.")))
        body = parse_json(await request.body()) if request.method in ("POST", "PATCH") else NO_BODY
        api_request = ApiRequest(request.method, tenant, environment, request.path_params["path"],
                                 parse_query(request.scope.get("query_string", b"").decode("latin-1"),
                                             self.options.plus_in_query_is_space),
                                 {k.lower(): v for k, v in request.headers.items()},
                                 body, root)
        with self._lock:
            response = self._api.handle(api_request)
        return json_response(response)

    async def _batch(self, request: Request) -> Response:
        context = authorise(request, self._environment_exists)
        if isinstance(context, Response):
            return context
        tenant, environment, root = context
        if request.method != "POST":
            return json_response(error_response(BcError(
                405, "BadRequest_MethodNotAllowed", f"'{request.method}' requests for '$batch' are not allowed.")))
        try:
            inner = parse_batch(parse_json(await request.body()), tenant, environment, root,
                                self.plan.knobs.max_query_chars, self.options.plus_in_query_is_space)
        except BcError as error:
            return json_response(error_response(error))
        if self.batch_item_ms:
            await asyncio.sleep(len(inner) * self.batch_item_ms / 1000)
        snapshot = request.headers.get("isolation", "").strip().lower() == "snapshot"
        continue_on_error = "odata.continue-on-error" in request.headers.get("prefer", "").lower()
        with self._lock:
            results = run_batch(self._api, inner, snapshot, continue_on_error)
        return json_response(batch_answer(results))

    async def _not_found(self, request: Request) -> Response:
        return json_response(ApiResponse(404, {"error": {
            "code": "BadRequest_NotFound",
            "message": f"No HTTP resource was found that matches the request URI '{request.url}'."}}))
