"""Uninvoiced bookings, and turning a selection of them into an invoicing job.

Exactly-once rests on claims: before anything is queued, every selected booking's customers are
claimed for the job with ETag-guarded table transactions (per partition, ≤ 100). A listed id
that cannot be claimed rejects the whole request and undoes the claims already taken. The job
is split into one part per customer (one BC draft invoice each), each with its own queue
message, so one customer's trouble neither blocks nor fails the others and a retried or
duplicated message finds its own work already done."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError

from shared.upstream.bc import ENVIRONMENT_CONCURRENCY
from shared.flows.bookings import FREE, Booking, iso_z, normalise_email
from shared.flows.messages import PARTS_PER_MESSAGE, InvoiceJobPart, encode
from shared.runtime import Runtime
from shared.settings import SettingsError
from shared.upstream.utf16 import cut, units
from shared.flows.invoicing.dimensions import dimension_set_key
from shared.flows.directory.resolver import CUSTOMER, ITEM, link_partitions
from shared.storage.store import (BOOKINGS, INVOICE_QUEUE, JOBS, MAX_BATCH, UPDATE, Store,
                          encode_key, fit_string, to_json)

log = logging.getLogger(__name__)

HEADER = "job"
LINE_DESCRIPTION_UNITS = 100
"""Sales Line "Description" is Text[100], counted in UTF-16 units."""
_IF_NOT_MODIFIED = MatchConditions.IfNotModified
REFS_CHUNK_CHARS = 30_000
MAX_REFS_CHUNKS = 28
SNAPSHOT_CHUNKS = 3
"""A part carries its bookings as claimed (with their ETags) when they fit in this many chunks,
so the worker need not read them back: see `snapshot_of`."""
CLAIM_ATTEMPTS = 6


class NotUninvoiced(Exception):
    def __init__(self, problems: dict[str, str]):
        super().__init__(f"{len(problems)} booking(s) cannot be invoiced")
        self.problems = problems


class TooLarge(Exception):
    pass


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


def _billing_problem(booking: Booking, invoice_free: bool, failed_customers: dict, failed_items: dict,
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


async def _failures(store: Store, settings) -> tuple[dict, dict]:
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
        store.query(BOOKINGS, " and ".join(clauses), parameters=parameters or None), _failures(store, rt.settings))
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
        problem = _billing_problem(booking, invoice_free, failed_customers, failed_items,
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


# -- grouping ----------------------------------------------------------------------------------

@dataclass
class Part:
    """One customer's share of a job in one company with one set of invoice dimensions: one BC
    draft invoice."""
    index: int
    email: str
    name: str | None
    bookings: list[Booking] = field(default_factory=list)
    company_id: str | None = None
    dimensions: dict[str, str] = field(default_factory=dict)

    @property
    def amount(self) -> Decimal:
        return sum((b.amount_per_customer() for b in self.bookings), Decimal(0))


def group_by_customer(bookings: list[Booking], emails_of, settings=None) -> list[Part]:
    """One part per customer e-mail, company and set of invoice dimensions (SPEC §4), bookings
    in start order; `emails_of(booking)` says which of a booking's customers to bill (open ones
    for a preview, the job's claims for a job). Without `settings`: one company, no dimensions."""
    groups: dict[tuple[str, str, str], Part] = {}
    for booking in sorted(bookings, key=lambda b: (b.start, b.id)):
        names = {c.email: c.name for c in booking.customers}
        company = company_of(settings, booking) if settings is not None else None
        dimensions = settings.dimensions_of(booking.business_id) if settings is not None else {}
        for email in emails_of(booking):
            key = (email, company or "", dimension_set_key(dimensions))
            part = groups.setdefault(key, Part(0, email, names.get(email), company_id=company, dimensions=dimensions))
            part.bookings.append(booking)
    parts = [groups[key] for key in sorted(groups)]
    for index, part in enumerate(parts):
        part.index = index
    return parts


def line_description(booking: Booking, time_zone: str) -> str:
    from zoneinfo import ZoneInfo

    local = booking.start.astimezone(ZoneInfo(time_zone))
    when = f" – {local:%Y-%m-%d %H:%M}"
    # Sales Line "Description" is Text[100] in UTF-16 units: the service name gives way, the date stays.
    return cut(booking.service_name or "Appointment", LINE_DESCRIPTION_UNITS - units(when)) + when


