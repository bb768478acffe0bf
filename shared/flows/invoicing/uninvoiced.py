"""Uninvoiced bookings: which ended bookings can be invoiced, and why the others cannot.

`candidates` reads the `bookings` table through the filters of `GET /api/bookings/uninvoiced` and
the pages, and gives each booking its billing view (customers, quantities, amounts) or the reason
it cannot be invoiced (`REASON_CODES`): no customer or e-mail, no service or price, a free
appointment, or a customer or item Business Central refused."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from shared.flows.bookings import FREE, Booking, iso_z, normalise_email
from shared.flows.directory.links import CUSTOMER, ITEM, link_partitions
from shared.runtime import Runtime
from shared.settings import SettingsError
from shared.storage.store import BOOKINGS, Store, encode_key


class NotUninvoiced(Exception):
    def __init__(self, problems: dict[str, str]):
        super().__init__(f"{len(problems)} booking(s) cannot be invoiced")
        self.problems = problems


@dataclass
class Filters:
    business_id: str | None = None
    customer_email: str | None = None
    start_from: datetime | None = None
    start_to: datetime | None = None
    ended_before: datetime | None = None
    """Only bookings that ended before this (`POST /api/invoices` `to`, billing runs)."""
    business_ids: list[str] | None = None
    """Only these businesses (the pages' company and location filters)."""


@dataclass
class Candidate:
    """A booking with its billing view: customers, quantities, amounts, and why not, if not."""
    booking: Booking
    invoiceable: bool
    reason: str | None
    reason_code: str | None = None
    """What kind of problem `reason` is (`REASON_CODES`), so pages can group and explain it."""

    def row(self) -> dict:
        b = self.booking
        quantity, amount = b.quantity(), b.amount_per_customer()
        open_emails = set(b.open_emails())
        listed = [c for c in b.customers if c.email is None or c.email in open_emails]
        customers = [{"email": c.email, "name": c.name, "quantity": float(quantity), "amount": float(amount)}
                     for c in listed]
        return {"id": b.id, "businessId": b.business_id, "serviceId": b.service_id, "serviceName": b.service_name,
                "start": iso_z(b.start), "end": iso_z(b.end), "priceType": b.price_type,
                "price": float(b.unit_price()), "customers": customers,
                "amount": float(amount * len(customers)),
                "invoiceable": self.invoiceable, "reason": self.reason}


REASON_CODES = ("no-customer", "no-email", "no-service", "no-price", "free", "customer-refused", "item-refused")


def billing_problem(booking: Booking, invoice_free: bool, failed_customers: dict, failed_items: dict,
                     company: str | None = None) -> tuple[str, str] | None:
    """(code, reason) when the booking cannot be billed as it is; None when it can. The failed
    customers and items are those of the company the booking's business bills into."""
    failed_customers, failed_items = failed_customers.get(company, {}), failed_items.get(company, {})
    if not booking.customers:
        return "no-customer", "appointment has no customer"
    if booking.missing_email:
        return "no-email", "customer has no e-mail"
    if not booking.service_id:
        return "no-service", "appointment has no service"
    if booking.price_type != FREE and not booking.price:
        return "no-price", "no price: set a price for this appointment in Bookings"
    if booking.price_type == FREE and not invoice_free:
        return "free", "free appointment"
    for email in booking.open_emails():
        if email in failed_customers:
            return ("customer-refused",
                    f"customer {email} could not be set up in Business Central: {failed_customers[email]}")
    if booking.service_id in failed_items:
        return "item-refused", f"service could not be set up in Business Central: {failed_items[booking.service_id]}"
    return None


async def refused_records(store: Store, settings) -> tuple[dict, dict]:
    """Customers and items BC refused, per company: company → key → reason."""
    found: list[dict] = []
    for kind in (CUSTOMER, ITEM):
        partitions = link_partitions(kind, settings)
        rows = await store.query(kind.table, "Status eq 'failed'", ["PartitionKey", "Key", "LastError"])
        failed: dict = {}
        for row in rows:
            if row["PartitionKey"] in partitions:  # not the push's rows (`push:<business>`)
                failed.setdefault(partitions[row["PartitionKey"]], {})[row.get("Key")] = row.get("LastError")
        found.append(failed)
    return found[0], found[1]


def company_of(settings, booking: Booking) -> str | None:
    """The BC company the booking's business bills into (None: no company is set for it)."""
    try:
        return settings.company_of(booking.business_id)
    except SettingsError:
        return None


def _time_filter(name: str, moment: datetime) -> str:
    return f"{name} {{op}} datetime'{moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}'"


async def candidates(rt: Runtime, store: Store, filters: Filters, now: datetime | None = None) -> list[Candidate]:
    """Every uninvoiced booking (SPEC §4: ended, not cancelled, not invoiced nor claimed), sorted
    by start. Free ones only with `INVOICE_FREE_BOOKINGS`; rows that cannot be billed carry a reason."""
    now = now or datetime.now(timezone.utc)
    ended_before = min(now, filters.ended_before) if filters.ended_before else now
    clauses = ["InvoiceState eq 'none'", "Cancelled eq false", _time_filter("EndUtc", ended_before).format(op="lt")]
    parameters: dict = {}
    if filters.business_id:
        clauses.insert(0, "PartitionKey eq @pk")
        parameters["pk"] = encode_key(filters.business_id)
    if filters.start_from:
        clauses.append(_time_filter("StartUtc", filters.start_from).format(op="ge"))
    if filters.start_to:
        clauses.append(_time_filter("StartUtc", filters.start_to).format(op="lt"))
    rows, (failed_customers, failed_items) = await asyncio.gather(
        store.query(BOOKINGS, " and ".join(clauses), parameters=parameters or None), refused_records(store, rt.settings))
    only = set(filters.business_ids) if filters.business_ids is not None else None
    email = normalise_email(filters.customer_email) if filters.customer_email else None
    invoice_free = rt.settings.invoice_free_bookings
    found = []
    for row in rows:
        booking = Booking.from_entity(row)
        if only is not None and booking.business_id not in only:
            continue
        if not booking.open_emails() and not booking.missing_email:
            continue
        if email and email not in booking.open_emails():
            continue
        if booking.price_type == FREE and not invoice_free:
            continue
        problem = billing_problem(booking, invoice_free, failed_customers, failed_items,
                                   company_of(rt.settings, booking))
        found.append(Candidate(booking, problem is None, problem and problem[1], problem and problem[0]))
    found.sort(key=lambda c: (c.booking.start, c.booking.business_id, c.booking.id))
    return found


def encode_cursor(candidate: Candidate) -> str:
    b = candidate.booking
    return base64.urlsafe_b64encode(json.dumps([iso_z(b.start), b.business_id, b.id]).encode()).decode()


def after_cursor(found: list[Candidate], cursor: str | None) -> list[Candidate]:
    if not cursor:
        return found
    try:
        key = tuple(json.loads(base64.urlsafe_b64decode(cursor.encode())))
        if len(key) != 3 or not all(isinstance(part, str) for part in key):
            raise ValueError("not a cursor")
    except (ValueError, TypeError) as error:
        raise ValueError("the continuation token is not valid") from error
    return [c for c in found if (iso_z(c.booking.start), c.booking.business_id, c.booking.id) > key]
