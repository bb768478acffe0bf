"""Directory: Bookings customers and services → BC customers and service items, by template."""

from __future__ import annotations

import json

import pytest
import re
import threading
import uuid
from collections import Counter

from sandbox.data import generate
from shared.flows.directory.links import CUSTOMER_PARTITION
from shared.flows.messages import (CustomerBatchUpsert, CustomerSource, CustomerUpsert, ItemBatchUpsert, ItemUpsert,
                             ServiceSource, encode)
from shared.storage.store import CUSTOMER_LINKS, ITEM_LINKS
from tests.helpers import body, rows


def customer_message(email: str, name: str = "Alice Example", **fields) -> str:
    source = CustomerSource(email=email, displayName=name, **fields)
    return encode(CustomerUpsert(customer=source, sourceHash="h1"))


def item_message(service_id: str = "svc-1", name: str = "Haircut", price: float = 45.0) -> str:
    source = ServiceSource(serviceId=service_id, displayName=name, defaultPrice=price)
    return encode(ItemUpsert(service=source, sourceHash="h1"))


def put_template(world, kind: str, code: str, fields: dict):
    return world.host.http("PUT", f"templates/{kind}/{code}", body=fields)


def bc_customers(world, email: str | None = None) -> list[dict]:
    found = world.bc.customers(world.company_id)
    return [c for c in found if email is None or (c.get("email") or "").lower() == email]


def test_new_customer_gets_template_defaults_overridden_by_bookings_fields(world):
    terms = world.bc.setup_id("paymentTerms", "30 DAYS")  # BC takes only the id of payment terms it has
    assert put_template(world, "customer", "SALON", {"paymentTermsId": terms,
                                                     "currencyCode": "EUR", "city": "Template City"}).status_code == 200
    world.configure(CUSTOMER_TEMPLATE="SALON")
    world.host.send("directory-upserts", customer_message("new@example.com", city="Lyon", phone="+33 1 23"))

    world.host.drain()

    [created] = bc_customers(world, "new@example.com")
    assert created["type"] == "Person"
    assert created["currencyCode"] == "EUR"
    assert created["paymentTermsId"] == terms
    assert created["city"] == "Lyon", "mapped Bookings fields win over template defaults"
    assert created["displayName"] == "Alice Example" and created["phoneNumber"] == "+33 1 23"
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "linked" and link["Origin"] == "created" and link["BcId"] == created["id"]


def test_bc_api_template_fills_what_is_still_empty(world):
    world.bc.set_api_template("customers", taxLiable=True)
    world.host.send("directory-upserts", customer_message("fill@example.com"))
    world.host.drain()
    [created] = bc_customers(world, "fill@example.com")
    assert created["taxLiable"] is True
    world.bc.set_api_template("customers")


def test_existing_customer_with_other_case_is_linked_not_duplicated(world):
    existing = world.bc.add_customer(world.company_id, displayName="Alice (BC)", email="Alice@Example.com", city="")
    world.host.send("directory-upserts", customer_message("alice@example.com", city="Paris"))

    world.host.drain()

    assert len(world.bc.customers(world.company_id)) == 1
    [customer] = world.bc.customers(world.company_id)
    assert customer["displayName"] == "Alice (BC)", "for an existing record BC wins"
    assert customer["city"] == "Paris", "blank BC fields are filled"
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Origin"] == "linked" and link["BcId"] == existing["id"]


def test_apostrophe_email_is_matched_and_created_safely(world):
    world.host.send("directory-upserts", customer_message("o'brien@example.com", "Pat O'Brien"))
    world.host.send("directory-upserts", customer_message("o'brien@example.com", "Pat O'Brien"))
    world.host.drain()
    assert len(bc_customers(world, "o'brien@example.com")) == 1


def test_a_customer_without_email_is_never_created_and_its_message_is_poisoned_with_a_reason(world):
    world.host.send("directory-upserts", json.dumps({"kind": "customer", "customer": {"displayName": "No Mail"},
                                                     "sourceHash": "x"}))
    world.host.drain()
    assert world.bc.customers(world.company_id) == []
    [poisoned] = world.host.peek_poison("directory-upserts")
    assert "customer.email" in poisoned["reason"] and "Field required" in poisoned["reason"]