def preview(parts: list[Part], time_zone: str) -> list[dict]:
    """What `dryRun` answers: the invoices that would be made (in which company, with which
    dimension values)."""
    return [{"customerEmail": p.email, "customerName": p.name, "amount": float(p.amount),
             "companyId": p.company_id, "dimensions": p.dimensions, "bookingIds": [b.id for b in p.bookings],
             "lines": [{"bookingId": b.id, "description": line_description(b, time_zone),
                        "quantity": float(b.quantity()), "unitPrice": float(b.unit_price()),
                        "amount": float(b.amount_per_customer())} for b in p.bookings]}
            for p in parts]


# -- claims ------------------------------------------------------------------------------------

def _refs(bookings: list[Booking]) -> list[list[str]]:
    return [[b.partition_key, b.row_key] for b in bookings]


async def _read(store: Store, refs: list[list[str]]) -> list[Booking | None]:
    """Current bookings for [partition, row] references, in order (None: gone); a few
    queries per partition rather than a read per booking."""
    by_partition: dict[str, list[str]] = {}
    for partition, row in refs:
        by_partition.setdefault(partition, []).append(row)
    found: dict[tuple[str, str], dict] = {}
    for partition, rows in zip(by_partition, await asyncio.gather(*(
            store.get_many(BOOKINGS, partition, keys) for partition, keys in by_partition.items())), strict=True):
        found |= {(partition, key): row for key, row in rows.items()}
    return [Booking.from_entity(found[(p, r)]) if (p, r) in found else None for p, r in refs]


async def _apply(store: Store, bookings: list[Booking], change, attempts: int = CLAIM_ATTEMPTS
                 ) -> tuple[list[Booking], dict[str, str]]:
    """Apply `change(booking) -> problem | None` to each booking and write the invoicing fields
    back with ETag-guarded transactions (≤ 100 per partition). A transaction that loses a race is
    re-read and retried. Returns the bookings written and the problems by booking id."""
    written: list[Booking] = []
    problems: dict[str, str] = {}
    by_partition: dict[str, list[Booking]] = {}
    for booking in bookings:
        by_partition.setdefault(booking.partition_key, []).append(booking)
    chunks = [group[i:i + MAX_BATCH] for group in by_partition.values() for i in range(0, len(group), MAX_BATCH)]
    gate = asyncio.Semaphore(16)

    async def run(chunk: list[Booking]) -> None:
        async with gate:
            for attempt in range(attempts):
                operations = []
                ready = []
                for booking in chunk:
                    problem = change(booking)
                    if problem:
                        problems[booking.id] = problem
                    else:
                        ready.append(booking)
                        operations.append((UPDATE, booking.invoice_fields(),
                                           {"mode": "merge", "etag": booking.etag,
                                            "match_condition": _IF_NOT_MODIFIED}))
                if not operations:
                    return
                try:
                    answers = await store.transact(BOOKINGS, operations)
                    for booking, answer in zip(ready, answers, strict=True):
                        booking.etag = answer.get("etag") or booking.etag
                    written.extend(ready)
                    return
                except (TableTransactionError, ResourceModifiedError, ResourceNotFoundError):
                    fresh = await _read(store, _refs(ready))
                    chunk = []
                    for old, new in zip(ready, fresh, strict=False):
                        if new is None:
                            problems[old.id] = "the booking no longer exists"
                        else:
                            chunk.append(new)
                    await asyncio.sleep(0.05 * (attempt + 1))
            for booking in chunk:
                problems.setdefault(booking.id, "the booking kept changing; try again")

    await asyncio.gather(*(run(chunk) for chunk in chunks))
    return written, problems


def _claimable(now: datetime, invoice_free: bool):
    def check(booking: Booking) -> str | None:
        if booking.cancelled:
            return "cancelled"
        if booking.end >= now:
            return "has not ended yet"
        if booking.missing_email:
            return "customer has no e-mail"
        if booking.price_type == FREE and not invoice_free:
            return "free appointment"
        if not booking.open_emails():
            held = set(booking.claims.values())
            return f"being invoiced by job {sorted(held)[0]}" if held else "already invoiced"
        return None
    return check


async def claim(store: Store, job_id: str, bookings: list[Booking], now: datetime,
                invoice_free: bool) -> tuple[list[Booking], dict[str, str]]:
    """Claim every open customer of each booking for `job_id`."""
    check = _claimable(now, invoice_free)

    def take(booking: Booking) -> str | None:
        problem = check(booking)
        if problem is None:
            for email in booking.open_emails():
                booking.claims[email] = job_id
        return problem

    return await _apply(store, bookings, take)


