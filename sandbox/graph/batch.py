"""JSON ``$batch``: at most 20 requests, each run through the whole stack (faults, limits, the
permission check, routing) concurrently, so more than four inner requests to one mailbox meet
the per-mailbox concurrency limit and some answers are 429 inside a 200 batch, as in Graph."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request

from sandbox.graph.wire import GraphError, graph_error_body

MAX_BATCH_REQUESTS = 20


def parse_batch(payload: Any) -> list[dict]:
    """The inner requests of a batch body, checked as Graph checks them."""
    items = payload.get("requests") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise GraphError(400, "BadRequest", "Invalid batch payload: 'requests' must be a non-empty array.")
    if len(items) > MAX_BATCH_REQUESTS:
        raise GraphError(400, "BadRequest",
                         f"Invalid batch payload: the number of requests exceeds the limit of {MAX_BATCH_REQUESTS}.")
    seen: list[str] = []
    for item in items:
        _check_batch_item(item, seen)
        seen.append(item["id"])
    return items


async def run_batch(app, outer: Request, items: list[dict]) -> list[dict]:
    """Answers in completion order; a request whose dependency failed is answered 424."""
    completed: list[dict] = []
    tasks: dict[str, asyncio.Task] = {}

    async def run(item: dict) -> dict:
        for dependency in item.get("dependsOn") or []:
            if not 200 <= (await tasks[dependency])["status"] < 300:
                answer = {"id": item["id"], "status": 424, "headers": {"Content-Type": "application/json"},
                          "body": graph_error_body(424, "FailedDependency",
                                                   f"Request {dependency}, on which this request depends, failed.")}
                completed.append(answer)
                return answer
        answer = await _dispatch(app, outer, item)
        completed.append(answer)
        return answer

    for item in items:
        tasks[item["id"]] = asyncio.ensure_future(run(item))
    await asyncio.gather(*tasks.values())
    return completed


async def _dispatch(app, outer: Request, item: dict) -> dict:
    """Run one inner request through `app` (the simulator's whole ASGI stack)."""
    url = item["url"].lstrip("/")
    path, _, query = url.partition("?")
    raw_path = "/v1.0/" + path
    headers = [(b"host", outer.headers.get("host", "graph.microsoft.com").encode())]
    if "authorization" in outer.headers:
        headers.append((b"authorization", outer.headers["authorization"].encode("latin-1")))
    for name, value in (item.get("headers") or {}).items():
        headers.append((name.lower().encode("latin-1"), str(value).encode("latin-1")))
    body = json.dumps(item["body"]).encode() if item.get("body") is not None else b""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": item["method"].upper(), "scheme": outer.url.scheme,
        "path": unquote(raw_path), "raw_path": raw_path.encode(), "query_string": query.encode(),
        "root_path": "", "headers": headers, "server": outer.scope.get("server"),
        "client": outer.scope.get("client"), "state": {},
    }
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    status, response_headers, chunks = 500, {}, []

    async def send(message: dict) -> None:
        nonlocal status, response_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    answer: dict[str, Any] = {"id": item["id"]}
    try:
        await app(scope, receive, send)
        content = b"".join(chunks)
        parsed = json.loads(content) if content else None
    except Exception:
        # A connection-level fault (reset, truncated body) has no batch equivalent: the
        # service reports the inner request as failed.
        answer.update(status=500, headers={"Content-Type": "application/json"},
                      body=graph_error_body(500, "InternalServerError", "The inner request failed."))
        return answer
    answer["status"] = status
    answer["headers"] = {_header_name(k): v for k, v in response_headers.items()
                         if k in ("content-type", "retry-after", "location", "etag")}
    if parsed is not None:
        answer["body"] = parsed
    return answer


def _check_batch_item(item: Any, earlier: list[str]) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
        raise GraphError(400, "BadRequest", "Invalid batch payload: every request needs a string 'id'.")
    if item["id"] in earlier:
        raise GraphError(400, "BadRequest", f"Invalid batch payload: duplicate request id '{item['id']}'.")
    if not isinstance(item.get("method"), str) or item["method"].upper() not in ("GET", "PATCH", "POST", "PUT", "DELETE"):
        raise GraphError(400, "BadRequest", f"Invalid batch payload: request '{item['id']}' has no valid 'method'.")
    url = item.get("url")
    if not isinstance(url, str) or not url or url.lower().startswith(("http:", "https:")):
        raise GraphError(400, "BadRequest", f"Invalid batch payload: request '{item['id']}' needs a relative 'url'.")
    if url.lstrip("/").lower().startswith("$batch"):
        raise GraphError(400, "BadRequest", "Invalid batch payload: nested batches are not supported.")
    if item.get("body") is not None and not any(
            name.lower() == "content-type" for name in (item.get("headers") or {})):
        raise GraphError(400, "BadRequest",
                         f"Invalid batch payload: request '{item['id']}' has a body but no Content-Type header.")
    depends_on = item.get("dependsOn") or []
    if not isinstance(depends_on, list) or any(d not in earlier for d in depends_on):
        raise GraphError(400, "BadRequest",
                         f"Invalid batch payload: request '{item['id']}' depends on an unknown or later request.")


def _header_name(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))
