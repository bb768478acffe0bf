"""Sync: Graph calendar window → bookings table, against real Azurite and the Graph simulator."""

from __future__ import annotations

import itertools
import logging

import pytest
import threading
from datetime import datetime, timedelta, timezone

from sandbox.data import generate, graph_datetime
from shared.runtime import runtime
from shared.storage.store import BOOKINGS
from tests.helpers import body, bookings, rows


def load(world, appointments=250, customers=60, seed=7):
    dataset = generate(appointments=appointments, customers=customers, services=8,
                       business_ids=world.business_ids, seed=seed)
    world.graph.load(dataset)
    return dataset


def in_window(dataset):
    return {a["id"] for _, a in dataset.appointments()}


def last_run(world) -> dict:
    return body(world.host.http("GET", "status"))["lastSync"]


def logged(caplog, event: str) -> int:
    return sum(1 for record in caplog.records if getattr(record, "event", None) == event)


def table_writes(world) -> int:
    async def count() -> int:
        return (await runtime().store()).stats.table_writes

    return world.host.run(count())


def test_sync_of_250_appointments_with_small_pages_and_throttling_lands_each_exactly_once(world):
    dataset = load(world)
    world.graph.page_size = 7
    world.graph.plan.script("GET", r"/calendarView", "429", times=3)
    world.graph.plan.configure(retry_after_seconds=0)

    world.sync_calendars()

    stored = bookings(world)
    assert set(stored) == in_window(dataset)
    assert len(stored) == 250
    assert world.graph.plan.stats.faults["429"] == 3
    run = last_run(world)
    assert run["outcome"] == "succeeded"
    assert run["counts"]["created"] == 250 and run["counts"]["fetched"] == 250


def test_a_second_sync_with_nothing_changed_writes_no_table_entity(world):
    load(world)
    world.sync_calendars()
    before = table_writes(world)
    world.sync_calendars()

    counts = last_run(world)["counts"]
    assert counts["tableWrites"] == 0 and table_writes(world) == before, "not even a lease or a run record"
    assert counts["bookingWrites"] == 0
    assert (counts["created"], counts["updated"], counts["cancelled"]) == (0, 0, 0)
    assert counts["unchanged"] == 250


def test_a_changed_appointment_is_rewritten_and_only_it(world):
    dataset = load(world)
    world.sync_calendars()
    business_id, appointment = next(dataset.appointments())
    world.graph.update_appointment(business_id, appointment["id"], price=999.5)

    world.sync_calendars()

    counts = last_run(world)["counts"]
    assert counts["updated"] == 1 and counts["bookingWrites"] == 1
    assert bookings(world)[appointment["id"]]["Price"] == 999.5


def test_a_vanished_appointment_is_marked_cancelled_not_deleted(world):
    dataset = load(world)
    world.sync_calendars()
    business_id, appointment = next(dataset.appointments())
    world.graph.delete_appointment(business_id, appointment["id"])

    world.sync_calendars()

    stored = bookings(world)
    assert len(stored) == 250
    assert stored[appointment["id"]]["Cancelled"] is True
    assert sum(1 for r in stored.values() if r["Cancelled"]) == 1
    assert last_run(world)["counts"]["cancelled"] == 1


def test_a_failed_pull_cancels_nothing_and_keeps_rows_as_they_were(world):
    dataset = load(world)
    world.sync_calendars()
    before = bookings(world)
    for business_id, appointment in list(dataset.appointments())[:10]:
        world.graph.delete_appointment(business_id, appointment["id"])
    world.graph.page_size = 50
    world.graph.plan.script("GET", r"/calendarView", "503", times=1000)
    world.graph.plan.configure(retry_after_seconds=0)

    world.sync_calendars()

    after = bookings(world)
    assert {k: v["SourceHash"] for k, v in after.items()} == {k: v["SourceHash"] for k, v in before.items()}
    assert not any(r["Cancelled"] for r in after.values())
    run = last_run(world)
    assert run["outcome"] == "failed"
    assert run["errors"] and world.business_ids[0] == run["errors"][0]["businessId"]