async def release(store: Store, job_id: str, refs: list[list[str]], email: str | None = None) -> int:
    """Give back the claims `job_id` holds (for one customer, or all) on these bookings."""
    current = [b for b in await _read(store, refs) if b is not None]

    def drop(booking: Booking) -> str | None:
        mine = [e for e, j in booking.claims.items() if j == job_id and (email is None or e == email)]
        if not mine:
            return "nothing to release"
        for e in mine:
            del booking.claims[e]
        return None

    written, _ = await _apply(store, current, drop)
    return len(written)


# -- jobs --------------------------------------------------------------------------------------

def new_job_id() -> str:
    return uuid.uuid4().hex


def external_document_number(job_id: str, part: int) -> str:
    """Deterministic per job part, ≤ 35 characters: finds an invoice created but not recorded.
    Upper-case, as BC stores it (a Code field): the key we look up is the key BC holds."""
    return f"BKI-{job_id[:22]}-{part:05d}".upper()


def _chunks(text: str) -> dict[str, str]:
    pieces = [text[i:i + REFS_CHUNK_CHARS] for i in range(0, len(text), REFS_CHUNK_CHARS)] or [""]
    if len(pieces) > MAX_REFS_CHUNKS:
        raise TooLarge("too many bookings for one customer in one request; select fewer")
    return {f"Refs{index}": piece for index, piece in enumerate(pieces)}


def _snapshot(bookings: list[Booking]) -> dict[str, str]:
    """The part's bookings as this job claimed them, when they fit; else nothing (the worker
    reads them)."""
    text = "[" + ",".join(b.model_dump_json(exclude={"last_updated"}) for b in bookings) + "]"
    if len(text) > SNAPSHOT_CHUNKS * REFS_CHUNK_CHARS:
        return {}
    return {f"Snapshot{index}": text[i:i + REFS_CHUNK_CHARS]
            for index, i in enumerate(range(0, len(text), REFS_CHUNK_CHARS))}


def snapshot_of(row: dict) -> list[Booking] | None:
    """The bookings a part carries, as its job claimed them. Safe to use instead of reading them
    on a part's first attempt: while a part is queued or running, nothing but the part itself
    releases its claims, and a stale ETag only makes recording re-read and retry."""
    text = "".join(row.get(f"Snapshot{index}", "") for index in range(SNAPSHOT_CHUNKS))
    if not text:
        return None
    return [Booking.model_validate(item) for item in json.loads(text)]


def refs_of(row: dict) -> list[list[str]]:
    text = "".join(row.get(f"Refs{index}", "") for index in range(MAX_REFS_CHUNKS))
    return json.loads(text or "[]")


def parts_per_message(parts: int) -> int:
    """Spread a job over at least as many messages as BC serves requests at once, so its
    `$batch`es run side by side (200 invoices: 5 messages of 40, not 4 of 50); larger jobs use
    messages of up to `PARTS_PER_MESSAGE`."""
    return max(1, min(PARTS_PER_MESSAGE, math.ceil(parts / ENVIRONMENT_CONCURRENCY)))


def part_key(index: int) -> str:
    return f"part-{index:05d}"


@dataclass(frozen=True)
class Dating:
    """How a job's invoices are dated: a billing run's invoices carry the period's last day and
    a comment line naming the period ("October 2026"); by hand, today and no comment."""
    invoice_date: str | None = None
    period: str | None = None


