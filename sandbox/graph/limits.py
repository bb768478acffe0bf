"""The longest values the simulated Bookings accepts in a customer or service it is sent.

Microsoft documents no length limit for any Bookings property (see `sandbox/FIDELITY.md`,
"Microsoft Graph" → "Writing customers and services"), except what follows from SMTP for an
e-mail address. The other values are the simulator's choice: strict but plausible (the field
sizes of common directory forms), so that a client which does not cut what it sends fails here
rather than in production. Each is a knob: ``GraphOptions.field_limits`` (``configure(field_limits=
{**DEFAULT_FIELD_LIMITS, "bookingCustomer.displayName": 50})``); a key it leaves out keeps its
default.

Lengths are counted in UTF-16 code units, as .NET and Exchange count them: a character outside
the Basic Multilingual Plane (most emoji) counts 2.

The app must not import this module: it copies the documented values (FIDELITY.md) instead.
"""

from __future__ import annotations

from sandbox.text import utf16_length  # noqa: F401 - the length unit of these limits, used by schema.py

CUSTOMER_DISPLAY_NAME = 100
EMAIL_ADDRESS = 254
"""RFC 5321: a path is at most 256 octets including the angle brackets."""
EMAIL_LOCAL_PART = 64
"""RFC 5321: "The maximum total length of a user name or other local-part is 64 octets." Not a
knob: it is the protocol's."""
PHONE_NUMBER = 30
ADDRESS_STREET = 100
ADDRESS_CITY = 50
ADDRESS_STATE = 50
ADDRESS_POSTAL_CODE = 20
ADDRESS_COUNTRY_OR_REGION = 50
ADDRESS_POST_OFFICE_BOX = 50
SERVICE_DISPLAY_NAME = 100
SERVICE_DESCRIPTION = 1000
SERVICE_NOTES = 1000
SERVICE_ADDITIONAL_INFORMATION = 1000
LANGUAGE_TAG = 35
"""BCP 47 (RFC 5646 §4.4.1): implementations should accept tags of at least 35 characters."""
REMINDER_MESSAGE = 1000
APPOINTMENT_NOTES = 1000
"""An appointment's ``serviceNotes``, ``customerNotes`` and ``additionalInformation`` (what a PATCH
may change): as a service's notes."""
OTHER_STRING = 255
"""Any other string property of a customer or service (and of the types inside them)."""

DEFAULT_FIELD_LIMITS: dict[str, int] = {
    "bookingCustomer.displayName": CUSTOMER_DISPLAY_NAME,
    "bookingCustomer.emailAddress": EMAIL_ADDRESS,
    "phone.number": PHONE_NUMBER,
    "physicalAddress.street": ADDRESS_STREET,
    "physicalAddress.city": ADDRESS_CITY,
    "physicalAddress.state": ADDRESS_STATE,
    "physicalAddress.postalCode": ADDRESS_POSTAL_CODE,
    "physicalAddress.countryOrRegion": ADDRESS_COUNTRY_OR_REGION,
    "physicalAddress.postOfficeBox": ADDRESS_POST_OFFICE_BOX,
    "bookingService.displayName": SERVICE_DISPLAY_NAME,
    "bookingService.description": SERVICE_DESCRIPTION,
    "bookingService.notes": SERVICE_NOTES,
    "bookingService.additionalInformation": SERVICE_ADDITIONAL_INFORMATION,
    "bookingService.languageTag": LANGUAGE_TAG,
    "bookingReminder.message": REMINDER_MESSAGE,
    "bookingAppointment.serviceNotes": APPOINTMENT_NOTES,
    "bookingAppointment.customerNotes": APPOINTMENT_NOTES,
    "bookingAppointment.additionalInformation": APPOINTMENT_NOTES,
    "*": OTHER_STRING,
}
"""Keyed ``"<type>.<property>"`` (the Graph type that declares the property); ``"*"`` is every
string property not listed."""


def limit_of(limits: dict[str, int], type_name: str, name: str) -> int:
    """The limit of `type_name.name` under `limits` (a partial override of the defaults)."""
    key = f"{type_name}.{name}"
    for table in (limits, DEFAULT_FIELD_LIMITS):
        if key in table:
            return table[key]
    return limits.get("*", OTHER_STRING)


def check_limits(limits: object) -> None:
    """ValueError unless `limits` is a dict of known keys to positive ints."""
    if not isinstance(limits, dict):
        raise ValueError("field_limits must be a dict of '<type>.<property>' to a positive int")
    unknown = set(limits) - set(DEFAULT_FIELD_LIMITS)
    if unknown:
        raise ValueError(f"unknown field limit(s) {sorted(unknown)}; known: {sorted(DEFAULT_FIELD_LIMITS)}")
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"field limit {key!r} must be a positive int, not {value!r}")
