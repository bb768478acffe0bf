"""`GraphOptions`: the behaviours Graph's documentation leaves open, and the permissions each
operation needs. Defaults are the strictest reading (see `sandbox/FIDELITY.md`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox.graph.limits import DEFAULT_FIELD_LIMITS, check_limits
from sandbox.graph.times import zone_of
from sandbox.tokens import BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_MANAGE, BOOKINGS_READ, BOOKINGS_READ_WRITE

CALENDAR_VIEW_MODES = ("starting", "overlapping")
ADDRESS_TYPE_MODES = ("dropped", "as-sent", "other")
CUSTOMER_UPDATE_STATUSES = (200, 204)
RULE_MODES = ("strict", "off")
REFUSAL_STYLES = ("precise", "unknown-400", "unknown-500")
CALENDAR_VIEW_PARAMS = ("start/end", "startDateTime/endDateTime")
PAGING_MODES = ("keyset", "offset")
MAX_WRITE_BYTES = 4 * 1024 * 1024
"""GRAPHDOCS ``concepts/use-the-api.md``: "Write requests in the Microsoft Graph API have a size limit of 4 MB."."""

READ_ROLES = frozenset({BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ_WRITE, BOOKINGS_MANAGE})
"""Reading a business, its customers and services (the per-API tables)."""
APPOINTMENT_READ_ROLES = frozenset({BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_MANAGE})
"""Reading appointments (`calendarView`, `appointments`). The tables also name Bookings.ReadWrite.All;
a Microsoft Q&A report has app-only calls to appointments refused with it alone: left out
(strictest). `configure(appointment_read_roles=READ_ROLES)` for the tables' reading."""
LIST_BUSINESSES_ROLES = frozenset({BOOKINGS_READ, BOOKINGS_READ_WRITE, BOOKINGS_MANAGE})
"""Listing businesses: the table does not name BookingsAppointment.ReadWrite.All for apps."""
WRITE_ROLES = frozenset({BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_MANAGE})
"""Changing an appointment. The table also lists Bookings.Read.All, a read-only permission by its
own description, and Bookings.ReadWrite.All, refused for appointments in the Q&A report above:
both left out (strictest)."""
CUSTOMER_WRITE_ROLES = frozenset({BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ_WRITE, BOOKINGS_MANAGE})
"""Creating (POST) or changing (PATCH) a customer: least privileged BookingsAppointment.ReadWrite.All.
The update table also lists Bookings.Read.All: left out, as for appointments (strictest)."""
SERVICE_WRITE_ROLES = frozenset({BOOKINGS_READ_WRITE, BOOKINGS_MANAGE})
"""Creating or changing a service: Bookings.ReadWrite.All (least privileged) or Bookings.Manage.All;
BookingsAppointment.ReadWrite.All is not enough."""


