"""Reconciliation with Business Central, run by every sync.

A draft invoice deleted in BC makes its bookings uninvoiced again; a posted invoice marks them
posted. BC's API shows a *released* draft with status `Open`, as it shows a posted invoice that
is not paid yet, and a released draft can still be reopened and deleted; the API publishes nothing
else that tells the two apart. So an `Open` invoice counts as posted only once its number is no
longer the draft's (posting gave it a posted number), or once it is `Paid`, `Canceled` or
`Corrective`, which only a posted invoice can be. An `Open` invoice with its draft's number
(released, or posted in a company whose posted invoices keep the draft's number) is followed on
every sync until then; if it disappears, its bookings are uninvoiced again. Job parts whose last
attempt could not ask BC whether their invoice exists are checked again here, so their bookings
end up either recorded or released, never stuck."""

from __future__ import annotations

import logging

import asyncio
from datetime import datetime, timedelta, timezone

from shared.flows.bookings import Booking
from shared.upstream.errors import UpstreamError
from shared.flows.invoicing.claims import _apply, release
from shared.flows.invoicing.jobs import HEADER, external_document_number, part_key, refs_of
from shared.runtime import Runtime
from shared.settings import SettingsError
from shared.flows.messages import Deferred, InvoiceJobPart, encode
from shared.storage.store import BOOKINGS, INVOICE_QUEUE, JOBS, Store

log = logging.getLogger(__name__)

POSTED_ONLY_STATUSES = {"Paid", "Canceled", "Corrective"}
"""Statuses only a posted invoice has (SalesInvoiceAggregator: an unposted Sales Header is
`Draft`, `In Review` or, released, `Open`)."""


def is_posted(current: dict, draft_number: str | None) -> bool:
    """Whether BC's invoice is certainly posted, given the number the app's draft had."""
    status = current.get("status")
    if status in POSTED_ONLY_STATUSES:
        return True
    return status == "Open" and bool(draft_number) and current.get("number") != draft_number


async def reconcile_invoices(rt: Runtime, store: Store) -> dict:
    """Every company's drafts the bookings know, checked in that company."""
    default = rt.settings.bc_company_id
    if not default and not rt.settings.business_companies:
        return {"reconcileSkipped": "Setting BC_COMPANY_ID is required but not set."}
    rows = await store.query(BOOKINGS, "HasInvoices eq true and InvoiceState ne 'posted'")
    bookings = [Booking.from_entity(row) for row in rows]
    by_company: dict[str, set[str]] = {}
    for booking in bookings:
        for invoice in booking.invoices.values():
            if not invoice.get("posted"):
                by_company.setdefault(invoice.get("companyId") or default, set()).add(invoice["invoiceId"])
    open_ids = sorted(i for ids in by_company.values() for i in ids)
    counts = {"invoicesChecked": len(open_ids), "bookingsReleased": 0, "bookingsPosted": 0, "partsRechecked": 0}
    if open_ids:
        try:
            states: dict[str, dict | None] = {}
            for company, ids in by_company.items():
                if company is None:
                    raise SettingsError("Setting BC_COMPANY_ID is required but not set.")
                states |= await rt.bc_for(company).invoices_by_id(sorted(ids))
        except SettingsError as error:
            return counts | {"reconcileSkipped": str(error)}
        except UpstreamError as error:
            log.warning("reconciliation skipped: %s", error, extra={"event": "reconcile_failed"})
            return counts | {"reconcileError": str(error)}

        def follow(booking: Booking) -> str | None:
            changed = False
            for email, invoice in list(booking.invoices.items()):
                if invoice.get("posted") or invoice["invoiceId"] not in states:
                    continue
                current = states[invoice["invoiceId"]]
                if current is None:
                    del booking.invoices[email]
                    changed = True
                elif is_posted(current, invoice.get("invoiceNumber")):
                    invoice["posted"] = True
                    invoice["postedNumber"] = current.get("number")
                    changed = True
            return None if changed else "unchanged"

        before = {b.id: b.invoice_state() for b in bookings}
        written, _ = await _apply(store, bookings, follow)
        for booking in written:
            state = booking.invoice_state().value
            if state == "none" and before[booking.id].value != "none":
                counts["bookingsReleased"] += 1
            elif state == "posted":
                counts["bookingsPosted"] += 1
    counts["partsRechecked"] = await _recheck_parts(rt, store)
    counts |= await recover_stale_claims(rt, store)
    return counts