async def create_job(rt: Runtime, store: Store, bookings: list[Booking], strict: bool,
                     request: dict, dating: Dating = Dating(), job_id: str | None = None) -> tuple[str | None, int]:
    """Claim, record and queue a job. `strict`: any booking that cannot be claimed rejects the
    whole request (listed ids); otherwise such bookings are left out (`all`). One part (one draft)
    per customer, company and set of invoice dimensions."""
    job_id = job_id or new_job_id()
    now = datetime.now(timezone.utc)
    await store.upsert(JOBS, {"PartitionKey": job_id, "RowKey": HEADER, "Status": "claiming", "CreatedAt": now,
                              "Request": fit_string(to_json(request), 4000)})
    claimed, problems = await claim(store, job_id, bookings, now, rt.settings.invoice_free_bookings)
    if (problems and strict) or not claimed:
        await release(store, job_id, _refs(claimed))
        await store.upsert(JOBS, {"PartitionKey": job_id, "RowKey": HEADER, "Status": "rejected"})
        if strict and problems:
            raise NotUninvoiced(problems)
        return None, 0
    parts = group_by_customer(claimed, lambda b: sorted(e for e, j in b.claims.items() if j == job_id), rt.settings)
    try:
        rows = [{"PartitionKey": job_id, "RowKey": part_key(p.index), "CustomerEmail": p.email,
                 "CustomerName": p.name or "", "Status": "queued", "BookingCount": len(p.bookings),
                 "CompanyId": p.company_id or "", "Dimensions": dimension_set_key(p.dimensions),
                 "InvoiceDate": dating.invoice_date or "", "Period": dating.period or "",
                 **_chunks(to_json(_refs(p.bookings))), **_snapshot(p.bookings)} for p in parts]
    except TooLarge:
        await release(store, job_id, _refs(claimed))
        await store.upsert(JOBS, {"PartitionKey": job_id, "RowKey": HEADER, "Status": "rejected"})
        raise
    await store.write_batches(JOBS, [("upsert", row) for row in rows])
    # "queued" before any message goes: a job left "claiming" is taken for dead after a while and
    # its claims released, which must never happen to a job whose parts may be running.
    await store.upsert(JOBS, {"PartitionKey": job_id, "RowKey": HEADER, "Status": "queued",
                              "BookingCount": len(claimed), "PartCount": len(parts)})
    indexes = [p.index for p in parts]
    size = parts_per_message(len(indexes))
    await store.send_many(INVOICE_QUEUE, [encode(InvoiceJobPart(jobId=job_id, parts=indexes[i:i + size]))
                                          for i in range(0, len(indexes), size)])
    log.info("invoicing job %s queued: %d bookings, %d invoices", job_id, len(claimed), len(parts),
             extra={"event": "invoice_job_queued", "job_id": job_id, "bookings": len(claimed), "parts": len(parts)})
    return job_id, len(claimed)


async def select_listed(rt: Runtime, store: Store, ids: list[str], now: datetime
                        ) -> tuple[list[Booking], dict[str, str]]:
    """The listed bookings if every one is uninvoiced and invoiceable; else the problems by id."""
    wanted = set(ids)
    found: dict[str, Booking] = {}
    async for row in store.iterate(BOOKINGS):
        if row.get("AppointmentId") in wanted:
            found[row["AppointmentId"]] = Booking.from_entity(row)
    failed_customers, failed_items = await _failures(store, rt.settings)
    check = _claimable(now, rt.settings.invoice_free_bookings)
    problems: dict[str, str] = {}
    for ident in dict.fromkeys(ids):
        booking = found.get(ident)
        if booking is None:
            problems[ident] = "unknown booking"
            continue
        billing = _billing_problem(booking, rt.settings.invoice_free_bookings, failed_customers, failed_items,
                                   company_of(rt.settings, booking))
        problem = check(booking) or (billing and billing[1])
        if problem:
            problems[ident] = problem
    return [found[i] for i in dict.fromkeys(ids) if i in found], problems


@dataclass
class Outcome:
    """What asking for invoices led to: a queued job, nothing to do, or (dry run) a preview."""
    booking_count: int
    job_id: str | None = None
    invoices: list[dict] | None = None


async def invoice_bookings(rt: Runtime, store: Store, *, booking_ids: list[str] | None = None,
                           filters: Filters | None = None, dry_run: bool = False, request: dict | None = None,
                           dating: Dating = Dating(), job_id: str | None = None) -> Outcome:
    """Invoice the listed bookings (all or nothing: `NotUninvoiced` names each one that cannot
    be), or every invoiceable booking the filters find; `dry_run` only says what would be made.
    The JSON API and the operator pages both come here."""
    now = datetime.now(timezone.utc)
    if booking_ids is not None:
        bookings, problems = await select_listed(rt, store, booking_ids, now)
        if problems:
            raise NotUninvoiced(problems)
    else:
        found = await candidates(rt, store, filters or Filters(), now)
        bookings = [c.booking for c in found if c.invoiceable]
    if dry_run:
        parts = group_by_customer(bookings, lambda b: b.open_emails(), rt.settings)
        return Outcome(len(bookings), invoices=preview(parts, rt.settings.time_zone))
    if not bookings:
        return Outcome(0)
    job_id, count = await create_job(rt, store, bookings, strict=booking_ids is not None, request=request or {},
                                     dating=dating, job_id=job_id)
    return Outcome(count, job_id)
