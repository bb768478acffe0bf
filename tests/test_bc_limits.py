"""Business Central's limits as they are: the `$filter` node limit, lengths in UTF-16 units, e-mail
address lists, 503 as "not run", and unknown outcomes confirmed within seconds."""

from __future__ import annotations

import logging
import statistics
import time

import pytest

from sandbox.bc import nodes, odata
from sandbox.bc.fields import CUSTOMER, INVOICE, ITEM
from shared.upstream.bc import CONFIRM_DELAYS, CUSTOMERS_BY_EMAIL, INVOICES_BY_KEY, ITEMS_BY_NAME, next_lookup
from shared.upstream.bc_lookups import MAX_QUERY_CHARS, NODE_BUDGET, QUERY_BUDGET, email_addresses
from shared.flows.messages import CustomerBatchUpsert, CustomerSource, CustomerUpsert, ItemUpsert, ServiceSource, encode
from shared.odata_filter import MAX_NODES, node_count
from shared.storage.store import CUSTOMER_LINKS, ITEM_LINKS, JOBS
from shared.upstream.utf16 import cut, units
from tests.helpers import body, rows
from tests.test_invoicing import appointment, invoice, run_job
from tests.sandbox.test_bc_sim import wait_until
from tests.test_pages import Browser

EMOJI = "\N{GRINNING FACE}"  # 1 code point, 2 UTF-16 units
ENTITIES = {"customers": CUSTOMER, "items": ITEM, "salesInvoices": INVOICE}


def upsert_customers(world, sources: list[CustomerSource]) -> None:
    world.host.send("directory-upserts", encode(CustomerBatchUpsert(customers=[
        CustomerUpsert(customer=s, sourceHash=f"h{i}") for i, s in enumerate(sources)])))
    world.host.drain()


# -- the node limit ---------------------------------------------------------------------------------

def longest_values() -> dict:
    """The longest values each lookup can ask for, with the most expensive characters: astral ones
    (2 UTF-16 units, 12 characters percent-encoded) and quotes (doubled in the literal)."""
    return {
        CUSTOMERS_BY_EMAIL: [f"{EMOJI * 28}'{i:03d}@{'e' * 7}.example.com" for i in range(100)],
        ITEMS_BY_NAME: [f"{EMOJI * 48}'{i:03d}" for i in range(100)],
        INVOICES_BY_KEY: [f"BKI-{'F' * 22}-{i:05d}" for i in range(100)],
    }


def test_the_largest_filters_the_app_builds_stay_within_bcs_node_limit_with_a_margin():
    for lookup, values in longest_values().items():
        wanted = lookup.askable(values)
        assert len(wanted) == 100, f"{lookup.entity_set}: every value fits its field ({units(values[0])} units)"
        queries = lookup.queries(wanted)
        asked = [value for query in queries for value in query.values]
        assert sorted(asked) == sorted(wanted), "every value is asked"
        entity = ENTITIES[lookup.entity_set].odata
        for query in queries + [f for q in queries for f in q.fallback]:
            counted = node_count(query.filter)
            assert counted <= NODE_BUDGET <= MAX_NODES - 10, (lookup.entity_set, counted)
            # The simulator counts independently, as BC would (strictest reading): the same number.
            assert nodes.count(odata.parse_filter(query.filter), entity, odata.FilterRules()) == counted
            assert len(query.url(lookup.entity_set)) <= QUERY_BUDGET + 100 < MAX_QUERY_CHARS
        assert len(queries) <= 100, "even the longest values of a message go in one $batch"


def test_the_chunk_size_follows_from_the_count_not_a_constant():
    per_filter = {lookup.entity_set: len(lookup.queries([f"v{i}@x.io" if lookup.address_list else f"V{i}"
                                                         for i in range(200)])[0].values)
                  for lookup in (CUSTOMERS_BY_EMAIL, ITEMS_BY_NAME, INVOICES_BY_KEY)}

    # tolower(field) eq 'v' is 6 nodes and each `or` one more: 13 terms are 90 nodes; a Code
    # field needs no tolower: 5 nodes, 15 terms are 89.
    assert per_filter == {"customers": 13, "items": 13, "salesInvoices": 15}


