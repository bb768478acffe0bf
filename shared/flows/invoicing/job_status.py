"""Invoicing jobs as people and clients see them: one job's status, invoices, errors and what
waits for Business Central, and the latest jobs (by hand, or billing runs).

A job is a header row (`job`) and one row per part (one BC draft each) in the `invoicejobs`
table, partition = the job id; `shared.flows.invoicing.jobs` makes them, `shared.flows.invoicing.worker` works them."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

from shared.upstream.bc import CONFIRMING
from shared.flows.invoicing.jobs import HEADER
from shared.storage.store import JOBS, Store


async def job_status(store: Store, job_id: str) -> dict | None:
    rows = await store.partition(JOBS, job_id)
    header = next((r for r in rows if r["RowKey"] == HEADER), None)
    if header is None or header.get("Status") == "rejected":
        return None
    parts = [r for r in rows if r["RowKey"].startswith("part-")]
    statuses = [p.get("Status") for p in parts]
    if header.get("Status") == "claiming" or not parts:
        status = "queued"
    elif all(s == "succeeded" for s in statuses):
        status = "succeeded"
    elif any(s in ("queued", "running", "waiting") for s in statuses):
        started = any(s != "queued" for s in statuses)  # a part taken by a worker is no longer queued
        status = "running" if started else "queued"
    elif any(s == "succeeded" for s in statuses):
        status = "partial"
    else:
        status = "failed"
    invoices, errors, waiting = [], [], []
    for part in sorted(parts, key=lambda p: p["RowKey"]):
        if part.get("Status") == "waiting":
            since = part.get("ConfirmSince") or None
            reason = f"{CONFIRMING}, since {since}" if since else part.get("Note") or "waiting for Business Central"
            waiting.append({"customerEmail": part.get("CustomerEmail"), "until": part.get("WaitUntil") or None,
                            "since": since, "reason": reason})
        if part.get("InvoiceId"):
            invoices.append({"customerEmail": part.get("CustomerEmail"), "invoiceId": part.get("InvoiceId"),
                             "invoiceNumber": part.get("InvoiceNumber"), "amount": part.get("Amount"),
                             "bookingIds": json.loads(part.get("BookingIds") or "[]"),
                             "companyId": part.get("CompanyId") or None, "writeBack": _write_back(part)})
        errors.extend(json.loads(part.get("Errors") or "[]"))
    try:
        request = json.loads(header.get("Request") or "{}")
    except ValueError:  # cut to fit the entity: what it asked for is not shown
        request = {}
    return {"jobId": job_id, "status": status, "bookingCount": int(header.get("BookingCount") or 0),
            "invoices": invoices, "errors": errors, "waiting": waiting, "request": request}


def _write_back(part: dict) -> dict | None:
    """What became of the invoice's note in its appointments (`shared.flows.invoicing.write_back`): None if
    none was written (WRITE_BACK_TO_BOOKINGS off, or not yet)."""
    try:
        kept = json.loads(part.get("WriteBack") or "null")
    except ValueError:  # cut to fit the entity: the count stays unknown
        return {"noted": 0, "notNoted": []}
    if not isinstance(kept, dict):
        return None
    return {"noted": int(kept.get("noted") or 0), "notNoted": list(kept.get("notNoted") or [])}


async def recent_jobs(store: Store, limit: int = 25) -> list[dict]:
    """The latest jobs, newest first, each as `job_status` reports it plus when it was made."""
    headers = await store.query(JOBS, f"RowKey eq '{HEADER}' and Status ne 'rejected'",
                                ["PartitionKey", "CreatedAt"])
    headers.sort(key=lambda r: r.get("CreatedAt") or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
    chosen = headers[:limit]
    statuses = await asyncio.gather(*(job_status(store, row["PartitionKey"]) for row in chosen))
    return [{**status, "createdAt": row.get("CreatedAt")} for row, status in zip(chosen, statuses, strict=True)
            if status is not None]
