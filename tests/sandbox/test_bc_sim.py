"""The Business Central simulator over HTTPS, driven the way the app drives the real API."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from sandbox import tokens
from sandbox.bc import BcSimulator
from sandbox.faults import FaultPlan, Knobs
from sandbox.server import ServerThread
from sandbox.tls import TlsFiles, make_tls_files

TENANT = "7e0a5a8c-3f0b-4a51-9d3e-1b2c3d4e5f60"
ENVIRONMENT = "Production"


@dataclass
class Bc:
    sim: BcSimulator
    client: httpx.Client
    company_id: str

    @property
    def company(self) -> str:
        return f"companies({self.company_id})"

    def url(self, path: str) -> str:
        return f"{self.company}/{path}"


@pytest.fixture(scope="module")
def tls() -> TlsFiles:
    return make_tls_files()


@pytest.fixture(scope="module")
def server(tls: TlsFiles) -> Iterator[tuple[BcSimulator, str]]:
    sim = BcSimulator(plan=FaultPlan(Knobs(max_concurrency=5, max_queued=100)), page_size=3)
    with ServerThread(sim.app, tls, name="bc-sim") as running:
        yield sim, running.url


@pytest.fixture
def bc(server: tuple[BcSimulator, str], tls: TlsFiles) -> Iterator[Bc]:
    """A fresh company per test, and a client whose base URL is the environment's API root."""
    sim, url = server
    company_id = sim.add_company(TENANT, ENVIRONMENT)
    token = tokens.issue(tokens.BC_AUDIENCE, TENANT, "client")
    with httpx.Client(base_url=f"{url}/v2.0/{TENANT}/{ENVIRONMENT}/api/v2.0/", verify=ssl.create_default_context(cafile=str(tls.ca_bundle)),
                      headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        yield Bc(sim, client, company_id)
    sim.set_api_template("customers")
    sim.set_api_template("items")
    sim.plan.clear()


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def test_create_customer_answers_201_with_a_number_and_an_etag(bc: Bc) -> None:
    response = bc.client.post(bc.url("customers"), json={"displayName": "Alice Vance", "type": "Person",
                                                         "email": "Alice@Example.com"})

    assert response.status_code == 201
    body = response.json()
    assert re.fullmatch(r"C\d{5}", body["number"])
    assert body["@odata.etag"].startswith('W/"') and response.headers["etag"] == body["@odata.etag"]
    assert response.headers["location"].endswith(f"customers({body['id']})")
    assert bc.client.get(bc.url(f"customers({body['id']})")).json()["email"] == "Alice@Example.com"


def test_a_request_without_a_valid_bc_token_is_refused(bc: Bc) -> None:
    graph_token = tokens.issue(tokens.GRAPH_AUDIENCE, TENANT, "client")

    missing = bc.client.get("companies", headers={"Authorization": ""})
    wrong_audience = bc.client.get("companies", headers={"Authorization": f"Bearer {graph_token}"})

    assert missing.status_code == wrong_audience.status_code == 401
    assert error_code(wrong_audience) == "Authentication_InvalidCredentials"


def test_validation_errors_name_the_problem(bc: Bc) -> None:
    no_name = bc.client.post(bc.url("customers"), json={"email": "x@example.com"})
    unknown = bc.client.post(bc.url("customers"), json={"displayName": "X", "emailAddress": "x@example.com"})
    read_only = bc.client.post(bc.url("customers"), json={"displayName": "X", "balanceDue": 5})
    bad_type = bc.client.post(bc.url("items"), json={"displayName": "Massage", "type": "Services"})
    too_long = bc.client.post(bc.url("salesInvoices"), json={"customerNumber": "C00010",
                                                             "externalDocumentNumber": "x" * 36})

    assert no_name.status_code == 400 and '"displayName"' in no_name.json()["error"]["message"]
    assert unknown.status_code == 400 and "'emailAddress'" in unknown.json()["error"]["message"]
    assert read_only.status_code == 400 and "balanceDue" in read_only.json()["error"]["message"]
    assert bad_type.status_code == 400 and "Non-Inventory" in bad_type.json()["error"]["message"]
    assert too_long.status_code == 400 and error_code(too_long) == "Application_StringExceededLength"
    assert bc.sim.customers(bc.company_id) == []


def test_filters_escape_quotes_and_compare_text_case_insensitively(bc: Bc) -> None:
    bc.sim.add_customer(bc.company_id, displayName="Seán O'Brien", email="o'brien@example.com")
    bc.sim.add_customer(bc.company_id, displayName="Alice Vance", email="Alice@Example.com")

    def find(expression: str) -> httpx.Response:
        return bc.client.get(bc.url("customers"), params={"$filter": expression})

    assert [c["displayName"] for c in find("email eq 'o''brien@example.com'").json()["value"]] == ["Seán O'Brien"]
    assert [c["displayName"] for c in find("email eq 'ALICE@example.com'").json()["value"]] == ["Alice Vance"]
    assert len(find("contains(displayName,'VANCE') or startswith(displayName,'seán')").json()["value"]) == 2
    assert len(find("contains(displayName,'VANCE') or startswith(displayName,'x')").json()["value"]) == 1

    injected = "x' or 1 eq 1 or email eq 'y"
    escaped = find(f"email eq '{injected.replace(chr(39), chr(39) * 2)}'")
    unescaped = find(f"email eq '{injected}'")
    assert escaped.status_code == 200 and escaped.json()["value"] == []
    assert unescaped.status_code == 400 and error_code(unescaped) == "BadRequest"


@pytest.mark.parametrize("expression", [
    "email eq",
    "email eq 'unterminated",
    "(email eq 'a'",
    "email eq 'a' or displayName eq 'b'",
    "id eq 'not-quoted-guids-only'",
    "number in ('C00010', 'C00020')",
    "nosuchfield eq 1",
    "frobnicate(email)",
    "email eq 'a' and",
])
def test_a_malformed_or_unsupported_filter_is_400_never_500(bc: Bc, expression: str) -> None:
    response = bc.client.get(bc.url("customers"), params={"$filter": expression})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_patch_and_delete_need_the_current_etag(bc: Bc) -> None:
    created = bc.client.post(bc.url("customers"), json={"displayName": "Ben"}).json()
    url = bc.url(f"customers({created['id']})")

    missing = bc.client.patch(url, json={"city": "Oslo"})
    updated = bc.client.patch(url, json={"city": "Oslo"}, headers={"If-Match": created["@odata.etag"]})
    stale = bc.client.patch(url, json={"city": "Bergen"}, headers={"If-Match": created["@odata.etag"]})
    stale_delete = bc.client.delete(url, headers={"If-Match": created["@odata.etag"]})
    forced = bc.client.patch(url, json={"city": "Bergen"}, headers={"If-Match": "*"})

    assert missing.status_code == 400 and error_code(missing) == "BadRequest_InvalidToken"
    assert updated.status_code == 200 and updated.json()["@odata.etag"] != created["@odata.etag"]
    assert stale.status_code == 409 and error_code(stale) == "Request_EntityChanged"
    assert stale_delete.status_code == 409
    assert forced.status_code == 200 and forced.json()["city"] == "Bergen"
    assert bc.client.get(url).json()["city"] == "Bergen"


def test_deep_insert_creates_an_invoice_with_its_lines_and_totals(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Chloé", email="chloe@example.com")
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=80)

    response = bc.client.post(bc.url("salesInvoices"), params={"$expand": "salesInvoiceLines"}, json={
        "customerId": customer["id"], "externalDocumentNumber": "BK-7F3A",
        "salesInvoiceLines": [
            {"lineType": "Item", "lineObjectNumber": item["number"], "quantity": 1.5,
             "description": "Massage – 2025-03-03 09:00"},
            {"itemId": item["id"], "quantity": 1, "unitPrice": 45.5},
        ],
    })

    assert response.status_code == 201, response.text
    invoice = response.json()
    assert invoice["status"] == "Draft" and invoice["number"].startswith("S-INV")
    assert invoice["customerNumber"] == customer["number"] and invoice["customerName"] == "Chloé"
    assert [line["amountExcludingTax"] for line in invoice["salesInvoiceLines"]] == [120, 45.5]
    assert [line["sequence"] for line in invoice["salesInvoiceLines"]] == [10000, 20000]
    assert invoice["totalAmountIncludingTax"] == 165.5
    found = bc.client.get(bc.url("salesInvoices"), params={"$filter": "externalDocumentNumber eq 'bk-7f3a'"})
    assert [i["id"] for i in found.json()["value"]] == [invoice["id"]]
    assert bc.sim.creates["salesInvoiceLines"] >= 2


def test_a_deep_insert_with_a_bad_line_creates_nothing(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Daniel")

    response = bc.client.post(bc.url("salesInvoices"), json={
        "customerId": customer["id"],
        "salesInvoiceLines": [{"itemId": "0b7c0e1e-5d1f-4c1a-9a43-6f3e2a1b0c9d", "quantity": 1}],
    })
    unknown_customer = bc.client.post(bc.url("salesInvoices"), json={"customerNumber": "NOPE"})
    no_customer = bc.client.post(bc.url("salesInvoices"), json={"externalDocumentNumber": "X"})

    assert response.status_code == 400 and "Item does not exist" in response.json()["error"]["message"]
    assert unknown_customer.status_code == 400 and no_customer.status_code == 400
    assert bc.sim.invoices(bc.company_id) == []


def test_batch_of_three_creates(bc: Bc) -> None:
    before = bc.sim.creates["customers"]
    requests = [{"id": str(n), "method": "POST", "url": bc.url("customers"),
                 "headers": {"Content-Type": "application/json"}, "body": {"displayName": f"Batch {n}"}}
                for n in range(3)]

    response = bc.client.post("$batch", json={"requests": requests})

    assert response.status_code == 200
    answers = response.json()["responses"]
    assert [(a["id"], a["status"]) for a in answers] == [("0", 201), ("1", 201), ("2", 201)]
    assert all(a["body"]["number"] and a["headers"]["etag"] for a in answers)
    assert sorted(c["displayName"] for c in bc.sim.customers(bc.company_id)) == ["Batch 0", "Batch 1", "Batch 2"]
    assert bc.sim.creates["customers"] == before + 3


def test_snapshot_batch_with_one_bad_request_creates_nothing(bc: Bc) -> None:
    requests = [
        {"id": "a", "method": "POST", "url": bc.url("customers"), "body": {"displayName": "Kept?"}},
        {"id": "b", "method": "POST", "url": bc.url("customers"), "body": {"displayName": "X", "bogus": 1}},
        {"id": "c", "method": "POST", "url": bc.url("customers"), "body": {"displayName": "Never run"}},
    ]

    snapshot = bc.client.post("$batch", json={"requests": requests}, headers={"Isolation": "snapshot"})

    answers = snapshot.json()["responses"]
    # As documented for BC: the answers before the failure still say 201, yet nothing was kept.
    assert [(a["id"], a["status"]) for a in answers] == [("a", 201), ("b", 400)]
    assert bc.sim.customers(bc.company_id) == []

    plain = bc.client.post("$batch", json={"requests": requests})
    assert [a["status"] for a in plain.json()["responses"]] == [201, 400]
    assert [c["displayName"] for c in bc.sim.customers(bc.company_id)] == ["Kept?"]


def test_batch_of_101_requests_is_refused(bc: Bc) -> None:
    requests = [{"id": str(n), "method": "GET", "url": bc.url("customers")} for n in range(101)]

    response = bc.client.post("$batch", json={"requests": requests})

    assert response.status_code == 400 and error_code(response) == "BadRequest"


def test_a_lost_answer_still_creates_the_customer(bc: Bc) -> None:
    bc.sim.plan.script("POST", re.escape(f"/{bc.company}/customers") + "$", "lost")

    with pytest.raises(httpx.TransportError):
        bc.client.post(bc.url("customers"), json={"displayName": "Emma", "email": "emma@example.com"})

    assert [c["email"] for c in bc.sim.customers(bc.company_id)] == ["emma@example.com"]
    found = bc.client.get(bc.url("customers"), params={"$filter": "email eq 'emma@example.com'"})
    assert len(found.json()["value"]) == 1


def test_the_api_template_fills_what_the_request_leaves_out(bc: Bc) -> None:
    terms = "5f7c1a2b-0000-4c3d-8e9f-0a1b2c3d4e5f"
    bc.sim.set_api_template("customers", paymentTermsId=terms, taxLiable=True, city="Template City")
    bc.sim.set_api_template("items", baseUnitOfMeasureCode="HOUR", generalProductPostingGroupCode="SERVICES")

    customer = bc.client.post(bc.url("customers"), json={"displayName": "Farid", "city": "Lyon"}).json()
    item = bc.client.post(bc.url("items"), json={"displayName": "Coaching", "type": "Service"}).json()
    by_user = bc.sim.add_customer(bc.company_id, displayName="Entered in BC")

    assert (customer["paymentTermsId"], customer["taxLiable"], customer["city"]) == (terms, True, "Lyon")
    assert (item["baseUnitOfMeasureCode"], item["generalProductPostingGroupCode"]) == ("HOUR", "SERVICES")
    assert item["baseUnitOfMeasureId"] != "00000000-0000-0000-0000-000000000000"
    assert by_user["paymentTermsId"] == "00000000-0000-0000-0000-000000000000"


def test_deleted_and_posted_invoices_as_a_bc_user_leaves_them(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Grace")
    item = bc.sim.add_item(bc.company_id, displayName="Session", type="Service", unitPrice=50)
    lines = [{"itemId": item["id"], "quantity": 1}]
    first = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"],
                                                          "salesInvoiceLines": lines}).json()
    second = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"],
                                                           "salesInvoiceLines": lines}).json()

    bc.sim.delete_invoice(bc.company_id, first["id"])
    posted = bc.sim.post_invoice(bc.company_id, second["id"])

    gone = bc.client.get(bc.url(f"salesInvoices({first['id']})"))
    assert gone.status_code == 404 and error_code(gone) == "Internal_RecordNotFound"
    again = bc.client.get(bc.url(f"salesInvoices({second['id']})")).json()
    assert again["status"] == "Open" and again["number"] == posted["number"] != second["number"]
    assert again["number"].startswith("PS-INV")
    refused = bc.client.delete(bc.url(f"salesInvoices({second['id']})"), headers={"If-Match": "*"})
    assert refused.status_code == 400