def test_many_new_customers_are_looked_up_within_the_node_limit_in_one_batch(world):
    world.configure(HTTP_TIMEOUT_SECONDS="60")  # batch sizes follow the timeout: the production default
    world.bc.add_customer(world.company_id, displayName="Known", email="known57@example.com")
    upsert_customers(world, [CustomerSource(email=f"known{i}@example.com", displayName=f"Known {i}")
                             for i in range(100)])

    assert len(world.bc.customers(world.company_id)) == 100, "99 created, one linked, none refused"
    assert all(r["Status"] == "linked" for r in rows(world, CUSTOMER_LINKS))
    assert dict(world.bc.plan.stats.requests) == {
        "POST /v2.0/{id}/production/api/v2.0/$batch": 2,
        "GET /v2.0/{id}/production/api/v2.0/companies()/customers": 2}, \
        "8 lookup filters in one $batch, 99 creates in another; the hourly check of BC's nested lookup: two GETs"


def test_a_bc_customer_filter_near_the_node_limit_is_taken_by_bc(world):
    from tests.test_push import by_email, enable_push

    cities = " or ".join(f"city eq 'Town {i}'" for i in range(14)) + " or city eq 'Oslo'"  # 89 nodes, +7 for the push
    assert node_count(cities) + 7 <= MAX_NODES < node_count(cities + " or city eq 'Bergen'") + 7
    enable_push(world, items=False, BC_CUSTOMER_FILTER=cities)
    world.bc.add_customer(world.company_id, type="Person", displayName="Oslo", email="oslo@example.com", city="Oslo")
    world.sync()  # the first push reads without a change clause, the second with one
    world.bc.add_customer(world.company_id, type="Person", displayName="Oslo 2", email="oslo2@example.com", city="Oslo")
    world.sync()

    assert set(by_email(world, 0)) == {"oslo@example.com", "oslo2@example.com"}
    counts = body(world.host.http("GET", "health", key=False))["lastSync"]
    assert counts["outcome"] == "succeeded", counts["errors"]


def test_a_push_filter_bc_would_refuse_fails_at_start_up_with_the_reason_and_position(world):
    from shared.settings import SettingsError, get_settings

    world.configure(BC_CUSTOMER_FILTER="city eq 'Oslo' or country eq 'NO'")
    with pytest.raises(SettingsError, match=r"BC_CUSTOMER_FILTER.*'or' at position 16 combines different fields"):
        get_settings()
    world.configure(BC_CUSTOMER_FILTER=" or ".join(f"city eq 'Town {i}'" for i in range(16)))
    with pytest.raises(SettingsError, match=r"BC_CUSTOMER_FILTER.*passes the limit at position \d+.*at most 93"):
        get_settings()
    world.configure(BC_CUSTOMER_FILTER=" or ".join(f"city eq '{'Ø' * 28}{i:02d}'" for i in range(12)))
    with pytest.raises(SettingsError, match=r"BC_CUSTOMER_FILTER.*characters in the URL once encoded.*2048"):
        get_settings()


# -- UTF-16 lengths ---------------------------------------------------------------------------------------

def test_utf16_cut_never_splits_a_character():
    assert units(EMOJI) == 2 and units("a" * 99 + EMOJI) == 101
    assert cut("a" * 99 + EMOJI, 100) == "a" * 99
    assert cut("a" * 98 + EMOJI + "b", 100) == "a" * 98 + EMOJI
    assert cut(EMOJI * 60, 100) == EMOJI * 50


def test_names_and_addresses_with_emoji_at_the_limit_reach_bc_in_its_lengths(world):
    at_limit = "a" * 98 + EMOJI  # 100 units: fits
    over = "b" * 99 + EMOJI  # 101 units: the emoji is cut
    upsert_customers(world, [
        CustomerSource(email="fits@example.com", displayName=at_limit, city="Tromsø " + EMOJI * 11),  # City Text[30]
        CustomerSource(email="over@example.com", displayName=over, addressLine1="x" * 99 + EMOJI)])

    by_email = {c["email"]: c for c in world.bc.customers(world.company_id)}
    assert by_email["fits@example.com"]["displayName"] == at_limit
    assert by_email["fits@example.com"]["city"] == "Tromsø " + EMOJI * 11  # 7 + 22 = 29 units
    assert by_email["over@example.com"]["displayName"] == "b" * 99
    assert by_email["over@example.com"]["addressLine1"] == ""
    left_out = {r["Key"]: r["LeftOut"] for r in rows(world, CUSTOMER_LINKS)}
    assert "addressLine1" in left_out["over@example.com"] and "longer than the 100 characters" in left_out[
        "over@example.com"]
    assert all(r["Status"] == "linked" for r in rows(world, CUSTOMER_LINKS))


