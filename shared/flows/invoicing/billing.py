"""Billing runs: invoice every closed period's bookings on a schedule (`BILLING_PERIOD`,
`BILLING_SCHEDULE`), the way a bookkeeper bills a month's work at the start of the next.

A run bills the last closed period (a calendar month, or an ISO week Monday to Sunday, in
`BOOKINGS_TIME_ZONE`): every invoiceable booking that ended before the period's end, earlier
ones not yet invoiced too (late edits, bookings made invoiceable since), as one job like any
other: one draft per customer, company and set of invoice dimensions, dated the period's last
day, its first line naming the period ("October 2026").

A period is billed once however often the timer fires (retried, duplicated, past-due
invocations, several instances): the run is recorded in the `invoicejobs` table (partition
`billing`, row = the period) by an insert that only one caller wins, with the job id it will
use. A run that died (its row still `running` after `STALE_RUN`) is taken over by the next
timer or sync: if its job exists, that job is the period's (its own recovery finishes it);
otherwise the period is billed then."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
from cronsim import CronSim

from shared.flows.invoicing.jobs import HEADER, Dating, invoice_bookings, new_job_id
from shared.flows.invoicing.uninvoiced import Filters
from shared.flows.invoicing.reconcile import STALE_CLAIMING
from shared.runtime import Runtime
from shared.storage.store import JOBS, Store

log = logging.getLogger(__name__)

PARTITION = "billing"
STALE_RUN = STALE_CLAIMING + timedelta(minutes=1)
"""Longer than a run takes (it only claims and queues; the invoices are made by the job), and
than a dead job's claims are kept: a run taken over finds what the dead one had claimed free."""


@dataclass(frozen=True)
class Period:
    key: str
    """`2026-10` (a month) or `2026-W43` (an ISO week): one run each."""
    label: str
    """What the invoices say: "October 2026", "Week 43, 2026"."""
    start: datetime
    end: datetime
    """Local midnight after the period's last day (exclusive)."""

    @property
    def last_day(self) -> date:
        return (self.end - timedelta(days=1)).date()


def period_of(kind: str, day: date, zone: str) -> Period:
    """The month or ISO week `day` falls in."""
    tz = ZoneInfo(zone)
    if kind == "month":
        from babel.dates import format_date  # only billing runs need it: keep it out of app start-up

        first = day.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
        return Period(f"{first:%Y-%m}", format_date(first, "MMMM y", locale="en"),
                      datetime.combine(first, time(), tz), datetime.combine(following, time(), tz))
    monday = day - timedelta(days=day.weekday())
    year, week, _ = monday.isocalendar()
    return Period(f"{year}-W{week:02d}", f"Week {week}, {year}", datetime.combine(monday, time(), tz),
                  datetime.combine(monday + timedelta(days=7), time(), tz))


def last_closed_period(kind: str, zone: str, now: datetime) -> Period:
    """The latest period that has ended by `now` (local time in `zone`)."""
    today = now.astimezone(ZoneInfo(zone)).date()
    current = period_of(kind, today, zone)
    return period_of(kind, current.start.date() - timedelta(days=1), zone)


def next_run(settings, now: datetime | None = None) -> tuple[datetime, Period] | None:
    """When the billing timer fires next (UTC, as Functions timers run) and which period that
    run bills; None without `BILLING_PERIOD`."""
    if not settings.billing_period:
        return None
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    fires = next(CronSim(settings.billing_schedule, now.replace(tzinfo=None))).replace(tzinfo=timezone.utc)
    return fires, last_closed_period(settings.billing_period, settings.time_zone, fires)


