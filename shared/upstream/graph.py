"""Microsoft Graph v1.0 Bookings: the payload models and the one client that reads and writes them.

Bookings has no delta query and no change notifications, so a sync re-reads a whole calendar
window. The service drops `@odata.nextLink` when `$top` is sent, so paging only follows the
links it returns. An inaccessible business answers `ErrorFolderNotFound` (not 403)."""

from __future__ import annotations

import logging
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any
from urllib.parse import quote as url_quote

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.upstream.errors import UpstreamAmbiguous, UpstreamError, UpstreamNotFound
from shared.upstream.http import ApiClient

log = logging.getLogger(__name__)

MAILBOX_CONCURRENCY = 4
"""Bookings serves at most 4 concurrent requests per app and mailbox."""
READ_ROLES = {"Bookings.Read.All", "BookingsAppointment.ReadWrite.All", "Bookings.Manage.All"}
"""Application permissions that let the app read Bookings businesses and their appointments (least
privileged first), on the strictest reading of Graph's docs: their tables also name
Bookings.ReadWrite.All, but app-only calls to appointments with it alone have been reported refused
(Microsoft Q&A 2283013), so it is not counted on (`GENEROUS_ROLE`)."""
GENEROUS_ROLE = "Bookings.ReadWrite.All"
"""Documented as enough for appointments, reported refused for them in app-only calls."""
WRITE_ROLES = {"BookingsAppointment.ReadWrite.All", "Bookings.Manage.All"}
"""Application permissions that let the app write an appointment's staff notes (strictest reading,
as for reading)."""
CUSTOMER_WRITE_ROLES = {"BookingsAppointment.ReadWrite.All", "Bookings.ReadWrite.All", "Bookings.Manage.All"}
"""Application permissions that let the app create and update Bookings customers (the push)."""
SERVICE_WRITE_ROLES = {"Bookings.ReadWrite.All", "Bookings.Manage.All"}
"""Application permissions that let the app create and update Bookings services (the push)."""


UNKNOWN_ERROR = "UnknownError"
UNKNOWN_ERROR_ATTEMPTS = {UNKNOWN_ERROR: 2}
"""How often a request answered `UnknownError` is sent (`ApiClient(attempts_by_code=…)`): Bookings
answers it, without a message, to writes it refuses for what they hold (community reports,
sandbox/FIDELITY.md), so retrying it seven times only holds one of the mailbox's four slots."""
WINDOW_PARAMETERS = (("start", "end"), ("startDateTime", "endDateTime"))
"""The calendar view's window: as documented (and in the SDKs' URL templates), then the names a
community report says Bookings wants instead, tried once when the documented ones are refused."""

ODATA_TYPES = {"customers": "#microsoft.graph.bookingCustomer", "services": "#microsoft.graph.bookingService"}


class GraphModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class DateTimeTimeZone(GraphModel):
    date_time: str = Field(alias="dateTime")
    time_zone: str | None = Field(None, alias="timeZone")

    def to_utc(self) -> datetime:
        """Bookings answers in UTC, but a `timeZone` may be any Windows or IANA zone name: honour
        it (or an offset in the time). An unknown zone raises `ValueError`: the appointment is
        reported as unreadable, never silently read as UTC."""
        parsed = datetime.fromisoformat(self.date_time)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=zone_of(self.time_zone))
        return parsed.astimezone(timezone.utc)


UTC_NAMES = {"", "utc", "z", "etc/utc", "gmt", "coordinated universal time"}


def zone_of(name: str | None) -> tzinfo:
    """The zone a `dateTimeTimeZone.timeZone` names: UTC, an IANA name, or a Windows name
    (mapped through CLDR's windowsZones, as the maintained `tzlocal` package ships it)."""
    if name is None or name.strip().lower() in UTC_NAMES:
        return timezone.utc
    from tzlocal.windows_tz import win_tz  # only for named zones: keep it out of app start-up

    iana = win_tz.get(name.strip(), name.strip())
    try:
        return zoneinfo.ZoneInfo(iana)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (neither a Windows nor an IANA time zone name)") from None


