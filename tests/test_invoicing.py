"""Uninvoiced bookings and bulk invoicing into BC drafts, end to end through the HTTP API."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from sandbox.data import graph_datetime
from shared.storage.store import BOOKINGS
from tests.helpers import body, rows

NOW = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)


def appointment(world, *, hours_ago: float = 48, minutes: int = 60, price: float = 50.0,
                price_type: str = "fixedPrice", customers=(("alice@example.com", "Alice"),), group: bool = False,
                service=("svc-cut", "Haircut"), business: int = 0) -> str:
    start = NOW - timedelta(hours=hours_ago)
    payload = {"id": f"AAMk{uuid.uuid4().hex}=", "startDateTime": graph_datetime(start),
               "endDateTime": graph_datetime(start + timedelta(minutes=minutes)),
               "duration": f"PT{minutes}M", "serviceId": service[0], "serviceName": service[1],
               "price": price, "priceType": price_type, "customers": []}
    if group or len(customers) > 1:
        payload["customers"] = [{"customerId": str(uuid.uuid4()), "name": name, "emailAddress": email}
                                for email, name in customers]
    else:
        email, name = customers[0]
        payload |= {"customerEmailAddress": email, "customerName": name}
    return world.graph.put_appointment(world.business_ids[business], payload)


def uninvoiced(world, **params) -> dict:
    response = world.host.http("GET", "bookings/uninvoiced", params=params)
    assert response.status_code == 200, response.get_body()
    return body(response)


def invoice(world, request: dict):
    return world.host.http("POST", "invoices", body=request)


def run_job(world, request: dict) -> dict:
    response = invoice(world, request)
    assert response.status_code == 202, response.get_body()
    accepted = body(response)
    assert response.headers["Location"] == f"/api/invoices/jobs/{accepted['jobId']}"
    world.host.drain()
    status = world.host.http("GET", f"invoices/jobs/{accepted['jobId']}")
    return body(status)


def lines_by_booking(world) -> Counter:
    """How many BC invoice lines bill each (booking, customer): the exactly-once check."""
    counted = Counter()
    for invoice_ in world.bc.invoices(world.company_id):
        for line in invoice_["salesInvoiceLines"]:
            counted[(line["description"], invoice_["customerId"])] += 1
    return counted


def test_uninvoiced_lists_exactly_the_ended_uncancelled_bookings_with_amounts_per_price_type(world):
    hourly = appointment(world, minutes=90, price=60, price_type="hourly")
    fixed = appointment(world, minutes=120, price=50, price_type="fixedPrice")
    starting = appointment(world, price=30, price_type="startingAt")
    varies = appointment(world, price=25.5, price_type="priceVaries")
    free = appointment(world, price=0, price_type="free")
    future = appointment(world, hours_ago=-24)
    running = appointment(world, hours_ago=0.5, minutes=120)
    no_email = appointment(world, customers=(("", "Walk-in"),))
    group = appointment(world, price=20, customers=(("g1@example.com", "G1"), ("G2@Example.com ", "G2")))
    cancelled = appointment(world)
    no_price = appointment(world, price=0, price_type="callUs")
    world.sync()
    world.graph.delete_appointment(world.business_ids[0], cancelled)
    world.sync()

    listed = {row["id"]: row for row in uninvoiced(world)["value"]}

    assert set(listed) == {hourly, fixed, starting, varies, no_email, group, no_price}
    assert free not in listed and future not in listed and running not in listed and cancelled not in listed
    assert listed[hourly]["customers"][0]["quantity"] == 1.5 and listed[hourly]["amount"] == 90.0
    assert listed[fixed]["customers"][0]["quantity"] == 1 and listed[fixed]["amount"] == 50.0
    assert listed[starting]["amount"] == 30.0 and listed[varies]["amount"] == 25.5
    assert [c["email"] for c in listed[group]["customers"]] == ["g1@example.com", "g2@example.com"]
    assert listed[group]["amount"] == 40.0 and listed[group]["invoiceable"] is True
    assert listed[no_email]["invoiceable"] is False and listed[no_email]["reason"] == "customer has no e-mail"
    assert listed[no_price]["invoiceable"] is False and "no price" in listed[no_price]["reason"]
    row = listed[fixed]
    assert row["start"].endswith("Z") and row["end"].endswith("Z") and row["businessId"] == world.business_ids[0]
    assert set(row) == {"id", "businessId", "serviceId", "serviceName", "start", "end", "priceType", "price",
                        "customers", "amount", "invoiceable", "reason"}

    world.configure(INVOICE_FREE_BOOKINGS="true")
    listed = {row["id"]: row for row in uninvoiced(world)["value"]}
    assert listed[free]["invoiceable"] is True and listed[free]["amount"] == 0.0


def test_filters_and_paging_return_every_booking_exactly_once(world2):
    world = world2
    ids = [appointment(world, hours_ago=100 - i, business=i % 2,
                       customers=((f"c{i % 3}@example.com", f"C{i % 3}"),)) for i in range(25)]
    world.sync()

    seen, page = [], uninvoiced(world, top="4")
    while True:
        seen += [row["id"] for row in page["value"]]
        if not page["nextLink"]:
            break
        params = dict(part.split("=", 1) for part in page["nextLink"].split("?", 1)[1].split("&"))
        from urllib.parse import unquote

        page = uninvoiced(world, **{k: unquote(v) for k, v in params.items()})
    assert seen == ids, "start order, each once"

    assert {r["businessId"] for r in uninvoiced(world, businessId=world.business_ids[1])["value"]} == {
        world.business_ids[1]}
    by_customer = uninvoiced(world, customerEmail=" C1@EXAMPLE.com ")["value"]
    assert [r["id"] for r in by_customer] == ids[1::3]
    start = (NOW - timedelta(hours=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = (NOW - timedelta(hours=85)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert [r["id"] for r in uninvoiced(world, **{"from": start, "to": end})["value"]] == ids[10:15]


@pytest.mark.parametrize("answer_totals", [False, True], ids=["answer-without-totals", "answer-with-totals"])
def test_invoicing_a_selection_makes_one_draft_per_customer_with_lines_in_start_order(world, answer_totals):
    """BC does not say whether the answer to a deep insert shows its lines' totals: the job's
    amounts are right either way."""
    world.bc.configure(deep_insert_answer_has_totals=answer_totals)
    world.configure(BOOKINGS_TIME_ZONE="Europe/Paris")
    first = appointment(world, hours_ago=72, minutes=90, price=60, price_type="hourly")
    second = appointment(world, hours_ago=48, price=50)
    other = appointment(world, hours_ago=60, customers=(("bob@example.com", "Bob"),), price=70)
    untouched = appointment(world, hours_ago=30, price=10)
    world.sync()

    job = run_job(world, {"bookingIds": [second, first, other]})

    assert job["status"] == "succeeded" and job["bookingCount"] == 3 and job["errors"] == []
    invoices = {i["customerEmail"]: i for i in job["invoices"]}
    assert invoices["alice@example.com"]["bookingIds"] == [first, second]
    assert invoices["alice@example.com"]["amount"] == 140.0 and invoices["bob@example.com"]["amount"] == 70.0
    drafts = {i["id"]: i for i in world.bc.invoices(world.company_id)}
    alice = drafts[invoices["alice@example.com"]["invoiceId"]]
    assert alice["status"] == "Draft" and alice["number"] == invoices["alice@example.com"]["invoiceNumber"]
    assert len(alice["externalDocumentNumber"]) <= 35
    local = (NOW - timedelta(hours=72)).astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert [(line["description"], line["quantity"], line["unitPrice"]) for line in alice["salesInvoiceLines"]] == [
        (f"Haircut – {local:%Y-%m-%d %H:%M}", 1.5, 60.0),
        (f"Haircut – {(local + timedelta(hours=24)):%Y-%m-%d %H:%M}", 1, 50.0)]
    assert all(line["lineType"] == "Item" for line in alice["salesInvoiceLines"])
    assert [r["id"] for r in uninvoiced(world)["value"]] == [untouched]


def test_invoice_all_then_again_finds_nothing(world):
    for i in range(6):
        appointment(world, hours_ago=50 + i, customers=((f"p{i % 2}@example.com", f"P{i % 2}"),))
    appointment(world, customers=(("", "Nobody"),))
    world.sync()

    job = run_job(world, {"all": True})

    assert job["status"] == "succeeded" and job["bookingCount"] == 6 and len(job["invoices"]) == 2
    again = invoice(world, {"all": True})
    assert again.status_code == 200 and body(again) == {"jobId": None, "bookingCount": 0}


def test_invoice_all_for_one_customer_only(world):
    appointment(world, customers=(("a@example.com", "A"),))
    appointment(world, customers=(("b@example.com", "B"),))
    world.sync()
    job = run_job(world, {"all": True, "customerEmail": "B@example.com"})
    assert [i["customerEmail"] for i in job["invoices"]] == ["b@example.com"]
    assert [r["customers"][0]["email"] for r in uninvoiced(world)["value"]] == ["a@example.com"]


def test_a_group_booking_bills_each_customer_on_their_own_invoice(world):
    group = appointment(world, price=20, customers=(("g1@example.com", "G1"), ("g2@example.com", "G2")))
    world.sync()
    job = run_job(world, {"bookingIds": [group]})
    assert sorted(i["customerEmail"] for i in job["invoices"]) == ["g1@example.com", "g2@example.com"]
    assert all(i["bookingIds"] == [group] for i in job["invoices"])
    assert uninvoiced(world)["value"] == []


def test_listing_an_invoiced_booking_again_is_a_conflict_and_claims_nothing(world):
    done = appointment(world, hours_ago=50)
    fresh = appointment(world, hours_ago=49)
    world.sync()
    run_job(world, {"bookingIds": [done]})

    response = invoice(world, {"bookingIds": [fresh, done, "AAMkUNKNOWN="]})

    assert response.status_code == 409 and response.mimetype == "application/problem+json"
    problem = body(response)
    assert set(problem["bookingIds"]) == {done, "AAMkUNKNOWN="}
    assert {e["message"] for e in problem["errors"]} == {"already invoiced", "unknown booking"}
    assert [r["id"] for r in uninvoiced(world)["value"]] == [fresh], "nothing was claimed"


def test_concurrent_overlapping_requests_bill_each_booking_exactly_once(world):
    ids = [appointment(world, hours_ago=80 - i, customers=((f"k{i % 4}@example.com", f"K{i % 4}"),))
           for i in range(24)]
    world.sync()
    world.sync()
    answers = []

    def request(selection):
        answers.append(invoice(world, selection))

    selections = [{"bookingIds": ids[:16]}, {"bookingIds": ids[8:]}, {"all": True}, {"bookingIds": ids[4:12]}]
    threads = [threading.Thread(target=request, args=(s,)) for s in selections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    world.host.drain()

    assert {a.status_code for a in answers} <= {200, 202, 409}
    billed = Counter()
    for draft in world.bc.invoices(world.company_id):
        billed.update(line["description"] for line in draft["salesInvoiceLines"])
    assert set(billed.values()) <= {1}, "no booking on two invoices"
    left = [r["id"] for r in uninvoiced(world)["value"]]
    assert len(left) + sum(billed.values()) == 24, "whatever lost a race is uninvoiced again, not stuck"

    run_job(world, {"all": True}) if left else None
    billed = Counter()
    for draft in world.bc.invoices(world.company_id):
        billed.update(line["description"] for line in draft["salesInvoiceLines"])
    assert sum(billed.values()) == 24 and set(billed.values()) == {1}
    assert uninvoiced(world)["value"] == []


def test_a_lost_create_response_does_not_make_a_second_invoice(world):
    ids = [appointment(world, hours_ago=40 + i) for i in range(3)]
    world.sync()
    world.bc.plan.script("POST", r"/salesInvoices$", "lost", times=1)

    job = run_job(world, {"bookingIds": ids})

    assert world.bc.plan.stats.faults["lost"] == 1
    assert job["status"] == "succeeded"
    assert len(world.bc.invoices(world.company_id)) == 1


def test_a_crash_between_bc_create_and_recording_does_not_bill_twice(world, monkeypatch):
    ids = [appointment(world, hours_ago=40 + i) for i in range(3)]
    world.sync()
    import shared.flows.invoicing.worker as worker

    real_apply, crashes = worker._apply, []

    async def crash_once(store, bookings, change, *args, **kwargs):
        if not crashes:
            crashes.append(1)
            raise RuntimeError("worker crashed after the BC create")
        return await real_apply(store, bookings, change, *args, **kwargs)

    monkeypatch.setattr(worker, "_apply", crash_once)
    job = run_job(world, {"bookingIds": ids})

    assert crashes and job["status"] == "succeeded"
    assert len(world.bc.invoices(world.company_id)) == 1
    assert len(world.bc.invoices(world.company_id)[0]["salesInvoiceLines"]) == 3
    assert invoice_lookups(world) == 1, "the retry looked for the invoice the crashed attempt made"


def invoice_lookups(world) -> int:
    return sum(n for path, n in world.bc.plan.stats.requests.items()
               if path.startswith("GET ") and path.endswith("/salesInvoices"))


def test_a_fresh_job_creates_its_invoices_in_one_batch_without_looking_them_up(world):
    world.configure(HTTP_TIMEOUT_SECONDS="60")  # batch sizes follow the timeout: the production default
    for i in range(12):
        appointment(world, hours_ago=40 + i, customers=((f"c{i % 6}@example.com", f"C{i % 6}"),))
    world.sync()
    world.bc.plan.reset_stats()

    job = run_job(world, {"all": True})

    assert job["status"] == "succeeded" and len(job["invoices"]) == 6
    assert invoice_lookups(world) == 0, "a part never attempted cannot have an invoice yet"
    assert world.bc.plan.stats.requests["POST /v2.0/{id}/production/api/v2.0/$batch"] == 3, \
        "6 invoices in 3 messages of 2 (spread for BC's concurrent slots), one $batch each"


@pytest.mark.parametrize(("parts", "per_message"), [(1, 1), (6, 2), (200, 40), (1000, 50), (5000, 50)])
def test_a_job_is_spread_over_at_least_as_many_messages_as_bc_serves_at_once(parts, per_message):
    from shared.flows.invoicing.jobs import parts_per_message

    assert parts_per_message(parts) == per_message


def test_a_part_bc_keeps_failing_ends_failed_with_its_bookings_released_once_bc_has_no_invoice(world):
    ids = [appointment(world, hours_ago=40 + i) for i in range(2)]
    world.sync()
    world.configure(HTTP_TIMEOUT_SECONDS="0.5")  # each unknown outcome is waited out: keep the waits short
    world.bc.plan.configure(retry_after_seconds=0)
    world.bc.plan.script("POST", r"/salesInvoices$", "500", times=1000)

    job = run_job(world, {"bookingIds": ids})
    world.bc.plan.clear()

    assert world.bc.plan.stats.faults["500"] == 5, "as many tries as a message gets, each once BC had settled"
    assert job["status"] == "failed" and job["invoices"] == []
    assert {e["bookingId"] for e in job["errors"]} == set(ids)
    assert all(e["message"].startswith("No invoice was made: Business Central gave no usable answer to 5 attempts")
               for e in job["errors"])
    assert world.host.peek_poison("invoice-jobs") == [], "the part failed on its own; the message was fine"
    assert sorted(r["id"] for r in uninvoiced(world)["value"]) == sorted(ids), "released, not lost"
    assert world.bc.invoices(world.company_id) == []


def test_dry_run_shows_the_invoices_and_claims_nothing(world):
    a = appointment(world, hours_ago=50, price=60, minutes=30, price_type="hourly")
    world.sync()
    response = invoice(world, {"all": True, "dryRun": True})
    assert response.status_code == 200
    preview = body(response)
    assert preview["bookingCount"] == 1
    [draft] = preview["invoices"]
    assert draft["customerEmail"] == "alice@example.com" and draft["amount"] == 30.0
    assert draft["lines"][0]["quantity"] == 0.5 and draft["lines"][0]["bookingId"] == a
    assert [r["id"] for r in uninvoiced(world)["value"]] == [a]
    assert world.bc.invoices(world.company_id) == []


def test_a_deleted_draft_makes_its_bookings_uninvoiced_and_a_posted_one_marks_them_posted(world):
    a = appointment(world, hours_ago=50, customers=(("a@example.com", "A"),))
    b = appointment(world, hours_ago=49, customers=(("b@example.com", "B"),))
    world.sync()
    job = run_job(world, {"all": True})
    by_email = {i["customerEmail"]: i["invoiceId"] for i in job["invoices"]}
    world.bc.delete_invoice(world.company_id, by_email["a@example.com"])
    world.bc.post_invoice(world.company_id, by_email["b@example.com"])

    world.sync()

    assert [r["id"] for r in uninvoiced(world)["value"]] == [a]
    states = {r["AppointmentId"]: r["InvoiceState"] for r in rows(world, BOOKINGS)}
    assert states[b] == "posted"
    counts = body(world.host.http("GET", "status"))["lastSync"]["counts"]
    assert counts["bookingsReleased"] == 1 and counts["bookingsPosted"] == 1


def test_a_released_draft_is_not_taken_for_posted_and_once_reopened_and_deleted_its_bookings_are_uninvoiced(world):
    a = appointment(world)
    world.sync()
    [made] = run_job(world, {"bookingIds": [a]})["invoices"]

    world.bc.release_invoice(world.company_id, made["invoiceId"])  # BC's API now says "Open", as if posted
    world.sync()
    assert {r["AppointmentId"]: r["InvoiceState"] for r in rows(world, BOOKINGS)}[a] != "posted"
    world.bc.reopen_invoice(world.company_id, made["invoiceId"])
    world.bc.delete_invoice(world.company_id, made["invoiceId"])
    world.sync()

    assert [r["id"] for r in uninvoiced(world)["value"]] == [a]


@pytest.mark.parametrize("keeps_number", [False, True])
def test_a_posted_invoice_is_marked_posted_once_bc_shows_it_posted(world, keeps_number):
    """With one number series for drafts and posted invoices, `Open` cannot tell posted from
    released: the bookings are marked posted once BC shows the invoice paid."""
    world.bc.configure(posted_invoice_keeps_number=keeps_number)
    a = appointment(world)
    world.sync()
    [made] = run_job(world, {"bookingIds": [a]})["invoices"]

    world.bc.post_invoice(world.company_id, made["invoiceId"])
    world.sync()
    state = {r["AppointmentId"]: r["InvoiceState"] for r in rows(world, BOOKINGS)}[a]
    assert (state == "posted") is not keeps_number
    world.bc.pay_invoice(world.company_id, made["invoiceId"])
    world.sync()

    assert {r["AppointmentId"]: r["InvoiceState"] for r in rows(world, BOOKINGS)}[a] == "posted"
    assert uninvoiced(world)["value"] == []


def test_write_back_adds_one_marker_line_and_keeps_staff_notes(world):
    world.graph.configure(app_only_business_rules="off")  # Bookings' lenient reading (tests/test_write_back.py: both)
    world.configure(WRITE_BACK_TO_BOOKINGS="true")
    a = appointment(world)
    world.graph.update_appointment(world.business_ids[0], a, serviceNotes="Prefers mornings.")
    world.sync()

    job = run_job(world, {"bookingIds": [a]})

    notes = world.graph.appointment(world.business_ids[0], a)["serviceNotes"]
    number = job["invoices"][0]["invoiceNumber"]
    assert notes.startswith("Prefers mornings.\n")
    assert notes.count(f"Invoiced: Business Central draft invoice {number} (") == 1


@pytest.mark.parametrize("request_body, fragment", [
    ({}, "bookingIds"),
    ({"bookingIds": []}, "bookingIds"),
    ({"bookingIds": ["a"], "all": True}, "either"),
    ({"all": False}, "all: true"),
    ({"bookingIds": "abc"}, "bookingIds"),
    ({"bookingIds": ["x"] * 10_001}, "bookingIds"),
    ({"bookingIds": ["a"], "businessId": "b"}, "only with all"),
    ({"all": True, "unexpected": 1}, "unexpected"),
    ({"all": True, "dryRun": "maybe"}, "dryRun"),
])
def test_bad_invoice_requests_are_answered_400_with_problem_details(world, request_body, fragment):
    response = invoice(world, request_body)
    assert response.status_code == 400 and response.mimetype == "application/problem+json"
    problem = body(response)
    assert problem["status"] == 400 and problem["title"] and fragment in response.get_body().decode()


def test_malformed_json_wrong_media_type_and_bad_queries_are_4xx_problems(world):
    assert world.host.http("POST", "invoices", body="{not json").status_code == 400
    assert world.host.http("POST", "invoices", body='{"all": true}',
                           headers={"Content-Type": "text/plain"}).status_code == 415
    for params in ({"top": "0"}, {"top": "1001"}, {"top": "ten"}, {"from": "yesterday"}, {"colour": "red"},
                   {"skipToken": "!!"}):
        response = world.host.http("GET", "bookings/uninvoiced", params=params)
        assert response.status_code == 400 and response.mimetype == "application/problem+json", params
    assert world.host.http("GET", "invoices/jobs/not-a-job").status_code == 400
    missing = world.host.http("GET", f"invoices/jobs/{uuid.uuid4().hex}")
    assert missing.status_code == 404 and body(missing)["status"] == 404


def test_every_route_but_health_and_openapi_needs_a_function_key(world):
    assert world.host.http("GET", "bookings/uninvoiced", key=False).status_code == 401
    assert world.host.http("POST", "invoices", body={"all": True}, key=False).status_code == 401
    assert world.host.http("POST", "sync", key="wrong").status_code == 401
    assert world.host.http("GET", "health", key=False).status_code == 200
    assert world.host.http("GET", "openapi.json", key=False).status_code == 200


# -- Business Central as it really behaves ------------------------------------------------------

@pytest.mark.parametrize(("fault", "executes"), [
    ("late", True), ("408", True), ("408", False), ("504", True), ("504", False)],
    ids=["late", "408-bc-finishes-it", "408-bc-drops-it", "504-bc-finishes-it", "504-bc-drops-it"])
def test_an_invoice_batch_bc_may_finish_after_the_client_gave_up_bills_each_booking_once(world, fault, executes):
    for i in range(6):
        appointment(world, hours_ago=40 + i, customers=((f"c{i % 3}@example.com", f"C{i % 3}"),))
    world.sync()
    world.configure(HTTP_TIMEOUT_SECONDS="0.5")
    world.bc.plan.configure(late_executes=executes)
    world.bc.plan.script("POST", r"/\$batch$|/salesInvoices$", fault, times=1)

    response = invoice(world, {"all": True})
    job_id = body(response)["jobId"]
    seen_waiting = []
    drained = threading.Thread(target=world.host.drain)
    drained.start()
    while drained.is_alive():
        status = body(world.host.http("GET", f"invoices/jobs/{job_id}"))
        if status["waiting"]:
            seen_waiting.append(status)
        drained.join(timeout=0.2)
    job = body(world.host.http("GET", f"invoices/jobs/{job_id}"))

    assert world.bc.plan.stats.faults[fault] == 1
    assert seen_waiting and {s["status"] for s in seen_waiting} == {"running"}, "waiting is running, not failed"
    [wait] = seen_waiting[0]["waiting"][:1]
    assert wait["since"] and wait["reason"] == f"waiting for Business Central to confirm, since {wait['since']}"
    assert job["status"] == "succeeded" and job["waiting"] == [] and len(job["invoices"]) == 3
    assert set(lines_by_booking(world).values()) == {1} and sum(lines_by_booking(world).values()) == 6
    assert len(world.bc.invoices(world.company_id)) == 3


@pytest.mark.parametrize(("break_bc", "fragment"), [
    (lambda w: w.bc.set_api_template("customers", w.company_id),
     "has no Gen. Bus. Posting Group in Business Central. Fix: set its Gen. Bus. Posting Group"),
    (lambda w: w.bc.set_number_series(w.company_id, "salesInvoices", "exhausted"),
     "no usable number series for sales invoices. Fix: set Invoice Nos."),
    (lambda w: w.bc.set_api_template("items", w.company_id),
     "has no Gen. Prod. Posting Group in Business Central. Fix:"),
    (lambda w: w.bc.set_vat_posting_setup(w.company_id, "DOMESTIC", "STANDARD", exists=False),
     "has no VAT Posting Setup for VAT Bus. Posting Group 'DOMESTIC' (the customer's) and VAT Prod. Posting Group "
     "'STANDARD' (the item's). Fix: add that combination on BC's VAT Posting Setup page"),
    (lambda w: w.bc.set_api_template("items", w.company_id, generalProductPostingGroupCode="SERVICES",
                                     vatProdPostingGroup="STANDARD", salesBlocked=True),
     "is blocked for sales in Business Central (Sales Blocked, which BC's API does not show). Fix: clear Sales Blocked"),
], ids=["customer-posting-group", "number-series", "item-posting-group", "vat-posting-setup", "sales-blocked"])
def test_an_invoice_bc_refuses_for_its_setup_says_per_booking_what_to_fix_in_bc(world, break_bc, fragment):
    ids = [appointment(world, hours_ago=40 + i, customers=(("setup@example.com", "Setup"),)) for i in range(2)]
    break_bc(world)  # before the customer and the item are created from BC's API Setup templates
    world.sync()

    job = run_job(world, {"bookingIds": ids})

    assert job["status"] == "failed"
    assert {e["bookingId"] for e in job["errors"]} == set(ids)
    assert all(fragment in e["message"] and "invoice these bookings again" in e["message"] for e in job["errors"])
    assert sorted(r["id"] for r in uninvoiced(world)["value"]) == sorted(ids), "released, to invoice once fixed"


def test_a_blocked_customer_is_reported_with_the_fix(world):
    ids = [appointment(world, hours_ago=40, customers=(("blocked@example.com", "Blocked"),))]
    world.sync()
    [customer] = world.bc.customers(world.company_id)
    world.bc.update(world.company_id, "customers", customer["id"], blocked="Invoice")

    job = run_job(world, {"bookingIds": ids})

    [error] = job["errors"]
    assert "is blocked in Business Central (Blocked = Invoice). Fix: clear Blocked" in error["message"]


@pytest.mark.parametrize(("option", "value"), [(None, None), ("code_filter_uppercases_literal", True),
                                               ("case_functions_ignore_case", True)],
                         ids=["strict", "bc-upper-cases-code-literals", "tolower-ignores-literal-case"])
def test_a_lost_invoice_answer_is_found_by_its_key_under_each_reading_of_bcs_filters(world, option, value):
    if option:
        world.bc.configure(**{option: value})
    ids = [appointment(world, hours_ago=40 + i, customers=(("Mixed.Case@Example.com", "Mixed"),)) for i in range(2)]
    world.bc.add_customer(world.company_id, displayName="Mixed (BC)", email="Mixed.Case@EXAMPLE.com")
    world.sync()
    world.bc.plan.script("POST", r"/salesInvoices$", "lost", times=1)

    job = run_job(world, {"bookingIds": ids})

    assert job["status"] == "succeeded" and len(world.bc.invoices(world.company_id)) == 1
    assert len(world.bc.customers(world.company_id)) == 1, "the BC customer was linked, not duplicated"