def test_an_inaccessible_business_is_reported_by_name_and_keeps_its_rows(world2):
    world = world2
    load(world)
    world.sync_calendars()
    before = bookings(world)
    locked = world.business_ids[1]
    world.graph.set_inaccessible(locked)

    world.sync_calendars()

    assert bookings(world).keys() == before.keys()
    assert not any(r["Cancelled"] for r in bookings(world).values())
    run = last_run(world)
    assert run["outcome"] == "partial"
    assert any(e["businessId"] == locked and f"no access to business {locked}" in e["message"]
               for e in run["errors"])


def test_a_malformed_appointment_is_reported_and_loses_no_stored_row(world):
    dataset = load(world)
    world.sync_calendars()
    business_id = world.business_ids[0]
    world.graph.put_appointment(business_id, {
        "id": "AAMkBROKEN=", "startDateTime": {"dateTime": "not a date", "timeZone": "UTC"},
        "endDateTime": graph_datetime(datetime.now(timezone.utc))})
    victim_business, victim = next(dataset.appointments())
    world.graph.delete_appointment(victim_business, victim["id"])

    world.sync_calendars()

    stored = bookings(world)
    assert len(stored) == 250 and not stored[victim["id"]]["Cancelled"], "an incomplete pull cancels nothing"
    run = last_run(world)
    assert run["outcome"] == "partial"
    assert any("AAMkBROKEN=" in e["message"] for e in run["errors"])


def test_group_and_single_customer_fields_are_both_read(world):
    dataset = load(world)
    world.sync_calendars()
    stored = bookings(world)
    import json

    for _, appointment in dataset.appointments():
        customers = json.loads(stored[appointment["id"]]["Customers"])
        if appointment["customers"]:
            assert len(customers) == len(appointment["customers"])
        else:
            expected = (appointment.get("customerEmailAddress") or "").strip().lower() or None
            assert customers[0]["email"] == (expected if expected and "@" in expected else None)


def test_overlapping_runs_do_not_corrupt_anything(world, caplog):
    caplog.set_level(logging.INFO, logger="shared.flows.sync.run")
    load(world)
    world.graph.plan.configure(latency_ms=20)
    errors = []

    def run():
        try:
            world.sync_calendars()
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert len(bookings(world)) == 250
    ran, skipped = logged(caplog, "sync_business_finished"), logged(caplog, "sync_skipped")
    assert ran + skipped == 3 and 1 <= ran < 3, "overlapping runs are skipped, not run twice at once"
    assert logged(caplog, "sync_run_finished") == 1, "the latest run is summed up once its business is synced"


def test_post_sync_queues_a_run_that_the_queue_trigger_performs(world):
    load(world, appointments=20)
    response = world.host.http("POST", "sync")
    assert response.status_code == 202 and body(response) == {"status": "queued"}
    assert rows(world, BOOKINGS) == []

    world.host.drain(queues=["sync-requests", "sync-businesses"])

    assert len(bookings(world)) == 20


def test_a_sync_without_business_ids_fails_naming_the_setting(world):
    world.monkeypatch.delenv("BOOKINGS_BUSINESS_IDS")
    import pytest

    from shared.settings import SettingsError

    with pytest.raises(SettingsError, match="BOOKINGS_BUSINESS_IDS"):
        world.sync_calendars()


def test_window_excludes_appointments_outside_lookback(world):
    business_id = world.business_ids[0]
    old = datetime.now(timezone.utc) - timedelta(days=90)
    world.graph.put_appointment(business_id, {
        "id": "AAMkOLD=", "startDateTime": graph_datetime(old), "endDateTime": graph_datetime(old + timedelta(hours=1)),
        "serviceName": "Old", "price": 10, "priceType": "fixedPrice", "customers": []})
    world.sync_calendars()
    assert "AAMkOLD=" not in bookings(world)


def test_upsert_messages_hold_at_most_100_entries_and_stay_within_the_queue_size_limit():
    from shared.flows.messages import CustomerBatchUpsert, CustomerSource, CustomerUpsert, pack

    long = "x" * 90
    entries = [CustomerUpsert(customer=CustomerSource(email=f"{long[:60]}{i}@example.com", displayName=long,
                                                      addressLine1=long, city=long[:30], state=long[:30],
                                                      postalCode=long[:20], phone=long[:30]), sourceHash="h" * 32)
               for i in range(250)]
    messages = pack(entries, lambda chunk: CustomerBatchUpsert(customers=chunk))
    import base64
    import json

    assert sum(len(json.loads(m)["customers"]) for m in messages) == 250
    assert all(len(base64.b64encode(m.encode())) < 64 * 1024 for m in messages)
    small = pack([CustomerUpsert(customer=CustomerSource(email=f"s{i}@e.com"), sourceHash="h")
                                    for i in range(250)], lambda chunk: CustomerBatchUpsert(customers=chunk))
    assert [len(json.loads(m)["customers"]) for m in small] == [100, 100, 50]


