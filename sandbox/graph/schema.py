"""What a body sent to create or change a Bookings customer or service may hold, as the Graph
v1.0 schema declares it (`microsoftgraph/msgraph-metadata`, ``schemas/v1.0-Prod.csdl``), and how
it is read: `read_entity` checks a body property by property and returns it as it is stored.

The answers, in Graph's error shape (`sandbox/FIDELITY.md`, "Writing customers and services"):

- an unknown property, a value of the wrong JSON type, ``null`` where the schema says
  ``Nullable="false"``, a malformed ``Edm.Duration``/``Edm.Date``/``Edm.TimeOfDay`` → 400
  ``RequestBodyRead`` (OData deserialization, the code Exchange-backed workloads answer);
- an enum value the schema does not list → 400 ``InvalidModel`` "customer: Requested value 'x' was
  not found." (observed from Bookings);
- a read-only property (``id``, ``createdDateTime``, ``lastUpdatedDateTime``, ``webUrl``) → 400
  ``BadRequest``;
- the rules the simulator adds where the docs are silent (required properties, an e-mail that is
  not an SMTP address, a value longer than its `limits`, a negative price or duration) → 400
  ``InvalidModel``.

Instance annotations are taken as the docs' own examples send them: ``@odata.type`` naming the
expected type (or a type derived from it), ``<property>@odata.type`` for a property of the type.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from sandbox.graph.limits import EMAIL_LOCAL_PART, limit_of, utf16_length
from sandbox.graph.wire import GraphError

NAMESPACE = "microsoft.graph"

STRING, BOOLEAN, INT32, DOUBLE = "Edm.String", "Edm.Boolean", "Edm.Int32", "Edm.Double"
DURATION, DATE, TIME_OF_DAY, DATE_TIME_OFFSET = "Edm.Duration", "Edm.Date", "Edm.TimeOfDay", "Edm.DateTimeOffset"


@dataclass(frozen=True)
class Prop:
    type: str
    """An ``Edm.*`` primitive, or the name of an enum or complex type below."""
    nullable: bool = True
    collection: bool = False
    read_only: bool = False
    v1: bool = True
    """False: accepted as the docs' examples send it but not in the v1.0 schema (not stored)."""


ENUMS: dict[str, tuple[str, ...]] = {
    "phoneType": ("home", "business", "mobile", "other", "assistant", "homeFax", "businessFax", "otherFax",
                  "pager", "radio"),
    "physicalAddressType": ("unknown", "home", "business", "other"),
    "bookingPriceType": ("undefined", "fixedPrice", "startingAt", "hourly", "free", "priceVaries", "callUs",
                         "notSet", "unknownFutureValue"),
    "bookingReminderRecipients": ("allAttendees", "staff", "customer", "unknownFutureValue"),
    "locationType": ("default", "conferenceRoom", "homeAddress", "businessAddress", "geoCoordinates",
                     "streetAddress", "hotel", "restaurant", "localBusiness", "postalAddress"),
    "locationUniqueIdType": ("unknown", "locationStore", "directory", "private", "bing"),
    "bookingsServiceAvailabilityType": ("bookWhenStaffAreFree", "notBookable", "customWeeklyHours",
                                        "unknownFutureValue"),
    "dayOfWeek": ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"),
}