def test_long_lists_are_paged_with_next_links(bc: Bc) -> None:
    for n in range(7):
        bc.sim.add_customer(bc.company_id, displayName=f"Paged {n}")

    names, url, pages = [], bc.url("customers?$select=displayName"), 0
    while url:
        body = bc.client.get(url).json()
        names += [c["displayName"] for c in body["value"]]
        url, pages = body.get("@odata.nextLink"), pages + 1

    assert pages == 3 and names == [f"Paged {n}" for n in range(7)]


def test_lines_can_be_added_to_a_draft_and_change_its_etag_and_total(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Hiroshi")
    item = bc.sim.add_item(bc.company_id, displayName="Lesson", type="Service", unitPrice=30)
    invoice = bc.client.post(bc.url("salesInvoices"), json={"customerNumber": customer["number"]}).json()

    line = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines"),
                          json={"itemId": item["id"], "quantity": 2})
    after = bc.client.get(bc.url(f"salesInvoices({invoice['id']})")).json()

    assert line.status_code == 201 and line.json()["amountIncludingTax"] == 60
    assert after["totalAmountIncludingTax"] == 60 and after["@odata.etag"] != invoice["@odata.etag"]


def test_an_unknown_environment_or_company_is_404(bc: Bc) -> None:
    sandbox_root = str(bc.client.base_url).replace(f"/{ENVIRONMENT}/", "/Sandbox/")
    other_environment = bc.client.get(f"{sandbox_root}{bc.company}/customers")
    other_company = bc.client.get("companies(9d7a3c52-1b0e-4f6a-8c2d-3e4f5a6b7c8d)/customers")

    assert other_environment.status_code == 404 and error_code(other_environment) == "EnvironmentNotFound"
    assert other_company.status_code == 404 and error_code(other_company) == "Internal_CompanyNotFound"


def test_five_requests_at_a_time_per_environment_then_a_queue_then_429(bc: Bc) -> None:
    plan = bc.sim.plan
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(lambda _: bc.client.get(bc.url("customers")), range(12)))  # open 12 connections
        plan.reset_stats()
        plan.configure(latency_ms=300, max_concurrency=5, max_queued=3)
        try:
            answers = list(pool.map(lambda _: bc.client.get(bc.url("customers")), range(12)))
        finally:
            plan.configure(latency_ms=0, max_queued=100)

    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) == 8 and statuses.count(429) == 4
    throttled = next(a for a in answers if a.status_code == 429)
    assert error_code(throttled) == "Application_TooManyRequests" and throttled.headers["retry-after"]
    assert plan.stats.max_in_flight[f"/{TENANT}/{ENVIRONMENT}".lower()] == 5
