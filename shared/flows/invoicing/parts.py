"""A job's parts in the `jobs` table, as the invoice worker takes, parks and finishes them.

A part is one customer's draft invoice. The worker takes the unfinished parts of its message
(ETag-guarded, as read: two copies of a message never ask BC for the same invoice at once),
records since when a create may have been sent (`PendingSince`), parks a part that must wait for
BC (`waiting`, `WaitUntil`), and finishes it (`succeeded` or `failed`, with the errors a person
reads)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError

from shared.flows.bookings import Booking
from shared.flows.invoicing.dimensions import parse_dimension_set
from shared.flows.invoicing.jobs import external_document_number, part_key, refs_of
from shared.flows.messages import PermanentFailure
from shared.runtime import Runtime
from shared.storage.store import JOBS, UPDATE, Store, fit_string, to_json
from shared.upstream.bc import Wait

log = logging.getLogger(__name__)

RUNNING_STALE_AFTER = timedelta(minutes=10)
"""Longer than a function may run (host.json functionTimeout)."""


def stored_time(value) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def pending_since(row: dict) -> datetime | None:
    """Since when a create for this part may have been sent (None: never). Rows claimed before
    `PendingSince` existed carry only `RunningSince`, which is no later."""
    value = row.get("PendingSince")
    if isinstance(value, str):
        return datetime.fromisoformat(value) if value else None
    return row.get("RunningSince")


@dataclass
class PartWork:
    index: int
    row: dict
    key: str
    email: str
    earlier: datetime | None
    """An earlier attempt may have sent this part's invoice since then: it must be looked up, and
    may be created only once BC cannot still be running that attempt."""
    mine: list[Booking] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    etag: str | None = None
    wait: Wait | None = None
    """Set for a part that must wait for BC."""
    all_lines: list[dict] = field(default_factory=list)
    """A draft made in steps (invoice dimensions): every line as sent, numbered."""

    @property
    def dimensions(self) -> dict[str, str]:
        """The invoice dimension values of the part's business (`INVOICE_DIMENSIONS`)."""
        return parse_dimension_set(self.row.get("Dimensions"))
    confirming: datetime | None = None
    """Since when an earlier create's outcome is unknown (BC is being asked to confirm it)."""

    @property
    def attempts(self) -> int:
        """Attempts that ended without a known outcome so far (see `Wait.attempt`)."""
        return int(self.row.get("Attempts") or 0)


async def unfinished_parts(store: Store, job_id: str, indexes: list[int], owner: str
                      ) -> tuple[list[PartWork], list[int], datetime | None]:
    """The unfinished parts this invocation could take; and the parts that wait for BC (and until
    when), for the message to come back to."""
    if indexes and indexes[-1] - indexes[0] < 2 * len(indexes):
        # A job's messages name runs of consecutive parts: one range query instead of many keys.
        rows = await store.get_range(JOBS, job_id, part_key(indexes[0]), part_key(indexes[-1]))
    else:
        rows = await store.get_many(JOBS, job_id, [part_key(index) for index in indexes])
    if not any(part_key(index) in rows for index in indexes):
        raise PermanentFailure(f"invoicing job {job_id} has no part {', '.join(map(str, indexes[:10]))}")
    now = datetime.now(timezone.utc)
    takeable, later, until = [], [], None
    for index in indexes:
        row = rows.get(part_key(index))
        if row is None or row.get("Status") in ("succeeded", "failed"):
            continue
        since = row.get("RunningSince")
        if row.get("Status") == "running" and row.get("Owner") not in (owner, None, "") and since \
                and now - since < RUNNING_STALE_AFTER:
            continue  # another copy of this message is working on it
        wait_until = row.get("WaitUntil")
        if row.get("Status") == "waiting" and wait_until and datetime.fromisoformat(wait_until) > now:
            later.append(index)
            until = max(until or now, datetime.fromisoformat(wait_until))
            continue
        takeable.append(PartWork(index, row, external_document_number(job_id, index), row["CustomerEmail"],
                                 pending_since(row), etag=row.metadata["etag"],
                                 confirming=stored_time(row.get("ConfirmSince"))))
    return takeable, later, until


def sort_bookings(work: PartWork, job_id: str, found: list[Booking | None]) -> None:
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