def test_a_service_name_with_emoji_near_the_limit_makes_one_item_and_lines_bc_takes(world):
    name = "Massage " + EMOJI * 47  # 8 + 94 = 102 units: cut to 100 for the item, shorter in a line
    appointment(world, service=("svc-emoji", name))
    appointment(world, hours_ago=50, service=("svc-emoji", name))
    world.sync()
    world.sync()  # the item is found again by the name BC holds, not created twice

    job = run_job(world, {"all": True})

    assert job["status"] == "succeeded", job["errors"]
    [item] = world.bc.items(world.company_id)
    assert item["displayName"] == "Massage " + EMOJI * 46 and units(item["displayName"]) == 100
    [draft] = world.bc.invoices(world.company_id)
    assert all(units(line["description"]) <= 100 and line["description"].endswith(":00")
               for line in draft["salesInvoiceLines"])
    assert len(rows(world, ITEM_LINKS)) == 1


def test_a_template_value_longer_than_bc_counts_is_refused(world):
    response = world.host.http("PUT", "templates/customer/EMOJI", body={"city": "a" * 29 + EMOJI})

    assert response.status_code == 400
    assert "at most 30 characters as Business Central counts them" in body(response)["detail"]
    assert world.host.http("PUT", "templates/customer/EMOJI", body={"city": "a" * 28 + EMOJI}).status_code == 200


# -- e-mail address lists ------------------------------------------------------------------------------------

def test_email_lists_are_split_as_bcs_mail_management_does():
    assert email_addresses(" Front@Example.com; books@example.com;;") == ["front@example.com", "books@example.com"]
    assert email_addresses("") == [] and email_addresses("no address") == []


@pytest.mark.parametrize("honoured, undefined", [(True, "empty"), (False, "error"), (False, "empty"),
                                                 (False, "unfiltered")],
                         ids=["schemaversion-2.1", "ignored-refused", "ignored-answers-nothing", "ignored-answers-all"])
def test_a_customer_whose_bc_email_lists_several_addresses_is_found_by_any_never_duplicated(world, honoured,
                                                                                           undefined):
    """Where BC does not take the nested lookup it "either throws an error or returns an undefined
    result": a 400, or a 200 with nothing or everything. Neither may make a customer twice."""
    world.bc.configure(schema_version_2_1_honoured=honoured, nested_functions_without_2_1=undefined)
    world.bc.add_customer(world.company_id, displayName="Other", email="other@example.com")
    listed = world.bc.add_customer(world.company_id, displayName="Front desk",
                                   email="front@example.com;BOOKS@EXAMPLE.COM")
    upsert_customers(world, [CustomerSource(email="books@example.com", displayName="Books"),
                             CustomerSource(email="Front@Example.com", displayName="Front")])
    appointment(world, customers=(("books@example.com", "Books"),))
    world.sync()
    job = run_job(world, {"all": True})

    assert [c["id"] for c in world.bc.customers(world.company_id) if c["displayName"] != "Other"] == [listed["id"]], \
        "linked, not duplicated"
    assert {r["BcId"] for r in rows(world, CUSTOMER_LINKS)} == {listed["id"]}
    assert job["status"] == "succeeded" and world.bc.invoices(world.company_id)[0]["customerId"] == listed["id"]


