"""A booking as this service keeps it: one row per Bookings appointment in the `bookings` table
(partition = business), holding what the sync read from Graph plus the invoicing state that only
this service knows (Graph v1.0 has no invoice fields).

Sync-owned and invoice-owned properties are disjoint, so the sync can MERGE what it read
without touching a claim or an invoice link, and vice versa."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

from pydantic import BaseModel, Field

from shared.upstream.graph import Appointment
from shared.storage.store import encode_key, fit_string, to_json


class InvoiceState(StrEnum):
    NONE = "none"
    CLAIMED = "claimed"
    """A running invoicing job holds it; nobody else may invoice it."""
    INVOICED = "invoiced"
    """Every customer of it is on a BC draft invoice."""
    POSTED = "posted"
    """Its invoice was posted in BC."""


HOURLY = "hourly"
FREE = "free"


def normalise_email(value: str | None) -> str | None:
    """Trimmed and lower-cased; blank or without `@` counts as no e-mail."""
    if not value:
        return None
    value = value.strip().lower()
    return value if "@" in value and len(value) <= 254 else None


class BookedCustomer(BaseModel):
    email: str | None = None
    name: str | None = None
    phone: str | None = None


class Booking(BaseModel):
    id: str
    business_id: str
    service_id: str | None = None
    service_name: str | None = None
    start: datetime
    end: datetime
    price_type: str | None = None
    price: float | None = None
    customers: list[BookedCustomer] = Field(default_factory=list)
    last_updated: str | None = None
    cancelled: bool = False

    claims: dict[str, str] = Field(default_factory=dict)
    """Per customer e-mail: the invoicing job that holds it."""
    invoices: dict[str, dict] = Field(default_factory=dict)
    """Per customer e-mail: {invoiceId, invoiceNumber, jobId, posted}."""
    etag: str | None = None

    def emails(self) -> list[str]:
        """Distinct customer e-mails (a customer listed twice is billed once)."""
        return list(dict.fromkeys(c.email for c in self.customers if c.email))

    @property
    def missing_email(self) -> bool:
        return not self.customers or any(not c.email for c in self.customers)

    def open_emails(self) -> list[str]:
        """Customers neither invoiced nor claimed by a running job."""
        return [e for e in self.emails() if e not in self.invoices and e not in self.claims]

    def invoice_state(self) -> InvoiceState:
        """Derived from the per-customer claims and invoices (a group booking bills each one)."""
        emails = self.emails()
        if self.missing_email or self.open_emails():
            return InvoiceState.NONE
        if any(e in self.claims and e not in self.invoices for e in emails):
            return InvoiceState.CLAIMED
        if all(self.invoices[e].get("posted") for e in emails):
            return InvoiceState.POSTED
        return InvoiceState.INVOICED

    def invoice_fields(self) -> dict:
        """The invoicing-owned properties, written only by invoicing and reconciliation."""
        return {"PartitionKey": self.partition_key, "RowKey": self.row_key,
                "Claims": to_json(self.claims), "Invoices": fit_string(to_json(self.invoices)),
                "InvoiceState": self.invoice_state().value, "HasInvoices": bool(self.invoices),
                "HasClaims": bool(self.claims)}

    @property
    def minutes(self) -> int:
        return max(int((self.end - self.start).total_seconds() // 60), 0)

    def quantity(self) -> Decimal:
        """Hourly: hours between start and end, to the minute. Anything else: one unit."""
        if self.price_type == HOURLY:
            return (Decimal(self.minutes) / Decimal(60)).quantize(Decimal("0.00001"), ROUND_HALF_UP)
        return Decimal(1)

    def unit_price(self) -> Decimal:
        return Decimal(str(self.price or 0)).quantize(Decimal("0.01"), ROUND_HALF_UP)

    def amount_per_customer(self) -> Decimal:
        return (self.quantity() * self.unit_price()).quantize(Decimal("0.01"), ROUND_HALF_UP)

    @property
    def partition_key(self) -> str:
        return encode_key(self.business_id)

    @property
    def row_key(self) -> str:
        return encode_key(self.id)

    def source_fields(self) -> dict:
        """What the sync reads from Graph (and nothing of the invoicing state)."""
        return {
            "AppointmentId": self.id,
            "BusinessId": self.business_id,
            "ServiceId": self.service_id or "",
            "ServiceName": fit_string(self.service_name or "", 1000),
            "StartUtc": self.start,
            "EndUtc": self.end,
            "PriceType": self.price_type or "",
            "Price": float(self.price or 0.0),
            "Customers": fit_string(to_json([c.model_dump() for c in self.customers])),
            "LastUpdated": self.last_updated or "",
            "Cancelled": self.cancelled,
        }

    def source_hash(self) -> str:
        return _digest(self.source_fields())

    def sync_entity(self) -> dict:
        fields = self.source_fields()
        return {"PartitionKey": self.partition_key, "RowKey": self.row_key, **fields, "SourceHash": _digest(fields)}

    @classmethod
    def from_appointment(cls, business_id: str, appointment: Appointment) -> Booking:
        customers = [BookedCustomer(email=normalise_email(c.email_address), name=(c.name or "").strip() or None,
                                    phone=(c.phone or "").strip() or None)
                     for c in appointment.billed_customers()]
        return cls(
            id=appointment.id,
            business_id=business_id,
            service_id=appointment.service_id,
            service_name=appointment.service_name,
            start=appointment.start_date_time.to_utc(),
            end=appointment.end_date_time.to_utc(),
            price_type=appointment.price_type,
            price=appointment.price,
            customers=customers,
            last_updated=appointment.last_updated_date_time,
        )

    @classmethod
    def from_entity(cls, entity: dict) -> Booking:
        metadata = getattr(entity, "metadata", {}) or {}
        return cls(
            id=entity["AppointmentId"],
            business_id=entity["BusinessId"],
            service_id=entity.get("ServiceId") or None,
            service_name=entity.get("ServiceName") or None,
            start=_aware(entity["StartUtc"]),
            end=_aware(entity["EndUtc"]),
            price_type=entity.get("PriceType") or None,
            price=entity.get("Price"),
            customers=[BookedCustomer(**c) for c in json.loads(entity.get("Customers") or "[]")],
            last_updated=entity.get("LastUpdated") or None,
            cancelled=bool(entity.get("Cancelled")),
            claims=json.loads(entity.get("Claims") or "{}"),
            invoices=json.loads(entity.get("Invoices") or "{}"),
            etag=metadata.get("etag"),
        )


def _digest(source_fields: dict) -> str:
    """The `SourceHash` of a booking's source fields (stored on every row: never change its form)."""
    canonical = json.dumps(source_fields, sort_keys=True, default=lambda v: v.isoformat())
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def parse_instant(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 instant as Graph, BC and the app write them (`Z` or an offset; none means UTC);
    None for a blank or unreadable value."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def iso_z(moment: datetime) -> str:
    """ISO 8601 UTC with `Z`, to the second, as the HTTP API answers."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
