"""What Graph's answers look like on the wire: the error shape, the JSON media type, and the
paging of collections (an absolute `@odata.nextLink` with an opaque `$skiptoken`).

Graph's paging guide allows both forms of next link ("either a `$skiptoken` or a `$skip` query
parameter") and pages of "zero or more results"; which one Bookings uses is not documented.
`keyset` paging (the token remembers the last item's key) lets a page walk see every item that
exists for the whole walk exactly once even when others are added or removed meanwhile; `offset`
paging (``$skip=n``) skips an item when one before the cursor is removed during the walk and
repeats one when one is added before it. Sending `$top` returns that many and *no* next link, as
the real service does.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

BUSINESSES_PATH = "/v1.0/solutions/bookingBusinesses"
MEDIA_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
_REFUSED_OPTIONS = ("$filter", "$orderby", "$skip", "$search")

Entry = tuple[tuple, dict]
"""(sort key, item) of a collection, sorted by key."""


class GraphError(Exception):
    """An error answer in Graph's shape; raised by handlers and by the data API's checks."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def graph_error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "innerError": {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": str(uuid.uuid4()),
        "client-request-id": str(uuid.uuid4()),
    }}}


def mailbox_of(path: str) -> str:
    """The FaultMiddleware key: Graph's limits apply per Bookings mailbox."""
    prefix = BUSINESSES_PATH + "/"
    return path[len(prefix):].split("/", 1)[0].lower() if path.startswith(prefix) else "*"


def json_response(request: Request, body: dict | None, status: int = 200, headers: dict | None = None) -> Response:
    all_headers = {"request-id": str(uuid.uuid4()),
                   "client-request-id": request.headers.get("client-request-id", str(uuid.uuid4()))}
    all_headers.update(headers or {})
    if body is None:
        return Response(status_code=status, headers=all_headers)
    content = json.dumps(body, ensure_ascii=False).encode()
    return Response(content, status_code=status, headers=all_headers, media_type=MEDIA_TYPE)


def page(request: Request, entries: list[Entry], context: str, kind: str, project: Callable[[dict], dict],
         page_size: int, paging: str = "keyset", empty: bool = False) -> Response:
    """One page of `entries` (sorted by key); `page_size` 0 means everything in one answer.
    `paging` ``keyset`` or ``offset``; `empty`: answer this page with no items and a next link to
    the same place (only where more items follow)."""
    params = request.query_params
    for option in _REFUSED_OPTIONS:
        if option in params and not (option == "$skip" and paging == "offset"):
            raise GraphError(400, "BadRequest", f"Query option '{option}' is not supported by this API.")
    top = None
    if "$top" in params:
        top = _count(params["$top"], "$top")
    first = 0
    after: tuple = ()
    if paging == "offset" and "$skip" in params:
        first = _count(params["$skip"], "$skip")
    elif "$skiptoken" in params:
        after = _decode_skiptoken(params["$skiptoken"], kind)
        try:
            first = bisect.bisect_right([key for key, _ in entries], after)
        except TypeError:
            raise GraphError(400, "BadRequest", "The $skiptoken is invalid.") from None
    size = top if top is not None else (max(int(page_size), 1) if page_size else len(entries))
    held_back = empty and top is None and first < len(entries)
    chunk = [] if held_back else entries[first:first + size]
    select = select_of(request)
    body: dict[str, Any] = {"@odata.context": context}
    if params.get("$count", "").lower() == "true":
        body["@odata.count"] = len(entries)
    body["value"] = [selected(project(item), select) for _, item in chunk]
    if top is None and (held_back or first + size < len(entries)):
        if paging == "offset":
            body["@odata.nextLink"] = _next_link(request, "$skip", str(first + len(chunk)))
        else:
            last = chunk[-1][0] if chunk else after
            body["@odata.nextLink"] = _next_link(request, "$skiptoken", _encode_skiptoken(last, kind))
    return json_response(request, body)


def _count(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise GraphError(400, "BadRequest", f"Invalid value '{text}' for query option '{option}'.")
    return value


def select_of(request: Request) -> set[str] | None:
    raw = request.query_params.get("$select")
    return {name.strip() for name in raw.split(",") if name.strip()} | {"id"} if raw else None


def selected(item: dict, select: set[str] | None) -> dict:
    return item if select is None else {k: v for k, v in item.items() if k in select}


def _encode_skiptoken(key: tuple, kind: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": list(key), "t": kind}).encode()).decode().rstrip("=")


def _decode_skiptoken(token: str, kind: str) -> tuple:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if decoded["t"] != kind or not isinstance(decoded["k"], list):
            raise ValueError(kind)
        return tuple(decoded["k"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise GraphError(400, "BadRequest", "The $skiptoken is invalid.") from None


def _next_link(request: Request, name: str, value: str) -> str:
    pairs = [(k, v) for k, v in request.query_params.multi_items() if k not in ("$skiptoken", "$skip")]
    pairs.append((name, value))
    query = "&".join(f"{quote(k, safe='$')}={quote(v, safe=':')}" for k, v in pairs)
    return f"{request.url.scheme}://{request.url.netloc}{quote(request.url.path, safe='/$')}?{query}"
