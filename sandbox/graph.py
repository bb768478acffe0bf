"""Simulated Microsoft Graph v1.0 Bookings (`/v1.0/solutions/bookingBusinesses/…`).

Faithful where the app can go wrong against the real service:

- every request needs a Bearer token for ``https://graph.microsoft.com`` (else 401
  ``InvalidAuthenticationToken``);
- ``calendarView`` needs ``start`` and ``end``; collections are paged with an absolute
  ``@odata.nextLink`` carrying an opaque ``$skiptoken``; sending ``$top`` returns that many and
  *no* next link, as the real service does, so a client that sends it silently loses data;
- lists return ``serviceNotes`` empty (and no ``reminders`` / ``customerNotes``): only a GET by id
  has them;
- an inaccessible or unknown business answers 404 ``ErrorFolderNotFound``, not 403;
- ``$batch`` takes at most 20 requests; inner requests run concurrently through the same fault and
  limit machinery, so a batch of more than four requests to one mailbox meets the per-mailbox
  concurrency limit and some answers are 429 inside a 200 batch, as in Graph;
- ``$filter``, ``$orderby``, ``$skip`` and ``$search`` are refused (400) so the app cannot come to
  rely on server-side filtering that Bookings does not promise.

Paging is keyset-based (the token remembers the last item), so a page walk sees every item that
exists for the whole walk exactly once even when others are added or removed meanwhile.

By default (no plan given) each mailbox serves at most 4 requests at once and answers 429 beyond
that, the documented Graph limit for Bookings; pass a `FaultPlan` to change it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox import tokens
from sandbox.data import Dataset, display_name_of, graph_timestamp, iso_duration
from sandbox.faults import FaultMiddleware, FaultPlan, Knobs

MAX_BATCH_REQUESTS = 20
CONCURRENCY_PER_MAILBOX = 4
BUSINESSES_PATH = "/v1.0/solutions/bookingBusinesses"
_MEDIA_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
_REFUSED_OPTIONS = ("$filter", "$orderby", "$skip", "$search")
_MALFORMED_ID = re.compile(r"[^A-Za-z0-9_\-+/=.@]")
_ALL_PRICE_TYPES = ("undefined", "fixedPrice", "startingAt", "hourly", "free", "priceVaries", "callUs",
                    "notSet", "unknownFutureValue")

_STRING, _BOOL, _NUMBER, _LIST, _OBJECT = (str,), (bool,), (int, float), (list,), (dict,)
APPOINTMENT_FIELDS: dict[str, tuple[type, ...]] = {
    "@odata.type": _STRING, "additionalInformation": _STRING, "anonymousJoinWebUrl": _STRING,
    "appointmentLabel": _STRING, "customerEmailAddress": _STRING, "customerName": _STRING,
    "customerNotes": _STRING, "customerPhone": _STRING, "customerTimeZone": _STRING,
    "duration": _STRING, "joinWebUrl": _STRING, "postBuffer": _STRING, "preBuffer": _STRING,
    "priceType": _STRING, "selfServiceAppointmentId": _STRING, "serviceId": _STRING,
    "serviceName": _STRING, "serviceNotes": _STRING,
    "isCustomerAllowedToManageBooking": _BOOL, "isLocationOnline": _BOOL,
    "optOutOfCustomerEmail": _BOOL, "smsNotificationsEnabled": _BOOL,
    "price": _NUMBER, "maximumAttendeesCount": _NUMBER, "filledAttendeesCount": _NUMBER,
    "customers": _LIST, "reminders": _LIST, "staffMemberIds": _LIST,
    "startDateTime": _OBJECT, "endDateTime": _OBJECT, "serviceLocation": _OBJECT, "customerLocation": _OBJECT,
    "id": _STRING, "createdDateTime": _STRING, "lastUpdatedDateTime": _STRING,
}
READ_ONLY_FIELDS = frozenset({"id", "createdDateTime", "lastUpdatedDateTime"})


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


def default_plan() -> FaultPlan:
    """Graph's documented per-mailbox concurrency, with no queueing (excess is throttled)."""
    return FaultPlan(Knobs(max_concurrency=CONCURRENCY_PER_MAILBOX, max_queued=0))