TYPES: dict[str, dict[str, Prop]] = {
    "bookingCustomer": {
        "id": Prop(STRING, read_only=True),
        "addresses": Prop("physicalAddress", collection=True),
        "createdDateTime": Prop(DATE_TIME_OFFSET, read_only=True),
        "displayName": Prop(STRING, nullable=False),
        "emailAddress": Prop(STRING),
        "lastUpdatedDateTime": Prop(DATE_TIME_OFFSET, read_only=True),
        "phones": Prop("phone", collection=True),
    },
    "bookingService": {
        "id": Prop(STRING, read_only=True),
        "additionalInformation": Prop(STRING),
        "createdDateTime": Prop(DATE_TIME_OFFSET, read_only=True),
        "customQuestions": Prop("bookingQuestionAssignment", collection=True),
        "defaultDuration": Prop(DURATION, nullable=False),
        "defaultLocation": Prop("location"),
        "defaultPrice": Prop(DOUBLE, nullable=False),
        "defaultPriceType": Prop("bookingPriceType", nullable=False),
        "defaultReminders": Prop("bookingReminder", collection=True),
        "description": Prop(STRING),
        "displayName": Prop(STRING, nullable=False),
        "isAnonymousJoinEnabled": Prop(BOOLEAN, nullable=False),
        "isCustomerAllowedToManageBooking": Prop(BOOLEAN),
        "isHiddenFromCustomers": Prop(BOOLEAN, nullable=False),
        "isLocationOnline": Prop(BOOLEAN, nullable=False),
        "languageTag": Prop(STRING, nullable=False),
        "lastUpdatedDateTime": Prop(DATE_TIME_OFFSET, read_only=True),
        "maximumAttendeesCount": Prop(INT32, nullable=False),
        "notes": Prop(STRING),
        "postBuffer": Prop(DURATION, nullable=False),
        "preBuffer": Prop(DURATION, nullable=False),
        "schedulingPolicy": Prop("bookingSchedulingPolicy"),
        "smsNotificationsEnabled": Prop(BOOLEAN, nullable=False),
        "staffMemberIds": Prop(STRING, collection=True),
        "webUrl": Prop(STRING, read_only=True),
    },
    "physicalAddress": {
        "city": Prop(STRING), "countryOrRegion": Prop(STRING), "postalCode": Prop(STRING),
        "state": Prop(STRING), "street": Prop(STRING),
        # Sent by the docs' own examples (and kept by beta); not in the v1.0 schema.
        "postOfficeBox": Prop(STRING, v1=False), "type": Prop("physicalAddressType", v1=False),
    },
    "phone": {"language": Prop(STRING), "number": Prop(STRING), "region": Prop(STRING), "type": Prop("phoneType")},
    "location": {
        "address": Prop("physicalAddress"), "coordinates": Prop("outlookGeoCoordinates"),
        "displayName": Prop(STRING), "locationEmailAddress": Prop(STRING), "locationType": Prop("locationType"),
        "locationUri": Prop(STRING), "uniqueId": Prop(STRING), "uniqueIdType": Prop("locationUniqueIdType"),
    },
    "outlookGeoCoordinates": {name: Prop(DOUBLE) for name in
                              ("accuracy", "altitude", "altitudeAccuracy", "latitude", "longitude")},
    "bookingQuestionAssignment": {"isRequired": Prop(BOOLEAN, nullable=False),
                                  "questionId": Prop(STRING, nullable=False)},
    "bookingReminder": {"message": Prop(STRING, nullable=False), "offset": Prop(DURATION, nullable=False),
                        "recipients": Prop("bookingReminderRecipients", nullable=False)},
    "bookingSchedulingPolicy": {
        "allowStaffSelection": Prop(BOOLEAN, nullable=False),
        "customAvailabilities": Prop("bookingsAvailabilityWindow", collection=True),
        "generalAvailability": Prop("bookingsAvailability"),
        "isMeetingInviteToCustomersEnabled": Prop(BOOLEAN),
        "maximumAdvance": Prop(DURATION, nullable=False), "minimumLeadTime": Prop(DURATION, nullable=False),
        "sendConfirmationsToOwner": Prop(BOOLEAN, nullable=False), "timeSlotInterval": Prop(DURATION, nullable=False),
    },
    "bookingsAvailability": {"availabilityType": Prop("bookingsServiceAvailabilityType", nullable=False),
                             "businessHours": Prop("bookingWorkHours", collection=True)},
    "bookingsAvailabilityWindow": {"availabilityType": Prop("bookingsServiceAvailabilityType", nullable=False),
                                   "businessHours": Prop("bookingWorkHours", collection=True),
                                   "endDate": Prop(DATE), "startDate": Prop(DATE)},
    "bookingWorkHours": {"day": Prop("dayOfWeek", nullable=False),
                         "timeSlots": Prop("bookingWorkTimeSlot", collection=True)},
    "bookingWorkTimeSlot": {"endTime": Prop(TIME_OF_DAY, nullable=False),
                            "startTime": Prop(TIME_OF_DAY, nullable=False)},
}
DERIVED: dict[str, tuple[str, ...]] = {"bookingsAvailability": ("bookingsAvailabilityWindow",)}

REQUIRED_ON_CREATE: dict[str, tuple[str, ...]] = {
    "bookingCustomer": ("displayName",),
    "bookingService": ("displayName", "defaultDuration"),
}
"""Not documented: the schema's non-nullable properties a create cannot do without (strictest
plausible reading; the others get defaults)."""
NOT_BLANK = {("bookingCustomer", "displayName"), ("bookingService", "displayName")}
NOT_NEGATIVE = {("bookingService", "defaultPrice"), ("bookingService", "defaultDuration"),
                ("bookingService", "preBuffer"), ("bookingService", "postBuffer")}
POSITIVE = {("bookingService", "defaultDuration"), ("bookingService", "maximumAttendeesCount")}

