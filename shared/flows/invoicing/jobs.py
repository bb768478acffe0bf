"""Turning a selection of bookings into an invoicing job: claimed, split into parts, queued.

Before anything is queued, every selected booking's customers are claimed for the job (`claims`).
A listed id that cannot be claimed rejects the whole request and undoes the claims already
taken. The job is split into one part per customer, company and set of invoice dimensions (one
BC draft invoice each), each with its own queue message, so one customer's trouble neither
blocks nor fails the others and a retried or duplicated message finds its own work already
done. The JSON API, the operator pages and billing runs all come here (`invoice_bookings`)."""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from shared.flows.bookings import Booking
from shared.flows.invoicing.claims import _refs, claim, claimable, release
from shared.flows.invoicing.dimensions import dimension_set_key
from shared.flows.invoicing.uninvoiced import (
    Filters,
    NotUninvoiced,
    billing_problem,
    candidates,
    company_of,
    refused_records,
)
from shared.flows.messages import PARTS_PER_MESSAGE, InvoiceJobPart, encode
from shared.runtime import Runtime
from shared.storage.store import BOOKINGS, INVOICE_QUEUE, JOBS, Store, fit_string, to_json
from shared.upstream.bc import ENVIRONMENT_CONCURRENCY
from shared.upstream.utf16 import cut, units

log = logging.getLogger(__name__)

HEADER = "job"
LINE_DESCRIPTION_UNITS = 100
"""Sales Line "Description" is Text[100], counted in UTF-16 units."""

REFS_CHUNK_CHARS = 30_000
MAX_REFS_CHUNKS = 28
SNAPSHOT_CHUNKS = 3
"""A part carries its bookings as claimed (with their ETags) when they fit in this many chunks,
so the worker need not read them back: see `snapshot_of`."""


class TooLarge(Exception):
    pass


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
    failed_customers, failed_items = await refused_records(store, rt.settings)
    check = claimable(now, rt.settings.invoice_free_bookings)
    problems: dict[str, str] = {}
    for ident in dict.fromkeys(ids):
        booking = found.get(ident)
        if booking is None:
            problems[ident] = "unknown booking"
            continue
        billing = billing_problem(booking, rt.settings.invoice_free_bookings, failed_customers, failed_items,
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