def test_duplicate_and_concurrent_messages_for_one_email_create_one_customer(world):
    world.bc.plan.configure(latency_ms=30)
    for _ in range(6):
        world.host.send("directory-upserts", customer_message("same@example.com"))
    world.host.drain()
    assert len(bc_customers(world, "same@example.com")) == 1


def test_resolving_concurrently_from_two_hosts_creates_one_customer(world, sandbox):
    from sandbox.host import FunctionHost
    from function_app import app

    world.bc.plan.configure(latency_ms=40)
    other = FunctionHost(app, sandbox.azurite.connection_string, retry_delay=0)
    try:
        for _ in range(4):
            world.host.send("directory-upserts", customer_message("race@example.com"))
        threads = [threading.Thread(target=h.drain) for h in (world.host, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        other.close()
    assert len(bc_customers(world, "race@example.com")) == 1


def test_throttling_and_server_error_storms_reach_the_same_end_state(world):
    world.configure(HTTP_TIMEOUT_SECONDS="1")  # a 503 to a create is an unknown outcome, waited out: briefly
    world.bc.plan.configure(fault_rate=0.3, fault_kinds=("429", "503"), retry_after_seconds=0, seed=3)
    for index in range(12):
        world.host.send("directory-upserts", customer_message(f"storm{index}@example.com", f"Storm {index}"))
    world.host.send("directory-upserts", item_message())
    world.host.drain()
    world.bc.plan.clear()

    assert world.bc.plan.stats.total_faults > 0
    assert sorted(c["email"] for c in world.bc.customers(world.company_id)) == sorted(
        f"storm{i}@example.com" for i in range(12))
    assert len(world.bc.items(world.company_id)) == 1
    assert all(r["Status"] == "linked" for r in rows(world, CUSTOMER_LINKS))


def test_a_create_whose_answer_was_lost_is_found_not_repeated(world):
    before = dict(world.bc.creates)
    world.bc.plan.script("POST", r"/customers$", "lost", times=1)
    world.bc.plan.script("POST", r"/items$", "lost", times=1)
    world.host.send("directory-upserts", customer_message("lost@example.com"))
    world.host.send("directory-upserts", item_message("svc-lost", "Massage"))
    world.host.drain()

    assert world.bc.plan.stats.faults["lost"] == 2
    assert len(bc_customers(world, "lost@example.com")) == 1
    assert len(world.bc.items(world.company_id)) == 1
    assert world.bc.creates["customers"] - before.get("customers", 0) == 1
    assert world.bc.creates["items"] - before.get("items", 0) == 1


def test_a_missing_template_poisons_the_message_naming_it_and_the_status_reports_it(world):
    world.configure(CUSTOMER_TEMPLATE="NOPE")
    world.host.send("directory-upserts", customer_message("t@example.com"))
    world.host.drain()

    assert world.bc.customers(world.company_id) == []
    [poisoned] = world.host.peek_poison("directory-upserts")
    assert "'NOPE'" in poisoned["reason"] and "CUSTOMER_TEMPLATE" in poisoned["reason"]
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "failed" and "NOPE" in link["LastError"]
    status = body(world.host.http("GET", "status"))
    assert status["directory"]["customerFailures"] == 1


def test_a_message_that_keeps_failing_lands_in_poison_after_max_dequeue_count(world):
    world.bc.plan.configure(retry_after_seconds=0)
    # Every customer read (the nested-lookup check, the lookups' $batch) finds BC unavailable (503, Retry-After: 0).
    world.bc.plan.script("*", r"/customers|/\$batch$", "503", times=1000)
    world.host.send("directory-upserts", customer_message("down@example.com"))
    world.host.drain()
    world.bc.plan.clear()

    [poisoned] = world.host.peek_poison("directory-upserts")
    assert poisoned["dequeueCount"] == 5 and "failed 5 times" in poisoned["reason"]
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "failed" and link["LastError"]


def test_new_service_becomes_a_service_item_from_the_item_template(world):
    put_template(world, "item", "SERVICES", {"baseUnitOfMeasureCode": "HOUR",
                                              "generalProductPostingGroupCode": "SERVICES", "unitPrice": 1})
    world.configure(ITEM_TEMPLATE="SERVICES")
    world.host.send("directory-upserts", item_message("svc-9", "Colour", 80.0))
    world.host.drain()

    [item] = world.bc.items(world.company_id)
    assert item["type"] == "Service" and item["displayName"] == "Colour" and item["unitPrice"] == 80.0
    assert item["baseUnitOfMeasureCode"] == "HOUR" and item["generalProductPostingGroupCode"] == "SERVICES"
    [link] = rows(world, ITEM_LINKS)
    assert link["Origin"] == "created"


def test_a_renamed_and_repriced_service_updates_the_item_it_created(world):
    world.host.send("directory-upserts", item_message("svc-2", "Cut", 40.0))
    world.host.drain()
    changed = encode(ItemUpsert(service=ServiceSource(serviceId="svc-2", displayName="Cut & style", defaultPrice=55.0),
                                sourceHash="h2"))
    world.host.send("directory-upserts", changed)
    world.host.drain()
    [item] = world.bc.items(world.company_id)
    assert (item["displayName"], item["unitPrice"]) == ("Cut & style", 55.0)


def test_disabled_sync_flags_leave_bc_alone(world):
    world.configure(SYNC_CUSTOMERS="false", SYNC_ITEMS="false")
    world.host.send("directory-upserts", customer_message("off@example.com"))
    world.host.send("directory-upserts", item_message())
    world.host.drain()
    assert world.bc.customers(world.company_id) == [] and world.bc.items(world.company_id) == []


def test_sync_queues_each_customer_and_service_once_and_nothing_when_unchanged(world):
    dataset = generate(appointments=120, customers=30, services=5, business_ids=world.business_ids, seed=11)
    world.graph.load(dataset)
    world.sync()

    emails = {(c.get("emailAddress") or "").strip().lower() for b in dataset.businesses.values() for c in b.customers}
    emails |= {(a.get("customerEmailAddress") or "").strip().lower() for _, a in dataset.appointments()}
    emails |= {(c.get("emailAddress") or "").strip().lower() for _, a in dataset.appointments() for c in a["customers"]}
    emails = {e for e in emails if "@" in e}
    bc_emails = sorted((c["email"] or "").lower() for c in world.bc.customers(world.company_id))
    assert bc_emails == sorted(emails), "one BC customer per distinct normalised e-mail"
    assert len(world.bc.items(world.company_id)) == 5
    creates = dict(world.bc.creates)

    world.sync()

    assert body(world.host.http("GET", "status"))["lastSync"]["counts"]["customersQueued"] == 0
    assert dict(world.bc.creates) == creates


def test_templates_are_listed_and_validated_against_bc_fields(world):
    assert put_template(world, "item", "BASIC", {"baseUnitOfMeasureCode": "HOUR"}).status_code == 200
    response = put_template(world, "customer", "BAD", {"paymentTermz": "x"})
    assert response.status_code == 400 and response.mimetype == "application/problem+json"
    assert "paymentTermz" in body(response)["detail"]
    assert put_template(world, "vendor", "X", {}).status_code == 400
    assert put_template(world, "item", "BAD", {"type": "Inventory"}).status_code == 400
    listed = body(world.host.http("GET", "templates"))["value"]
    assert [(t["kind"], t["code"], t["fields"]) for t in listed] == [("item", "BASIC", {"baseUnitOfMeasureCode": "HOUR"})]


def test_link_rows_live_in_one_partition_keyed_by_normalised_email(world):
    world.host.send("directory-upserts", customer_message("a/b#c?d@example.com"))
    world.host.drain()
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["PartitionKey"] == CUSTOMER_PARTITION and "/" not in link["RowKey"] and "#" not in link["RowKey"]
    assert link["Key"] == "a/b#c?d@example.com"


def test_one_batch_of_new_customers_and_items_costs_a_few_bc_requests(world):
    world.configure(HTTP_TIMEOUT_SECONDS="60")  # batch sizes follow the timeout: the production default
    customers = [(CustomerSource(email=f"bulk{i}@example.com", displayName=f"Bulk {i}"), "h") for i in range(40)]
    message = encode(CustomerBatchUpsert(customers=[CustomerUpsert(customer=c, sourceHash=h) for c, h in customers]))
    services = [ItemUpsert(service=ServiceSource(serviceId=f"svc-{i}", displayName=f"Service {i % 5}",
                                                 defaultPrice=10 + i), sourceHash="h") for i in range(10)]
    world.host.send("directory-upserts", message)
    world.host.send("directory-upserts", encode(ItemBatchUpsert(services=services)))
    world.bc.plan.reset_stats()

    world.host.drain()

    assert len(world.bc.customers(world.company_id)) == 40
    assert len(world.bc.items(world.company_id)) == 5, "services BC knows by one name share one item"
    assert len({r["BcId"] for r in rows(world, ITEM_LINKS)}) == 5 and len(rows(world, ITEM_LINKS)) == 10
    # lookups and creates of each kind (a $batch or a GET each), and one GET looking for a customer
    # to check BC's nested lookup with (a new company has none yet)
    assert world.bc.plan.stats.total_requests <= 5, dict(world.bc.plan.stats.requests)


def test_a_customer_bc_refuses_is_poisoned_at_once_with_bcs_reason(world):
    put_template(world, "customer", "BROKEN", {"paymentTermsId": "not-a-guid"})
    world.configure(CUSTOMER_TEMPLATE="BROKEN")
    world.host.send("directory-upserts", customer_message("refused@example.com"))
    world.host.drain()

    [poisoned] = world.host.peek_poison("directory-upserts")
    assert poisoned["dequeueCount"] == 1 and "Business Central refused" in poisoned["reason"]
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "failed" and link["LastError"]


@pytest.mark.parametrize("template, fragment", [
    ({"salespersonCode": "NOPE"}, "Business Central has no Salesperson/Purchaser 'NOPE' (the Salesperson Code of the "
                                  "new Customer). Fix: correct it in the template"),
    ({"currencyCode": "XYZ"}, "Business Central has no Currency that currencyCode names. Fix: set currencyCode in the "
                              "customer or item template"),
], ids=["salesperson", "currency"])
def test_a_template_value_bc_has_no_record_of_is_reported_with_bcs_message_and_the_fix(world, template, fragment):
    assert put_template(world, "customer", "TYPO", template).status_code == 200  # types and lengths are fine
    world.configure(CUSTOMER_TEMPLATE="TYPO")
    world.host.send("directory-upserts", customer_message("typo@example.com"))
    world.host.drain()

    [poisoned] = world.host.peek_poison("directory-upserts")
    [link] = rows(world, CUSTOMER_LINKS)
    assert fragment in poisoned["reason"] and link["Status"] == "failed" and fragment in link["LastError"]
    assert bc_customers(world, "typo@example.com") == []


def test_customers_are_upserted_while_the_calendar_is_still_being_read(world):
    dataset = generate(appointments=60, customers=20, services=3, business_ids=world.business_ids, seed=5)
    world.graph.load(dataset)
    # The first calendarView answer hangs, then times out (504): the pull takes longer than the
    # host takes to look at the directory queue again (up to half a second), even on a busy machine.
    world.configure(HTTP_TIMEOUT_SECONDS="5")
    world.graph.plan.configure(hang_seconds=2.5, retry_after_seconds=0)
    world.graph.plan.script("GET", r"/calendarView", "timeout", times=1)

    world.host.run_listening(world.host.timer_async("sync_bookings"))

    run = body(world.host.http("GET", "status"))["lastSync"]
    assert run["outcome"] == "succeeded" and run["counts"]["created"] == 60
    upserts_done = [at for queue, at in world.host.stats.finished_at if queue == "directory-upserts"]
    parts_done = [at for queue, at in world.host.stats.finished_at if queue == "sync-businesses"]
    assert upserts_done and min(upserts_done) < max(parts_done), \
        "the directory upserts ran while the business's sync was still reading the calendar"
    assert len(world.bc.customers(world.company_id)) == run["counts"]["customersQueued"] > 10


def test_a_customer_of_two_businesses_is_made_once_and_kept_by_the_first_business(world2):
    first, second = world2.business_ids
    for business, name, city in ((first, "Ann First", "Lyon"), (second, "Ann Second", "Oslo")):
        world2.graph.put_customer(business, {"id": str(uuid.uuid4()), "displayName": name,
                                             "emailAddress": "Ann@Example.com", "phones": [],
                                             "addresses": [{"street": "1 Main St", "city": city, "state": "",
                                                            "countryOrRegion": "", "postalCode": ""}]})
    # The first business's customer list answers last: the second business's sync reaches Ann first.
    world2.graph.plan.configure(hang_seconds=0.5, retry_after_seconds=0)
    world2.graph.plan.script("GET", rf"/{re.escape(first)}/customers", "timeout", times=1)

    world2.sync()

    [customer] = world2.bc.customers(world2.company_id)
    assert customer["displayName"] in ("Ann First", "Ann Second")
    [link] = rows(world2, CUSTOMER_LINKS, "PartitionKey eq 'customer'")
    assert link["SourceHash"].endswith(f"|{first}"), "the first business in BOOKINGS_BUSINESS_IDS keeps her"
    for _ in range(2):
        world2.sync()
        counts = body(world2.host.http("GET", "status"))["lastSync"]["counts"]
        assert counts["customersQueued"] == 0, "the two businesses do not undo each other's data"
    assert len(world2.bc.customers(world2.company_id)) == 1


def test_a_batch_of_new_customers_is_looked_up_in_one_request(world):
    world.configure(HTTP_TIMEOUT_SECONDS="60")  # batch sizes follow the timeout: the production default
    world.host.send("directory-upserts", encode(CustomerBatchUpsert(customers=[
        CustomerUpsert(customer=CustomerSource(email=f"new{i}@example.com", displayName=f"New {i}"), sourceHash=f"h{i}")
        for i in range(100)])))
    world.host.drain()

    assert len(world.bc.customers(world.company_id)) == 100
    assert Counter(world.bc.plan.stats.requests) == Counter({
        "POST /v2.0/{id}/production/api/v2.0/$batch": 2,
        "GET /v2.0/{id}/production/api/v2.0/companies()/customers": 1}), \
        "one $batch of 8 lookups (13 addresses each, BC's node limit), one $batch of 100 creates, and one GET for a " \
        "customer to check BC's nested lookup with (a new company has none)"


# -- Business Central as it really behaves ------------------------------------------------------

def test_an_item_bc_names_in_another_case_is_linked_not_created_again(world):
    existing = world.bc.add_item(world.company_id, displayName="Initial Consultation", type="Service")
    world.host.send("directory-upserts", item_message("svc-intro", "initial consultation", 80.0))
    world.host.drain()

    assert [i["id"] for i in world.bc.items(world.company_id)] == [existing["id"]]
    [link] = rows(world, ITEM_LINKS)
    assert link["Status"] == "linked" and link["BcId"] == existing["id"] and link["Origin"] == "linked"


def test_a_customer_bc_spells_in_capitals_is_linked_not_duplicated(world):
    existing = world.bc.add_customer(world.company_id, displayName="Bob Smith", email="Bob.Smith@Example.COM")
    world.host.send("directory-upserts", customer_message("bob.smith@example.com", "Bob"))
    world.host.drain()

    assert [c["id"] for c in world.bc.customers(world.company_id)] == [existing["id"]]


def test_countries_written_in_any_language_reach_bc_as_its_country_codes(world):
    written = {"us@example.com": "United States", "no@example.com": "Norge", "nl@example.com": "Pays-Bas",
               "de@example.com": "Deutschland", "gb@example.com": "UK"}
    for email, country in written.items():
        world.host.send("directory-upserts", customer_message(email, country=country, city="Town"))
    world.host.drain()

    assert {c["email"]: c["country"] for c in world.bc.customers(world.company_id)} == {
        "us@example.com": "US", "no@example.com": "NO", "nl@example.com": "NL", "de@example.com": "DE",
        "gb@example.com": "GB"}
    assert all(r["Status"] == "linked" and not r.get("LeftOut") for r in rows(world, CUSTOMER_LINKS))


def test_a_customer_with_fields_bc_refuses_is_created_without_them_and_the_status_says_which(world):
    world.host.send("directory-upserts", customer_message("ann@example.com", "Ann", phone="555 0102 ext. 7",
                                                          country="Narnia", city="Cair Paravel"))
    world.host.drain()

    [customer] = world.bc.customers(world.company_id)
    assert customer["email"] == "ann@example.com" and customer["city"] == "Cair Paravel"
    assert customer["phoneNumber"] == "" and customer["country"] == ""
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "linked" and "phoneNumber" in link["LeftOut"] and "'Narnia'" in link["LeftOut"]
    status = body(world.host.http("GET", "status"))
    assert status["directory"]["customersWithFieldsLeftOut"] == 1 and status["directory"]["customerFailures"] == 0
    [left_out] = status["directory"]["leftOut"]
    assert "contains letters" in left_out["leftOut"] and "not a country/region" in left_out["leftOut"]
    assert world.host.peek_poison("directory-upserts") == []


def test_a_field_bc_refuses_unforeseen_is_left_out_with_bcs_reason_and_the_customer_created(world):
    world.host.send("directory-upserts", customer_message("first@example.com", country="Norway"))
    world.host.drain()  # the app now knows BC's countries (it reads them once an hour)
    world.bc.remove_country(world.company_id, "NO")
    world.host.send("directory-upserts", customer_message("second@example.com", country="Norge", city="Oslo"))
    world.host.drain()

    second = bc_customers(world, "second@example.com")
    assert len(second) == 1 and second[0]["country"] == "" and second[0]["city"] == "Oslo"
    link = next(r for r in rows(world, CUSTOMER_LINKS) if r["Key"] == "second@example.com")
    assert "Country/Region" in link["LeftOut"] and "Business Central refused it" in link["LeftOut"]


def test_an_email_longer_than_bc_allows_is_never_put_in_a_filter(world):
    long_email = "a" * 75 + "@example.com"
    world.host.send("directory-upserts", encode(CustomerBatchUpsert(customers=[
        CustomerUpsert(customer=CustomerSource(email=email, displayName="Batch"), sourceHash="h")
        for email in ("short@example.com", long_email, "other@example.com")])))
    world.host.drain()

    assert sorted(c["email"] for c in world.bc.customers(world.company_id)) == ["", "other@example.com",
                                                                                "short@example.com"]
    assert all(r["Status"] == "linked" for r in rows(world, CUSTOMER_LINKS)), \
        "BC refuses a whole filter with a literal longer than the field: the others would have failed too"
    long_link = next(r for r in rows(world, CUSTOMER_LINKS) if r["Key"] == long_email)
    assert "longer than the 80 characters" in long_link["LeftOut"]


LATE_VARIANTS = pytest.mark.parametrize(("fault", "executes"), [
    ("late", True), ("408", True), ("408", False), ("504", True), ("504", False)],
    ids=["late", "408-bc-finishes-it", "408-bc-drops-it", "504-bc-finishes-it", "504-bc-drops-it"])
"""BC's docs say a timed-out request is cancelled; it may still have committed: both variants."""


@LATE_VARIANTS
def test_a_create_bc_may_finish_after_the_client_gave_up_makes_one_customer(world, fault, executes):
    world.configure(HTTP_TIMEOUT_SECONDS="0.5")
    world.bc.plan.configure(late_executes=executes)
    world.bc.plan.script("POST", r"/\$batch$", fault, times=1)
    world.host.send("directory-upserts", encode(CustomerBatchUpsert(customers=[
        CustomerUpsert(customer=CustomerSource(email=f"late{i}@example.com", displayName=f"Late {i}"), sourceHash="h")
        for i in range(3)])))
    world.host.drain()

    assert world.bc.plan.stats.faults[fault] == 1
    assert sorted(c["email"] for c in world.bc.customers(world.company_id)) == [f"late{i}@example.com"
                                                                               for i in range(3)]
    assert all(r["Status"] == "linked" for r in rows(world, CUSTOMER_LINKS))


def test_throttling_without_retry_after_defers_the_upsert_and_never_poisons_it(world, monkeypatch):
    from shared.upstream.http import ApiClient

    monkeypatch.setattr(ApiClient, "_delay", lambda self, attempt, retry_after: 0.01)  # retry at once
    monkeypatch.setattr("shared.flows.messages.THROTTLED_DEFER_SECONDS", 1.0)  # come back after a second, not a minute
    world.bc.plan.configure(retry_after_omitted=1.0)
    world.bc.plan.script("POST", r"/customers$", "429", times=7 * 3)  # three whole invocations' worth of retries
    world.host.send("directory-upserts", customer_message("busy@example.com"))
    stats = world.host.drain()

    assert world.bc.plan.stats.faults["429"] == 21
    assert len(bc_customers(world, "busy@example.com")) == 1
    assert stats.failed_attempts == 0 and world.host.peek_poison("directory-upserts") == []


def test_two_services_of_one_name_wait_for_each_others_unknown_create_and_share_one_item(world2):
    world = world2
    world.bc.plan.script("POST", r"/items$", "504", times=1)  # answered at once, created 0.9 s later
    world.host.send("directory-upserts", item_message("svc-a", "Massage", 60.0))
    world.host.send("directory-upserts", item_message("svc-b", "Massage", 60.0))
    world.host.drain()

    [item] = world.bc.items(world.company_id)
    assert {r["Key"]: r["BcId"] for r in rows(world, ITEM_LINKS)} == {"svc-a": item["id"], "svc-b": item["id"]}
