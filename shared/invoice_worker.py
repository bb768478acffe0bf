"""The invoice worker: a message names up to 50 parts of a job; each part → one BC draft sales
invoice for one customer. The parts of a message share their BC round trips (one lookup per 40
invoices, one `$batch` create per 100), so a job of hundreds of customers costs a few requests.

Order of work, and why it is safe to repeat from any point:
1. parts that already succeeded are skipped (duplicate or retried message);
2. customers and items are resolved through the directory (created from templates if missing);
3. BC is asked for invoices with the parts' deterministic `externalDocumentNumber`s; only the
   missing ones are created (all lines by deep insert). A create whose answer was lost is looked
   up again, never blindly repeated;
4. each invoice is recorded on its bookings (ETag-guarded), then on its part.
A crash anywhere before 4 ends in the retry finding the invoice in step 3. A part that BC refuses
for good (e.g. a blocked customer) fails alone; its bookings are released."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError

from shared.bc import BcClient
from shared.bookings import Booking
from shared.directory import Resolver
from shared.http import UpstreamAmbiguous, UpstreamError
from shared.invoicing import (HEADER, _apply, _read, external_document_number, line_description, part_key,
                              refs_of, release)
from shared.messages import CustomerSource, InvoiceJobPart, PermanentFailure, ServiceSource
from shared.runtime import Runtime
from shared.store import JOBS, UPDATE, Store, fit_string, to_json

log = logging.getLogger(__name__)

CREATE_ATTEMPTS = 4
RUNNING_STALE_AFTER = timedelta(minutes=10)
"""Longer than a function may run (host.json functionTimeout)."""
MARKER = "Invoiced: Business Central draft invoice {number} ({date})"


@dataclass
class PartWork:
    index: int
    row: dict
    key: str
    email: str
    attempted: bool
    """An earlier attempt claimed this part, so BC may hold its invoice already. A part never
    claimed cannot have one (invoices are created only under a claim): no lookup needed."""
    mine: list[Booking] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)


async def _claim_parts(store: Store, rows: list[dict], owner: str) -> list[dict]:
    """Take the parts for this message (ETag-guarded), so two copies of a message never ask BC
    for the same invoice at once. A part that another message is working on is left to it; if
    that one died, reconciliation queues the part again once it is stale. `owner` is the queue
    message id, so the host's retry of a crashed message takes its own parts back."""
    now = datetime.now(timezone.utc)
    mine, operations = [], []
    for row in rows:
        since = row.get("RunningSince")
        if row.get("Status") == "running" and row.get("Owner") not in (owner, None, "") and since \
                and now - since < RUNNING_STALE_AFTER:
            continue
        mine.append(row)
        operations.append((UPDATE, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"], "Status": "running",
                                    "Owner": owner, "RunningSince": now},
                           {"mode": "merge", "etag": row.metadata["etag"], "match_condition": MatchConditions.IfNotModified}))
    if not operations:
        return []
    try:
        await store.transact(JOBS, operations)
        return mine
    except (TableTransactionError, ResourceModifiedError, ResourceNotFoundError):
        taken = []
        for row, operation in zip(mine, operations, strict=True):
            try:
                await store.update(JOBS, operation[1], etag=row.metadata["etag"])
                taken.append(row)
            except (ResourceModifiedError, ResourceNotFoundError):
                continue
        return taken


async def _load(store: Store, job_id: str, indexes: list[int], owner: str) -> list[PartWork]:
    """The unfinished parts this invocation could take, and their bookings, read together."""
    rows = await store.get_many(JOBS, job_id, [part_key(index) for index in indexes])
    if not rows:
        raise PermanentFailure(f"invoicing job {job_id} has no part {', '.join(map(str, indexes[:10]))}")
    unfinished = [rows[part_key(index)] for index in indexes
                  if part_key(index) in rows and rows[part_key(index)].get("Status") not in ("succeeded", "failed")]
    # The bookings are read while the parts are claimed: a part not taken just ignores them.
    refs = [ref for row in unfinished for ref in refs_of(row)]
    claimed, found = await asyncio.gather(_claim_parts(store, unfinished, owner), _read(store, refs))
    # `claimed` are the rows as read before this claim: their RunningSince tells an earlier attempt.
    bookings = dict(zip(map(tuple, refs), found, strict=True))
    works = [PartWork(int(row["RowKey"][5:]), row, external_document_number(job_id, int(row["RowKey"][5:])),
                      row["CustomerEmail"], attempted=bool(row.get("RunningSince"))) for row in claimed]
    for work in works:
        _sort(work, job_id, [bookings[tuple(ref)] for ref in refs_of(work.row)])
    return works