def parse_instant(text: str) -> datetime:
    """An ISO 8601 date-time with `Z` or an offset (naive means UTC); raises ValueError."""
    if "T" not in text:
        raise ValueError(f"not a date-time: {text!r}")
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _instant_of(value: Any) -> datetime:
    """A `dateTimeTimeZone` dict as an aware datetime."""
    if not isinstance(value, dict) or not isinstance(value.get("dateTime"), str):
        raise ValueError("expected {dateTime, timeZone}")
    moment = datetime.fromisoformat(value["dateTime"])
    if moment.tzinfo is None:
        try:
            moment = moment.replace(tzinfo=ZoneInfo(value.get("timeZone") or "UTC"))
        except (ZoneInfoNotFoundError, ValueError):
            moment = moment.replace(tzinfo=timezone.utc)
    return moment


class _Collection:
    """Items in insertion order, each with a stable sequence number for keyset paging."""

    def __init__(self) -> None:
        self.items: dict[str, dict] = {}
        self.seq: dict[str, int] = {}
        self._next = 0

    def put(self, item_id: str, item: dict) -> None:
        if item_id not in self.seq:
            self.seq[item_id] = self._next
            self._next += 1
        self.items[item_id] = item

    def remove(self, item_id: str) -> None:
        del self.items[item_id]
        del self.seq[item_id]

    def entries(self) -> list[tuple[tuple, dict]]:
        return [((self.seq[item_id],), item) for item_id, item in self.items.items()]


@dataclass
class _Business:
    id: str
    display_name: str
    inaccessible: bool = False
    services: _Collection = field(default_factory=_Collection)
    customers: _Collection = field(default_factory=_Collection)
    appointments: _Collection = field(default_factory=_Collection)
    calendar: list[tuple[float, str, float]] | None = None
    """Appointments as (start, id, end) sorted by start; None when it must be rebuilt."""

    def calendar_index(self) -> list[tuple[float, str, float]]:
        """Appointments whose times do not parse (stored on purpose by a test) sort first and
        fall in every window, so a calendar pull always serves them for the app to reject."""
        if self.calendar is None:
            rows = []
            for appointment_id, appointment in self.appointments.items.items():
                try:
                    start = _instant_of(appointment.get("startDateTime")).timestamp()
                    end = _instant_of(appointment.get("endDateTime")).timestamp()
                except ValueError:
                    start, end = float("-inf"), float("inf")
                rows.append((start, appointment_id, end))
            rows.sort()
            self.calendar = rows
        return self.calendar


def _check_appointment_fields(fields: dict) -> None:
    """What Graph refuses in a PATCH: unknown or read-only properties and values of the wrong type."""
    for name, value in fields.items():
        kinds = APPOINTMENT_FIELDS.get(name)
        if kinds is None:
            raise GraphError(400, "BadRequest",
                             f"The property '{name}' does not exist on type 'microsoft.graph.bookingAppointment'. "
                             "Make sure to only use property names that are defined by the type.")
        if name in READ_ONLY_FIELDS:
            raise GraphError(400, "BadRequest", f"The property '{name}' is read-only and cannot be set.")
        if value is not None and (not isinstance(value, kinds) or (kinds is _NUMBER and isinstance(value, bool))):
            raise GraphError(400, "BadRequest", f"Cannot convert the value of property '{name}'.")
        if name == "priceType" and value is not None and value not in _ALL_PRICE_TYPES:
            raise GraphError(400, "BadRequest", f"Requested value '{value}' was not found for bookingPriceType.")
        if name in ("startDateTime", "endDateTime") and value is not None:
            try:
                _instant_of(value)
            except ValueError as error:
                raise GraphError(400, "BadRequest", f"Invalid value for '{name}': {error}.") from error


