"""The invoice worker: one job part → one BC draft sales invoice for one customer.

Order of work, and why it is safe to repeat from any point:
1. the part already succeeded → nothing to do (duplicate message);
2. customer and items are resolved through the directory (created from templates if missing);
3. BC is asked for an invoice with the part's deterministic `externalDocumentNumber`; only if
   none exists is one created (all lines by deep insert). A create whose answer was lost is
   looked up again, never blindly repeated;
4. the invoice is recorded on every booking (ETag-guarded), then on the part.
A crash anywhere before 4 ends in the retry finding the invoice in step 3."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from shared.bc import BcClient
from shared.bookings import Booking
from shared.directory import Resolver
from shared.http import UpstreamAmbiguous, UpstreamError
from shared.invoicing import (_apply, _read, external_document_number, line_description, part_key, refs_of,
                              release)
from shared.messages import CustomerSource, InvoiceJobPart, PermanentFailure, ServiceSource
from shared.runtime import Runtime
from shared.store import JOBS, Store, fit_string, to_json

log = logging.getLogger(__name__)

CREATE_ATTEMPTS = 4
MARKER = "Invoiced: Business Central draft invoice {number} ({date})"


class PartGone(PermanentFailure):
    pass


async def _part_row(store: Store, message: InvoiceJobPart) -> dict:
    row = await store.get(JOBS, message.job_id, part_key(message.part))
    if row is None:
        raise PartGone(f"invoicing job {message.job_id} has no part {message.part}")
    return row


async def find_or_create_invoice(bc: BcClient, key: str, fields: dict) -> dict:
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        existing = await bc.invoices_by_external_number(key)
        if existing:
            return existing[0]
        try:
            return await bc.create("salesInvoices", fields)
        except UpstreamAmbiguous:
            if attempt == CREATE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def invoice_part(rt: Runtime, message: InvoiceJobPart) -> None:
    store = await rt.store()
    row = await _part_row(store, message)
    if row.get("Status") in ("succeeded", "failed"):
        return
    job_id, email = message.job_id, row["CustomerEmail"]
    key = external_document_number(job_id, message.part)
    context = {"job_id": job_id, "part": message.part}
    await store.update(JOBS, {"PartitionKey": job_id, "RowKey": row["RowKey"], "Status": "running"}, etag=None)

    refs = refs_of(row)
    bookings = [b for b in await _read(store, refs) if b is not None]
    errors: list[dict] = []
    mine: list[Booking] = []
    for booking in bookings:
        recorded = booking.invoices.get(email, {})
        if booking.claims.get(email) == job_id or recorded.get("jobId") == job_id:
            mine.append(booking)
        else:
            errors.append({"bookingId": booking.id, "message": "the booking was released before it was invoiced"})
    missing = len(refs) - len(bookings)
    if missing:
        errors.append({"bookingId": None, "message": f"{missing} booking(s) no longer exist"})
    if not mine:
        await _finish(store, row, "failed", errors=errors)
        return

    resolver = Resolver(rt, store, rt.bc)
    customer = await resolver.customer(CustomerSource(email=email, displayName=row.get("CustomerName") or None))
    services = {b.service_id: b for b in mine}
    items = dict(zip(services, await asyncio.gather(*(
        resolver.item(ServiceSource(serviceId=service_id, displayName=(b.service_name or service_id)[:100],
                                    defaultPrice=float(b.unit_price())))
        for service_id, b in services.items())), strict=False))
    zone = rt.settings.time_zone
    today = datetime.now(ZoneInfo(zone)).date().isoformat()
    lines = [{"lineType": "Item", "itemId": items[b.service_id].bc_id, "description": line_description(b, zone),
              "quantity": float(b.quantity()), "unitPrice": float(b.unit_price())}
             for b in sorted(mine, key=lambda b: (b.start, b.id))]
    invoice = await find_or_create_invoice(rt.bc, key, {
        "customerId": customer.bc_id, "externalDocumentNumber": key, "invoiceDate": today,
        "salesInvoiceLines": lines})
    link = {"invoiceId": invoice["id"], "invoiceNumber": invoice.get("number"), "jobId": job_id,
            "date": invoice.get("invoiceDate") or today}
    log.info("draft invoice %s for job part %s", invoice.get("number"), key,
             extra={"event": "invoice_created", "invoice_id": invoice["id"], "lines": len(lines), **context})

    def record(booking: Booking) -> str | None:
        if booking.invoices.get(email, {}).get("jobId") == job_id:
            return None
        if booking.claims.get(email) != job_id:
            return "the booking was released before it was invoiced"
        booking.invoices[email] = link
        del booking.claims[email]
        return None

    written, problems = await _apply(store, mine, record)
    errors += [{"bookingId": ident, "message": problem} for ident, problem in problems.items()]
    amount = invoice.get("totalAmountIncludingTax")
    if amount is None:
        amount = round(sum(line["quantity"] * line["unitPrice"] for line in lines), 2)
    await _finish(store, row, "succeeded", invoice=invoice, amount=amount,
                  booking_ids=[b.id for b in written], errors=errors)
    if rt.settings.write_back_to_bookings:
        await write_back(rt, written, link)


async def _finish(store: Store, row: dict, status: str, invoice: dict | None = None, amount: float | None = None,
                  booking_ids: list[str] | None = None, errors: list[dict] | None = None) -> None:
    entity = {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"], "Status": status,
              "Errors": fit_string(to_json(errors or []), 30_000), "FinishedAt": datetime.now(timezone.utc)}
    if invoice:
        entity |= {"InvoiceId": invoice["id"], "InvoiceNumber": invoice.get("number") or "",
                   "Amount": float(amount or 0), "BookingIds": fit_string(to_json(booking_ids or []), 30_000)}
    await store.update(JOBS, entity, etag=None)
    log.log(logging.INFO if status == "succeeded" else logging.ERROR, "invoice job part %s %s", row["RowKey"], status,
            extra={"event": "invoice_job_part_" + status, "job_id": row["PartitionKey"], "part": row["RowKey"],
                   "errors": len(errors or [])})


async def give_up(rt: Runtime, message: InvoiceJobPart, reason: str) -> None:
    """The part's last attempt failed. If BC has its invoice after all, record it; otherwise
    release the claims so the bookings are uninvoiced again. If BC cannot be asked, keep the
    claims: releasing then could bill twice; reconciliation checks the part again later."""
    store = await rt.store()
    row = await store.get(JOBS, message.job_id, part_key(message.part))
    if row is None or row.get("Status") == "succeeded":
        return
    key = external_document_number(message.job_id, message.part)
    try:
        found = await rt.bc.invoices_by_external_number(key)
    except UpstreamError as error:
        await _finish(store, row, "failed", errors=[{"bookingId": None, "message": f"{_plain(reason)} "
                      f"Business Central could not be checked ({error.code}); the bookings stay reserved "
                      "until the next sync confirms no invoice was made."}])
        await store.update(JOBS, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"],
                                  "NeedsCheck": True}, etag=None)
        return
    if found:
        await invoice_part(rt, message)
        return
    released = await release(store, message.job_id, refs_of(row), row["CustomerEmail"])
    errors = [{"bookingId": ref[1], "message": _plain(reason)} for ref in refs_of(row)]
    await _finish(store, row, "failed", errors=errors)
    log.error("invoice job part %s failed; %d bookings released", row["RowKey"], released,
              extra={"event": "invoice_job_part_released", "job_id": message.job_id, "released": released})


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