def _sort(work: PartWork, job_id: str, found: list[Booking | None]) -> None:
    """Which of the part's bookings are still its own to invoice."""
    refs = refs_of(work.row)
    bookings = [b for b in found if b is not None]
    for booking in bookings:
        recorded = booking.invoices.get(work.email, {})
        if booking.claims.get(work.email) == job_id or recorded.get("jobId") == job_id:
            work.mine.append(booking)
        else:
            work.errors.append({"bookingId": booking.id,
                                "message": "the booking was released before it was invoiced"})
    if len(refs) > len(bookings):
        work.errors.append({"bookingId": None, "message": f"{len(refs) - len(bookings)} booking(s) no longer exist"})
    work.mine.sort(key=lambda b: (b.start, b.id))


async def find_or_create_invoices(bc: BcClient, bodies: dict[str, dict], fresh: frozenset[str] = frozenset()
                                  ) -> tuple[dict[str, dict], dict[str, str]]:
    """Invoices by external document number: found, else created. Returns (invoices, refusals)
    where refusals are BC's permanent answers (the part cannot be invoiced as it is). `fresh`
    keys were never attempted, so the first round creates them without a lookup; after an
    ambiguous answer every key is looked up again."""
    invoices: dict[str, dict] = {}
    refused: dict[str, str] = {}
    remaining = list(bodies)
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        lookup = [key for key in remaining if attempt > 1 or key not in fresh]
        existing = await bc.invoices_by_external_numbers(lookup) if lookup else {}
        invoices |= {key: found[0] for key, found in existing.items() if found}
        remaining = [key for key in remaining if key not in invoices]
        if not remaining:
            break
        try:
            answers = await bc.create_many("salesInvoices", [bodies[key] for key in remaining])
        except UpstreamAmbiguous:
            if attempt == CREATE_ATTEMPTS:
                raise
            continue
        retry = []
        for key, answer in zip(remaining, answers, strict=True):
            if isinstance(answer, dict):
                invoices[key] = answer
            elif isinstance(answer, UpstreamAmbiguous) or answer.retryable:
                retry.append(key)
            else:
                refused[key] = answer.message
        remaining = retry
        if not remaining:
            break
        if attempt == CREATE_ATTEMPTS:
            raise UpstreamError(bc.api.service, None, "CreateFailed",
                                f"{len(remaining)} invoice(s) could not be created after {attempt} attempts")
    return invoices, refused


