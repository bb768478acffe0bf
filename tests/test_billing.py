"""Billing runs (`BILLING_PERIOD`, `BILLING_SCHEDULE`): each closed period billed once, dated its
last day and named on the invoice; late bookings in the next run; `POST /api/invoices` `to`."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta, timezone

from azure.data.tables import TableServiceClient

from sandbox.data import graph_datetime
from shared.flows.invoicing.billing import PARTITION, last_closed_period, next_run, period_of, run_billing
from shared.flows.invoicing.jobs import HEADER
from shared.settings import Settings
from shared.storage.store import JOBS
from tests.helpers import body, rows
from tests.test_invoicing import run_job, uninvoiced

ZONE = "Europe/Oslo"


def test_periods_are_calendar_months_and_iso_weeks_in_the_bookings_time_zone():
    october = period_of("month", date(2026, 10, 17), ZONE)
    assert (october.key, october.label, october.last_day) == ("2026-10", "October 2026", date(2026, 10, 31))
    assert october.end.isoformat() == "2026-11-01T00:00:00+01:00"  # the local midnight, after summer time
    week = period_of("week", date(2026, 10, 22), ZONE)
    assert (week.key, week.label, week.start.date(), week.last_day) == ("2026-W43", "Week 43, 2026",
                                                                        date(2026, 10, 19), date(2026, 10, 25))
    # 23:30 UTC on 31 October is already 1 November in Oslo: October is closed there.
    assert last_closed_period("month", ZONE, datetime(2026, 10, 31, 23, 30, tzinfo=timezone.utc)).key == "2026-10"
    assert last_closed_period("month", "UTC", datetime(2026, 10, 31, 23, 30, tzinfo=timezone.utc)).key == "2026-09"
    assert last_closed_period("week", ZONE, datetime(2027, 1, 4, 12, tzinfo=timezone.utc)).key == "2026-W53"


def test_the_next_run_follows_the_ncrontab_schedule_and_names_the_period_it_bills():
    settings = Settings(BILLING_PERIOD="month", BILLING_SCHEDULE="0 0 6 1 * *", BOOKINGS_TIME_ZONE=ZONE)
    fires, period = next_run(settings, datetime(2026, 10, 17, 12, tzinfo=timezone.utc))
    assert fires == datetime(2026, 11, 1, 6, tzinfo=timezone.utc) and period.label == "October 2026"
    assert next_run(Settings(), datetime(2026, 10, 17, tzinfo=timezone.utc)) is None


def booking(world, start: datetime, email: str | None = "alice@example.com", minutes: int = 60) -> str:
    payload = {"id": f"AAMk{uuid.uuid4().hex}=", "startDateTime": graph_datetime(start),
               "endDateTime": graph_datetime(start + timedelta(minutes=minutes)), "duration": f"PT{minutes}M",
               "serviceId": "svc-cut", "serviceName": "Haircut", "price": 50.0, "priceType": "fixedPrice",
               "customers": [], "customerEmailAddress": email or "", "customerName": "Alice"}
    return world.graph.put_appointment(world.business_ids[0], payload)


def bill(world, now: datetime | None = None) -> dict:
    async def run() -> dict:
        from shared.runtime import runtime

        return await run_billing(runtime(), trigger="test", now=now)

    result = world.host.run(run())
    world.host.drain()
    return result


def billing_jobs(world) -> list[dict]:
    return [r for r in rows(world, JOBS, f"RowKey eq '{HEADER}'") if '"billing"' in (r.get("Request") or "")]


def test_a_run_bills_the_closed_month_and_earlier_dated_its_last_day_with_the_month_named(world):
    world.configure(BILLING_PERIOD="month", BOOKINGS_TIME_ZONE=ZONE)
    now = datetime.now(timezone.utc)
    period = last_closed_period("month", ZONE, now)
    in_period = booking(world, period.start.astimezone(timezone.utc) + timedelta(days=2))
    earlier = booking(world, period.start.astimezone(timezone.utc) - timedelta(days=3))
    this_period = booking(world, now - timedelta(hours=2))
    world.sync()

    world.host.timer("billing_run")
    world.host.drain()

    [draft] = world.bc.invoices(world.company_id)
    assert draft["invoiceDate"] == period.last_day.isoformat()
    assert draft["salesInvoiceLines"][0]["lineType"] == "Comment"
    assert draft["salesInvoiceLines"][0]["description"] == period.label
    this_period_ended_in_it = now - timedelta(hours=1) < period.end  # only within an hour of the month's end
    assert len(draft["salesInvoiceLines"]) - 1 == 2 + this_period_ended_in_it
    left = {b["id"] for b in uninvoiced(world)["value"]}
    assert {in_period, earlier}.isdisjoint(left)
    assert (this_period in left) != this_period_ended_in_it  # the current month's: the next run


def test_a_retried_or_duplicated_timer_bills_a_period_once(world):
    world.configure(BILLING_PERIOD="week")
    start = last_closed_period("week", "UTC", datetime.now(timezone.utc)).start + timedelta(days=1)
    for hour in range(3):
        booking(world, start + timedelta(hours=hour))
    world.sync()

    async def fire_together() -> list:
        return await asyncio.gather(*(world.host.timer_async("billing_run") for _ in range(3)))

    world.host.run(fire_together())
    world.host.timer("billing_run")
    world.host.timer("billing_run", past_due=True)
    world.host.drain()

    assert len(billing_jobs(world)) == 1
    assert len(world.bc.invoices(world.company_id)) == 1
    [run] = rows(world, JOBS, f"PartitionKey eq '{PARTITION}'")
    assert run["Status"] == "done" and run["BookingCount"] == 3


def test_a_booking_that_becomes_invoiceable_later_goes_into_the_next_run(world):
    world.configure(BILLING_PERIOD="week")
    now = datetime.now(timezone.utc)
    start = last_closed_period("week", "UTC", now).start - timedelta(days=5)
    late = booking(world, start, email=None)
    world.sync()
    first = bill(world)
    assert (first["outcome"], first["bookingCount"]) == ("done", 0)  # no e-mail yet: not invoiceable

    world.graph.update_appointment(world.business_ids[0], late, customerEmailAddress="alice@example.com")
    world.sync()
    next_week = bill(world, now + timedelta(days=7))

    assert next_week["outcome"] == "done" and next_week["bookingCount"] == 1
    [draft] = world.bc.invoices(world.company_id)
    assert draft["invoiceDate"] == last_closed_period("week", "UTC", now + timedelta(days=7)).last_day.isoformat()


def test_a_run_that_died_is_taken_over_by_the_next_sync(world):
    world.configure(BILLING_PERIOD="month")
    now = datetime.now(timezone.utc)
    period = last_closed_period("month", "UTC", now)
    booking(world, period.start + timedelta(days=1))
    world.sync()
    # A run that died 20 minutes ago, after claiming the period and before making its job.
    TableServiceClient.from_connection_string(world.sandbox.azurite.connection_string).get_table_client(JOBS) \
        .upsert_entity({"PartitionKey": PARTITION, "RowKey": period.key, "Status": "running",
                        "JobId": uuid.uuid4().hex, "StartedAt": now - timedelta(minutes=20)})

    world.sync()

    [run] = rows(world, JOBS, f"PartitionKey eq '{PARTITION}'")
    assert run["Status"] == "done" and run["BookingCount"] == 1
    assert len(world.bc.invoices(world.company_id)) == 1


def test_without_a_billing_period_the_timer_bills_nothing(world):
    booking(world, datetime.now(timezone.utc) - timedelta(days=40))
    world.sync()

    world.host.timer("billing_run")
    world.host.drain()

    assert billing_jobs(world) == [] and world.bc.invoices(world.company_id) == []


def test_invoice_all_to_bills_only_bookings_that_ended_before_it(world):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old = booking(world, now - timedelta(days=3))
    recent = booking(world, now - timedelta(hours=5))
    world.sync()

    job = run_job(world, {"all": True, "to": (now - timedelta(days=1)).isoformat()})
    refused = world.host.http("POST", "invoices", body={"bookingIds": [recent], "to": now.isoformat()})

    assert job["bookingCount"] == 1 and job["invoices"][0]["bookingIds"] == [old]
    assert [b["id"] for b in uninvoiced(world)["value"]] == [recent]
    assert refused.status_code == 400 and "only with all" in body(refused)["errors"][0]["message"]
