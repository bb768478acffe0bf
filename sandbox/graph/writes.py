"""Creating and changing Bookings customers and services: the stored entity a create makes (a
server-assigned id, ``createdDateTime``/``lastUpdatedDateTime``, defaults for what the body
leaves out), a change merged into it, and the log of executed writes the data API exposes.

Nothing here is unique: two customers may share an e-mail address and two services a name, as
in Bookings, whose docs promise no uniqueness (`sandbox/FIDELITY.md`)."""

from __future__ import annotations

import base64
import copy
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sandbox.data import graph_timestamp
from sandbox.graph.times import parse_instant

CUSTOMER_TYPE = "#microsoft.graph.bookingCustomer"
SERVICE_TYPE = "#microsoft.graph.bookingService"

SERVICE_DEFAULTS: dict = {
    "additionalInformation": None, "customQuestions": [], "defaultLocation": None, "defaultPrice": 0.0,
    "defaultPriceType": "undefined", "defaultReminders": [], "description": None, "isAnonymousJoinEnabled": False,
    "isCustomerAllowedToManageBooking": None, "isHiddenFromCustomers": False, "isLocationOnline": False,
    "languageTag": "", "maximumAttendeesCount": 1, "notes": None, "postBuffer": "PT0S", "preBuffer": "PT0S",
    "schedulingPolicy": None, "smsNotificationsEnabled": False, "staffMemberIds": [],
}
"""What a created service holds for the properties its body left out (not documented)."""


@dataclass(frozen=True)
class Write:
    """One write the simulator executed (committed), whatever the client saw of its answer."""
    method: str
    """``POST`` (create) or ``PATCH`` (change)."""
    kind: str
    """``customers``, ``services`` or ``appointments``."""
    business_id: str
    item_id: str
    at: str
    """When it was executed (Graph timestamp)."""


def customer_id(business_id: str) -> str:
    """An opaque, Exchange-style id (``AAQkA…=``, URL-safe base64) as Bookings now gives its customers,
    not a GUID."""
    mailbox = str(uuid.uuid5(uuid.NAMESPACE_DNS, business_id.lower())).encode()
    raw = b"\x00\x04\x24\x00" + mailbox + b"\x00\x10\x00" + secrets.token_bytes(16)
    return base64.urlsafe_b64encode(raw).decode()


def new_customer(business_id: str, fields: dict) -> dict:
    now = graph_timestamp(datetime.now(timezone.utc))
    customer = {"@odata.type": CUSTOMER_TYPE, "id": customer_id(business_id), "displayName": None,
                "emailAddress": None, "addresses": [], "phones": []}
    customer.update(copy.deepcopy(fields))
    customer["createdDateTime"] = customer["lastUpdatedDateTime"] = now
    return customer


def new_service(business_id: str, fields: dict) -> dict:
    now = graph_timestamp(datetime.now(timezone.utc))
    service = {"@odata.type": SERVICE_TYPE, "id": str(uuid.uuid4()), "displayName": None, "defaultDuration": None,
               **copy.deepcopy(SERVICE_DEFAULTS)}
    service.update(copy.deepcopy(fields))
    service["webUrl"] = (f"https://outlook.office365.com/owa/calendar/{business_id}/bookings/s/"
                         f"{secrets.token_urlsafe(16)[:22]}")
    service["createdDateTime"] = service["lastUpdatedDateTime"] = now
    return service


def apply_update(item: dict, fields: dict) -> None:
    """PATCH semantics: the properties sent replace theirs (a collection or complex value as a
    whole); `lastUpdatedDateTime` moves on, strictly."""
    item.update(copy.deepcopy(fields))
    now = datetime.now(timezone.utc)
    try:
        now = max(now, parse_instant(item.get("lastUpdatedDateTime") or "") + timedelta(microseconds=1))
    except ValueError:
        pass
    item["lastUpdatedDateTime"] = graph_timestamp(now)


def write_record(method: str, kind: str, business_id: str, item_id: str) -> Write:
    return Write(method, kind, business_id, item_id, graph_timestamp(datetime.now(timezone.utc)))