class CustomerInformation(GraphModel):
    customer_id: str | None = Field(None, alias="customerId")
    name: str | None = None
    email_address: str | None = Field(None, alias="emailAddress")
    phone: str | None = None


class Appointment(GraphModel):
    id: str = Field(min_length=1)
    start_date_time: DateTimeTimeZone = Field(validation_alias=AliasChoices("startDateTime", "start"))
    end_date_time: DateTimeTimeZone = Field(validation_alias=AliasChoices("endDateTime", "end"))
    duration: str | None = None
    service_id: str | None = Field(None, alias="serviceId")
    service_name: str | None = Field(None, alias="serviceName")
    price: float | None = None
    price_type: str | None = Field(None, alias="priceType")
    customers: list[CustomerInformation] = Field(default_factory=list)
    customer_email_address: str | None = Field(None, alias="customerEmailAddress")
    customer_name: str | None = Field(None, alias="customerName")
    customer_phone: str | None = Field(None, alias="customerPhone")
    service_notes: str | None = Field(None, alias="serviceNotes")
    is_location_online: bool | None = Field(None, alias="isLocationOnline")
    last_updated_date_time: str | None = Field(None, alias="lastUpdatedDateTime")

    @field_validator("customers", mode="before")
    @classmethod
    def _null_is_empty(cls, value):
        return value or []

    def billed_customers(self) -> list[CustomerInformation]:
        """The `customers[]` entries, or — as is common — the single-customer fields."""
        if self.customers:
            return self.customers
        return [CustomerInformation(name=self.customer_name, emailAddress=self.customer_email_address,
                                    phone=self.customer_phone)]


class PhysicalAddress(GraphModel):
    street: str | None = None
    city: str | None = None
    state: str | None = None
    country_or_region: str | None = Field(None, alias="countryOrRegion")
    postal_code: str | None = Field(None, alias="postalCode")


class Phone(GraphModel):
    number: str | None = None
    type: str | None = None


class BookingCustomer(GraphModel):
    id: str
    display_name: str | None = Field(None, alias="displayName")
    email_address: str | None = Field(None, alias="emailAddress")
    addresses: list[PhysicalAddress] = Field(default_factory=list)
    phones: list[Phone] = Field(default_factory=list)
    last_updated_date_time: str | None = Field(None, alias="lastUpdatedDateTime")

    @field_validator("addresses", "phones", mode="before")
    @classmethod
    def _null_is_empty(cls, value):
        return value or []


class BookingService(GraphModel):
    id: str
    display_name: str | None = Field(None, alias="displayName")
    default_price: float | None = Field(None, alias="defaultPrice")
    default_price_type: str | None = Field(None, alias="defaultPriceType")
    default_duration: str | None = Field(None, alias="defaultDuration")
    description: str | None = None
    last_updated_date_time: str | None = Field(None, alias="lastUpdatedDateTime")


class Page(GraphModel):
    """A page of a Graph collection whose every item is valid, parsed and validated from the
    answer's bytes in one pass (`model_validate_json`; each collection has its subclass)."""
    value: list
    next_link: str | None = Field(None, alias="@odata.nextLink")


class AppointmentPage(Page):
    value: list[Appointment]


class CustomerPage(Page):
    value: list[BookingCustomer]


class ServicePage(Page):
    value: list[BookingService]


class RawPage(Page):
    """A page with an item that is not valid: read again as it came, so that one bad item does
    not hide the others on its page (they are validated one by one)."""
    value: list[Any]


def _read_page(page_type: type[Page]):
    def read(content: bytes) -> Page:
        try:
            return page_type.model_validate_json(content)
        except ValidationError:
            return RawPage.model_validate_json(content)  # raises if the page itself is malformed
    return read


@dataclass
class Unreadable:
    """An item of a page that is not a valid appointment (customer, service): its id, if it has
    one, and why."""
    id: str | None
    reason: str


def _readable(model: type[GraphModel], item: Any) -> GraphModel | Unreadable:
    if isinstance(item, model):
        return item
    try:
        return model.model_validate(item)
    except (ValidationError, ValueError, TypeError) as error:
        ident = item.get("id") if isinstance(item, dict) else None
        return Unreadable(ident if isinstance(ident, str) else None, str(error).splitlines()[0] if str(error) else
                          type(error).__name__)


