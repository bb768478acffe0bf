"""A sync run: fanned out per business, each business's part under its lease, and the results.

A run fans out: the timer (or a request) queues one message per business, and the queue workers
sync the businesses on as many instances as the plan gives, each business under its own lease, so
one slow or failing business delays no other. A business's part reads its customers and services
(`handover`) and its calendar window (`calendar`) side by side, then pushes BC's customers and
items into the business (`shared/flows/directory/push.py`).

Each business's latest result goes to one blob (`sync/businesses/<id>.json`), overwritten by its
next sync; `GET /api/status` adds them up (`last_sync`). The history of runs is in the logs
(`sync_business_finished`, and `sync_run_finished` once the run's last part is done)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import datetime, timezone

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from shared.flows.directory.push import push_directory
from shared.flows.messages import BusinessSync, InvoiceReconciliation, SyncRequest, encode
from shared.flows.sync.calendar import CalendarRead, slice_length, sync_calendar, window
from shared.flows.sync.handover import BusinessPull, DirectoryQueue, pull_directory
from shared.runtime import Runtime
from shared.storage import leases
from shared.storage.store import (
    BOOKINGS,
    SYNC_BUSINESS_QUEUE,
    SYNC_QUEUE,
    Store,
    StoreStats,
    encode_key,
    writes_of_this_task,
)

log = logging.getLogger(__name__)

SYNC_LEASE = "sync"
"""Each business's lease is `sync/<business>`: one sync of a business at a time, on any instance."""
RECONCILE_LEASE = "reconcile"
LAST_RUN = "sync/last-run.json"
"""The latest run: its id, trigger, start and businesses (written when it fans out)."""
BUSINESS_RESULT = "sync/businesses/{business}.json"
"""Each business's latest result (counts, errors, outcome), overwritten by its next sync."""
RECONCILED = "sync/reconciled.json"
RUN_FINISHED = "sync/finished.json"
"""The id of the latest run whose summary was logged (so it is logged once)."""

BUSINESSES_AT_ONCE = 4
"""Businesses one instance syncs at a time. The host hands an instance up to 16 messages at once
(`host.json` `batchSize`); a business's sync holds one slice's rows per slice it reads, so four at
a time keep an instance's memory that of four businesses, whatever the chain's size."""
MAX_ERRORS = 40
"""A business's result keeps this many error messages (the logs have them all)."""


def _result_blob(business_id: str) -> str:
    return BUSINESS_RESULT.format(business=encode_key(business_id))


async def start_run(rt: Runtime, trigger: str, requested_at: datetime | None = None) -> str:
    """Fan a sync run out: one `BusinessSync` message per business, and one reconciliation with
    BC, which any instance may take. Returns the run id."""
    settings = rt.settings
    settings.require("business_ids")
    store = await rt.store()
    started = datetime.now(timezone.utc)
    run_id = f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    requested = requested_at or started
    record = {"runId": run_id, "trigger": trigger, "startedAt": _iso(started), "requestedAt": _iso(requested),
              "businesses": settings.business_ids}
    await store.write_blob(LAST_RUN, json.dumps(record).encode(), "application/json")
    await store.send_many(SYNC_BUSINESS_QUEUE, [
        *(encode(BusinessSync(runId=run_id, businessId=business, trigger=trigger, requestedAt=requested))
          for business in settings.business_ids),
        encode(InvoiceReconciliation(runId=run_id))])
    log.info("sync run %s started for %d businesses", run_id, len(settings.business_ids),
             extra={"event": "sync_run_started", "run_id": run_id, "trigger": trigger,
                    "businesses": len(settings.business_ids)})
    return run_id


async def sync_business(rt: Runtime, request: BusinessSync, now: datetime | None = None) -> dict | None:
    """One business's part of a run, under the business's lease: its customers and services,
    its calendar slice by slice, then the push from BC. Returns its result (also kept for health
    in `sync/businesses/<id>.json`); the latest result if a sync that started after the request
    covers it; None when another sync of the business holds its lease."""
    store = await rt.store()
    business = request.business_id
    async with rt.gate("business syncs", BUSINESSES_AT_ONCE):
        latest = await business_result(store, business)
        if _covers(latest, request.requested_at):
            log.info("sync of a business already covered by a later one",
                     extra={"event": "sync_request_covered", "business_id": business, "run_id": request.run_id})
            await _finish_run(store)
            return latest
        last_fetched = (latest or {}).get("counts", {}).get("fetched")
        return await _sync_business(rt, store, request, now, last_fetched)


