"""A `bookingAppointment`: which properties a PATCH may set (and with which types), how a change
is applied, and how an appointment looks in an answer (lists blank the per-item-only properties;
start and end in the configured response time zone)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

from sandbox.data import graph_timestamp, iso_duration
from sandbox.graph.limits import limit_of
from sandbox.graph.store import Business
from sandbox.text import utf16_length
from sandbox.graph.times import in_zone, instant_of, parse_instant
from sandbox.graph.wire import GraphError

ALL_PRICE_TYPES = ("undefined", "fixedPrice", "startingAt", "hourly", "free", "priceVaries", "callUs",
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
_TIMES = ("startDateTime", "endDateTime")


def check_appointment_fields(fields: dict, limits: dict | None = None) -> None:
    """What Graph refuses in a PATCH: unknown or read-only properties, values of the wrong type, and
    (with `limits`, `GraphOptions.field_limits`) strings longer than their limit in UTF-16 units."""
    for name, value in fields.items():
        if limits is not None and isinstance(value, str) and name in APPOINTMENT_FIELDS and name != "@odata.type":
            limit = limit_of(limits, "bookingAppointment", name)
            if utf16_length(value) > limit:
                raise GraphError(400, "InvalidModel", f"appointment: The value of '{name}' is {utf16_length(value)} "
                                                      f"characters long; at most {limit} are allowed.")
        kinds = APPOINTMENT_FIELDS.get(name)
        if kinds is None:
            raise GraphError(400, "BadRequest",
                             f"The property '{name}' does not exist on type 'microsoft.graph.bookingAppointment'. "
                             "Make sure to only use property names that are defined by the type.")
        if name in READ_ONLY_FIELDS:
            raise GraphError(400, "BadRequest", f"The property '{name}' is read-only and cannot be set.")
        if value is not None and (not isinstance(value, kinds) or (kinds is _NUMBER and isinstance(value, bool))):
            raise GraphError(400, "BadRequest", f"Cannot convert the value of property '{name}'.")
        if name == "priceType" and value is not None and value not in ALL_PRICE_TYPES:
            raise GraphError(400, "BadRequest", f"Requested value '{value}' was not found for bookingPriceType.")
        if name in _TIMES and value is not None:
            try:
                instant_of(value)
            except ValueError as error:
                raise GraphError(400, "BadRequest", f"Invalid value for '{name}': {error}.") from error


def apply_changes(business: Business, appointment: dict, fields: dict) -> None:
    """Merge `fields`; keep `duration` consistent and `lastUpdatedDateTime` strictly rising."""
    appointment.update(copy.deepcopy(fields))
    if any(name in fields for name in _TIMES):
        business.calendar = None
        try:
            span = instant_of(appointment.get("endDateTime")) - instant_of(appointment.get("startDateTime"))
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


def as_read(appointment: dict, time_zone: str | None) -> dict:
    """An appointment read by id: every property, start and end in `time_zone` (None: as stored)."""
    if time_zone is None:
        return appointment
    return {**appointment, **{name: in_zone(appointment[name], time_zone) for name in _TIMES if name in appointment}}


def as_listed(appointment: dict, time_zone: str | None) -> dict:
    """An appointment in a collection: the per-item-only properties are blank."""
    return {**as_read(appointment, time_zone), "serviceNotes": "", "customerNotes": None, "reminders": []}
