"""JSON ``$batch``: up to 100 API calls in one request, run in order.

What BC does, and what the simulator keeps: the batch stops at the first failure unless the
request says ``Prefer: odata.continue-on-error``; a request whose ``dependsOn`` failed gets 424.
With ``Isolation: snapshot`` the whole batch is one transaction: a failure undoes every change,
yet — as the BC documentation's example shows — the requests that ran before the failure still
report their success (``201`` with an id that no longer exists). A client must therefore judge
a snapshot batch by its failures, never by an inner 201.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from sandbox.bc.api import Api
from sandbox.bc.errors import BcError
from sandbox.bc.options import parse_query
from sandbox.bc.wire import INNER_JSON_TYPE, NO_BODY, ApiRequest, ApiResponse, error_response, parse_json

MAX_BATCH_REQUESTS = 100

InnerRequest = tuple[Any, list, ApiRequest]
"""(request id, ids it depends on, the call)."""


class _Rollback(Exception):
    """Raised inside a snapshot batch to undo everything it did."""


def parse_batch(body: Any, tenant: str, environment: str, root: str,
                max_query_chars: int | None = None, plus_is_space: bool = False) -> list[InnerRequest]:
    """The inner requests of a JSON ``$batch`` body, or the 400 BC gives for a bad envelope. An
    inner request whose query string is longer than `max_query_chars` is answered 414 (the
    strictest reading: BC's docs give no limit, inside a batch or out)."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise BcError(400, "BadRequest", "Invalid Request Body: a JSON batch needs a 'requests' array.")
    requests = body["requests"]
    if len(requests) > MAX_BATCH_REQUESTS:
        # As reported from BC online (https://demiliani.com/2021/01/12/dynamics-365-business-central-batch-api-calls-
        # and-max-number-of-operations/); the docs give the limit only.
        raise BcError(400, "Unknown", "The current batch message contains too many parts. A maximum number of "
                                      f"'{MAX_BATCH_REQUESTS}' query operations and change sets are allowed in a batch "
                                      "message.")
    result = []
    for number, item in enumerate(requests):
        if not (isinstance(item, dict) and isinstance(item.get("url"), str) and isinstance(item.get("method"), str)):
            raise BcError(400, "BadRequest", f"Invalid Request Body: request {number} needs 'method' and 'url'.")
        method = item["method"].upper()
        if method not in ("GET", "POST", "PATCH", "DELETE"):
            raise BcError(400, "BadRequest", f"Invalid Request Body: method '{item['method']}' is not supported.")
        url = item["url"]
        split = urlsplit(url)
        path = split.path
        if "/api/v2.0/" in path:
            path = path.split("/api/v2.0/", 1)[1]
        path = unquote(path.lstrip("/"))
        if path.startswith("$batch"):
            raise BcError(400, "BadRequest", "Invalid Request Body: a batch cannot contain a batch.")
        headers = item.get("headers") or {}
        if not isinstance(headers, dict):
            raise BcError(400, "BadRequest", f"Invalid Request Body: request {number} has invalid 'headers'.")
        raw_body = item.get("body", NO_BODY)
        if isinstance(raw_body, str):
            raw_body = parse_json(raw_body)
        elif raw_body is None:
            raw_body = NO_BODY
        depends_on = item.get("dependsOn") or []
        query = parse_query(split.query, plus_is_space)
        api_request = ApiRequest(method, tenant, environment, path, query,
                                 {str(k).lower(): str(v) for k, v in headers.items()}, raw_body, root)
        if max_query_chars is not None and len(split.query) > max_query_chars:
            api_request.refusal = BcError(414, "RequestUriTooLong", f"The query string is {len(split.query)} "
                                                                    f"characters long; at most {max_query_chars} are accepted.")
        result.append((item.get("id"), list(depends_on) if isinstance(depends_on, list) else [], api_request))
    return result


def run_batch(api: Api, inner: list[InnerRequest], snapshot: bool,
              continue_on_error: bool) -> list[tuple[Any, ApiResponse]]:
    """Run in order; stop at the first failure (unless continue-on-error). A snapshot batch runs
    as one transaction: a failure undoes it all, earlier answers stay as they were."""
    results: list[tuple[Any, ApiResponse]] = []
    failed: set = set()

    def run() -> None:
        for request_id, depends_on, api_request in inner:
            if any(dependency in failed for dependency in depends_on):
                response = error_response(BcError(424, "BadRequest_FailedDependency",
                                                  "A request this request depends on failed."))
            elif api_request.refusal is not None:
                response = error_response(api_request.refusal)
            else:
                response = api.handle(api_request)
            results.append((request_id, response))
            if response.status >= 400:
                failed.add(request_id)
                if snapshot:
                    raise _Rollback
                if not continue_on_error:
                    return

    if snapshot:
        try:
            with api.b.atomic():
                run()
        except _Rollback:
            pass
    else:
        run()
    return results


def batch_answer(results: list[tuple[Any, ApiResponse]]) -> ApiResponse:
    """The ``{"responses": [...]}`` body of a batch answer (always 200 once the envelope parsed)."""
    responses = []
    for request_id, response in results:
        entry: dict[str, Any] = {"id": request_id, "status": response.status, "headers": _inner_headers(response)}
        if response.body is not None:
            entry["body"] = response.body
        responses.append(entry)
    return ApiResponse(200, {"responses": responses})


def _inner_headers(response: ApiResponse) -> dict[str, str]:
    headers = {k.lower(): v for k, v in response.headers.items()}
    if response.body is not None:
        headers.update({"content-type": INNER_JSON_TYPE, "odata-version": "4.0"})
    return headers
