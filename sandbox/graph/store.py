"""The simulated Bookings data: businesses, each with its services, customers and appointments,
and the calendar index a calendar view is served from."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandbox.graph.times import instant_of

_DEFAULT_POLICY = {"timeSlotInterval": "PT30M", "minimumLeadTime": "PT0S", "maximumAdvance": "P365D",
                   "sendConfirmationsToOwner": True, "allowStaffSelection": True}
"""A new business's scheduling policy (`sandbox.graph.rules`; Bookings' own defaults are not documented)."""


class Collection:
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
class Business:
    id: str
    display_name: str
    inaccessible: bool = False
    business_hours: list[dict] = field(default_factory=list)
    """``bookingWorkHours`` (``day``, ``timeSlots`` of ``startTime``/``endTime``); empty: none to keep."""
    scheduling_policy: dict = field(default_factory=lambda: dict(_DEFAULT_POLICY))
    time_zone: str = "UTC"
    """The zone the business hours are in (the simulator's: v1.0 bookingBusiness names none)."""
    services: Collection = field(default_factory=Collection)
    customers: Collection = field(default_factory=Collection)
    appointments: Collection = field(default_factory=Collection)
    calendar: list[tuple[float, str, float]] | None = None
    """Appointments as (start, id, end) sorted by start; None when it must be rebuilt."""

    def calendar_index(self) -> list[tuple[float, str, float]]:
        """Appointments whose times do not parse (stored on purpose by a test) sort first and
        fall in every window, so a calendar pull always serves them for the app to reject."""
        if self.calendar is None:
            rows = []
            for appointment_id, appointment in self.appointments.items.items():
                try:
                    start = instant_of(appointment.get("startDateTime")).timestamp()
                    end = instant_of(appointment.get("endDateTime")).timestamp()
                except ValueError:
                    start, end = float("-inf"), float("inf")
                rows.append((start, appointment_id, end))
            rows.sort()
            self.calendar = rows
        return self.calendar

    def calendar_view(self, start: float, end: float, overlapping: bool, cap: int | None) -> list[tuple[tuple, dict]]:
        """The appointments of [start, end) by start: those starting in it, or (`overlapping`)
        every one that overlaps it; at most `cap` of them."""
        entries = []
        for row_start, appointment_id, row_end in self.calendar_index():
            if row_start >= end or (cap is not None and len(entries) >= cap):
                break
            unreadable = row_start == float("-inf")
            if unreadable or (row_end > start if overlapping else row_start >= start):
                entries.append(((row_start, appointment_id), self.appointments.items[appointment_id]))
        return entries