class _RequireGraphToken:
    """Refuse any request without a valid Graph token before it reaches a handler."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                tokens.verify(authorization, tokens.GRAPH_AUDIENCE)
            except tokens.InvalidToken as error:
                body = json.dumps(graph_error_body(401, "InvalidAuthenticationToken", str(error))).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="", authorization_uri='
                                          b'"https://login.microsoftonline.com/common/oauth2/authorize", '
                                          b'client_id="00000003-0000-0000-c000-000000000000"')]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class GraphSimulator:
    """Graph Bookings over HTTP (`app`) plus a thread-safe data API for tests, demo and benchmark.

    Request counters are `plan.stats` (inner `$batch` requests are counted as themselves, the
    batch as `POST /v1.0/$batch`)."""

    def __init__(self, plan: FaultPlan | None = None, page_size: int = 100):
        self.plan = plan or default_plan()
        self.page_size = page_size
        self._lock = threading.Lock()
        self._businesses: dict[str, _Business] = {}
        business = BUSINESSES_PATH + "/{business_id}"
        router = Starlette(
            routes=[
                Route(BUSINESSES_PATH, self._list_businesses, methods=["GET"]),
                Route(business, self._get_business, methods=["GET"]),
                Route(business + "/calendarView", self._calendar_view, methods=["GET"]),
                Route(business + "/appointments", self._list_appointments, methods=["GET"]),
                Route(business + "/appointments/{item_id}", self._get_appointment, methods=["GET"]),
                Route(business + "/appointments/{item_id}", self._patch_appointment, methods=["PATCH"]),
                Route(business + "/customers", self._list_customers, methods=["GET"]),
                Route(business + "/customers/{item_id}", self._get_customer, methods=["GET"]),
                Route(business + "/services", self._list_services, methods=["GET"]),
                Route(business + "/services/{item_id}", self._get_service, methods=["GET"]),
                Route("/v1.0/$batch", self._batch, methods=["POST"]),
            ],
            exception_handlers={GraphError: self._error_response, 404: self._no_route, 405: self._no_method},
        )
        self.app = FaultMiddleware(_RequireGraphToken(router), self.plan, key_of=mailbox_of,
                                   error_body=graph_error_body)

    # Data API (any thread) -------------------------------------------------------------------

    def add_business(self, business_id: str, display_name: str | None = None) -> None:
        with self._lock:
            existing = self._businesses.get(business_id.lower())
            if existing is None:
                self._businesses[business_id.lower()] = _Business(business_id, display_name or display_name_of(business_id))
            elif display_name:
                existing.display_name = display_name

    def load(self, dataset: Dataset) -> None:
        """Replace the services, customers and appointments of the dataset's businesses."""
        for business_id, data in dataset.businesses.items():
            fresh = _Business(business_id, data.display_name)
            for service in data.services:
                fresh.services.put(service["id"], copy.deepcopy(service))
            for customer in data.customers:
                fresh.customers.put(customer["id"], copy.deepcopy(customer))
            for appointment in data.appointments:
                fresh.appointments.put(appointment["id"], copy.deepcopy(appointment))
            fresh.calendar_index()
            with self._lock:
                self._businesses[business_id.lower()] = fresh

    def put_service(self, business_id: str, service: dict) -> str:
        return self._put(business_id, "services", service)

    def put_customer(self, business_id: str, customer: dict) -> str:
        return self._put(business_id, "customers", customer)

    def put_appointment(self, business_id: str, appointment: dict) -> str:
        """Create or replace an appointment exactly as given (Graph JSON); returns its id.

        Nothing is validated, so a test can plant a malformed appointment for the app to meet.
        Only a missing id is made up and missing created/updated stamps are set to now."""
        stored = copy.deepcopy(appointment)
        stored.setdefault("id", "AAMkAD" + uuid.uuid4().hex + "AAA=")
        now = graph_timestamp(datetime.now(timezone.utc))
        stored.setdefault("createdDateTime", now)
        stored.setdefault("lastUpdatedDateTime", now)
        return self._put(business_id, "appointments", stored, copy_item=False)

    def delete_appointment(self, business_id: str, appointment_id: str) -> None:
        """Remove an appointment: all a calendar pull ever sees of a cancellation."""
        with self._lock:
            business = self._business(business_id)
            business.appointments.remove(appointment_id)
            business.calendar = None

    def update_appointment(self, business_id: str, appointment_id: str, **fields: Any) -> dict:
        """Change fields (Graph names) as a Bookings user would; bumps `lastUpdatedDateTime`."""
        _check_appointment_fields(fields)
        with self._lock:
            business = self._business(business_id)
            self._apply(business, business.appointments.items[appointment_id], fields)
            return copy.deepcopy(business.appointments.items[appointment_id])

    def set_inaccessible(self, business_id: str, inaccessible: bool = True) -> None:
        with self._lock:
            self._business(business_id).inaccessible = inaccessible

    def appointment(self, business_id: str, appointment_id: str) -> dict:
        """The stored appointment, notes included (KeyError if it does not exist)."""
        with self._lock:
            return copy.deepcopy(self._business(business_id).appointments.items[appointment_id])

    def appointments(self, business_id: str) -> list[dict]:
        with self._lock:
            return copy.deepcopy(list(self._business(business_id).appointments.items.values()))

    def _business(self, business_id: str) -> _Business:
        return self._businesses[business_id.lower()]

    def _put(self, business_id: str, kind: str, item: dict, copy_item: bool = True) -> str:
        stored = copy.deepcopy(item) if copy_item else item
        stored.setdefault("id", str(uuid.uuid4()))
        with self._lock:
            if business_id.lower() not in self._businesses:
                self._businesses[business_id.lower()] = _Business(business_id, display_name_of(business_id))
            business = self._business(business_id)
            getattr(business, kind).put(stored["id"], stored)
            if kind == "appointments":
                business.calendar = None
        return stored["id"]

    @staticmethod
    def _apply(business: _Business, appointment: dict, fields: dict) -> None:
        """Merge `fields`; keep `duration` consistent and `lastUpdatedDateTime` strictly rising."""
        appointment.update(copy.deepcopy(fields))
        if "startDateTime" in fields or "endDateTime" in fields:
            business.calendar = None
            try:
                span = _instant_of(appointment.get("endDateTime")) - _instant_of(appointment.get("startDateTime"))
                appointment["duration"] = iso_duration(max(int(span.total_seconds() // 60), 0))
            except ValueError:
                pass
        now = datetime.now(timezone.utc)
        try:
            previous = parse_instant(appointment.get("lastUpdatedDateTime") or "")
            now = max(now, previous + timedelta(microseconds=1))
        except ValueError:
            pass
        appointment["lastUpdatedDateTime"] = graph_timestamp(now)

    # HTTP ------------------------------------------------------------------------------------

    def _json(self, request: Request, body: dict | None, status: int = 200, headers: dict | None = None) -> Response:
        all_headers = {"request-id": str(uuid.uuid4()),
                       "client-request-id": request.headers.get("client-request-id", str(uuid.uuid4()))}
        all_headers.update(headers or {})
        if body is None:
            return Response(status_code=status, headers=all_headers)
        content = json.dumps(body, ensure_ascii=False).encode()
        return Response(content, status_code=status, headers=all_headers, media_type=_MEDIA_TYPE)

    async def _error_response(self, request: Request, error: GraphError) -> Response:
        return self._json(request, graph_error_body(error.status, error.code, error.message), error.status)

    async def _no_route(self, request: Request, error: HTTPException) -> Response:
        segment = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        return await self._error_response(
            request, GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'."))

    async def _no_method(self, request: Request, error: HTTPException) -> Response:
        return await self._error_response(
            request, GraphError(405, "BadRequest", "Specified HTTP method is not allowed for the request uri."))

    def _accessible(self, request: Request) -> _Business:
        """Call with the lock held."""
        business_id = request.path_params["business_id"]
        business = self._businesses.get(business_id.lower())
        if business is None or business.inaccessible:
            raise GraphError(404, "ErrorFolderNotFound",
                             f"The specified folder could not be found in the store. Mailbox: '{business_id}'.")
        return business

    def _context(self, request: Request, business: _Business | None, segment: str) -> str:
        base = f"{request.url.scheme}://{request.url.netloc}/v1.0/$metadata#solutions/bookingBusinesses"
        return f"{base}('{quote(business.id, safe='')}')/{segment}" if business else base

    async def _list_businesses(self, request: Request) -> Response:
        with self._lock:
            entries = [((index,), {"id": b.id, "displayName": b.display_name})
                       for index, b in enumerate(self._businesses.values())]
            return self._page(request, entries, self._context(request, None, ""), "businesses", lambda b: b)

    async def _get_business(self, request: Request) -> Response:
        with self._lock:
            business = self._accessible(request)
            body = {
                "@odata.context": self._context(request, None, "") + "/$entity",
                "id": business.id, "displayName": business.display_name, "businessType": "",
                "phone": "", "email": business.id, "webSiteUrl": "", "defaultCurrencyIso": "USD",
                "isPublished": True, "languageTag": "en-US",
                "publicUrl": f"https://outlook.office365.com/owa/calendar/{quote(business.id, safe='@')}/bookings/",
                "address": {"street": "", "city": "", "state": "", "countryOrRegion": "", "postalCode": ""},
                "businessHours": [], "schedulingPolicy": None,
            }
            return self._json(request, body)

    async def _calendar_view(self, request: Request) -> Response:
        params = request.query_params
        try:
            start = parse_instant(params["start"]).timestamp()
            end = parse_instant(params["end"]).timestamp()
        except (KeyError, ValueError):
            raise GraphError(400, "ErrorInvalidRequest",
                             "The 'start' and 'end' query parameters are required and must be ISO 8601 "
                             "date-times, e.g. 2018-01-01T00:00:00Z.") from None
        with self._lock:
            business = self._accessible(request)
            items = business.appointments.items
            entries = []
            for row_start, appointment_id, row_end in business.calendar_index():
                if row_start >= end:
                    break
                if row_end > start:
                    entries.append(((row_start, appointment_id), items[appointment_id]))
            return self._page(request, entries, self._context(request, business, "calendarView"),
                              "calendarView", _as_listed)

    async def _list_appointments(self, request: Request) -> Response:
        with self._lock:
            business = self._accessible(request)
            return self._page(request, business.appointments.entries(),
                              self._context(request, business, "appointments"), "appointments", _as_listed)

    async def _list_customers(self, request: Request) -> Response:
        with self._lock:
            business = self._accessible(request)
            return self._page(request, business.customers.entries(),
                              self._context(request, business, "customers"), "customers", lambda c: c)

    async def _list_services(self, request: Request) -> Response:
        with self._lock:
            business = self._accessible(request)
            return self._page(request, business.services.entries(),
                              self._context(request, business, "services"), "services", lambda s: s)

    async def _get_appointment(self, request: Request) -> Response:
        return self._get_item(request, "appointments")

    async def _get_customer(self, request: Request) -> Response:
        return self._get_item(request, "customers")

    async def _get_service(self, request: Request) -> Response:
        return self._get_item(request, "services")

    def _get_item(self, request: Request, kind: str) -> Response:
        with self._lock:
            business = self._accessible(request)
            item = self._item(request, getattr(business, kind))
            body = {"@odata.context": self._context(request, business, kind) + "/$entity"}
            body.update(_selected(item, _select_of(request)))
            return self._json(request, body)

    async def _patch_appointment(self, request: Request) -> Response:
        try:
            fields = json.loads(await request.body() or b"null")
        except ValueError:
            raise GraphError(400, "BadRequest", "Invalid JSON in the request body.") from None
        if not isinstance(fields, dict):
            raise GraphError(400, "BadRequest", "Empty Payload. JSON content expected.")
        if fields.get("@odata.type", "#microsoft.graph.bookingAppointment") != "#microsoft.graph.bookingAppointment":
            raise GraphError(400, "BadRequest", "A type named '" + str(fields["@odata.type"]) + "' could not be resolved.")
        fields.pop("@odata.type", None)
        _check_appointment_fields(fields)
        with self._lock:
            business = self._accessible(request)
            appointment = self._item(request, business.appointments)
            self._apply(business, appointment, fields)
        return self._json(request, None, 204)

    @staticmethod
    def _item(request: Request, collection: _Collection) -> dict:
        item_id = request.path_params["item_id"]
        item = collection.items.get(item_id)
        if item is None:
            if _MALFORMED_ID.search(item_id):
                raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return item

    def _page(self, request: Request, entries: list[tuple[tuple, dict]], context: str, kind: str,
              project: Callable[[dict], dict]) -> Response:
        """One page of `entries` (sorted by key). Call with the lock held: it serialises."""
        params = request.query_params
        for option in _REFUSED_OPTIONS:
            if option in params:
                raise GraphError(400, "BadRequest", f"Query option '{option}' is not supported by this API.")
        top = None
        if "$top" in params:
            try:
                top = int(params["$top"])
            except ValueError:
                top = -1
            if top < 0:
                raise GraphError(400, "BadRequest", f"Invalid value '{params['$top']}' for query option '$top'.")
        first = 0
        if "$skiptoken" in params:
            after = _decode_skiptoken(params["$skiptoken"], kind)
            try:
                first = bisect.bisect_right([key for key, _ in entries], after)
            except TypeError:
                raise GraphError(400, "BadRequest", "The $skiptoken is invalid.") from None
        size = top if top is not None else max(int(self.page_size), 1)
        chunk = entries[first:first + size]
        select = _select_of(request)
        body: dict[str, Any] = {"@odata.context": context}
        if params.get("$count", "").lower() == "true":
            body["@odata.count"] = len(entries)
        body["value"] = [_selected(project(item), select) for _, item in chunk]
        if top is None and first + size < len(entries):
            body["@odata.nextLink"] = _next_link(request, _encode_skiptoken(chunk[-1][0], kind))
        return self._json(request, body)

    async def _batch(self, request: Request) -> Response:
        try:
            payload = json.loads(await request.body() or b"null")
        except ValueError:
            raise GraphError(400, "BadRequest", "Invalid batch payload: the body is not JSON.") from None
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
            answer = await self._dispatch(request, item)
            completed.append(answer)
            return answer

        for item in items:
            tasks[item["id"]] = asyncio.ensure_future(run(item))
        await asyncio.gather(*tasks.values())
        return self._json(request, {"responses": completed})

    async def _dispatch(self, outer: Request, item: dict) -> dict:
        """Run one inner request through the whole stack (faults, limits, auth, routing)."""
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
            await self.app(scope, receive, send)
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


def _as_listed(appointment: dict) -> dict:
    """How an appointment looks in a collection: the per-item-only properties are blank."""
    return {**appointment, "serviceNotes": "", "customerNotes": None, "reminders": []}


def _select_of(request: Request) -> set[str] | None:
    raw = request.query_params.get("$select")
    return {name.strip() for name in raw.split(",") if name.strip()} | {"id"} if raw else None


def _selected(item: dict, select: set[str] | None) -> dict:
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


def _next_link(request: Request, token: str) -> str:
    pairs = [(k, v) for k, v in request.query_params.multi_items() if k != "$skiptoken"]
    pairs.append(("$skiptoken", token))
    query = "&".join(f"{quote(k, safe='$')}={quote(v, safe=':')}" for k, v in pairs)
    return f"{request.url.scheme}://{request.url.netloc}{quote(request.url.path, safe='/$')}?{query}"
