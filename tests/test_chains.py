"""Chains and franchises: businesses that bill into different BC companies (`BUSINESS_COMPANIES`)
and carry a dimension value per location (`INVOICE_DIMENSIONS`), end to end."""

from __future__ import annotations

import pytest

from sandbox.stack import ENVIRONMENT, TENANT
from tests.conftest import World, make_world
from tests.helpers import body
from tests.test_checks import checks
from tests.test_invoicing import appointment, run_job, uninvoiced

LOCATIONS = ("OSLO", "BERGEN", "STOCKHOLM")


def make_chain(sandbox, monkeypatch) -> World:
    """Three locations: Oslo and Bergen bill into the world's company (A), Stockholm into B
    ("Contoso Sweden AB"); each location's invoices carry LOCATION=<its code>, which both
    companies have set up."""
    made = make_world(sandbox, monkeypatch, businesses=3)
    monkeypatch.setattr("shared.flows.checks._cache", {})
    monkeypatch.setattr("shared.flows.invoicing.dimensions._checked", {})
    made.second_company = sandbox.bc.add_company(TENANT, ENVIRONMENT, name="Contoso Sweden AB")
    for company in (made.company_id, made.second_company):
        sandbox.bc.add_dimension(company, "LOCATION", "Location")
        for code in LOCATIONS:
            sandbox.bc.add_dimension_value(company, "LOCATION", code, code.title())
    oslo, bergen, stockholm = made.business_ids
    made.configure(BUSINESS_COMPANIES=f"{stockholm}={made.second_company}",
                   INVOICE_DIMENSIONS=",".join(f"{business}:LOCATION={code}"
                                               for business, code in zip(made.business_ids, LOCATIONS, strict=True)))
    return made


@pytest.fixture
def chain(sandbox, monkeypatch) -> World:
    made = make_chain(sandbox, monkeypatch)
    yield made
    made.host.close()


def _customers(world, company: str, email: str) -> list[dict]:
    return [c for c in world.bc.customers(company) if c["email"].lower() == email]


def test_a_customer_of_two_companies_exists_once_in_each_and_once_across_two_businesses_of_one(chain):
    for business in range(3):
        appointment(chain, business=business, customers=(("alice@example.com", "Alice"),))
    chain.sync()

    assert len(_customers(chain, chain.company_id, "alice@example.com")) == 1
    assert len(_customers(chain, chain.second_company, "alice@example.com")) == 1


def test_invoice_all_makes_one_draft_per_customer_company_and_location_with_the_location_on_every_line(chain):
    for business in range(3):
        appointment(chain, business=business, hours_ago=30)
        appointment(chain, business=business, hours_ago=50)
    chain.sync()

    job = run_job(chain, {"all": True})

    assert job["status"] == "succeeded" and job["bookingCount"] == 6 and len(job["invoices"]) == 3
    first = chain.bc.invoices(chain.company_id)
    second = chain.bc.invoices(chain.second_company)
    assert sorted(i["dimensions"]["LOCATION"] for i in first) == ["BERGEN", "OSLO"]
    assert [i["dimensions"] for i in second] == [{"LOCATION": "STOCKHOLM"}]
    for invoice in first + second:
        assert len(invoice["salesInvoiceLines"]) == 2
        assert all(line["dimensions"] == invoice["dimensions"] for line in invoice["salesInvoiceLines"])
    assert sum(len(invoice["salesInvoiceLines"]) for invoice in first + second) == 6
    assert [i["displayName"] for i in chain.bc.items(chain.second_company)] == ["Haircut"]
    assert uninvoiced(chain)["value"] == []


def test_a_dry_run_names_the_company_and_dimensions_of_each_draft(chain):
    appointment(chain, business=2)
    chain.sync()

    response = chain.host.http("POST", "invoices", body={"all": True, "dryRun": True})

    [draft] = body(response)["invoices"]
    assert draft["companyId"] == chain.second_company and draft["dimensions"] == {"LOCATION": "STOCKHOLM"}


def test_a_dimension_value_missing_in_bc_fails_the_invoice_with_what_to_create_and_health_names_it(chain, sandbox):
    oslo = chain.business_ids[0]
    chain.configure(INVOICE_DIMENSIONS=f"{oslo}:LOCATION=TROMSO")
    ident = appointment(chain)
    chain.sync()

    job = run_job(chain, {"bookingIds": [ident]})

    assert job["status"] == "failed" and chain.bc.invoices(chain.company_id) == []
    assert "no value TROMSO of dimension LOCATION" in job["errors"][0]["message"]
    assert [b["id"] for b in uninvoiced(chain)["value"]] == [ident]
    check = checks(chain)["dimensions"]
    assert not check["ok"] and "Dimension Values and create TROMSO" in check["message"]


@pytest.mark.parametrize("refused_at_once", [False, True])
def test_a_blocked_value_never_leaves_a_half_made_draft(chain, refused_at_once):
    chain.bc.configure(refuse_blocked_dimension_values=refused_at_once)
    chain.bc.block_dimension_value(chain.company_id, "LOCATION", "OSLO")
    ident = appointment(chain)
    chain.sync()

    job = run_job(chain, {"bookingIds": [ident]})

    if refused_at_once:  # BC refuses the dimension: the draft is deleted, health names the value
        assert job["status"] == "failed" and chain.bc.invoices(chain.company_id) == []
        assert "LOCATION - OSLO is blocked" in job["errors"][0]["message"]
        assert "LOCATION=OSLO" in checks(chain)["dimensions"]["message"]
        chain.bc.block_dimension_value(chain.company_id, "LOCATION", "OSLO", blocked=False)
        assert run_job(chain, {"bookingIds": [ident]})["status"] == "succeeded"
        chain.monkeypatch.setattr("shared.flows.checks._cache", {})
        assert checks(chain)["dimensions"]["ok"]
    else:  # BC takes it on the draft (API v2.0 cannot tell): the draft is whole, posting refuses it
        assert job["status"] == "succeeded"
        [draft] = chain.bc.invoices(chain.company_id)
        assert draft["dimensions"] == {"LOCATION": "OSLO"} and len(draft["salesInvoiceLines"]) == 1