def test_several_webhook_calls_while_queued_make_one_sync_run(world, caplog, monkeypatch):
    monkeypatch.setattr("shared.web.blueprints.sync.RETRY_WHEN_BUSY_SECONDS", 1)  # not 30 s: the merging is the point
    caplog.set_level(logging.INFO, logger="shared.flows.sync.run")
    load(world, appointments=10)
    for _ in range(4):
        assert world.host.http("POST", "sync").status_code == 202
    world.host.drain(queues=["sync-requests", "sync-businesses"])
    assert logged(caplog, "sync_run_finished") == 1


# -- Graph as it really behaves -------------------------------------------------------------------

NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)


def appointment_at(world, start: datetime, minutes: int = 120, zone: str | None = None, business: int = 0) -> str:
    end = start + timedelta(minutes=minutes)
    fields = {"startDateTime": graph_datetime(start), "endDateTime": graph_datetime(end), "duration": f"PT{minutes}M",
              "serviceId": "svc-1", "serviceName": "Massage", "price": 50.0, "priceType": "fixedPrice",
              "customers": [], "customerEmailAddress": "edge@example.com", "customerName": "Edge"}
    if zone:  # a local time labelled with a zone, as Graph writes dateTimeTimeZone
        fields["startDateTime"] = {"dateTime": f"{start:%Y-%m-%dT%H:%M:%S}.0000000", "timeZone": zone}
        fields["endDateTime"] = {"dateTime": f"{end:%Y-%m-%dT%H:%M:%S}.0000000", "timeZone": zone}
    return world.graph.put_appointment(world.business_ids[business], fields)


def by_id_reads(world) -> int:
    return sum(n for path, n in world.graph.plan.stats.requests.items()
               if path.startswith("GET ") and "/appointments/" in path)


@pytest.mark.parametrize("calendar_view", ["starting", "overlapping"])
def test_appointments_straddling_the_window_edge_or_a_slice_edge_are_kept_once_and_never_cancelled(
        world, calendar_view):
    world.graph.configure(calendar_view=calendar_view)
    lookback = timedelta(days=60)
    edge = appointment_at(world, NOW - lookback - timedelta(hours=1))  # begins before the window, ends in it
    slice_edge = appointment_at(world, NOW - lookback + timedelta(days=7) - timedelta(hours=1))
    world.configure(SYNC_LOOKBACK_DAYS="61")
    world.sync_calendars()  # a wider window first: both are stored
    world.configure(SYNC_LOOKBACK_DAYS="60")
    world.graph.plan.reset_stats()

    world.sync_calendars()

    stored = bookings(world)
    assert not stored[edge]["Cancelled"] and not stored[slice_edge]["Cancelled"]
    run = last_run(world)
    assert run["outcome"] == "succeeded" and run["counts"]["cancelled"] == 0
    assert by_id_reads(world) == (1 if calendar_view == "starting" else 0), \
        "only what the read did not return is read by id"


def test_an_appointment_gone_from_bookings_is_cancelled_once_graph_confirms_it_by_id(world):
    kept = appointment_at(world, NOW - timedelta(days=3))
    gone = appointment_at(world, NOW - timedelta(days=2))
    world.sync_calendars()
    world.graph.delete_appointment(world.business_ids[0], gone)
    world.graph.plan.reset_stats()

    world.sync_calendars()

    stored = bookings(world)
    assert stored[gone]["Cancelled"] and not stored[kept]["Cancelled"]
    assert by_id_reads(world) == 1 and last_run(world)["counts"]["cancelled"] == 1


def test_a_silently_capped_read_cancels_nothing_that_still_exists(world):
    ids = [appointment_at(world, NOW - timedelta(days=1, minutes=30 * i), minutes=20) for i in range(12)]
    world.sync_calendars()
    world.graph.configure(calendar_view_cap=5)  # each read silently stops after 5 appointments
    world.graph.delete_appointment(world.business_ids[0], ids[-1])

    world.sync_calendars()

    stored = bookings(world)
    assert [i for i in ids if stored[i]["Cancelled"]] == [ids[-1]], "only the one Graph confirmed gone"
    assert last_run(world)["counts"]["cancelled"] == 1


