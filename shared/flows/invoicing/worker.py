"""The invoice worker: a message names up to 50 parts of a job; each part → one BC draft sales
invoice for one customer. The parts of a message share their BC round trips (one lookup per 40
invoices, one `$batch` create per batch), so a job of hundreds of customers costs a few requests.

Order of work, and why it is safe to repeat from any point:
1. parts that already succeeded are skipped (duplicate or retried message), and parts waiting
   for BC (below) are left for the message that will come back for them;
2. customers and items are resolved through the directory (created from templates if missing);
3. the parts are claimed (ETag-guarded): from then on an invoice may have been sent to BC
   (`PendingSince`), and every create is sent within `HTTP_TIMEOUT_SECONDS` of the claim;
4. a part claimed before (a retry) is looked up by its deterministic `externalDocumentNumber`;
   a part never claimed cannot have an invoice and is created without asking;
5. the missing invoices are created (all lines by deep insert);
6. each invoice is recorded on its bookings (ETag-guarded), then on its part.
A create whose outcome is unknown (a timeout, a dropped connection, 408, 500, 502, 504) may have
happened, or may still be running in BC. The part waits for BC to confirm (`waiting`, shown as
still running, with since when): its message comes back in seconds, then less and less often
(`Deferred`), and each time its invoice is looked up by its key; the part finishes as soon as BC
shows it. Only once BC cannot be running that create any more does a lookup that finds nothing
mean it did not happen, and the invoice is created again. BC's 429 and 503 mean it did not run
the request: it is sent again after the delay, without waiting for any of that.
A part that BC refuses for good (e.g. a customer without a posting group) fails alone, with
what to fix in BC; its bookings are released."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from shared.flows.bookings import Booking
from shared.flows.directory.resolver import Resolver
from shared.flows.invoicing.claims import _apply, _read, release
from shared.flows.invoicing.dimensions import problem_of as dimension_problem
from shared.flows.invoicing.drafts import complete_parts, numbered
from shared.flows.invoicing.jobs import external_document_number, line_description, part_key, refs_of, snapshot_of
from shared.flows.invoicing.parts import (
    PartWork,
    claim_parts,
    company_of_part,
    finish_part,
    finished_entity,
    park,
    pending_since,
    sort_bookings,
    unclaim_parts,
    unfinished_parts,
)
from shared.flows.invoicing.write_back import note_part
from shared.flows.messages import CustomerSource, Deferred, InvoiceJobPart, ServiceSource, throttled_wait
from shared.hostconfig import queue_settings
from shared.runtime import Runtime
from shared.storage.store import JOBS, UPDATE, Store
from shared.upstream.bc import BcClient, Wait, explain_refusal
from shared.upstream.errors import NOT_RUN_STATUS, UpstreamAmbiguous, UpstreamError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = queue_settings().max_dequeue_count
"""Creates without a known outcome before BC is taken to be failing: as often as a message is tried."""


async def find_or_create_invoices(bc: BcClient, works: list[PartWork], bodies: dict[str, dict], claimed_at: datetime
                                  ) -> tuple[dict[str, dict], dict[str, str]]:
    """Invoices by external document number: found, else created. Returns (invoices, refusals)
    where refusals are BC's permanent answers (the part cannot be invoiced as it is). Parts that
    must wait for BC get `work.wait`."""
    invoices: dict[str, dict] = {}
    refused: dict[str, str] = {}
    now = datetime.now(timezone.utc)
    retried = [w for w in works if w.earlier is not None]
    existing = await bc.invoices_by_external_numbers([w.key for w in retried]) if retried else {}
    to_create = []
    for work in works:
        if existing.get(work.key):
            invoices[work.key] = existing[work.key][0]
        elif work.earlier is not None and bc.settled_at(work.earlier) > now:
            # Not there (yet): an earlier create may still land. Ask again soon.
            work.wait = bc.confirm(work.earlier, work.confirming or work.earlier)
        elif work.attempts >= MAX_ATTEMPTS:
            refused[work.key] = (f"Business Central gave no usable answer to {work.attempts} attempts to create the "
                                 f"invoice, and it does not have it (last: {work.row.get('Note') or 'no answer'})")
        else:
            to_create.append(work)
    if not to_create:
        return invoices, refused
    answers = await bc.create_many("salesInvoices", [bodies[w.key] for w in to_create], bc.send_by(claimed_at))
    for work, answer in zip(to_create, answers, strict=True):
        if isinstance(answer, dict):
            invoices[work.key] = answer
        elif isinstance(answer, UpstreamAmbiguous):
            work.wait = bc.confirm(claimed_at, attempt=True)
        elif answer.retryable:
            # Certainly not created (throttled or unavailable, not sent, or refused for now inside a batch).
            until = datetime.now(timezone.utc) + timedelta(seconds=throttled_wait(answer))
            work.wait = Wait(until, work.earlier, f"Business Central did not create it yet ({answer.code}); it is "
                                                  "tried again later",
                             attempt=answer.status is not None and answer.status not in NOT_RUN_STATUS)
        else:
            refused[work.key] = explain_refusal(answer.message)
    return invoices, refused


async def invoice_parts(rt: Runtime, message: InvoiceJobPart, owner: str | None = None) -> None:
    """`owner` is the queue message's id (the same for its `give_up`)."""
    store = await rt.store()
    job_id = message.job_id
    owner = owner or uuid.uuid4().hex
    parts, later, until = await unfinished_parts(store, job_id, message.part_indexes(), owner)
    if parts:
        waiting = await _invoice(rt, store, job_id, parts, owner)
        later += [w.index for w in waiting]
        times = [w.wait.until for w in waiting if w.wait] + ([until] if until else [])
        until = max(times) if times else None
    if later:
        seconds = ((until or datetime.now(timezone.utc)) - datetime.now(timezone.utc)).total_seconds()
        raise Deferred(seconds, f"{len(later)} invoice(s) of job {job_id} wait for Business Central",
                       InvoiceJobPart(jobId=job_id, parts=sorted(set(later))))


