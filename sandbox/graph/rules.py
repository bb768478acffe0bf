"""Bookings' business rules, which apps writing appointments with application permissions must
keep (`sandbox/FIDELITY.md`, "Writing appointments"):

- GRAPHDOCS ``api-reference/v1.0/api/bookingappointment-update.md``: "If you create a custom app
  using application permissions, you must follow the Business rules validation.";
- GRAPHDOCS ``concepts/bookingsbusiness-business-rules.md``: "An appointment can't be set outside
  the business hours." and "Minimum lead time indicates the minimum time before an appointment
  can be made or canceled."

Whether a PATCH that changes only an appointment's notes is validated against them is not
documented. On the strictest reading (`GraphOptions.app_only_business_rules` ``strict``, the
default) every app-only PATCH of an appointment is: one that starts (after the change) earlier than
now plus the business's minimum lead time, or outside its business hours, is refused, so a past
appointment can never be changed by an app. ``off`` is the lenient reading (only an admin's
delegated calls may override the rules, and notes are not what they are about).

A business's hours are read in its `Business.time_zone` (the simulator's choice: Graph's v1.0
bookingBusiness has no time zone property; UTC by default). A business without hours has none to
keep (the simulator's default for a new business)."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from sandbox.graph.schema import duration_seconds
from sandbox.graph.store import Business
from sandbox.graph.times import instant_of, zone_of

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _clock(text: str) -> time:
    """An ``Edm.TimeOfDay`` such as ``08:00:00.0000000``."""
    hours, minutes, *rest = text.split(":")
    seconds = float(rest[0]) if rest else 0.0
    return time(int(hours), int(minutes), int(seconds))


def _within_hours(business: Business, start: datetime, end: datetime) -> bool:
    """Whether [start, end) lies inside one time slot of the business's hours on its day."""
    zone = zone_of(business.time_zone)
    local_start, local_end = start.astimezone(zone), end.astimezone(zone)
    if local_end.date() != local_start.date() and local_end.time() != time(0):
        return False
    day = DAYS[local_start.weekday()]
    for hours in business.business_hours:
        if hours.get("day") != day:
            continue
        for slot in hours.get("timeSlots") or []:
            opens, closes = _clock(slot["startTime"]), _clock(slot["endTime"])
            ends_at = local_end.time() if local_end.date() == local_start.date() else time.max
            if opens <= local_start.time() and ends_at <= closes:
                return True
    return False


def violation(business: Business, appointment: dict, now: datetime) -> str | None:
    """Why an app may not write `appointment` (as it would be after the change), or None."""
    try:
        start, end = instant_of(appointment.get("startDateTime")), instant_of(appointment.get("endDateTime"))
    except ValueError:
        return None  # a malformed appointment (planted by a test) is refused by the field checks, if at all
    lead = duration_seconds(str(business.scheduling_policy.get("minimumLeadTime") or "PT0S")) or 0.0
    if start < now + timedelta(seconds=lead):
        return ("The appointment starts before the business's minimum lead time allows an appointment to be made or "
                "changed.")
    if business.business_hours and not _within_hours(business, start, end):
        return "The appointment is outside the business hours."
    return None