_DURATION = re.compile(r"(-)?P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)(?:\.(\d{1,12}))?S)?)?")
_DATE = re.compile(r"-?\d{4,}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])")
_TIME_OF_DAY = re.compile(r"([01]\d|2[0-3]):[0-5]\d(:([0-5]\d|60)(\.\d{1,12})?)?")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATEXT}(\.{_ATEXT})*")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def duration_seconds(text: str) -> float | None:
    """An ``Edm.Duration`` (OData ABNF ``durationValue``: days and time only, at least one
    component, ``T`` only before a time component) in seconds; None if malformed."""
    match = _DURATION.fullmatch(text)
    if not match or text.endswith(("P", "T")):
        return None
    sign, days, hours, minutes, seconds, fraction = match.groups()
    total = (int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
             + (int(fraction) / 10 ** len(fraction) if fraction else 0))
    return -total if sign else total


def smtp_address_problem(text: str) -> str | None:
    """Why `text` is not an SMTP address (RFC 5321 ``Mailbox`` with a dot-atom local part and a
    domain of DNS labels, at least two of them), or None."""
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        return "it has no '@' between a local part and a domain"
    if utf16_length(local) > EMAIL_LOCAL_PART:
        return f"its local part is longer than {EMAIL_LOCAL_PART} characters"
    if not _LOCAL_PART.fullmatch(local):
        return "its local part is not a dot-atom of letters, digits and !#$%&'*+/=?^_`{|}~-"
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return "its domain is not a host name such as example.com"
    return None