def test_an_empty_company_never_spares_another_company_of_the_environment_the_nested_lookup_check(world):
    """"No customer with an e-mail to test BC's nested lookup with" is one company's state: kept a
    minute for it, it must not stand for a company of the same environment that has customers, whose
    lookups would then trust an answer BC may leave undefined."""
    from sandbox.stack import ENVIRONMENT, TENANT
    from shared.runtime import runtime

    world.bc.configure(schema_version_2_1_honoured=False, nested_functions_without_2_1="empty")
    empty = world.bc.add_company(TENANT, ENVIRONMENT, name="Empty Ltd")
    world.bc.add_customer(world.company_id, displayName="Front desk", email="front@example.com;books@example.com")

    async def verdicts() -> tuple[str, str, str]:
        rt = runtime()
        return (await rt.bc_for(empty).nested_calls(), await rt.bc_for(world.company_id).nested_calls(),
                await rt.bc_for(empty).nested_calls())

    assert world.host.run(verdicts(), 30) == ("unknown", "untrusted", "untrusted")


def test_an_address_that_is_only_part_of_another_customers_address_never_links_to_it(world):
    victim = world.bc.add_customer(world.company_id, displayName="Victim", email="victim@example.com;x@example.com")
    upsert_customers(world, [CustomerSource(email="tim@example.com", displayName="Tim")])  # `contains` finds Victim

    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "linked" and link["BcId"] != victim["id"]
    assert len(world.bc.customers(world.company_id)) == 2


# -- 429 and 503: not run ---------------------------------------------------------------------------------------

def test_a_create_answered_503_is_sent_again_at_once_and_made_once(world):
    world.bc.plan.configure(retry_after_seconds=0)
    world.bc.plan.script("POST", r"/customers$", "503", times=2)
    upsert_customers(world, [CustomerSource(email="unavailable@example.com", displayName="Una")])

    assert world.bc.plan.stats.faults["503"] == 2
    assert [c["email"] for c in world.bc.customers(world.company_id)] == ["unavailable@example.com"]
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "linked" and not link.get("ConfirmSince"), "no lookup, no settle wait"


@pytest.mark.parametrize("each_operation", [True, False], ids=["batch-counts-each-operation", "batch-counts-once"])
def test_batches_never_take_bc_past_its_rate_limit_however_bc_counts_them(world, monkeypatch, each_operation):
    """BC does not say whether a `$batch` counts as one request or as each of its operations
    toward its rate limit: the app charges its budget for each, so it meets no 429 either way."""
    from tests.test_limits import knobs

    monkeypatch.setattr("shared.upstream.bc.REQUESTS_PER_WINDOW", 150)  # BC's 6,000 per 5 minutes, scaled down
    monkeypatch.setattr("shared.upstream.bc.WINDOW_SECONDS", 4.0)
    world.configure(HTTP_TIMEOUT_SECONDS="60")  # batch sizes follow the timeout: 100 creates a batch
    with knobs(world.bc.plan, rate_limit=150, rate_window_seconds=4.0, batch_counts_each_operation=each_operation):
        for round_ in range(2):  # 2 × (8 lookups + 100 creates) operations: more than one window holds
            upsert_customers(world, [CustomerSource(email=f"r{round_}-{i}@example.com", displayName=f"R {i}")
                                     for i in range(100)])

    assert len(world.bc.customers(world.company_id)) == 200
    assert world.bc.plan.stats.faults["429"] == 0, "the app held itself back instead"


# -- unknown outcomes: confirmed within seconds -------------------------------------------------------------------

def test_the_lookups_after_an_unknown_outcome_start_within_seconds_and_back_off():
    from datetime import datetime, timedelta, timezone

    lost = datetime(2026, 5, 4, 10, 0, tzinfo=timezone.utc)
    settled = lost + timedelta(minutes=20)  # production: 2 × 60 s + BC's 8-minute queue + its 10-minute limit
    schedule, now = [], lost
    while now < settled:
        now = next_lookup(lost, now, settled)
        schedule.append((now - lost).total_seconds())

    assert schedule[:4] == [2.0, 6.0, 14.0, 29.0], "seconds at first"
    assert max(b - a for a, b in zip(schedule, schedule[1:], strict=False)) == max(CONFIRM_DELAYS) == 120.0
    assert schedule[-1] == 1200.0 and len(schedule) == 16, "16 lookups over BC's queue and execution limits, then settled"