async def run_billing(rt: Runtime, trigger: str = "timer", now: datetime | None = None) -> dict:
    """Bill the last closed period, once. Returns what happened: `disabled`, `done` (this call
    billed it), `already` (billed before), `busy` (another run is at it)."""
    settings = rt.settings
    if not settings.billing_period:
        log.info("billing timer fired; no BILLING_PERIOD is set", extra={"event": "billing_run_disabled"})
        return {"outcome": "disabled"}
    store = await rt.store()
    now = now or datetime.now(timezone.utc)
    period = last_closed_period(settings.billing_period, settings.time_zone, now)
    claimed = await _claim(store, period, now, trigger)
    if isinstance(claimed, str):
        log.info("billing run for %s skipped: %s", period.key, claimed,
                 extra={"event": "billing_run_skipped", "outcome": claimed, "period": period.key, "trigger": trigger})
        return {"outcome": claimed, "period": period.key}
    job_id, etag = claimed
    outcome = await invoice_bookings(
        rt, store, filters=Filters(ended_before=period.end.astimezone(timezone.utc)), job_id=job_id,
        request={"source": "billing", "period": period.key, "label": period.label, "trigger": trigger},
        dating=Dating(period.last_day.isoformat(), period.label))
    await store.update(JOBS, {"PartitionKey": PARTITION, "RowKey": period.key, "Status": "done",
                              "JobId": outcome.job_id or "", "BookingCount": outcome.booking_count,
                              "FinishedAt": datetime.now(timezone.utc)}, etag=None)
    log.info("billing run for %s: %d bookings", period.key, outcome.booking_count,
             extra={"event": "billing_run_done", "period": period.key, "job_id": outcome.job_id,
                    "bookings": outcome.booking_count, "trigger": trigger})
    return {"outcome": "done", "period": period.key, "jobId": outcome.job_id, "bookingCount": outcome.booking_count}


async def _claim(store: Store, period: Period, now: datetime, trigger: str) -> tuple[str, str] | str:
    """Take the period's run for this caller: (job id, row ETag), or why not."""
    row = {"PartitionKey": PARTITION, "RowKey": period.key, "Status": "running", "JobId": new_job_id(),
           "StartedAt": now, "Trigger": trigger, "Label": period.label, "Owner": uuid.uuid4().hex}
    try:
        answer = await store.insert(JOBS, row)
        return row["JobId"], answer["etag"]
    except ResourceExistsError:
        pass
    existing = await store.get(JOBS, PARTITION, period.key)
    if existing is None:
        return "busy"
    if existing.get("Status") == "done":
        return "already"
    started = existing.get("StartedAt")
    if started and now - started < STALE_RUN:
        return "busy"
    header = await store.get(JOBS, existing.get("JobId") or "-", HEADER)
    if header is not None and header.get("Status") not in ("rejected", "claiming"):
        # The dead run had queued its job: that job is the period's.
        await store.update(JOBS, {"PartitionKey": PARTITION, "RowKey": period.key, "Status": "done",
                                  "BookingCount": int(header.get("BookingCount") or 0)}, etag=None)
        return "already"
    try:
        answer = await store.update(JOBS, row, etag=existing.metadata["etag"], merge=False)
    except ResourceModifiedError:
        return "busy"
    return row["JobId"], answer["etag"]


async def resume_stale_run(rt: Runtime, now: datetime | None = None) -> dict | None:
    """Called by every sync's reconciliation: a run that died is taken over (its period is then
    billed, or found billed)."""
    settings = rt.settings
    if not settings.billing_period:
        return None
    now = now or datetime.now(timezone.utc)
    store = await rt.store()
    period = last_closed_period(settings.billing_period, settings.time_zone, now)
    row = await store.get(JOBS, PARTITION, period.key)
    if row is None or row.get("Status") == "done" or (row.get("StartedAt") and now - row["StartedAt"] < STALE_RUN):
        return None
    return await run_billing(rt, trigger="resumed", now=now)


async def billing_runs(store: Store, limit: int = 12) -> list[dict]:
    """The latest billing runs, newest period first."""
    rows = await store.partition(JOBS, PARTITION)
    rows.sort(key=lambda r: r["RowKey"], reverse=True)
    return [{"period": r["RowKey"], "label": r.get("Label") or r["RowKey"], "status": r.get("Status"),
             "jobId": r.get("JobId") or None, "bookingCount": r.get("BookingCount"), "startedAt": r.get("StartedAt")}
            for r in rows[:limit]]