@dataclass
class GraphOptions:
    calendar_view: str = "starting"
    """Which appointments "occur in the specified date range": ``starting`` (start in
    [start, end)) or ``overlapping`` (any overlap with the window)."""
    calendar_view_cap: int | None = None
    """Silently return at most this many appointments from a calendar view (None: no cap)."""
    calendar_view_omit: float = 0.0
    """A fault, not a reading of the docs: this fraction of the appointments a calendar view
    would return are left out of that one answer, without a word (the app must never take
    "not in this read" for "gone")."""
    response_time_zone: str | None = None
    """Return start/end in this zone (Windows or IANA name, used as the ``timeZone`` label);
    None: UTC, as documented."""
    read_roles: frozenset[str] = READ_ROLES
    appointment_read_roles: frozenset[str] = APPOINTMENT_READ_ROLES
    """Reading the calendar view and appointments."""
    list_roles: frozenset[str] = LIST_BUSINESSES_ROLES
    write_roles: frozenset[str] = WRITE_ROLES
    """Changing an appointment."""
    customer_write_roles: frozenset[str] = CUSTOMER_WRITE_ROLES
    service_write_roles: frozenset[str] = SERVICE_WRITE_ROLES
    field_limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_FIELD_LIMITS))
    """The longest string a customer or service write may carry, by ``"<type>.<property>"`` (UTF-16
    code units; `sandbox.graph.limits`); keys left out keep their defaults."""
    customer_update_status: int = 200
    """What a successful ``PATCH …/customers/{id}`` answers: 200 with the updated customer, as
    documented, or 204 without a body (what Graph answers for the other Bookings updates)."""
    customer_create_needs_odata_type: bool = True
    """``POST …/customers`` without ``"@odata.type": "#microsoft.graph.bookingCustomer"`` is refused
    (the collection's declared type, bookingCustomerBase, is abstract); False accepts it."""
    customer_address_type: str = "dropped"
    """What becomes of a customer address's ``type`` (and ``postOfficeBox``), which v1.0 "isn't
    supported": ``dropped`` (not stored, as the v1.0 schema has neither), ``as-sent`` (kept, as the
    docs' example answer shows them) or ``other`` (``type`` stored as ``other``, as the docs' note
    says)."""

    app_only_business_rules: str = "strict"
    """Whether an app-only PATCH of an appointment must keep the business's rules (`rules`):
    ``strict`` (not documented either way for a notes-only change: every one is checked, so a past
    appointment cannot be changed by an app) or ``off``."""
    refusal_style: str = "precise"
    """How a write Graph refuses for its content (schema, lengths, business rules) is answered:
    ``precise`` (400 with a code and a message), or, as reported from Bookings, ``unknown-400`` /
    ``unknown-500`` (``UnknownError`` with an empty message). Nothing is executed either way."""
    calendar_view_params: str = "start/end"
    """The query parameters ``calendarView`` takes: ``start``/``end``, as documented, or (a
    community report) ``startDateTime``/``endDateTime``; the other pair is a 400."""
    paging: str = "keyset"
    """How next links page a collection: ``keyset`` (an opaque ``$skiptoken`` remembering the last
    item: each item seen once) or ``offset`` (``$skip=n``: an item removed before the cursor during a
    walk makes the walk skip one, an item added before it repeats one)."""
    empty_pages: float = 0.0
    """This fraction of the pages that have a next link are answered with no items (and a next link
    to the same place): "A page of results might contain zero or more results"."""
    max_write_bytes: int | None = MAX_WRITE_BYTES
    """A POST or PATCH body (a ``$batch`` included) longer than this is answered 413 (None: no limit)."""

    def check(self) -> None:
        if self.calendar_view not in CALENDAR_VIEW_MODES:
            raise ValueError(f"calendar_view must be one of {CALENDAR_VIEW_MODES}, not {self.calendar_view!r}")
        if self.calendar_view_cap is not None and (isinstance(self.calendar_view_cap, bool)
                                                   or not isinstance(self.calendar_view_cap, int)
                                                   or self.calendar_view_cap < 0):
            raise ValueError("calendar_view_cap must be None or a non-negative int")
        if not 0.0 <= self.calendar_view_omit <= 1.0:
            raise ValueError("calendar_view_omit must be a fraction between 0 and 1")
        if self.response_time_zone is not None:
            zone_of(self.response_time_zone)
        check_limits(self.field_limits)
        if self.customer_update_status not in CUSTOMER_UPDATE_STATUSES:
            raise ValueError(f"customer_update_status must be one of {CUSTOMER_UPDATE_STATUSES}")
        if self.customer_address_type not in ADDRESS_TYPE_MODES:
            raise ValueError(f"customer_address_type must be one of {ADDRESS_TYPE_MODES}")
        for name, value, allowed in (("app_only_business_rules", self.app_only_business_rules, RULE_MODES),
                                     ("refusal_style", self.refusal_style, REFUSAL_STYLES),
                                     ("calendar_view_params", self.calendar_view_params, CALENDAR_VIEW_PARAMS),
                                     ("paging", self.paging, PAGING_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        if not 0.0 <= self.empty_pages < 1.0:
            raise ValueError("empty_pages must be a fraction of at least 0 and below 1")
        if self.max_write_bytes is not None and (isinstance(self.max_write_bytes, bool)
                                                 or not isinstance(self.max_write_bytes, int) or self.max_write_bytes < 1):
            raise ValueError("max_write_bytes must be None or a positive int")
        for name in ("read_roles", "appointment_read_roles", "list_roles", "write_roles", "customer_write_roles",
                     "service_write_roles"):
            if not isinstance(getattr(self, name), frozenset):
                setattr(self, name, frozenset(getattr(self, name)))