@pytest.fixture
def deferrals(caplog):
    caplog.set_level(logging.INFO, logger="shared.flows.messages")

    def chosen(queue: str) -> list[int]:
        return [r.delay_seconds for r in caplog.records
                if getattr(r, "event", None) == "message_deferred" and getattr(r, "queue", None) == queue]
    return chosen


def invoice_lookups(world) -> int:
    return sum(n for path, n in world.bc.plan.stats.requests.items()
               if path.startswith("GET ") and path.endswith("/salesInvoices"))


def test_a_job_whose_create_answer_was_lost_finishes_in_seconds_not_after_the_settle_time(world, deferrals):
    """Median time from a lost answer to a finished job, where BC has the invoice: under 30 s,
    counted from the delays the app chose (the production settle time is 20 minutes)."""
    world.configure(BC_EXECUTION_LIMIT_SECONDS="600")  # production: a late create may land up to 10 min later
    scenarios = [("lost", "3"), ("504", "3"), ("408", "3"), ("late", "0.5")]
    waited, walls = [], []
    for index, (fault, timeout) in enumerate(scenarios):
        world.configure(HTTP_TIMEOUT_SECONDS=timeout)
        ids = [appointment(world, hours_ago=40 + index, customers=((f"lost{index}@example.com", "Lost"),))]
        world.sync()
        world.bc.plan.reset_stats()
        before = len(deferrals("invoice-jobs"))
        world.bc.plan.script("POST", r"/salesInvoices$", fault, times=1)
        started = time.monotonic()

        job = run_job(world, {"bookingIds": ids})

        walls.append(time.monotonic() - started)
        delays = deferrals("invoice-jobs")[before:]
        waited.append(sum(delays))
        assert job["status"] == "succeeded" and world.bc.plan.stats.faults[fault] == 1, (fault, job)
        assert 1 <= invoice_lookups(world) <= 3, (fault, "found by its key after one to three lookups")
        assert delays and max(delays) <= 15, (fault, delays)
    assert len(world.bc.invoices(world.company_id)) == len(scenarios), "each once"
    assert statistics.median(waited) < 30, waited
    logging.getLogger(__name__).warning("lost answer → finished job: chosen delays %s s, wall %s s (median %.1f s)",
                                        waited, [round(w, 1) for w in walls], statistics.median(walls))


def test_the_job_says_it_waits_for_bc_to_confirm_and_since_when(world):
    world.configure(BC_EXECUTION_LIMIT_SECONDS="600", HTTP_TIMEOUT_SECONDS="0.5")
    world.bc.plan.configure(late_executes=False)  # the 504'd create never lands: BC keeps not showing it
    ids = [appointment(world, customers=(("confirm@example.com", "Confirm"),))]
    world.sync()
    world.bc.plan.script("POST", r"/salesInvoices$", "504", times=1)
    job_id = body(invoice(world, {"bookingIds": ids}))["jobId"]
    with pytest.raises(TimeoutError):  # the part keeps waiting: a few lookups, far from the 10-minute settle time
        world.host.drain(timeout=8)

    status = body(world.host.http("GET", f"invoices/jobs/{job_id}"))
    browser = Browser(world)
    page = browser.get(f"pages/jobs/{job_id}").get_body().decode()
    french = browser.get(f"pages/jobs/{job_id}", headers={"accept-language": "fr"}).get_body().decode()

    [wait] = status["waiting"]
    assert status["status"] == "running" and wait["since"]
    assert wait["reason"] == f"waiting for Business Central to confirm, since {wait['since']}"
    [part] = [r for r in rows(world, JOBS, f"PartitionKey eq '{job_id}'") if r["RowKey"].startswith("part-")]
    assert part["Status"] == "waiting" and part["ConfirmSince"] == wait["since"]
    assert "waiting for Business Central to confirm, since" in page
    assert "attente de la confirmation de Business Central, depuis" in french
    assert world.bc.invoices(world.company_id) == [], "nothing created again before BC settles"