class Reader:
    """Reads one body for `label` ("customer", "service"), with the `limits` of the run."""

    def __init__(self, label: str, limits: dict[str, int], address_type: str = "dropped"):
        self.label = label
        self.limits = limits
        self.address_type = address_type

    def invalid(self, message: str) -> GraphError:
        return GraphError(400, "InvalidModel", f"{self.label}: {message}")

    def entity(self, type_name: str, body: Any, creating: bool) -> dict:
        fields = self.complex(type_name, body, top=True)
        if creating:
            for name in REQUIRED_ON_CREATE.get(type_name, ()):
                if name not in fields:
                    raise self.invalid(f"The property '{name}' is required to create a {type_name}.")
        return fields

    def complex(self, type_name: str, value: Any, top: bool = False) -> dict:
        if not isinstance(value, dict):
            raise GraphError(400, "RequestBodyRead",
                             f"An object was expected for a value of type '{NAMESPACE}.{type_name}'.")
        declared = value.get("@odata.type")
        if declared is not None and not top:
            type_name = self._resolve(declared, type_name)
        props = TYPES[type_name]
        fields: dict[str, Any] = {}
        for name, item in value.items():
            if name == "@odata.type":
                continue
            if "@" in name:
                target, _, term = name.partition("@")
                if term == "odata.type" and target in props and isinstance(item, str):
                    continue
                raise self._unknown(name, type_name)
            prop = props.get(name)
            if prop is None:
                raise self._unknown(name, type_name)
            if prop.read_only:
                raise GraphError(400, "BadRequest",
                                 f"The property '{name}' of '{NAMESPACE}.{type_name}' is read-only and cannot be set.")
            fields[name] = self.value(type_name, name, prop, item)
        if type_name == "physicalAddress":
            fields = self._address(fields)
        return fields

    def value(self, type_name: str, name: str, prop: Prop, item: Any) -> Any:
        if item is None:
            if prop.nullable:
                return None
            expected = f"{prop.type if prop.type.startswith('Edm.') else NAMESPACE + '.' + prop.type}"
            raise GraphError(400, "RequestBodyRead",
                             f"A null value was found for the property named '{name}', which has the expected type "
                             f"'{expected}[Nullable=False]'. The expected type '{expected}[Nullable=False]' does not "
                             "allow null values.")
        if prop.collection:
            if not isinstance(item, list):
                raise self._cannot_convert(name, f"Collection({prop.type})")
            return [self.single(type_name, name, Prop(prop.type, nullable=False), element) for element in item]
        return self.single(type_name, name, prop, item)

    def single(self, type_name: str, name: str, prop: Prop, item: Any) -> Any:
        kind = prop.type
        if item is None:
            return self.value(type_name, name, prop, item)
        if kind in TYPES:
            return self.complex(kind, item)
        if kind in ENUMS:
            if not isinstance(item, str):
                raise self._cannot_convert(name, f"{NAMESPACE}.{kind}")
            if item not in ENUMS[kind]:
                raise self.invalid(f"Requested value '{item}' was not found.")
            return item
        if kind == STRING:
            if not isinstance(item, str):
                raise self._cannot_convert(name, kind)
            return self._string(type_name, name, item)
        if kind == BOOLEAN:
            if not isinstance(item, bool):
                raise self._cannot_convert(name, kind)
            return item
        if kind in (INT32, DOUBLE):
            if isinstance(item, bool) or not isinstance(item, (int, float)) or \
                    (kind == INT32 and (not isinstance(item, int) or not -2**31 <= item < 2**31)) or \
                    (isinstance(item, float) and not math.isfinite(item)):
                raise self._cannot_convert(name, kind)
            if (type_name, name) in NOT_NEGATIVE and item < 0:
                raise self.invalid(f"The value of '{name}' must not be negative.")
            if (type_name, name) in POSITIVE and item <= 0:
                raise self.invalid(f"The value of '{name}' must be greater than zero.")
            return float(item) if kind == DOUBLE else item
        if not isinstance(item, str):
            raise self._cannot_convert(name, kind)
        if kind == DURATION:
            seconds = duration_seconds(item)
            if seconds is None:
                raise GraphError(400, "RequestBodyRead",
                                 f"The value '{item}' of '{name}' is not a valid Edm.Duration: an ISO 8601 duration "
                                 "of days and time such as PT1H30M or P1DT12H.")
            if seconds < 0:
                raise self.invalid(f"The value of '{name}' must not be negative.")
            if (type_name, name) in POSITIVE and seconds == 0:
                raise self.invalid(f"The value of '{name}' must be greater than zero.")
            return item
        pattern = {DATE: _DATE, TIME_OF_DAY: _TIME_OF_DAY}.get(kind)
        if pattern is None or not pattern.fullmatch(item):
            raise self._cannot_convert(name, kind)
        return item

    def _string(self, type_name: str, name: str, item: str) -> str:
        limit = limit_of(self.limits, type_name, name)
        if utf16_length(item) > limit:
            raise self.invalid(f"The value of '{name}' is {utf16_length(item)} characters long; "
                               f"at most {limit} are allowed.")
        if (type_name, name) in NOT_BLANK and not item.strip():
            raise self.invalid(f"The property '{name}' must not be empty.")
        if (type_name, name) == ("bookingCustomer", "emailAddress") and item != "":
            problem = smtp_address_problem(item)
            if problem:
                raise self.invalid(f"The e-mail address '{item}' is not valid: {problem}.")
        return item

    def _address(self, fields: dict) -> dict:
        """v1.0 stores no `type` nor `postOfficeBox` ("The attribute type of physicalAddress isn't
        supported in v1.0"); the knob keeps them as sent or writes `type` as ``other``."""
        if self.address_type == "as-sent":
            return fields
        kept = {k: v for k, v in fields.items() if TYPES["physicalAddress"][k].v1}
        if self.address_type == "other":
            kept["type"] = "other"
        return kept

    def _resolve(self, declared: Any, expected: str) -> str:
        name = declared[1:] if isinstance(declared, str) and declared.startswith("#") else declared
        for candidate in (expected, *DERIVED.get(expected, ())):
            if name == f"{NAMESPACE}.{candidate}":
                return candidate
        raise GraphError(400, "BadRequest", f"A type named '{declared}' could not be resolved as "
                                            f"'{NAMESPACE}.{expected}' or a type derived from it.")

    @staticmethod
    def _unknown(name: str, type_name: str) -> GraphError:
        return GraphError(400, "RequestBodyRead",
                          f"The property '{name}' does not exist on type '{NAMESPACE}.{type_name}'. Make sure to only "
                          "use property names that are defined by the type or mark the type as open type.")

    @staticmethod
    def _cannot_convert(name: str, expected: str) -> GraphError:
        return GraphError(400, "RequestBodyRead",
                          f"Cannot convert the value of property '{name}' to the expected type '{expected}'.")


def check_entity_type(body: dict, type_name: str, required: bool) -> None:
    """The top-level ``@odata.type`` of a body: must name `type_name` when present (with or
    without ``#``); when `required`, a body without it is refused (the collection's declared type
    is abstract)."""
    declared = body.get("@odata.type")
    if declared is None:
        if required:
            raise GraphError(400, "BadRequest",
                             f"The request body needs '@odata.type': '#{NAMESPACE}.{type_name}': the collection's "
                             f"type '{NAMESPACE}.{type_name}Base' is abstract and cannot be created.")
        return
    name = declared[1:] if isinstance(declared, str) and declared.startswith("#") else declared
    if name != f"{NAMESPACE}.{type_name}":
        raise GraphError(400, "BadRequest", f"A type named '{declared}' could not be resolved as "
                                            f"'{NAMESPACE}.{type_name}'.")
