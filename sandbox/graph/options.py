"""`GraphOptions`: the behaviours Graph's documentation leaves open, and the permissions each
operation needs. Defaults are the strictest reading (see `sandbox/FIDELITY.md`)."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.graph.times import zone_of
from sandbox.tokens import BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_MANAGE, BOOKINGS_READ, BOOKINGS_READ_WRITE

CALENDAR_VIEW_MODES = ("starting", "overlapping")

READ_ROLES = frozenset({BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ_WRITE, BOOKINGS_MANAGE})
"""Reading a business, its calendar, appointments, customers, services (the per-API tables)."""
LIST_BUSINESSES_ROLES = frozenset({BOOKINGS_READ, BOOKINGS_READ_WRITE, BOOKINGS_MANAGE})
"""Listing businesses: the table does not name BookingsAppointment.ReadWrite.All for apps."""
WRITE_ROLES = frozenset({BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ_WRITE, BOOKINGS_MANAGE})
"""Changing an appointment. The table also lists Bookings.Read.All, a read-only permission by its
own description: left out (strictest)."""


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
    list_roles: frozenset[str] = LIST_BUSINESSES_ROLES
    write_roles: frozenset[str] = WRITE_ROLES

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