_PAGES: dict[type[GraphModel], Any] = {Appointment: _read_page(AppointmentPage), BookingCustomer: _read_page(CustomerPage),
                                       BookingService: _read_page(ServicePage)}


class NoAccessToBusiness(UpstreamError):
    """Graph hides an inaccessible business behind ErrorFolderNotFound."""


class BookingsRefused(UpstreamError):
    """Bookings refused a write without a reason (`UnknownError`, 400 or 500): not to be sent again
    as it is."""

    retryable_override = False


class UnreadableAppointment(UpstreamError):
    """An appointment read by id that is not a valid appointment (it is reported, never retried)."""

    retryable_override = False


def refused_without_reason(error: UpstreamError) -> UpstreamError:
    """`BookingsRefused` for a write answered `UnknownError` (but not a create whose outcome is
    unknown: Bookings has been reported to answer 500 to a create it made); any other error as it is."""
    if error.code != UNKNOWN_ERROR or isinstance(error, UpstreamAmbiguous):
        return error
    return BookingsRefused(error.service, error.status, error.code, "Bookings refused it without giving a reason")


class GraphClient:
    def __init__(self, api: ApiClient, base_url: str):
        self.api = api
        self.base_url = base_url.rstrip("/")
        self.window_parameters = WINDOW_PARAMETERS[0]
        """The calendar view's parameter names this process found Graph to take."""

    def _business_url(self, business_id: str) -> str:
        return f"{self.base_url}/solutions/bookingBusinesses/{url_quote(business_id, safe='@')}"

    async def _pages(self, business_id: str, url: str, model: type[GraphModel], params: dict | None = None):
        """Yield the items of every page, following `@odata.nextLink` only: each a `model`, or
        `Unreadable`."""
        read_page = _PAGES[model]
        next_url: str | None = url
        while next_url:
            try:
                response = await self.api.request("GET", next_url, params=params, limit_key=business_id,
                                                  decode=read_page)
            except UpstreamError as error:
                if error.status == 403:
                    raise NoAccessToBusiness(error.service, error.status, error.code,
                                             f"access to business {business_id} denied ({error.code}): the app needs "
                                             "the Microsoft Graph application permission Bookings.Read.All, with "
                                             "admin consent") from error
                if error.code == "ErrorFolderNotFound":
                    raise NoAccessToBusiness(error.service, error.status, error.code,
                                             f"no access to business {business_id}") from error
                raise
            page = response.body
            if not isinstance(page, Page):  # an answer without a body
                raise UpstreamError("Graph", response.status, "MalformedResponse", "a page of results had no body")
            for item in page.value:
                yield _readable(model, item)
            next_url, params = page.next_link, None

    async def calendar_view(self, business_id: str, start: datetime, end: datetime):
        """The appointments Graph says occur in [start, end) (those starting in it, on the strictest
        reading; some Graph readings add those overlapping it): each an `Appointment`, or `Unreadable`
        (one bad appointment does not hide the others).

        Graph documents the window as ``start``/``end``; one community report says Bookings wants
        ``startDateTime``/``endDateTime``. If the first page is refused (400) with the names in use,
        the other names are tried once, and kept for the process if Graph takes them."""
        url = f"{self._business_url(business_id)}/calendarView"
        names = self.window_parameters
        served = False
        try:
            async for item in self._pages(business_id, url, Appointment, _window(names, start, end)):
                served = True
                yield item
            return
        except UpstreamError as error:
            if served or error.status != 400:
                raise
            refused = error
        # Another read of this process may have found the names Graph takes meanwhile.
        other = self.window_parameters if self.window_parameters != names else \
            next(pair for pair in WINDOW_PARAMETERS if pair != names)
        try:
            async for item in self._pages(business_id, url, Appointment, _window(other, start, end)):
                self._taken(other, business_id)
                yield item
        except UpstreamError as error:
            if error.status == 400:
                raise refused from None
            raise
        self._taken(other, business_id)  # an empty window: the names were taken all the same

    def _taken(self, names: tuple[str, str], business_id: str) -> None:
        if self.window_parameters != names:
            log.warning("Graph refused the calendar view's parameters %s; it takes %s",
                        "/".join(self.window_parameters), "/".join(names),
                        extra={"event": "graph_calendar_parameters", "business_id": business_id})
            self.window_parameters = names

    async def customers(self, business_id: str):
        """The business's customers: each a `BookingCustomer`, or `Unreadable`."""
        async for item in self._pages(business_id, f"{self._business_url(business_id)}/customers", BookingCustomer):
            yield item

    async def services(self, business_id: str):
        """The business's services: each a `BookingService`, or `Unreadable`."""
        async for item in self._pages(business_id, f"{self._business_url(business_id)}/services", BookingService):
            yield item

    async def get_business(self, business_id: str) -> dict:
        response = await self.api.request("GET", self._business_url(business_id), limit_key=business_id)
        return response.body if isinstance(response.body, dict) else {}

    async def get_appointment(self, business_id: str, appointment_id: str) -> Appointment:
        """The appointment by id; `UnreadableAppointment` if what Graph answers is not one."""
        url = f"{self._business_url(business_id)}/appointments/{url_quote(appointment_id, safe='')}"
        response = await self.api.request("GET", url, limit_key=business_id)
        try:
            return Appointment.model_validate(response.body)
        except (ValidationError, ValueError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UnreadableAppointment("Graph", response.status, "UnreadableAppointment",
                                        f"appointment {appointment_id} is not a valid appointment: {reason}") from None

    async def get_item(self, business_id: str, collection: str, item_id: str) -> BookingCustomer | BookingService | None:
        """A customer or service by id; None if Bookings does not have it (any more)."""
        url = f"{self._business_url(business_id)}/{collection}/{url_quote(item_id, safe='')}"
        try:
            response = await self.api.request("GET", url, limit_key=business_id)
        except UpstreamNotFound as error:
            if error.code == "ErrorFolderNotFound":
                raise
            return None
        model = BookingCustomer if collection == "customers" else BookingService
        try:
            return model.model_validate(response.body)
        except (ValidationError, ValueError, TypeError):
            raise UpstreamError("Graph", response.status, "MalformedResponse",
                                f"the {collection[:-1]} {item_id} could not be read") from None

    async def update_appointment(self, business_id: str, appointment_id: str, changes: dict) -> None:
        url = f"{self._business_url(business_id)}/appointments/{url_quote(appointment_id, safe='')}"
        try:
            await self.api.request("PATCH", url, json_body=changes, limit_key=business_id)
        except UpstreamError as error:
            raise refused_without_reason(error) from error

    async def create(self, business_id: str, collection: str, body: dict) -> dict:
        """POST a customer or service; the created entity. A lost answer is `UpstreamAmbiguous`:
        the caller looks it up (by e-mail or name) before it creates it again."""
        # `customers` holds the abstract bookingCustomerBase: Graph needs the concrete type named.
        typed = {"@odata.type": ODATA_TYPES[collection], **body}
        try:
            response = await self.api.request("POST", f"{self._business_url(business_id)}/{collection}",
                                              json_body=typed, limit_key=business_id)
        except UpstreamError as error:
            raise refused_without_reason(error) from error
        created = response.body if isinstance(response.body, dict) else {}
        if not created.get("id"):
            raise UpstreamError("Graph", response.status, "MalformedResponse", f"the created {collection} had no id")
        return created

    async def update(self, business_id: str, collection: str, item_id: str, changes: dict) -> None:
        url = f"{self._business_url(business_id)}/{collection}/{url_quote(item_id, safe='')}"
        try:
            await self.api.request("PATCH", url, json_body={"@odata.type": ODATA_TYPES[collection], **changes},
                                   limit_key=business_id)
        except UpstreamError as error:
            raise refused_without_reason(error) from error


def _window(names: tuple[str, str], start: datetime, end: datetime) -> dict:
    return {names[0]: _iso_z(start), names[1]: _iso_z(end)}


def _iso_z(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