async def _invoice(rt: Runtime, store: Store, job_id: str, parts: list[PartWork], owner: str) -> list[PartWork]:
    """Each company's parts with that company's client, side by side. Returns the parts that
    wait for BC."""
    by_company: dict[str, list[PartWork]] = {}
    for work in parts:
        by_company.setdefault(company_of_part(rt, work.row), []).append(work)
    results = await asyncio.gather(*(_invoice_company(rt, store, job_id, rt.bc_for(company), works, owner)
                                     for company, works in by_company.items()), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [work for waiting in results for work in waiting]


async def _invoice_company(rt: Runtime, store: Store, job_id: str, bc: BcClient, parts: list[PartWork],
                           owner: str) -> list[PartWork]:
    """Read, resolve and claim (side by side), find or create, record: the parts of one company.
    Returns the parts that wait for BC."""
    resolver = Resolver(rt, store, bc)
    claimed_at = datetime.now(timezone.utc)
    # A first attempt uses the bookings its part carries; a retry reads them as they are now.
    carried = {w.key: snapshot_of(w.row) if w.earlier is None else None for w in parts}
    refs = [ref for work in parts if carried[work.key] is None for ref in refs_of(work.row)]

    async def bookings_and_items() -> tuple[dict[str, list[Booking | None]], dict]:
        found = dict(zip(map(tuple, refs), await _read(store, refs), strict=True))
        of_part = {w.key: carried[w.key] if carried[w.key] is not None else [found[tuple(ref)] for ref in refs_of(w.row)]
                   for w in parts}
        services = {b.service_id: b for bookings in of_part.values() for b in bookings if b and b.service_id}
        items = await resolver.items([(ServiceSource(serviceId=service_id,
                                                     displayName=(b.service_name or service_id)[:100],
                                                     defaultPrice=float(b.unit_price())), None)
                                      for service_id, b in services.items()])
        return of_part, items

    read, customers, claimed = await asyncio.gather(
        bookings_and_items(),
        resolver.customers([(CustomerSource(email=w.email, displayName=(w.row.get("CustomerName") or "")[:200] or None),
                             None) for w in parts]),
        claim_parts(store, parts, owner, claimed_at),
        return_exceptions=True)
    if isinstance(claimed, BaseException):
        raise claimed
    try:
        for result in (read, customers):
            if isinstance(result, BaseException):
                raise result
        of_part, items = read
        for work in claimed:
            sort_bookings(work, job_id, of_part[work.key])
        for work in [w for w in claimed if not w.mine]:
            await finish_part(store, work.row, "failed", errors=work.errors)
        parts = [w for w in claimed if w.mine]
    except Deferred as deferred:
        # The directory must wait for BC first; nothing was sent for these parts.
        retry_at = datetime.now(timezone.utc) + timedelta(seconds=deferred.seconds)
        for work in claimed:
            await park(store, work, Wait(retry_at, work.earlier, deferred.reason))
        return claimed
    except BaseException:
        await unclaim_parts(store, claimed)
        raise
    zone = rt.settings.time_zone
    today = datetime.now(ZoneInfo(zone)).date().isoformat()
    bodies, refused = {}, {}
    for work in parts:
        work.lines = [{"lineType": "Item", "itemId": items[b.service_id].bc_id,
                       "description": line_description(b, zone), "quantity": float(b.quantity()),
                       "unitPrice": float(b.unit_price())} for b in work.mine]
        # A billing run's invoice names its period first ("October 2026"), on a comment line.
        period = [{"lineType": "Comment", "description": work.row["Period"][:100]}] if work.row.get("Period") else []
        bodies[work.key] = {"customerId": customers[work.email].bc_id, "externalDocumentNumber": work.key,
                            "invoiceDate": work.row.get("InvoiceDate") or today}
        if work.dimensions:
            work.all_lines = numbered(period + work.lines)  # after the dimensions: see shared/flows/invoicing/drafts.py
            if work.earlier is None:  # before anything can exist in BC: a missing value fails the part at once
                try:
                    problem = await dimension_problem(rt, bc.company_id, work.dimensions)
                except UpstreamError as error:
                    until = datetime.now(timezone.utc) + timedelta(seconds=throttled_wait(error))
                    work.wait = Wait(until, None, f"the invoice dimensions could not be checked ({error.code})")
                    continue
                if problem:
                    refused[work.key] = problem
        else:
            bodies[work.key]["salesInvoiceLines"] = period + work.lines
    invoices, refusals = await find_or_create_invoices(
        bc, [w for w in parts if w.key not in refused and w.wait is None], bodies, claimed_at)
    refused |= refusals
    await complete_parts(store, bc, [w for w in parts if w.dimensions and w.key in invoices], invoices, refused,
                         claimed_at)
    for work in [w for w in parts if w.key in refused]:
        await release(store, job_id, refs_of(work.row), work.email)
        await finish_part(store, work.row, "failed", errors=work.errors + [
            {"bookingId": b.id, "message": _plain(refused[work.key])} for b in work.mine])
    waiting = [w for w in parts if w.wait]
    for work in waiting:
        await park(store, work, work.wait)
    done = [w for w in parts if w.key in invoices]
    links = {w.key: {"invoiceId": invoices[w.key]["id"], "invoiceNumber": invoices[w.key].get("number"),
                     "jobId": job_id, "date": invoices[w.key].get("invoiceDate") or today,
                     **({"companyId": bc.company_id} if bc.company_id != rt.settings.bc_company_id else {})}
             for w in done}
    recorded = await _record(store, job_id, done, links)
    finished = []
    for work in done:
        invoice = invoices[work.key]
        written = [b for b in work.mine if (b.id, work.email) in recorded]
        errors = work.errors + [{"bookingId": b.id, "message": "the booking was released before it was invoiced"}
                                for b in work.mine if (b.id, work.email) not in recorded]
        amount = invoice.get("totalAmountIncludingTax")
        lines_total = round(sum(line["quantity"] * line["unitPrice"] for line in work.lines), 2)
        if amount is None or (not amount and lines_total):
            # BC does not say whether a deep insert's answer shows the totals of its lines: an answer
            # without them gives the lines' own total (before tax).
            amount = lines_total
        finished.append(finished_entity(work.row, "succeeded", invoice, amount, [b.id for b in written], errors))
        log.info("draft invoice %s for job part %s", invoice.get("number"), work.key,
                 extra={"event": "invoice_created", "job_id": job_id, "part": work.index,
                        "invoice_id": invoice["id"], "lines": len(work.lines), "amount": amount})
    await store.write_batches(JOBS, [(UPDATE, entity, {"mode": "merge"}) for entity in finished])
    if rt.settings.write_back_to_bookings:
        await asyncio.gather(*(note_part(rt, store, w.row, [b for b in w.mine if (b.id, w.email) in recorded],
                                         links[w.key]) for w in done))
    return waiting


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


async def give_up(rt: Runtime, message: InvoiceJobPart, reason: str, owner: str | None = None) -> None:
    """The message's last attempt failed. For each unfinished part: if BC has its invoice after
    all, record it; if BC certainly has none (and cannot still be creating one), release the
    claims so the bookings are uninvoiced again. Otherwise keep the claims (releasing then could
    bill twice): reconciliation checks the part again on a later sync."""
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
        found: dict[str, list[dict]] = {}
        for company, company_keys in _keys_by_company(rt, unfinished, keys).items():
            found |= await rt.bc_for(company).invoices_by_external_numbers(company_keys)
    except UpstreamError as error:
        for _, row in unfinished:
            await _keep_for_check(store, row, f"{_plain(reason)} Business Central could not be checked ({error.code}); "
                                              "the bookings stay reserved until a sync confirms no invoice was made.")
        return
    recorded = [index for (index, _), key in zip(unfinished, keys, strict=True) if found.get(key)]
    if recorded:
        await invoice_parts(rt, InvoiceJobPart(jobId=message.job_id, parts=recorded), owner)
    now = datetime.now(timezone.utc)
    for (_, row), key in zip(unfinished, keys, strict=True):
        if found.get(key):
            continue
        since = pending_since(row)
        if since is not None and rt.bc_for(company_of_part(rt, row)).settled_at(since) > now:
            await _keep_for_check(store, row, f"{_plain(reason)} Business Central may still be creating the invoice; "
                                              "the bookings stay reserved until a sync confirms no invoice was made.")
            continue
        released = await release(store, message.job_id, refs_of(row), row["CustomerEmail"])
        await finish_part(store, row, "failed", errors=[{"bookingId": ref[1], "message": _plain(reason)}
                                                    for ref in _booking_ids(row)])
        log.error("invoice job part %s failed; %d bookings released", row["RowKey"], released,
                  extra={"event": "invoice_job_part_released", "job_id": message.job_id, "released": released})


def _keys_by_company(rt: Runtime, rows: list[tuple[int, dict]], keys: list[str]) -> dict[str, list[str]]:
    by_company: dict[str, list[str]] = {}
    for (_, row), key in zip(rows, keys, strict=True):
        by_company.setdefault(company_of_part(rt, row), []).append(key)
    return by_company


async def _keep_for_check(store: Store, row: dict, message: str) -> None:
    """Failed, with its claims kept for reconciliation to check, in one write: a part written
    failed without `NeedsCheck` (the process dying between two writes) would have its claims
    released as stale by the next sync, though BC may hold its invoice."""
    entity = finished_entity(row, "failed", errors=[{"bookingId": None, "message": message}]) | {"NeedsCheck": True}
    await store.update(JOBS, entity, etag=None)


def _booking_ids(row: dict) -> list[list[str]]:
    from shared.storage.store import decode_key

    return [[ref[0], decode_key(ref[1])] for ref in refs_of(row)]


def _plain(reason: str) -> str:
    return f"No invoice was made: {reason}"[:1000]