def test_a_create_bc_kept_in_its_queue_and_ran_after_the_client_gave_up_is_made_once(world):
    """BC may keep a request waiting for a slot up to its queue timeout, then run it up to its
    execution limit: the app creates an invoice again only once both have passed (here up to 6 s in
    the queue, 1 s to run, the client giving up after 0.5 s)."""
    world.configure(HTTP_TIMEOUT_SECONDS="0.5", BC_QUEUE_TIMEOUT_SECONDS="6")
    world.bc.plan.configure(queue_timeout_seconds=6, queued_seconds=5)  # then runs 0.9 s later (limit 1 s)
    ids = [appointment(world, customers=(("queued@example.com", "Queued"),))]
    world.sync()
    world.bc.plan.script("POST", r"/salesInvoices$", "queued", times=1)

    job = run_job(world, {"bookingIds": ids})

    assert world.bc.plan.stats.faults["queued"] == 1 and job["status"] == "succeeded", job
    assert wait_until(lambda: world.bc.plan.stats.executed_late == 1, seconds=10), "BC ran the queued create"
    assert len(world.bc.invoices(world.company_id)) == 1, "created once"


def test_a_create_answered_502_is_an_unknown_outcome_made_once(world):
    """BC documents 502 with `Retry-After` ("temporarily unavailable"), not whether the request
    ran: the invoice is looked for, and created again only once BC cannot be running it."""
    world.configure(HTTP_TIMEOUT_SECONDS="0.5")
    world.bc.plan.configure(retry_after_seconds=0)
    ids = [appointment(world, customers=(("gateway@example.com", "Gateway"),))]
    world.sync()
    world.bc.plan.script("POST", r"/salesInvoices$", "502", times=1)

    job = run_job(world, {"bookingIds": ids})

    assert world.bc.plan.stats.faults["502"] == 1 and job["status"] == "succeeded", job
    assert invoice_lookups(world) >= 1, "looked for before it was created again"
    assert len(world.bc.invoices(world.company_id)) == 1


def test_a_customer_whose_create_answer_was_lost_is_linked_within_seconds(world, deferrals):
    world.configure(BC_EXECUTION_LIMIT_SECONDS="600")
    world.bc.plan.script("POST", r"/customers$", "lost", times=1)

    upsert_customers(world, [CustomerSource(email="lostcustomer@example.com", displayName="Lost")])

    [customer] = world.bc.customers(world.company_id)
    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "linked" and link["BcId"] == customer["id"]
    assert deferrals("directory-upserts") and max(deferrals("directory-upserts")) <= 3


def test_an_item_whose_create_answer_was_lost_is_linked_within_seconds(world, deferrals):
    world.configure(BC_EXECUTION_LIMIT_SECONDS="600")
    world.bc.plan.script("POST", r"/items$", "lost", times=1)
    world.host.send("directory-upserts", encode(ItemUpsert(
        service=ServiceSource(serviceId="svc-lost", displayName="Lost service", defaultPrice=10), sourceHash="h")))
    world.host.drain()

    [item] = world.bc.items(world.company_id)
    [link] = rows(world, ITEM_LINKS)
    assert link["Status"] == "linked" and link["BcId"] == item["id"]
    assert deferrals("directory-upserts") and max(deferrals("directory-upserts")) <= 3


# -- Graph: an appointment's staff notes ------------------------------------------------------------------------

def test_staff_notes_too_long_for_the_marker_are_left_as_they_are_and_the_invoice_is_made(world, caplog):
    world.graph.configure(app_only_business_rules="off")  # the notes' length is what is tested
    world.configure(WRITE_BACK_TO_BOOKINGS="true")
    full = "n" * 980 + EMOJI * 5  # 990 units: the marker line would pass Bookings' 1,000
    a = appointment(world)
    world.graph.update_appointment(world.business_ids[0], a, serviceNotes=full)
    world.sync()
    caplog.set_level(logging.WARNING, logger="shared.flows.invoicing.write_back")

    job = run_job(world, {"bookingIds": [a]})

    assert job["status"] == "succeeded"
    assert world.graph.appointment(world.business_ids[0], a)["serviceNotes"] == full
    assert world.graph.writes(kind="appointments", method="PATCH") == [], "nothing sent that Bookings would refuse"
    assert any(getattr(r, "event", None) == "write_back_skipped" for r in caplog.records)
    assert job["invoices"][0]["writeBack"]["notNoted"][0]["outcome"] == "too-long", "and the job says so"