async def _sync_business(rt: Runtime, store: Store, request: BusinessSync, now: datetime | None,
                         last_fetched: int | None) -> dict | None:
    settings, business = rt.settings, request.business_id
    lease = await leases.acquire(store, f"{SYNC_LEASE}/{encode_key(business)}")
    if lease is None:
        log.info("sync of a business skipped: another run is syncing it",
                 extra={"event": "sync_skipped", "business_id": business, "run_id": request.run_id})
        return None
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    start, end = window(settings, now or started)
    read = CalendarRead(business, start, end, slice_length(start, end, last_fetched))
    pull = BusinessPull(business)
    upserts = DirectoryQueue(rt, store, request.run_id, business)
    outcome, counts, errors = "succeeded", {}, []
    writes = StoreStats()
    writes_of_this_task.set(writes)
    try:
        try:
            await asyncio.gather(pull_directory(rt, pull, upserts), sync_calendar(rt, store, read))
            await upserts.appointment_customers(read.customer_sources())
            await upserts.finish()
        except BaseException:
            await upserts.abandon()
            raise
        pushed = await push_directory(rt, store, [pull])
        push = pushed.get(business)
        counts = read.counts.__dict__ | {"complete": read.complete, "confirmedById": read.confirmed,
                                         "customersQueued": upserts.customers, "itemsQueued": upserts.items,
                                         "bookingWrites": writes.by_table.get(BOOKINGS, 0)}
        if push is not None:
            counts |= {"push": push.counts(), "customersPushed": push.customers.created,
                       "servicesPushed": push.services.created,
                       "pushUpdated": push.customers.updated + push.services.updated,
                       "pushFailed": push.customers.failed + push.services.failed}
        # The same trouble (no access to the business…) met by every slice is said once.
        errors = list(dict.fromkeys([*read.errors, *pull.errors, *(push.errors if push else [])]))[:MAX_ERRORS]
        if not read.complete and not read.counts.fetched:
            outcome = "failed"
        elif errors or not read.complete:
            outcome = "partial"
    except Exception as error:
        outcome = "failed"
        errors.append(f"sync failed: {error}")
        log.exception("sync of a business failed", extra={"event": "sync_run_failed", "run_id": request.run_id,
                                                          "business_id": business})
    finally:
        counts["seconds"] = round(time.monotonic() - clock, 3)
        counts["tableWrites"] = writes.table_writes
        result = {"runId": request.run_id, "trigger": request.trigger, "businessId": business,
                  "startedAt": _iso(started), "at": _iso(datetime.now(timezone.utc)), "outcome": outcome,
                  "counts": counts, "errors": errors}
        try:
            await store.write_blob(_result_blob(business), json.dumps(result).encode(), "application/json")
        finally:
            await leases.release(store, lease)
    flat = {f"count_{k}": v for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log.info("sync of %s %s", business, outcome,
             extra={"event": "sync_business_finished", "run_id": request.run_id, "business_id": business,
                    "outcome": outcome, **flat})
    await _finish_run(store)
    return result


async def reconcile_run(rt: Runtime, request: InvoiceReconciliation) -> dict | None:
    """The run's reconciliation with BC, under its own lease (None: another is running); it also
    takes over a billing run that died."""
    from shared.flows.invoicing.billing import resume_stale_run
    from shared.flows.invoicing.reconcile import reconcile_invoices

    store = await rt.store()
    lease = await leases.acquire(store, RECONCILE_LEASE)
    if lease is None:
        return None
    try:
        counts = await reconcile_invoices(rt, store)
        resumed = await resume_stale_run(rt)
        if resumed is not None:
            counts["billingRunResumed"] = resumed.get("period")
        result = {"runId": request.run_id, "at": _iso(datetime.now(timezone.utc)), "counts": counts}
        await store.write_blob(RECONCILED, json.dumps(result).encode(), "application/json")
    finally:
        await leases.release(store, lease)
    await _finish_run(store)
    return result


async def _finish_run(store: Store) -> None:
    """Whoever completes the latest run's last part logs the run's summary, once
    (`sync_run_finished`)."""
    summary = await last_sync(store)
    if summary is None or summary["pending"]:
        return
    run_id = summary["runId"]
    if not await _claim_finish(store, run_id):
        return
    counts = summary["counts"]
    flat = {f"count_{k}": v for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log.info("sync run %s %s", run_id, summary["outcome"],
             extra={"event": "sync_run_finished", "run_id": run_id, "outcome": summary["outcome"],
                    "trigger": summary["trigger"], **flat})


async def _claim_finish(store: Store, run_id: str) -> bool:
    """Record that `run_id`'s summary is being logged; False if another worker did (ETags)."""
    blob = store.blob(RUN_FINISHED)
    try:
        download = await blob.download_blob()
        if json.loads(await download.readall()).get("runId") == run_id:
            return False
        condition = {"overwrite": True, "etag": download.properties.etag,
                     "match_condition": MatchConditions.IfNotModified}
    except ResourceNotFoundError:
        condition = {"overwrite": False}
    try:
        await blob.upload_blob(json.dumps({"runId": run_id}).encode(), **condition)
    except (ResourceExistsError, ResourceModifiedError):
        return False
    return True


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def _read_json(store: Store, path: str) -> dict | None:
    content = await store.read_blob(path)
    return json.loads(content) if content else None


def _covers(result: dict | None, requested_at: datetime) -> bool:
    """Whether a business's result comes from a sync that started after `requested_at`."""
    return result is not None and datetime.fromisoformat(result["startedAt"]) > requested_at


async def last_run(store: Store) -> dict | None:
    """The latest run's record: id, trigger, start and businesses."""
    return await _read_json(store, LAST_RUN)


async def business_result(store: Store, business_id: str) -> dict | None:
    """A business's latest sync result."""
    return await _read_json(store, _result_blob(business_id))


SUMMED = ("fetched", "created", "updated", "unchanged", "cancelled", "invalid", "confirmedById", "customersQueued",
          "itemsQueued", "bookingWrites", "tableWrites", "customersPushed", "servicesPushed", "pushUpdated", "pushFailed")


async def last_sync(store: Store) -> dict | None:
    """The latest run as `GET /api/status` reports it: every business's latest result, with
    totals, and the run's reconciliation. Businesses not synced since the run began are listed
    in `pending`."""
    run = await last_run(store)
    if run is None:
        return None
    businesses = run.get("businesses") or []
    results = await asyncio.gather(*(business_result(store, b) for b in businesses), _read_json(store, RECONCILED))
    reconciled, results = results[-1], dict(zip(businesses, results[:-1], strict=True))
    totals: dict = dict.fromkeys(SUMMED, 0)
    per_business, errors, outcomes, pending, finished = {}, [], [], [], []
    for business, result in results.items():
        if result is None or datetime.fromisoformat(result["at"]) < datetime.fromisoformat(run["startedAt"]):
            pending.append(business)  # not synced since the run began (a sync that was running then counts)
        if result is None:
            per_business[business] = {"outcome": "pending"}
            continue
        counts = result["counts"]
        per_business[business] = counts | {"outcome": result["outcome"], "at": result["at"], "runId": result["runId"]}
        outcomes.append(result["outcome"])
        finished.append(datetime.fromisoformat(result["at"]))
        for name in SUMMED:
            totals[name] += counts.get(name, 0)
        errors += [{"businessId": business, "message": message} for message in result["errors"]]
    if not outcomes:
        return None
    if all(outcome == "failed" for outcome in outcomes):
        outcome = "failed"
    elif any(outcome != "succeeded" for outcome in outcomes):
        outcome = "partial"
    else:
        outcome = "succeeded"
    if reconciled is not None:
        totals |= reconciled["counts"]
    at = max(finished)
    seconds = (at - datetime.fromisoformat(run["startedAt"])).total_seconds()
    totals |= {"businesses": per_business, "seconds": round(max(seconds, 0.0), 3)}
    return {"runId": run["runId"], "trigger": run["trigger"], "startedAt": run["startedAt"], "at": _iso(at),
            "outcome": outcome, "counts": totals, "errors": errors, "pending": pending}


async def queue_sync(store: Store, reason: str) -> None:
    """Queue a sync run soon (`POST /api/sync`, the setup page's "Sync now")."""
    await store.send(SYNC_QUEUE, encode(SyncRequest(reason=reason, requestedAt=datetime.now(timezone.utc))))