def test_a_window_is_read_in_weekly_slices_side_by_side_within_four_requests_per_mailbox(world):
    load(world, appointments=250)
    world.graph.plan.configure(latency_ms=150)  # slices overlap even on a busy machine
    world.sync_calendars()

    calendar_reads = sum(n for path, n in world.graph.plan.stats.requests.items() if "/calendarView" in path)
    assert calendar_reads >= 13, "90 days in weekly slices"
    assert max(world.graph.plan.stats.max_in_flight.values()) == 4
    assert len(bookings(world)) == 250, "each appointment once"


def test_times_labelled_with_a_windows_time_zone_are_read_in_that_zone(world):
    start = NOW - timedelta(days=2)
    ident = appointment_at(world, start)
    world.graph.configure(response_time_zone="W. Europe Standard Time")

    world.sync_calendars()

    stored = bookings(world)[ident]
    assert stored["StartUtc"].replace(tzinfo=timezone.utc) == start
    assert last_run(world)["outcome"] == "succeeded"


def test_an_unknown_time_zone_makes_the_appointment_unreadable_with_the_reason_never_utc(world):
    good = appointment_at(world, NOW - timedelta(days=2))
    odd = appointment_at(world, NOW - timedelta(days=1), zone="Mars Standard Time")
    world.sync_calendars()

    stored = bookings(world)
    assert good in stored and odd not in stored, "not stored at a guessed time"
    run = last_run(world)
    assert run["outcome"] == "partial"
    assert any(odd in e["message"] and "unknown time zone 'Mars Standard Time'" in e["message"] for e in run["errors"])


def test_a_malformed_appointment_hides_no_other_on_its_page_and_is_named(world):
    """A page is parsed and validated in one pass; one item that is not a valid appointment
    makes the app read that page item by item, so only that one is left out."""
    good = [appointment_at(world, NOW - timedelta(days=2, hours=hour)) for hour in range(3)]
    start = NOW - timedelta(days=2, hours=5)
    bad = world.graph.put_appointment(world.business_ids[0], {
        "startDateTime": graph_datetime(start), "endDateTime": graph_datetime(start + timedelta(hours=1)),
        "price": "a lot", "customers": [], "customerEmailAddress": "odd@example.com"})
    world.sync_calendars()

    stored = bookings(world)
    assert set(good) <= set(stored) and bad not in stored
    run = last_run(world)
    assert run["outcome"] == "partial" and run["counts"]["invalid"] == 1
    assert any(bad in e["message"] and "could not be read" in e["message"] for e in run["errors"])


def test_an_invoiced_appointment_moved_to_another_week_keeps_its_invoice(world):
    ident = appointment_at(world, NOW - timedelta(days=20))
    world.sync_calendars()
    accepted = world.host.http("POST", "invoices", body={"bookingIds": [ident]})
    assert accepted.status_code == 202
    world.host.drain()
    assert bookings(world)[ident]["InvoiceState"] == "invoiced"
    moved = NOW - timedelta(days=2)  # two slices later: its new slice has no row of it
    world.graph.update_appointment(world.business_ids[0], ident, startDateTime=graph_datetime(moved),
                                   endDateTime=graph_datetime(moved + timedelta(hours=2)))

    world.sync_calendars()

    row = bookings(world)[ident]
    assert row["InvoiceState"] == "invoiced" and row["HasInvoices"], "a move never makes a booking billable again"
    assert row["StartUtc"] == moved
    counts = last_run(world)["counts"]
    assert (counts["created"], counts["updated"], counts["cancelled"]) == (0, 1, 0)
    assert ident not in {b["id"] for b in body(world.host.http("GET", "bookings/uninvoiced"))["value"]}