async def claim_parts(store: Store, works: list[PartWork], owner: str, now: datetime) -> list[PartWork]:
    """Take the parts for this message (ETag-guarded, as read), so two copies of a message never
    ask BC for the same invoice at once; a part someone else changed meanwhile is left to them.
    `owner` is the queue message id, so the host's retry of a crashed message takes its own parts
    back. The claim marks each part as possibly sent to BC from now on."""
    def operation(work: PartWork) -> tuple:
        return (UPDATE, {"PartitionKey": work.row["PartitionKey"], "RowKey": work.row["RowKey"], "Status": "running",
                         "Owner": owner, "RunningSince": now, "PendingSince": now.isoformat(), "WaitUntil": "",
                         "Note": ""},
                {"mode": "merge", "etag": work.etag, "match_condition": MatchConditions.IfNotModified})

    if not works:
        return []
    try:
        await store.transact(JOBS, [operation(work) for work in works])
        return works
    except (TableTransactionError, ResourceModifiedError, ResourceNotFoundError):
        taken = []
        for work in works:
            try:
                await store.update(JOBS, operation(work)[1], etag=work.etag)
                taken.append(work)
            except (ResourceModifiedError, ResourceNotFoundError):
                continue
        return taken


async def unclaim_parts(store: Store, works: list[PartWork]) -> None:
    """Nothing was sent for these claimed parts after all: whoever takes them next need not wait
    for BC on our account (the claim's `PendingSince` goes back to what it was)."""
    for work in works:
        try:
            await store.update(JOBS, {"PartitionKey": work.row["PartitionKey"], "RowKey": work.row["RowKey"],
                                      "PendingSince": work.earlier.isoformat() if work.earlier else ""}, etag=None)
        except Exception:  # noqa: BLE001 - best effort: the claim stays, and a retry waits a little longer
            log.warning("could not give back the claim of job part %s", work.key,
                        extra={"event": "invoice_job_part_unclaim_failed", "job_id": work.row["PartitionKey"]})


async def park(store: Store, work: PartWork, wait: Wait) -> None:
    """The part waits for BC: still running as far as the job is concerned, with a note why."""
    work.wait = wait
    log.warning("invoice job part %s waits until %s: %s", work.key, wait.until.isoformat(), wait.reason,
                extra={"event": "invoice_job_part_waiting", "job_id": work.row["PartitionKey"], "part": work.index})
    await store.update(JOBS, {"PartitionKey": work.row["PartitionKey"], "RowKey": work.row["RowKey"],
                              "Status": "waiting", "Owner": "", "WaitUntil": wait.until.isoformat(),
                              "PendingSince": wait.pending_since.isoformat() if wait.pending_since else "",
                              "ConfirmSince": wait.confirming_since.isoformat() if wait.confirming_since else "",
                              "Attempts": work.attempts + (1 if wait.attempt else 0), "Note": wait.reason[:1000]},
                       etag=None)


def finished_entity(row: dict, status: str, invoice: dict | None = None, amount: float | None = None,
              booking_ids: list[str] | None = None, errors: list[dict] | None = None) -> dict:
    entity = {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"], "Status": status,
              "Errors": fit_string(to_json(errors or []), 30_000), "FinishedAt": datetime.now(timezone.utc)}
    if invoice:
        entity |= {"InvoiceId": invoice["id"], "InvoiceNumber": invoice.get("number") or "",
                   "Amount": float(amount or 0), "BookingIds": fit_string(to_json(booking_ids or []), 30_000)}
    log.log(logging.INFO if status == "succeeded" else logging.ERROR, "invoice job part %s %s", row["RowKey"], status,
            extra={"event": "invoice_job_part_" + status, "job_id": row["PartitionKey"], "part": row["RowKey"],
                   "errors": len(errors or []),
                   # The first error, shortened: what the workbook groups failed parts by.
                   "reason": (errors[0].get("message") or "")[:120] if errors else ""})
    return entity


async def finish_part(store: Store, row: dict, status: str, errors: list[dict] | None = None) -> None:
    await store.update(JOBS, finished_entity(row, status, errors=errors), etag=None)


def company_of_part(rt: Runtime, row: dict) -> str:
    """The company a job part invoices into (parts made before companies per business: BC_COMPANY_ID's)."""
    company = row.get("CompanyId") or rt.settings.bc_company_id
    if not company:
        rt.settings.require("bc_company_id")
    return company