async def invoice_parts(rt: Runtime, message: InvoiceJobPart, owner: str | None = None) -> None:
    """`owner` is the queue message's id (the same for its `give_up`)."""
    store = await rt.store()
    job_id = message.job_id
    parts = await _load(store, job_id, message.part_indexes(), owner or uuid.uuid4().hex)
    if not parts:
        return
    await store.upsert(JOBS, {"PartitionKey": job_id, "RowKey": HEADER, "StartedAt": datetime.now(timezone.utc)})
    for work in [w for w in parts if not w.mine]:
        await _finish(store, work.row, "failed", errors=work.errors)
    parts = [w for w in parts if w.mine]
    if not parts:
        return

    resolver = Resolver(rt, store, rt.bc)
    names = {w.email: next((c.name for b in w.mine for c in b.customers if c.email == w.email and c.name), None)
             for w in parts}
    customers = await resolver.customers([(CustomerSource(email=w.email, displayName=(names[w.email] or None)
                                                          and names[w.email][:100]), None) for w in parts])
    services = {b.service_id: b for w in parts for b in w.mine}
    items = await resolver.items([(ServiceSource(serviceId=service_id, displayName=(b.service_name or service_id)[:100],
                                                 defaultPrice=float(b.unit_price())), None)
                                  for service_id, b in services.items()])
    zone = rt.settings.time_zone
    today = datetime.now(ZoneInfo(zone)).date().isoformat()
    bodies = {}
    for work in parts:
        work.lines = [{"lineType": "Item", "itemId": items[b.service_id].bc_id,
                       "description": line_description(b, zone), "quantity": float(b.quantity()),
                       "unitPrice": float(b.unit_price())} for b in work.mine]
        bodies[work.key] = {"customerId": customers[work.email].bc_id, "externalDocumentNumber": work.key,
                            "invoiceDate": today, "salesInvoiceLines": work.lines}
    invoices, refused = await find_or_create_invoices(rt.bc, bodies, frozenset(w.key for w in parts if not w.attempted))
    for work in [w for w in parts if w.key not in invoices]:
        reason = f"Business Central refused the invoice: {refused.get(work.key)}"
        await release(store, job_id, refs_of(work.row), work.email)
        await _finish(store, work.row, "failed", errors=work.errors + [
            {"bookingId": b.id, "message": _plain(reason)} for b in work.mine])
    done = [w for w in parts if w.key in invoices]
    links = {w.key: {"invoiceId": invoices[w.key]["id"], "invoiceNumber": invoices[w.key].get("number"),
                     "jobId": job_id, "date": invoices[w.key].get("invoiceDate") or today} for w in done}
    recorded = await _record(store, job_id, done, links)
    finished = []
    for work in done:
        invoice = invoices[work.key]
        written = [b for b in work.mine if (b.id, work.email) in recorded]
        errors = work.errors + [{"bookingId": b.id, "message": "the booking was released before it was invoiced"}
                                for b in work.mine if (b.id, work.email) not in recorded]
        amount = invoice.get("totalAmountIncludingTax")
        if amount is None:
            amount = round(sum(line["quantity"] * line["unitPrice"] for line in work.lines), 2)
        finished.append(_finished(work.row, "succeeded", invoice, amount, [b.id for b in written], errors))
        log.info("draft invoice %s for job part %s", invoice.get("number"), work.key,
                 extra={"event": "invoice_created", "job_id": job_id, "part": work.index,
                        "invoice_id": invoice["id"], "lines": len(work.lines)})
    await store.write_batches(JOBS, [(UPDATE, entity, {"mode": "merge"}) for entity in finished])
    if rt.settings.write_back_to_bookings:
        await asyncio.gather(*(write_back(rt, [b for b in w.mine if (b.id, w.email) in recorded], links[w.key])
                               for w in done))


async def _record(store: Store, job_id: str, done: list[PartWork], links: dict[str, dict]) -> set[tuple[str, str]]:
    """Put each invoice on its bookings, all parts at once (ETag-guarded transactions of ≤ 100
    per partition; a group booking on several invoices is written once). Returns the recorded
    (booking id, customer e-mail) pairs."""
    changes: dict[str, list[tuple[str, dict]]] = {}
    bookings: dict[str, Booking] = {}
    for work in done:
        for booking in work.mine:
            bookings.setdefault(booking.id, booking)
            changes.setdefault(booking.id, []).append((work.email, links[work.key]))
    recorded: set[tuple[str, str]] = set()

    def record(booking: Booking) -> str | None:
        mine = []
        for email, link in changes[booking.id]:
            if booking.invoices.get(email, {}).get("jobId") == job_id:
                mine.append((booking.id, email))
            elif booking.claims.get(email) == job_id:
                booking.invoices[email] = link
                del booking.claims[email]
                mine.append((booking.id, email))
        recorded.difference_update({(booking.id, email) for email, _ in changes[booking.id]})
        recorded.update(mine)
        return None if mine else "the booking was released before it was invoiced"

    written, _ = await _apply(store, list(bookings.values()), record)
    kept = {b.id for b in written}
    return {pair for pair in recorded if pair[0] in kept}