def test_each_business_is_synced_on_its_own_and_health_shows_each_outcome(world2):
    world = world2
    quick, slow = world.business_ids
    load(world, appointments=60)
    # The slow business's calendar answers late (a timeout, then the retry).
    world.graph.plan.configure(hang_seconds=1.0, retry_after_seconds=0)
    world.graph.plan.script("GET", rf"/{slow}/calendarView", "timeout", times=2)

    world.host.timer("sync_bookings")
    stats = world.host.drain(queues=["sync-businesses"])

    assert stats.by_queue["sync-businesses"] == 3, "one message per business, and the reconciliation"
    run = last_run(world)
    quick_result, slow_result = (run["counts"]["businesses"][b] for b in (quick, slow))
    assert quick_result["outcome"] == slow_result["outcome"] == "succeeded"
    assert quick_result["at"] < slow_result["at"], "the slow business delays no other"
    assert quick_result["created"] + slow_result["created"] == run["counts"]["created"] == 60

    world.graph.set_inaccessible(slow)
    world.sync_calendars()

    run = last_run(world)
    assert run["outcome"] == "partial"
    assert run["counts"]["businesses"][quick]["outcome"] == "succeeded"
    assert run["counts"]["businesses"][slow]["outcome"] == "failed"
    assert {e["businessId"] for e in run["errors"]} == {slow}


def test_a_sync_message_for_a_business_is_processed_or_deferred_never_run_twice_at_once(world, caplog):
    caplog.set_level(logging.INFO, logger="shared.flows.sync.run")
    load(world, appointments=30)
    world.graph.plan.configure(latency_ms=20)
    world.host.timer("sync_bookings")
    world.host.timer("sync_bookings")  # a second run before the first one's parts ran

    world.host.drain(queues=["sync-businesses"])

    synced = [r for r in caplog.records if getattr(r, "event", None) == "sync_business_finished"]
    covered = [r for r in caplog.records if getattr(r, "event", None) in ("sync_request_covered", "sync_skipped")]
    assert len(synced) + len(covered) == 2 and synced
    assert len(bookings(world)) == 30 and last_run(world)["counts"]["created"] == 30 or len(synced) == 2


def test_a_queued_part_for_a_business_no_longer_configured_is_dropped_not_retried(world2, caplog):
    caplog.set_level(logging.INFO, logger="shared.web.blueprints.sync")
    load(world2, appointments=20)
    world2.host.http("POST", "sync")
    world2.host.drain(queues=["sync-requests"])  # the run is fanned out, its parts wait
    world2.configure(BOOKINGS_BUSINESS_IDS=world2.business_ids[0])

    stats = world2.host.drain(queues=["sync-businesses"])

    assert stats.poisoned == 0 and logged(caplog, "sync_skipped") == 1
    assert {row["BusinessId"] for row in bookings(world2).values()} == {world2.business_ids[0]}


def test_someone_known_only_from_appointments_is_taken_from_the_latest_and_not_queued_again(world):
    for days, name in ((20, "Kim Old"), (2, "Kim Latest"), (10, "Kim Middle")):  # three slices
        start = NOW - timedelta(days=days)
        world.graph.put_appointment(world.business_ids[0], {
            "startDateTime": graph_datetime(start), "endDateTime": graph_datetime(start + timedelta(hours=1)),
            "duration": "PT1H", "serviceId": "svc-1", "serviceName": "Massage", "price": 50.0,
            "priceType": "fixedPrice", "customers": [], "customerEmailAddress": "kim@example.com",
            "customerName": name})

    world.sync()
    world.sync()

    [kim] = [c for c in world.bc.customers(world.company_id) if c["email"] == "kim@example.com"]
    assert kim["displayName"] == "Kim Latest"
    assert last_run(world)["counts"]["customersQueued"] == 0, "whatever order the slices were read in"


def test_a_dense_calendar_is_read_in_shorter_slices_so_a_slice_holds_about_2000_rows():
    from shared.flows.sync.calendar import SHORTEST_SLICE, SUB_WINDOW, slice_length, sub_windows

    start = NOW
    end = NOW + timedelta(days=90)
    assert slice_length(start, end, None) == slice_length(start, end, 10_000) == SUB_WINDOW
    dense = slice_length(start, end, 100_000)
    assert timedelta(days=1) < dense < timedelta(days=2) and dense.total_seconds() % 3600 == 0
    assert 100_000 * dense / (end - start) <= 2_000
    assert slice_length(start, end, 100_000_000) == SHORTEST_SLICE
    parts = sub_windows(start, end, dense)
    assert parts[0][0] == start and parts[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