def test_a_lost_answer_to_the_dimensions_makes_no_second_dimension_or_line(chain):
    ident = appointment(chain)
    chain.sync()
    chain.bc.plan.script("POST", r"/\$batch$", "lost", times=1)  # the dimension set lines' batch

    job = run_job(chain, {"bookingIds": [ident]})

    assert chain.bc.plan.stats.faults["lost"] == 1 and job["status"] == "succeeded"
    [draft] = chain.bc.invoices(chain.company_id)
    assert draft["dimensions"] == {"LOCATION": "OSLO"} and len(draft["salesInvoiceLines"]) == 1
    assert draft["salesInvoiceLines"][0]["dimensions"] == {"LOCATION": "OSLO"}


def test_a_lost_answer_to_the_lines_makes_no_second_line_and_keeps_the_draft(chain):
    first, second = appointment(chain, hours_ago=30), appointment(chain, hours_ago=50)
    chain.sync()
    chain.bc.plan.script("POST", r"/\$batch$", "lost", times=1, skip=1)  # the lines' batch, after the dimensions'

    job = run_job(chain, {"bookingIds": [first, second]})

    assert chain.bc.plan.stats.faults["lost"] == 1 and job["status"] == "succeeded", job
    [draft] = chain.bc.invoices(chain.company_id)
    assert [line["sequence"] for line in draft["salesInvoiceLines"]] == [10000, 20000]
    assert all(line["dimensions"] == {"LOCATION": "OSLO"} for line in draft["salesInvoiceLines"])
    assert job["invoices"][0]["invoiceNumber"] == draft["number"]


@pytest.mark.parametrize("item_wins", [True, False])
def test_default_dimensions_in_bc_never_replace_the_configured_value_on_the_header_or_a_line(chain, item_wins):
    chain.bc.configure(line_default_dims_override_header=item_wins)
    customer = chain.bc.add_customer(chain.company_id, displayName="Alice", email="alice@example.com")
    item = chain.bc.add_item(chain.company_id, displayName="Haircut", type="Service", unitPrice=50)
    chain.bc.add_default_dimension(chain.company_id, "customers", customer["number"], "LOCATION", "BERGEN")
    chain.bc.add_default_dimension(chain.company_id, "items", item["number"], "LOCATION", "STOCKHOLM")
    first, second = appointment(chain, hours_ago=30), appointment(chain, hours_ago=50)  # Oslo: LOCATION=OSLO
    chain.sync()

    job = run_job(chain, {"bookingIds": [first, second]})

    assert job["status"] == "succeeded", job
    [draft] = chain.bc.invoices(chain.company_id)
    assert draft["customerId"] == customer["id"] and draft["dimensions"] == {"LOCATION": "OSLO"}
    assert [line["dimensions"] for line in draft["salesInvoiceLines"]] == [{"LOCATION": "OSLO"}] * 2


def test_a_draft_bc_stops_answering_for_is_completed_by_the_next_attempt(chain, monkeypatch):
    monkeypatch.setattr("shared.flows.messages.THROTTLED_DEFER_SECONDS", 1.0)
    chain.bc.plan.configure(retry_after_seconds=0)
    ident = appointment(chain, business=2)
    chain.sync()
    chain.bc.plan.script("POST", r"/\$batch$", "503", times=8)  # every retry of the dimensions' batch

    job = run_job(chain, {"bookingIds": [ident]})

    assert job["status"] == "succeeded"
    [draft] = chain.bc.invoices(chain.second_company)
    assert draft["dimensions"] == {"LOCATION": "STOCKHOLM"}
    assert [line["dimensions"] for line in draft["salesInvoiceLines"]] == [{"LOCATION": "STOCKHOLM"}]


def test_reconciliation_follows_the_drafts_of_each_company(chain):
    oslo = appointment(chain, business=0)
    stockholm = appointment(chain, business=2)
    chain.sync()
    run_job(chain, {"all": True})
    [first] = chain.bc.invoices(chain.company_id)
    [second] = chain.bc.invoices(chain.second_company)

    chain.bc.delete_invoice(chain.second_company, second["id"])
    chain.bc.post_invoice(chain.company_id, first["id"])
    chain.sync()

    assert [b["id"] for b in uninvoiced(chain)["value"]] == [stockholm]
    assert oslo not in [b["id"] for b in uninvoiced(chain)["value"]]


def test_health_reaches_both_companies_and_names_one_bc_does_not_have(chain):
    assert checks(chain)["businessCentral"]["ok"]
    assert "Contoso Sweden AB" in checks(chain)["businessCentral"]["message"]
    assert checks(chain)["dimensions"]["ok"]

    missing = "0d1e2f3a-0000-4000-8000-000000000404"
    chain.configure(BUSINESS_COMPANIES=f"{chain.business_ids[2]}={missing}")
    found = checks(chain)["businessCentral"]

    assert not found["ok"] and missing in found["message"] and "BUSINESS_COMPANIES" in found["message"]


def test_settings_naming_an_unknown_business_are_refused_naming_the_setting(chain):
    chain.configure(INVOICE_DIMENSIONS="someone@else.example:LOCATION=OSLO")

    response = chain.host.http("GET", "bookings/uninvoiced")

    assert response.status_code == 503
    assert "INVOICE_DIMENSIONS names someone@else.example" in body(response)["detail"]