def _finished(row: dict, status: str, invoice: dict | None = None, amount: float | None = None,
              booking_ids: list[str] | None = None, errors: list[dict] | None = None) -> dict:
    entity = {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"], "Status": status,
              "Errors": fit_string(to_json(errors or []), 30_000), "FinishedAt": datetime.now(timezone.utc)}
    if invoice:
        entity |= {"InvoiceId": invoice["id"], "InvoiceNumber": invoice.get("number") or "",
                   "Amount": float(amount or 0), "BookingIds": fit_string(to_json(booking_ids or []), 30_000)}
    log.log(logging.INFO if status == "succeeded" else logging.ERROR, "invoice job part %s %s", row["RowKey"], status,
            extra={"event": "invoice_job_part_" + status, "job_id": row["PartitionKey"], "part": row["RowKey"],
                   "errors": len(errors or [])})
    return entity


async def _finish(store: Store, row: dict, status: str, errors: list[dict] | None = None) -> None:
    await store.update(JOBS, _finished(row, status, errors=errors), etag=None)


async def give_up(rt: Runtime, message: InvoiceJobPart, reason: str, owner: str | None = None) -> None:
    """The message's last attempt failed. For each unfinished part: if BC has its invoice after
    all, record it; otherwise release the claims so the bookings are uninvoiced again. If BC
    cannot be asked, keep the claims (releasing then could bill twice): reconciliation checks
    the part again on the next sync."""
    store = await rt.store()
    unfinished = []
    for index in message.part_indexes():
        row = await store.get(JOBS, message.job_id, part_key(index))
        if row is not None and row.get("Status") not in ("succeeded", "failed"):
            unfinished.append((index, row))
    if not unfinished:
        return
    keys = [external_document_number(message.job_id, index) for index, _ in unfinished]
    try:
        found = await rt.bc.invoices_by_external_numbers(keys)
    except UpstreamError as error:
        for _, row in unfinished:
            await _finish(store, row, "failed", errors=[{"bookingId": None, "message": f"{_plain(reason)} "
                          f"Business Central could not be checked ({error.code}); the bookings stay reserved "
                          "until the next sync confirms no invoice was made."}])
            await store.update(JOBS, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"],
                                      "NeedsCheck": True}, etag=None)
        return
    recorded = [index for (index, _), key in zip(unfinished, keys, strict=True) if found.get(key)]
    if recorded:
        await invoice_parts(rt, InvoiceJobPart(jobId=message.job_id, parts=recorded), owner)
    for (_, row), key in zip(unfinished, keys, strict=True):
        if found.get(key):
            continue
        released = await release(store, message.job_id, refs_of(row), row["CustomerEmail"])
        await _finish(store, row, "failed", errors=[{"bookingId": ref[1], "message": _plain(reason)}
                                                    for ref in _booking_ids(row)])
        log.error("invoice job part %s failed; %d bookings released", row["RowKey"], released,
                  extra={"event": "invoice_job_part_released", "job_id": message.job_id, "released": released})


def _booking_ids(row: dict) -> list[list[str]]:
    from shared.store import decode_key

    return [[ref[0], decode_key(ref[1])] for ref in refs_of(row)]


def _plain(reason: str) -> str:
    return f"No invoice was made: {reason}"[:500]


async def write_back(rt: Runtime, bookings: list[Booking], link: dict) -> None:
    """Add one marker line per invoice to the appointment's staff notes, keeping their text
    (lists return notes empty, so each appointment is read by id first) and never twice."""
    line = MARKER.format(number=link["invoiceNumber"], date=link["date"])
    graph = rt.graph

    async def one(booking: Booking) -> None:
        try:
            appointment = await graph.get_appointment(booking.business_id, booking.id)
            notes = appointment.service_notes or ""
            if line in notes.splitlines():
                return
            updated = f"{notes.rstrip()}\n{line}" if notes.strip() else line
            await graph.update_appointment(booking.business_id, booking.id, {"serviceNotes": updated})
        except UpstreamError as error:
            log.warning("could not note invoice %s on appointment: %s", link["invoiceNumber"], error,
                        extra={"event": "write_back_failed", "booking_id": booking.id})

    await asyncio.gather(*(one(b) for b in bookings))
