"""`GraphSimulator`: the ASGI application (with the data API of `data_api`) and Graph's default
limits.

A request passes the `FaultPlan` (latency, the 4-per-mailbox limit, injected faults) first, then
the token and permission check, then routing; handlers work under one lock, so every answer sees
a consistent state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import random
import threading
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.faults import FaultMiddleware, FaultPlan, Knobs
from sandbox.graph.appointments import apply_changes, as_listed, as_read, check_appointment_fields
from sandbox.graph.batch import parse_batch, run_batch
from sandbox.graph.data_api import DataApi
from sandbox.graph.options import GraphOptions
from sandbox.graph.permissions import RequireGraphPermission, app_only
from sandbox.graph.rules import violation
from sandbox.graph.schema import Reader, check_entity_type
from sandbox.graph.store import Business, Collection
from sandbox.graph.times import parse_instant
from sandbox.graph.writes import Write, apply_update, new_customer, new_service, write_record
from sandbox.graph.wire import (BUSINESSES_PATH, GraphError, graph_error_body, json_response, mailbox_of, page,
                                select_of, selected)

CONCURRENCY_PER_MAILBOX = 4
MAX_LISTED_BUSINESSES = 500
"""`GET /solutions/bookingBusinesses` answers at most this many, in one page without a next link."""
_MALFORMED_ID = re.compile(r"[^A-Za-z0-9_\-+/=.@]")


def default_plan() -> FaultPlan:
    """Graph's documented per-mailbox concurrency, with no queueing (excess is throttled); a query
    string over 2,048 characters is refused (not documented: the strictest plausible front end)."""
    return FaultPlan(Knobs(max_concurrency=CONCURRENCY_PER_MAILBOX, max_queued=0, max_query_chars=2048))


class GraphSimulator(DataApi):
    """Graph Bookings over HTTP (`app`) plus a thread-safe data API for tests, demo and benchmark.

    `options` switches what the docs leave open (`GraphOptions`; `configure(...)` or the
    `calendar_view`, `calendar_view_cap` and `response_time_zone` properties, at any time).
    Request counters are `plan.stats` (inner `$batch` requests are counted as themselves, the
    batch as `POST /v1.0/$batch`); the writes actually executed are `writes(...)`."""

    def __init__(self, plan: FaultPlan | None = None, page_size: int = 100, options: GraphOptions | None = None):
        self.plan = plan or default_plan()
        self.page_size = page_size
        self.options = options or GraphOptions()
        self.options.check()
        self._omissions = random.Random(self.plan.knobs.seed)
        self._empty_pages = random.Random(self.plan.knobs.seed + 1)
        self.omitted_reads = 0
        """Calendar views answered with appointments left out (`GraphOptions.calendar_view_omit`)."""
        self._lock = threading.RLock()
        self.page_served: Callable[[str, str], None] | None = None
        """For tests: called with (business id, collection) after each page of a business's collection
        is made, under the data lock (the data API may be used in it), e.g. to delete a customer
        while a client walks the list."""
        self._businesses: dict[str, Business] = {}
        self._writes: list[Write] = []
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
                Route(business + "/customers", self._create_customer, methods=["POST"]),
                Route(business + "/customers/{item_id}", self._get_customer, methods=["GET"]),
                Route(business + "/customers/{item_id}", self._update_customer, methods=["PATCH"]),
                Route(business + "/services", self._list_services, methods=["GET"]),
                Route(business + "/services", self._create_service, methods=["POST"]),
                Route(business + "/services/{item_id}", self._get_service, methods=["GET"]),
                Route(business + "/services/{item_id}", self._update_service, methods=["PATCH"]),
                Route("/v1.0/$batch", self._batch, methods=["POST"]),
            ],
            exception_handlers={GraphError: self._error_response, 404: self._no_route, 405: self._no_method},
        )
        self.app = FaultMiddleware(RequireGraphPermission(router, self.options), self.plan, key_of=mailbox_of,
                                   error_body=graph_error_body)

    # Options -----------------------------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Change `GraphOptions` at run time, e.g. ``configure(calendar_view="overlapping")``;
        ``configure(**dataclasses.asdict(GraphOptions()))`` restores the defaults."""
        with self._lock:
            trial = dataclasses.replace(self.options, **changes)
            trial.check()
            for name in changes:
                setattr(self.options, name, getattr(trial, name))

    @property
    def calendar_view(self) -> str:
        return self.options.calendar_view

    @calendar_view.setter
    def calendar_view(self, value: str) -> None:
        self.configure(calendar_view=value)

    @property
    def calendar_view_cap(self) -> int | None:
        return self.options.calendar_view_cap

    @calendar_view_cap.setter
    def calendar_view_cap(self, value: int | None) -> None:
        self.configure(calendar_view_cap=value)

    @property
    def response_time_zone(self) -> str | None:
        return self.options.response_time_zone

    @response_time_zone.setter
    def response_time_zone(self, value: str | None) -> None:
        self.configure(response_time_zone=value)

    # HTTP ----------------------------------------------------------------------------------------

    async def _error_response(self, request: Request, error: GraphError) -> Response:
        return json_response(request, graph_error_body(error.status, error.code, error.message), error.status)

    async def _no_route(self, request: Request, error: HTTPException) -> Response:
        segment = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        return await self._error_response(
            request, GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'."))

    async def _no_method(self, request: Request, error: HTTPException) -> Response:
        return await self._error_response(
            request, GraphError(405, "BadRequest", "Specified HTTP method is not allowed for the request uri."))

    def _accessible(self, request: Request) -> Business:
        """Call with the lock held."""
        business_id = request.path_params["business_id"]
        business = self._businesses.get(business_id.lower())
        if business is None or business.inaccessible:
            raise GraphError(404, "ErrorFolderNotFound",
                             f"The specified folder could not be found in the store. Mailbox: '{business_id}'.")
        return business

    @staticmethod
    def _context(request: Request, business: Business | None, segment: str) -> str:
        base = f"{request.url.scheme}://{request.url.netloc}/v1.0/$metadata#solutions/bookingBusinesses"
        return f"{base}('{quote(business.id, safe='')}')/{segment}" if business else base

    def _page(self, request: Request, entries: list, context: str, kind: str, project) -> Response:
        """Call with the lock held."""
        options = self.options
        empty = bool(options.empty_pages) and self._empty_pages.random() < options.empty_pages
        answer = page(request, entries, context, kind, project, self.page_size, options.paging, empty)
        if self.page_served is not None:
            self.page_served(request.path_params.get("business_id", ""), kind)
        return answer

    def _refused(self, error: GraphError) -> GraphError:
        """A refusal of what a write holds, as `GraphOptions.refusal_style` says Graph answers it."""
        style = self.options.refusal_style
        if style == "precise" or error.status != 400:
            return error
        return GraphError(500 if style == "unknown-500" else 400, "UnknownError", "")

    async def _list_businesses(self, request: Request) -> Response:
        with self._lock:
            entries = [((index,), {"id": b.id, "displayName": b.display_name})
                       for index, b in enumerate(self._businesses.values())][:MAX_LISTED_BUSINESSES]
            return page(request, entries, self._context(request, None, ""), "businesses", lambda b: b, page_size=0)

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
                "businessHours": copy.deepcopy(business.business_hours),
                "schedulingPolicy": copy.deepcopy(business.scheduling_policy),
            }
            return json_response(request, body)

    async def _calendar_view(self, request: Request) -> Response:
        params = request.query_params
        first, last = self.options.calendar_view_params.split("/")
        try:
            start = parse_instant(params[first]).timestamp()
            end = parse_instant(params[last]).timestamp()
        except (KeyError, ValueError):
            raise GraphError(400, "ErrorInvalidRequest",
                             f"The '{first}' and '{last}' query parameters are required and must be ISO 8601 "
                             "date-times, e.g. 2018-01-01T00:00:00Z.") from None
        with self._lock:
            business = self._accessible(request)
            options = self.options
            entries = business.calendar_view(start, end, overlapping=options.calendar_view == "overlapping",
                                             cap=options.calendar_view_cap)
            if options.calendar_view_omit and "$skiptoken" not in params and "$skip" not in params:
                entries = [entry for entry in entries if self._omissions.random() >= options.calendar_view_omit]
                self.omitted_reads += 1
            zone = options.response_time_zone
            return self._page(request, entries, self._context(request, business, "calendarView"),
                              "calendarView", lambda a: as_listed(a, zone))

    async def _list_appointments(self, request: Request) -> Response:
        with self._lock:
            business = self._accessible(request)
            zone = self.options.response_time_zone
            return self._page(request, business.appointments.entries(),
                              self._context(request, business, "appointments"), "appointments",
                              lambda a: as_listed(a, zone))

    async def _list_customers(self, request: Request) -> Response:
        with self._lock:
            business = self._accessible(request)
            return self._page(request, business.customers.entries(),
                              self._context(request, business, "customers"), "customers", lambda c: c)

    async def _list_services(self, request: Request) -> Response:
        with self._lock:
            business = self._accessible(request)
            return self._page(request, business.services.entries(),
                              self._context(request, business, "services"), "services",
                              lambda s: {**s, "defaultReminders": []} if "defaultReminders" in s else s)

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
            if kind == "appointments":
                item = as_read(item, self.options.response_time_zone)
            body = {"@odata.context": self._context(request, business, kind) + "/$entity"}
            body.update(selected(item, select_of(request)))
            return json_response(request, body)

    async def _body(self, request: Request) -> bytes:
        """A write's body, refused 413 over Graph's 4 MB write limit."""
        content = await request.body()
        limit = self.options.max_write_bytes
        if limit is not None and len(content) > limit:
            raise GraphError(413, "RequestEntityTooLarge", "Request entity too large")
        return content

    async def _json_object(self, request: Request) -> dict:
        try:
            fields = json.loads(await self._body(request) or b"null")
        except ValueError:
            raise GraphError(400, "BadRequest", "Invalid JSON in the request body.") from None
        if not isinstance(fields, dict):
            raise GraphError(400, "BadRequest", "Empty Payload. JSON content expected.")
        return fields

    async def _patch_appointment(self, request: Request) -> Response:
        fields = await self._json_object(request)
        try:
            if fields.get("@odata.type", "#microsoft.graph.bookingAppointment") != "#microsoft.graph.bookingAppointment":
                raise GraphError(400, "BadRequest",
                                 "A type named '" + str(fields["@odata.type"]) + "' could not be resolved.")
            fields.pop("@odata.type", None)
            check_appointment_fields(fields, self.options.field_limits)
        except GraphError as error:
            raise self._refused(error) from None
        with self._lock:
            business = self._accessible(request)
            appointment = self._item(request, business.appointments)
            if self.options.app_only_business_rules == "strict" and app_only(request.scope):
                broken = violation(business, {**appointment, **fields}, datetime.now(timezone.utc))
                if broken:
                    raise self._refused(GraphError(400, "ErrorInvalidRequest", broken))
            apply_changes(business, appointment, fields)
            self._writes.append(write_record("PATCH", "appointments", business.id, appointment["id"]))
        return json_response(request, None, 204)

    # Customers and services --------------------------------------------------------------------

    def _reader(self, label: str) -> Reader:
        options = self.options
        return Reader(label, options.field_limits, options.customer_address_type)

    async def _create_customer(self, request: Request) -> Response:
        body = await self._json_object(request)
        try:
            check_entity_type(body, "bookingCustomer", self.options.customer_create_needs_odata_type)
            fields = self._reader("customer").entity("bookingCustomer", body, creating=True)
        except GraphError as error:
            raise self._refused(error) from None
        with self._lock:
            business = self._accessible(request)
            customer = new_customer(business.id, fields)
            return self._created(request, business, "customers", customer)

    async def _create_service(self, request: Request) -> Response:
        body = await self._json_object(request)
        try:
            check_entity_type(body, "bookingService", required=False)
            fields = self._reader("service").entity("bookingService", body, creating=True)
        except GraphError as error:
            raise self._refused(error) from None
        with self._lock:
            business = self._accessible(request)
            service = new_service(business.id, fields)
            return self._created(request, business, "services", service)

    def _created(self, request: Request, business: Business, kind: str, item: dict) -> Response:
        """Store a new item and answer 201 with it. Call with the lock held."""
        getattr(business, kind).put(item["id"], item)
        self._writes.append(write_record("POST", kind, business.id, item["id"]))
        body = {"@odata.context": self._context(request, business, kind) + "/$entity", **copy.deepcopy(item)}
        return json_response(request, body, 201)

    async def _update_customer(self, request: Request) -> Response:
        business, customer = await self._update(request, "customers", "bookingCustomer", "customer")
        if self.options.customer_update_status == 204:
            return json_response(request, None, 204)
        body = {"@odata.context": self._context(request, business, "customers") + "/$entity", **customer}
        return json_response(request, body)

    async def _update_service(self, request: Request) -> Response:
        await self._update(request, "services", "bookingService", "service")
        return json_response(request, None, 204)

    async def _update(self, request: Request, kind: str, entity_type: str, reader: str) -> tuple[Business, dict]:
        """PATCH one customer or service: the fields checked against the schema, applied, and
        recorded as a write; the business and (a copy of) the item as it now is."""
        body = await self._json_object(request)
        try:
            check_entity_type(body, entity_type, required=False)
            fields = self._reader(reader).entity(entity_type, body, creating=False)
        except GraphError as error:
            raise self._refused(error) from None
        with self._lock:
            business = self._accessible(request)
            item = self._item(request, getattr(business, kind))
            apply_update(item, fields)
            self._writes.append(write_record("PATCH", kind, business.id, item["id"]))
            return business, copy.deepcopy(item)

    @staticmethod
    def _item(request: Request, collection: Collection) -> dict:
        """The item the path names; a deleted or cancelled appointment is gone like any unknown id."""
        item_id = request.path_params["item_id"]
        item = collection.items.get(item_id)
        if item is None:
            if _MALFORMED_ID.search(item_id):
                raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return item

    async def _batch(self, request: Request) -> Response:
        try:
            payload = json.loads(await self._body(request) or b"null")
        except ValueError:
            raise GraphError(400, "BadRequest", "Invalid batch payload: the body is not JSON.") from None
        items = parse_batch(payload)
        return json_response(request, {"responses": await run_batch(self.app, request, items)})