async def _recheck_parts(rt: Runtime, store: Store) -> int:
    """Parts whose bookings stayed reserved because BC could not say whether their invoice
    exists: record the invoice if it does; release the bookings once BC certainly has none and
    cannot still be creating one."""
    from shared.flows.invoicing.parts import company_of_part, pending_since
    from shared.flows.invoicing.worker import invoice_parts

    checked = 0
    now = datetime.now(timezone.utc)
    for row in await store.query(JOBS, "NeedsCheck eq true"):
        job_id, part = row["PartitionKey"], int(row["RowKey"].split("-")[1])
        key = external_document_number(job_id, part)
        since = pending_since(row)
        try:
            bc = rt.bc_for(company_of_part(rt, row))
            found = (await bc.invoices_by_external_numbers([key]))[key]
        except (UpstreamError, SettingsError):
            continue
        if found:
            await store.update(JOBS, {"PartitionKey": job_id, "RowKey": row["RowKey"], "Status": "queued",
                                      "NeedsCheck": False}, etag=None)
            try:
                await invoice_parts(rt, InvoiceJobPart(jobId=job_id, parts=[part]))
            except Deferred as deferred:
                await store.send(INVOICE_QUEUE, encode(deferred.message or InvoiceJobPart(jobId=job_id, parts=[part])),
                                 visibility_timeout=max(1, int(deferred.seconds)))
        elif since is not None and bc.settled_at(since) > now:
            continue  # BC may still be creating it: check on a later sync
        else:
            await release(store, job_id, refs_of(row), row["CustomerEmail"])
            await store.update(JOBS, {"PartitionKey": job_id, "RowKey": row["RowKey"], "NeedsCheck": False},
                               etag=None)
        checked += 1
    return checked


STALE_CLAIMING = timedelta(minutes=15)
STALE_PART = timedelta(minutes=30)


async def recover_stale_claims(rt: Runtime, store: Store, now: datetime | None = None) -> dict:
    """Claims must end: a job that crashed while claiming gives its claims back; a part whose
    message was lost (queued or running for too long) is queued again (the worker is idempotent);
    a failed part's leftover claims are released."""
    now = now or datetime.now(timezone.utc)
    rows = await store.query(BOOKINGS, "HasClaims eq true")
    claimed = [Booking.from_entity(row) for row in rows]
    jobs = sorted({job for booking in claimed for job in booking.claims.values()})
    headers = await asyncio.gather(*(store.get(JOBS, job, HEADER) for job in jobs))
    dead: set[str] = set()
    requeued = 0
    for job, header in zip(jobs, headers, strict=True):
        status = header.get("Status") if header else None
        created = header.get("CreatedAt") if header else None
        if header is None or status == "rejected" or (status == "claiming" and created and now - created > STALE_CLAIMING):
            dead.add(job)
            continue
        if status != "queued":
            continue
        for part in await store.query(JOBS, "PartitionKey eq @pk and Status ne 'succeeded'", parameters={"pk": job}):
            if not part["RowKey"].startswith("part-"):
                continue
            changed = part.metadata.get("timestamp")
            if part.get("Status") == "failed" and not part.get("NeedsCheck"):
                await release(store, job, refs_of(part), part["CustomerEmail"])
            elif part.get("Status") in ("queued", "running", "waiting") and changed and now - changed > STALE_PART:
                await store.send(INVOICE_QUEUE, encode(InvoiceJobPart(jobId=job, parts=[int(part["RowKey"][5:])])))
                await store.update(JOBS, {"PartitionKey": job, "RowKey": part_key(int(part["RowKey"][5:])),
                                          "Requeued": now}, etag=None)
                requeued += 1
    released = 0
    if dead:
        def drop(booking: Booking) -> str | None:
            mine = [email for email, job in booking.claims.items() if job in dead]
            for email in mine:
                del booking.claims[email]
            return None if mine else "unchanged"

        written, _ = await _apply(store, [b for b in claimed if dead & set(b.claims.values())], drop)
        released = len(written)
        for job, header in zip(jobs, headers, strict=True):
            if job in dead and header is not None:
                await store.update(JOBS, {"PartitionKey": job, "RowKey": HEADER, "Status": "rejected"}, etag=None)
    return {"staleClaimsReleased": released, "partsRequeued": requeued}
