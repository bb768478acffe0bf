"""The Business Central simulator over HTTPS, driven the way the app drives the real API.

Each behaviour here is a row of `sandbox/FIDELITY.md`, which names where BC documents it."""

from __future__ import annotations

import dataclasses
import re
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest

from sandbox import tokens
from sandbox.bc import BcSimulator
from sandbox.bc.app import default_knobs
from sandbox.bc.options import BcOptions
from sandbox.bc.webclient import parse_filter
from sandbox.faults import FAULT_KINDS, Knobs
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
    sim = BcSimulator(page_size=3)  # BC's own limits (default_knobs) and the strictest options
    with ServerThread(sim.app, tls, name="bc-sim") as running:
        yield sim, running.url


def _spaces_as_percent_20(request: httpx.Request) -> None:
    """httpx writes a space in `params` as `+`, which BC need not read as one (`BcOptions.plus_in_query_is_space`);
    a `+` in a value is `%2B`, so every `+` httpx wrote is a space."""
    if b"+" in request.url.query:
        request.url = request.url.copy_with(query=request.url.query.replace(b"+", b"%20"))


def make_client(url: str, tls: TlsFiles, principal: str = "client", **options) -> httpx.Client:
    token = tokens.issue(tokens.BC_AUDIENCE, TENANT, principal)
    return httpx.Client(base_url=f"{url}/v2.0/{TENANT}/{ENVIRONMENT}/api/v2.0/",
                        verify=ssl.create_default_context(cafile=str(tls.ca_bundle)),
                        headers={"Authorization": f"Bearer {token}"},
                        event_hooks={"request": [_spaces_as_percent_20]}, **{"timeout": 10, **options})


@pytest.fixture
def bc(server: tuple[BcSimulator, str], tls: TlsFiles) -> Iterator[Bc]:
    """A fresh company per test, and a client whose base URL is the environment's API root."""
    sim, url = server
    company_id = sim.add_company(TENANT, ENVIRONMENT)
    with make_client(url, tls) as client:
        yield Bc(sim, client, company_id)
    sim.plan.clear()
    sim.plan.configure(**dataclasses.asdict(default_knobs()))
    sim.configure(**dataclasses.asdict(BcOptions()))


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def error_message(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


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


def test_filters_escape_quotes(bc: Bc) -> None:
    bc.sim.add_customer(bc.company_id, displayName="Seán O'Brien", email="o'brien@example.com")
    bc.sim.add_customer(bc.company_id, displayName="Alice Vance", email="Alice@Example.com")

    def find(expression: str) -> httpx.Response:
        return bc.client.get(bc.url("customers"), params={"$filter": expression})

    assert [c["displayName"] for c in find("email eq 'o''brien@example.com'").json()["value"]] == ["Seán O'Brien"]
    assert len(find("contains(displayName,'Vance') or startswith(displayName,'Seán')").json()["value"]) == 2

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
    assert invoice["totalAmountIncludingTax"] == 0, "the answer's totals are the header's as inserted (strictest)"
    assert bc.client.get(bc.url(f"salesInvoices({invoice['id']})")).json()["totalAmountIncludingTax"] == 165.5
    bc.sim.configure(deep_insert_answer_has_totals=True)
    again = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"], "salesInvoiceLines": [
        {"itemId": item["id"], "quantity": 1, "unitPrice": 45.5}]})
    assert again.json()["totalAmountIncludingTax"] == 45.5
    found = bc.client.get(bc.url("salesInvoices"), params={"$filter": "externalDocumentNumber eq 'BK-7F3A'"})
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

    assert response.status_code == 400 and error_code(response) == "Unknown"
    assert error_message(response) == ("The current batch message contains too many parts. A maximum number of '100' "
                                       "query operations and change sets are allowed in a batch message.")


def test_a_lost_answer_still_creates_the_customer(bc: Bc) -> None:
    bc.sim.plan.script("POST", re.escape(f"/{bc.company}/customers") + "$", "lost")

    with pytest.raises(httpx.TransportError):
        bc.client.post(bc.url("customers"), json={"displayName": "Emma", "email": "emma@example.com"})

    assert [c["email"] for c in bc.sim.customers(bc.company_id)] == ["emma@example.com"]
    found = bc.client.get(bc.url("customers"), params={"$filter": "email eq 'emma@example.com'"})
    assert len(found.json()["value"]) == 1


def test_the_api_template_fills_what_the_request_leaves_out(bc: Bc) -> None:
    terms = "5f7c1a2b-0000-4c3d-8e9f-0a1b2c3d4e5f"
    bc.sim.set_api_template("customers", bc.company_id, paymentTermsId=terms, taxLiable=True, city="Template City")
    bc.sim.set_api_template("items", bc.company_id, baseUnitOfMeasureCode="HOUR",
                            generalProductPostingGroupCode="SERVICES")

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


def test_a_released_draft_reads_open_like_a_posted_invoice_and_can_be_reopened_and_deleted(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Grace")
    item = bc.sim.add_item(bc.company_id, displayName="Session", type="Service", unitPrice=50)
    draft = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"], "salesInvoiceLines": [
        {"itemId": item["id"], "quantity": 1}]}).json()
    url = bc.url(f"salesInvoices({draft['id']})")

    bc.sim.release_invoice(bc.company_id, draft["id"])

    released = bc.client.get(url).json()
    assert (released["status"], released["number"]) == ("Open", draft["number"])
    changed = bc.client.patch(url, json={"externalDocumentNumber": "X"}, headers={"If-Match": released["@odata.etag"]})
    assert changed.status_code == 400 and error_message(changed) == (
        f"Status must be equal to 'Open'  in Sales Header: Document Type=Invoice, No.={draft['number']}. "
        "Current value is 'Released'.")
    line = bc.client.post(f"{url}/salesInvoiceLines", json={"itemId": item["id"], "quantity": 1})
    assert line.status_code == 400 and "Current value is 'Released'" in error_message(line)
    bc.sim.reopen_invoice(bc.company_id, draft["id"])
    assert bc.client.get(url).json()["status"] == "Draft"
    bc.sim.release_invoice(bc.company_id, draft["id"])
    bc.sim.delete_invoice(bc.company_id, draft["id"])  # a released draft can be deleted, a posted one not
    assert bc.client.get(url).status_code == 404


@pytest.mark.parametrize("keeps_number", [False, True])
def test_a_posted_invoice_keeps_the_drafts_number_when_both_series_are_one(bc: Bc, keeps_number: bool) -> None:
    bc.sim.configure(posted_invoice_keeps_number=keeps_number)
    customer = bc.sim.add_customer(bc.company_id, displayName="Grace")
    item = bc.sim.add_item(bc.company_id, displayName="Session", type="Service", unitPrice=50)
    draft = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"], "salesInvoiceLines": [
        {"itemId": item["id"], "quantity": 1}]}).json()

    posted = bc.sim.post_invoice(bc.company_id, draft["id"])
    paid = bc.sim.pay_invoice(bc.company_id, draft["id"])

    assert posted["status"] == "Open" and (posted["number"] == draft["number"]) is keeps_number
    assert paid["status"] == "Paid"
    line = bc.client.post(bc.url(f"salesInvoices({draft['id']})/salesInvoiceLines"), json={"itemId": item["id"]})
    assert error_message(line) == "The invoice has been posted and can no longer be modified."


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
    plan.configure(retry_after_omitted=0.0)
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


# --- $filter: case, Code fields, lengths ---------------------------------------------------------

def find(bc: Bc, entity_set: str, expression: str, **params: str) -> httpx.Response:
    return bc.client.get(bc.url(entity_set), params={"$filter": expression, **params})


def names(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [record["displayName"] for record in response.json()["value"]]


def test_text_comparisons_are_case_sensitive_and_tolower_makes_them_case_insensitive(bc: Bc) -> None:
    bc.sim.add_customer(bc.company_id, displayName="Bob Stone", email="Bob@Example.COM")

    assert names(find(bc, "customers", "email eq 'bob@example.com'")) == []
    assert names(find(bc, "customers", "email eq 'Bob@Example.COM'")) == ["Bob Stone"]
    assert names(find(bc, "customers", "tolower(email) eq 'bob@example.com'")) == ["Bob Stone"]
    assert names(find(bc, "customers", "toupper(email) eq 'BOB@EXAMPLE.COM'")) == ["Bob Stone"]
    assert names(find(bc, "customers", "email ne 'bob@example.com'")) == ["Bob Stone"]
    assert names(find(bc, "customers", "email gt 'a'")) == []  # 'B' sorts before 'a' in a binary comparison
    assert names(find(bc, "customers", "contains(displayName,'stone')")) == []
    assert names(find(bc, "customers", "contains(displayName,'Stone')")) == ["Bob Stone"]
    assert names(find(bc, "customers", "startswith(displayName,'bob')")) == []
    assert names(find(bc, "customers", "endswith(displayName,'Stone')")) == ["Bob Stone"]


def test_tolower_applies_to_the_field_so_a_mixed_case_literal_finds_nothing_unless_configured(bc: Bc) -> None:
    bc.sim.add_customer(bc.company_id, displayName="Bob Stone", email="Bob@Example.COM")

    assert names(find(bc, "customers", "tolower(email) eq 'Bob@example.com'")) == []
    bc.sim.configure(case_functions_ignore_case=True)  # the docs' AL approximation: case simply ignored
    assert names(find(bc, "customers", "tolower(email) eq 'Bob@example.com'")) == ["Bob Stone"]


def test_a_plus_in_a_query_string_is_a_plus_sign_unless_configured(bc: Bc, tls) -> None:
    bc.sim.add_customer(bc.company_id, displayName="Oslo Salon", city="Oslo")
    plus = bc.url("customers") + "?$filter=city+eq+'Oslo'"
    encoded = bc.url("customers") + "?$filter=city%20eq%20'Oslo'"
    raw = httpx.Client(base_url=bc.client.base_url, headers=bc.client.headers,  # no rewriting of `+`
                       verify=ssl.create_default_context(cafile=str(tls.ca_bundle)))

    with raw:
        assert raw.get(plus).status_code == 400 and names(raw.get(encoded)) == ["Oslo Salon"]
        bc.sim.configure(plus_in_query_is_space=True)
        assert names(raw.get(plus)) == ["Oslo Salon"]


@pytest.mark.parametrize("undefined", ["empty", "unfiltered", "error"])
def test_nested_filter_functions_need_schema_version_2_1(bc: Bc, undefined: str) -> None:
    bc.sim.configure(nested_functions_without_2_1=undefined)
    bc.sim.add_customer(bc.company_id, displayName="Bob Stone", email="Bob@Example.COM")
    bc.sim.add_customer(bc.company_id, displayName="Eve", email="eve@example.com")

    without = find(bc, "customers", "contains(tolower(email),'bob@')")
    accepted = find(bc, "customers", "contains(tolower(email),'bob@')", **{"$schemaversion": "2.1"})

    assert names(accepted) == ["Bob Stone"]
    if undefined == "error":
        assert without.status_code == 400 and "$schemaversion=2.1" in error_message(without)
    else:  # "either throws an error or returns an undefined result": here a 200 the client cannot trust
        assert without.status_code == 200
        assert names(without) == ([] if undefined == "empty" else ["Bob Stone", "Eve"])


def test_code_fields_are_stored_upper_case_and_compared_with_the_literal_as_sent(bc: Bc) -> None:
    customer = bc.client.post(bc.url("customers"), json={"displayName": "Nora", "country": "no",
                                                         "postalCode": " n-0150 ", "number": "c-nora"})
    invoice = bc.client.post(bc.url("salesInvoices"), json={"customerNumber": "C-NORA",
                                                            "externalDocumentNumber": "bk-1a2b"})

    assert customer.status_code == 201, customer.text
    assert (customer.json()["country"], customer.json()["postalCode"], customer.json()["number"]) == \
        ("NO", "N-0150", "C-NORA")
    assert invoice.status_code == 201 and invoice.json()["externalDocumentNumber"] == "BK-1A2B"
    by_lower = find(bc, "salesInvoices", "externalDocumentNumber eq 'bk-1a2b'")
    by_upper = find(bc, "salesInvoices", "externalDocumentNumber eq 'BK-1A2B'")
    by_tolower = find(bc, "salesInvoices", "tolower(externalDocumentNumber) eq 'bk-1a2b'")
    assert by_lower.json()["value"] == [] and len(by_upper.json()["value"]) == len(by_tolower.json()["value"]) == 1
    assert names(find(bc, "customers", "number eq 'c-nora'")) == []

    bc.sim.configure(code_filter_uppercases_literal=True)  # the variant in which BC upper-cases the literal
    assert len(find(bc, "salesInvoices", "externalDocumentNumber eq 'bk-1a2b'").json()["value"]) == 1
    assert names(find(bc, "customers", "number eq 'c-nora'")) == ["Nora"]


@pytest.mark.parametrize("expression", [
    "email eq '{81}'",
    "tolower(email) eq '{81}'",
    "email eq 'a@example.com' or email eq '{81}'",
    "contains(email,'{81}')",
])
def test_a_filter_literal_longer_than_the_field_refuses_the_whole_request(bc: Bc, expression: str) -> None:
    too_long = "x" * 69 + "@example.com"  # 81 characters; the Customer "E-Mail" field is Text[80]
    assert len(too_long) == 81

    response = find(bc, "customers", expression.replace("{81}", too_long))

    assert response.status_code == 400 and error_code(response) == "Application_FilterErrorException"
    assert "The length of the string is 81, but it must be less than or equal to 80 characters." \
        in error_message(response)
    assert "Email field on the Customer table" in error_message(response)
    assert find(bc, "customers", f"email eq '{too_long[1:]}'").status_code == 200


def test_a_code_filter_literal_longer_than_the_field_is_refused_too(bc: Bc) -> None:
    response = find(bc, "salesInvoices", "externalDocumentNumber eq '" + "K" * 36 + "'")

    assert response.status_code == 400 and error_code(response) == "Application_FilterErrorException"
    assert "must be less than or equal to 35 characters" in error_message(response)


def test_entity_types_follow_the_apiv2_pages_and_their_tables(bc: Bc) -> None:
    long_site = "https://example.com/" + "p" * 200  # Customer "Home Page" is Text[255]

    customer = bc.client.post(bc.url("customers"), json={"displayName": "Site", "website": long_site})
    item = bc.client.post(bc.url("items"), json={"displayName": "Fee", "type": "Service"}).json()
    invoice = bc.client.post(bc.url("salesInvoices"), params={"$expand": "salesInvoiceLines"}, json={
        "customerId": customer.json()["id"], "promisedPayDate": "2025-05-01",
        "salesInvoiceLines": [{"itemId": item["id"], "quantity": 1, "description2": "second line"}]})

    assert customer.status_code == 201, customer.text
    assert invoice.status_code == 201, invoice.text
    assert invoice.json()["promisedPayDate"] == "2025-05-01"
    assert invoice.json()["salesInvoiceLines"][0]["description2"] == "second line"


# --- Country/Region --------------------------------------------------------------------------------

def test_a_new_company_has_a_cronus_list_of_countries_regions(bc: Bc) -> None:
    countries = {c["code"]: c["displayName"] for c in bc.sim.countries(bc.company_id)}
    norway = find(bc, "countriesRegions", "code eq 'NO'").json()["value"]
    first_page = bc.client.get(bc.url("countriesRegions")).json()

    required = "AT AU BE BG CA CH CN CZ DE DK EE ES FI FR GB GR HR HU IE IS IT JP LT LU LV MX NL NO NZ PL PT RO " \
               "RU SE SI SK TR US ZA"
    assert set(required.split()) <= set(countries)
    assert (countries["NO"], countries["US"], countries["NL"]) == ("Norway", "United States", "Netherlands")
    assert [(c["code"], c["displayName"]) for c in norway] == [("NO", "Norway")]
    assert set(norway[0]) >= {"id", "code", "displayName", "addressFormat", "lastModifiedDateTime"}
    assert len(first_page["value"]) == 3 and "@odata.nextLink" in first_page  # paged like any list
    by_id = bc.client.get(bc.url(f"countriesRegions({norway[0]['id']})"))
    assert by_id.status_code == 200 and by_id.json()["code"] == "NO"


def test_countries_regions_can_be_created_renamed_and_deleted(bc: Bc) -> None:
    created = bc.client.post(bc.url("countriesRegions"), json={"code": "xk", "displayName": "Kosovo"})
    duplicate = bc.client.post(bc.url("countriesRegions"), json={"code": "NO", "displayName": "Norway again"})
    customer = bc.client.post(bc.url("customers"), json={"displayName": "Arta", "country": "XK"}).json()

    assert created.status_code == 201 and created.json()["code"] == "XK"
    assert created.json()["addressFormat"] == "City_x002B_Post_x0020_Code"
    assert duplicate.status_code == 400 and error_code(duplicate) == "Internal_EntityWithSameKeyExists"
    url = bc.url(f"countriesRegions({created.json()['id']})")
    renamed = bc.client.patch(url, json={"code": "KS"}, headers={"If-Match": created.json()["@odata.etag"]})
    assert renamed.status_code == 200 and renamed.json()["code"] == "KS"
    assert bc.client.get(bc.url(f"customers({customer['id']})")).json()["country"] == "KS"  # BC renames relations
    deleted = bc.client.delete(url, headers={"If-Match": renamed.json()["@odata.etag"]})
    assert deleted.status_code == 204 and "KS" not in {c["code"] for c in bc.sim.countries(bc.company_id)}


def test_a_country_must_exist_in_countries_regions(bc: Bc) -> None:
    unknown = bc.client.post(bc.url("customers"), json={"displayName": "Xavier", "country": "XX"})
    blank = bc.client.post(bc.url("customers"), json={"displayName": "Yara", "country": ""})
    known = bc.client.post(bc.url("customers"), json={"displayName": "Zoe", "country": "nl"}).json()
    bad_ship_to = bc.client.post(bc.url("salesInvoices"), json={"customerId": known["id"], "shipToCountry": "XX"})

    assert unknown.status_code == 400 and error_code(unknown) == "Internal_InvalidTableRelation"
    assert error_message(unknown) == ("The field Country/Region Code of table Customer contains a value (XX) that "
                                      "cannot be found in the related table (Country/Region).")
    assert blank.status_code == 201 and known["country"] == "NL"
    assert bad_ship_to.status_code == 400 and error_code(bad_ship_to) == "Internal_InvalidTableRelation"
    assert "Ship-to Country/Region Code of table Sales Invoice Entity Aggregate" in error_message(bad_ship_to)

    bc.sim.remove_country(bc.company_id, "NL")
    gone = bc.client.post(bc.url("customers"), json={"displayName": "Zoe 2", "country": "NL"})
    bc.sim.add_country(bc.company_id, "XX", "Testland")
    added = bc.client.post(bc.url("customers"), json={"displayName": "Xavier", "country": "XX"})
    assert gone.status_code == 400 and added.status_code == 201


# --- phone numbers and e-mail addresses ------------------------------------------------------------

def test_a_phone_number_with_letters_is_refused(bc: Bc) -> None:
    fine = bc.client.post(bc.url("customers"), json={"displayName": "Ola", "phoneNumber": "+47 (22) 33-44.55 #12"})
    letters = bc.client.post(bc.url("customers"), json={"displayName": "Per", "phoneNumber": "555-CALL-NOW"})
    patched = bc.client.patch(bc.url(f"customers({fine.json()['id']})"), json={"phoneNumber": "22 33 ext. 4"},
                              headers={"If-Match": "*"})
    on_invoice = bc.client.post(bc.url("salesInvoices"), json={"customerId": fine.json()["id"],
                                                               "phoneNumber": "tel 22334455"})

    assert fine.status_code == 201
    assert letters.status_code == 400 and error_code(letters) == "Application_FieldValidationException"
    assert error_message(letters) == "Phone No. must not contain letters in Customer No.=''."
    assert error_message(patched) == f"Phone No. must not contain letters in Customer No.='{fine.json()['number']}'."
    assert on_invoice.status_code == 400 and error_code(on_invoice) == "Application_DialogException"
    assert error_message(on_invoice) == "You cannot enter letters in this field."


@pytest.mark.parametrize("email", ["bob@example.com", "o'brien@example.co.uk", "a@b.io;c@d.org", "",
                                   "Bob Stone <bob@example.com>", "jürgen@exämple.de"])
def test_an_email_address_bc_accepts(bc: Bc, email: str) -> None:
    response = bc.client.post(bc.url("customers"), json={"displayName": "Mail", "email": email})

    assert response.status_code == 201, response.text


@pytest.mark.parametrize("email, reported", [
    ("bob", "bob"), ("bob@example", "bob@example"), ("bob@@example.com", "bob@@example.com"),
    ("bob smith@example.com", "bob smith@example.com"), ("bob@example.c", "bob@example.c"),
    ("@example.com", "@example.com"), ("bob@.com", "bob@.com"), ("a@b.io;nope", "nope"),
    ("bob..x@example.com", "bob..x@example.com"),
])
def test_an_email_address_bc_refuses(bc: Bc, email: str, reported: str) -> None:
    response = bc.client.post(bc.url("customers"), json={"displayName": "Mail", "email": email})
    customer = bc.sim.add_customer(bc.company_id, displayName="Mail")
    on_invoice = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"], "email": email})

    assert response.status_code == 400 and error_code(response) == "Application_DialogException"
    assert error_message(response) == f'The email address "{reported}" is not valid.'
    assert on_invoice.status_code == 400 and error_message(on_invoice) == error_message(response)


# --- posting groups, blocked customers, number series ----------------------------------------------

def test_posting_groups_are_not_in_the_api_and_come_from_the_api_setup_template(bc: Bc) -> None:
    created = bc.client.post(bc.url("customers"), json={"displayName": "Ida"}).json()
    refused = bc.client.post(bc.url("customers"), json={"displayName": "Jon", "customerPostingGroup": "EXPORT"})
    filtered = find(bc, "customers", "customerPostingGroup eq 'DOMESTIC'")
    bc.sim.set_api_template("customers", bc.company_id, customerPostingGroup="EXPORT", genBusPostingGroup="EXPORT")
    exported = bc.client.post(bc.url("customers"), json={"displayName": "Kai"}).json()
    item = bc.client.post(bc.url("items"), json={"displayName": "Massage", "type": "Service"}).json()

    assert "customerPostingGroup" not in created and "genBusPostingGroup" not in created
    assert refused.status_code == 400 and "'customerPostingGroup' does not exist" in error_message(refused)
    assert filtered.status_code == 400
    stored = {c["displayName"]: c for c in bc.sim.customers(bc.company_id)}
    assert (stored["Ida"]["customerPostingGroup"], stored["Ida"]["genBusPostingGroup"]) == ("DOMESTIC", "DOMESTIC")
    assert (stored["Kai"]["customerPostingGroup"], stored["Kai"]["genBusPostingGroup"]) == ("EXPORT", "EXPORT")
    assert exported["id"] and item["generalProductPostingGroupCode"] == "SERVICES"


def test_an_invoice_for_a_customer_without_posting_groups_is_refused_when_it_gets_the_customer(bc: Bc) -> None:
    bc.sim.set_api_template("customers", bc.company_id)  # an API Setup without a customer template
    customer = bc.client.post(bc.url("customers"), json={"displayName": "Lea"}).json()

    no_gen_bus = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"]})
    bc.sim.configure(sales_tax=True)  # a US company skips the Gen. Bus. Posting Group check
    no_customer_group = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"]})

    assert no_gen_bus.status_code == 400 and error_code(no_gen_bus) == "Application_FieldValidationException"
    assert error_message(no_gen_bus) == (f"Gen. Bus. Posting Group must have a value in Customer: "
                                         f"No.={customer['number']}. It cannot be zero or empty.")
    assert error_message(no_customer_group) == (f"Customer Posting Group must have a value in Customer: "
                                                f"No.={customer['number']}. It cannot be zero or empty.")
    by_user = bc.sim.add_customer(bc.company_id, displayName="Mia", customerPostingGroup="")
    refused = bc.client.post(bc.url("salesInvoices"), json={"customerNumber": by_user["number"]})
    assert refused.status_code == 400 and "Customer Posting Group must have a value" in error_message(refused)
    assert bc.sim.invoices(bc.company_id) == []


def test_a_line_for_an_item_without_posting_groups_is_refused_when_it_gets_the_item(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Nils")
    no_group = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", generalProductPostingGroupCode="")
    stock = bc.sim.add_item(bc.company_id, displayName="Oil", type="Inventory", inventoryPostingGroupCode="")
    invoice = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"]}).json()
    lines = bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines")

    service_line = bc.client.post(lines, json={"itemId": no_group["id"], "quantity": 1})
    stock_line = bc.client.post(lines, json={"lineObjectNumber": stock["number"], "lineType": "Item", "quantity": 1})
    deep = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"], "salesInvoiceLines": [
        {"itemId": no_group["id"], "quantity": 1}]})

    assert service_line.status_code == 400 and error_code(service_line) == "Application_FieldValidationException"
    assert error_message(service_line) == (f"Gen. Prod. Posting Group must have a value in Item: "
                                           f"No.={no_group['number']}. It cannot be zero or empty.")
    assert error_message(stock_line) == (f"Inventory Posting Group must have a value in Item: "
                                         f"No.={stock['number']}. It cannot be zero or empty.")
    assert deep.status_code == 400 and len(bc.sim.invoices(bc.company_id)) == 1


def test_a_quantity_is_rounded_to_five_decimals_as_bc_rounds_it(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Una")
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=60)

    invoice = bc.client.post(bc.url("salesInvoices"), params={"$expand": "salesInvoiceLines"}, json={
        "customerId": customer["id"], "salesInvoiceLines": [{"itemId": item["id"], "quantity": 50 / 60}]}).json()

    [line] = invoice["salesInvoiceLines"]
    assert line["quantity"] == 0.83333 and line["amountExcludingTax"] == 50.0


def test_a_line_needs_the_vat_posting_setup_of_its_customers_and_items_groups(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Pia", vatBusPostingGroup="EU")
    item = bc.sim.add_item(bc.company_id, displayName="Facial", type="Service", vatProdPostingGroup="REDUCED")
    invoice = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"]}).json()
    lines = bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines")
    assert bc.client.post(lines, json={"itemId": item["id"], "quantity": 1}).status_code == 201

    bc.sim.set_vat_posting_setup(bc.company_id, "EU", "REDUCED", exists=False)
    refused = bc.client.post(lines, json={"itemId": item["id"], "quantity": 1})

    assert refused.status_code == 404 and error_code(refused) == "Internal_RecordNotFound"
    assert error_message(refused) == ("The VAT Posting Setup does not exist. Identification fields and values: "
                                      "VAT Bus. Posting Group='EU',VAT Prod. Posting Group='REDUCED'")


def test_a_sales_blocked_item_cannot_be_sold(bc: Bc) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Quinn")
    item = bc.sim.add_item(bc.company_id, displayName="Retired service", type="Service", salesBlocked=True)

    refused = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"], "salesInvoiceLines": [
        {"itemId": item["id"], "quantity": 1}]})

    assert "salesBlocked" not in bc.client.get(bc.url(f"items({item['id']})")).json(), "the API shows Blocked only"
    assert refused.status_code == 400 and error_code(refused) == "Application_DialogException"
    assert error_message(refused) == (f"You cannot sell Item {item['number']} because the Sales Blocked check box is "
                                      "selected on the Item card.")


@pytest.mark.parametrize("entity, body, message", [
    ("customers", {"currencyCode": "XYZ"}, 'The "currencyCode" does not match to a Currency.'),
    ("customers", {"paymentTermsId": "0b6ea8c8-0000-4000-8000-000000000030"},
     'The "paymentTermsId" does not match to a Payment Terms.'),
    ("customers", {"salespersonCode": "NOPE"}, "The field Salesperson Code of table Customer contains a value (NOPE) "
                                               "that cannot be found in the related table (Salesperson/Purchaser)."),
    ("items", {"itemCategoryCode": "NOPE"}, 'The "itemCategoryCode" does not match to a Item Category.'),
    ("items", {"taxGroupCode": "NOPE"}, 'The "taxGroupCode" does not match to a Tax Group.'),
    ("items", {"baseUnitOfMeasureCode": "NOPE"}, "The Unit of Measure with Code NOPE does not exist."),
    ("items", {"generalProductPostingGroupCode": "NOPE"}, "The field Gen. Prod. Posting Group of table Item contains "
                                                          "a value (NOPE) that cannot be found in the related table "
                                                          "(Gen. Product Posting Group)."),
])
def test_a_code_or_id_that_names_no_setup_record_is_refused_with_the_pages_message(bc: Bc, entity: str, body: dict,
                                                                                   message: str) -> None:
    refused = bc.client.post(bc.url(entity), json={"displayName": "Ruth", **body})
    known = {"customers": {"currencyCode": "EUR", "salespersonCode": "JR",
                           "paymentTermsId": bc.sim.setup_id("paymentTerms", "30 DAYS")},
             "items": {"itemCategoryCode": "MISC", "taxGroupCode": "TAXABLE", "baseUnitOfMeasureCode": "HOUR",
                       "generalProductPostingGroupCode": "SERVICES"}}[entity]
    accepted = bc.client.post(bc.url(entity), json={"displayName": "Sam", **known})

    assert refused.status_code == 400 and error_message(refused) == message
    assert accepted.status_code == 201, accepted.text
    bc.sim.add_setup_record(bc.company_id, "salespeople", "NOPE")
    assert bc.client.post(bc.url("customers"), json={"displayName": "Tea", "salespersonCode": "NOPE"}).status_code == 201


@pytest.mark.parametrize("blocked, refused", [("All", True), ("Invoice", True), ("Ship", False), (" ", False)])
def test_a_blocked_customer_cannot_be_invoiced(bc: Bc, blocked: str, refused: bool) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Otto", blocked=blocked)

    response = bc.client.post(bc.url("salesInvoices"), json={"customerNumber": customer["number"]})

    if refused:
        assert response.status_code == 400 and error_code(response) == "Application_DialogException"
        assert error_message(response) == (f"You cannot create this type of document when Customer "
                                           f"{customer['number']} is blocked with type {blocked}")
    else:
        assert response.status_code == 201, response.text


@pytest.mark.parametrize("problem, code, message", [
    ("exhausted", "Application_DialogException", "You cannot assign new numbers from the number series S-INV."),
    ("missing", "Application_FieldValidationException",
     "Invoice Nos. must have a value in Sales & Receivables Setup: Primary Key=. It cannot be zero or empty."),
    ("manual", "Application_DialogException",
     "It is not possible to assign numbers automatically. If you want the program to assign numbers "
     "automatically, please activate Default Nos. in No. Series S-INV."),
])
def test_an_unusable_sales_invoice_number_series_refuses_new_invoices(bc: Bc, problem: str, code: str,
                                                                     message: str) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Pia")
    bc.sim.set_number_series(bc.company_id, "salesInvoices", problem)

    refused = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"]})
    bc.sim.set_number_series(bc.company_id, "salesInvoices", None)
    accepted = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"]})

    assert refused.status_code == 400 and (error_code(refused), error_message(refused)) == (code, message)
    assert accepted.status_code == 201


def test_an_unusable_customer_number_series_refuses_only_customers_without_a_number(bc: Bc) -> None:
    bc.sim.set_number_series(bc.company_id, "customers", "exhausted")
    bc.sim.set_number_series(bc.company_id, "postedSalesInvoices", "missing")

    numbered = bc.client.post(bc.url("customers"), json={"displayName": "Quinn", "number": "Q1"})
    unnumbered = bc.client.post(bc.url("customers"), json={"displayName": "Rita"})
    invoice = bc.client.post(bc.url("salesInvoices"), json={"customerNumber": "Q1"})

    assert numbered.status_code == 201
    assert error_message(unnumbered) == "You cannot assign new numbers from the number series CUST."
    assert error_message(invoice) == ("Posted Invoice Nos. must have a value in Sales & Receivables Setup: "
                                      "Primary Key=. It cannot be zero or empty.")


# --- requests that finish after the client gave up -------------------------------------------------

def emails(bc: Bc) -> list[str]:
    return [c["email"] for c in bc.sim.customers(bc.company_id)]


def test_new_fault_kinds_can_be_scripted_but_are_not_drawn_by_default() -> None:
    assert {"late", "408", "504"} <= set(FAULT_KINDS)
    assert not {"late", "408", "504"} & set(Knobs().fault_kinds)


def test_a_late_request_times_the_client_out_and_commits_afterwards(bc: Bc) -> None:
    bc.sim.plan.configure(late_seconds=1.0)
    bc.sim.plan.script("POST", re.escape(f"/{bc.company}/customers") + "$", "late")

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        bc.client.post(bc.url("customers"), json={"displayName": "Sam", "email": "sam@example.com"}, timeout=0.3)

    assert emails(bc) == []
    assert wait_until(lambda: emails(bc) == ["sam@example.com"])
    assert time.monotonic() - started >= 0.9
    assert bc.sim.plan.stats.faults["late"] == 1


def test_a_late_write_commits_even_after_the_client_closed_the_connection(bc: Bc, server, tls) -> None:
    bc.sim.plan.configure(late_seconds=0.8)
    bc.sim.plan.script("POST", r"/customers$", "late")

    with make_client(server[1], tls, timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        client.post(bc.url("customers"), json={"displayName": "Tor", "email": "tor@example.com"})
    # the client and its connections are closed here, long before BC gets to the request

    assert emails(bc) == []
    assert wait_until(lambda: emails(bc) == ["tor@example.com"])


def test_a_batch_can_be_late_too(bc: Bc) -> None:
    bc.sim.plan.configure(late_seconds=0.8)
    bc.sim.plan.script("POST", r"/\$batch$", "late")
    requests = [{"id": str(n), "method": "POST", "url": bc.url("customers"),
                 "body": {"displayName": f"Late {n}", "email": f"late{n}@example.com"}} for n in range(3)]

    with pytest.raises(httpx.ReadTimeout):
        bc.client.post("$batch", json={"requests": requests}, headers={"Isolation": "snapshot"}, timeout=0.2)

    assert emails(bc) == []
    assert wait_until(lambda: len(emails(bc)) == 3)


def test_408_answers_at_once_and_the_request_still_executes_later(bc: Bc) -> None:
    bc.sim.plan.configure(late_seconds=0.8)
    bc.sim.plan.script("POST", r"/customers$", "408")

    started = time.monotonic()
    response = bc.client.post(bc.url("customers"), json={"displayName": "Una", "email": "una@example.com"})

    assert response.status_code == 408 and error_code(response) and time.monotonic() - started < 0.5
    assert emails(bc) == []
    assert wait_until(lambda: emails(bc) == ["una@example.com"])


def test_504_executes_later_unless_late_executes_is_off(bc: Bc) -> None:
    bc.sim.plan.configure(late_seconds=0.5)
    bc.sim.plan.script("POST", r"/customers$", "504", times=1)
    executed = bc.client.post(bc.url("customers"), json={"displayName": "Vera", "email": "vera@example.com"})
    assert executed.status_code == 504 and wait_until(lambda: emails(bc) == ["vera@example.com"])

    bc.sim.plan.configure(late_executes=False)
    bc.sim.plan.script("POST", r"/customers$", "504", times=1)
    dropped = bc.client.post(bc.url("customers"), json={"displayName": "Wim", "email": "wim@example.com"})
    time.sleep(0.8)
    assert dropped.status_code == 504 and emails(bc) == ["vera@example.com"]


def test_nothing_executes_later_than_the_execution_limit(bc: Bc) -> None:
    bc.sim.plan.configure(late_seconds=0.8, execution_limit_seconds=0.4)
    bc.sim.plan.script("POST", r"/customers$", "408", times=1)
    bc.sim.plan.script("POST", r"/customers$", "late", times=1)

    timed_out = bc.client.post(bc.url("customers"), json={"displayName": "Xia", "email": "xia@example.com"})
    aborted = bc.client.post(bc.url("customers"), json={"displayName": "Yul", "email": "yul@example.com"})
    time.sleep(1.0)

    assert timed_out.status_code == 408 and aborted.status_code == 504
    assert emails(bc) == []


@pytest.mark.parametrize("counted_from", ["start", "arrival"])
def test_the_execution_limit_counts_from_when_a_queued_request_gets_its_turn(bc: Bc, counted_from: str) -> None:
    bc.sim.plan.configure(queued_seconds=0.4, late_seconds=0.3, execution_limit_seconds=0.5, queue_timeout_seconds=1,
                          execution_limit_from=counted_from)
    bc.sim.plan.script("POST", r"/customers$", "queued")

    with pytest.raises(httpx.ReadTimeout):
        bc.client.post(bc.url("customers"), json={"displayName": "Zoe", "email": "zoe@example.com"}, timeout=0.2)

    if counted_from == "start":  # 0.4 s queued, then 0.3 s of its 0.5 s: it lands 0.7 s after it arrived
        assert wait_until(lambda: emails(bc) == ["zoe@example.com"])
    else:
        time.sleep(1.0)
        assert emails(bc) == []


def test_a_request_queued_longer_than_the_queue_timeout_never_runs(bc: Bc) -> None:
    bc.sim.plan.configure(queued_seconds=0.6, late_seconds=0.1, queue_timeout_seconds=0.3)
    bc.sim.plan.script("POST", r"/customers$", "queued")

    with pytest.raises(httpx.ReadTimeout):
        bc.client.post(bc.url("customers"), json={"displayName": "Ada", "email": "ada@example.com"}, timeout=0.2)
    time.sleep(1.0)

    assert emails(bc) == []


def test_a_502_says_when_to_come_back(bc: Bc) -> None:
    bc.sim.plan.script("GET", r"/customers$", "502")

    response = bc.client.get(bc.url("customers"))

    assert response.status_code == 502 and response.headers["retry-after"]
    assert bc.client.get(bc.url("customers")).status_code == 200


# --- throttling --------------------------------------------------------------------------------------

def test_bc_defaults_are_its_documented_limits() -> None:
    knobs = BcSimulator().plan.knobs

    assert (knobs.max_concurrency, knobs.max_queued) == (5, 95)
    assert (knobs.rate_limit, knobs.rate_window_seconds) == (6000, 300.0)
    assert knobs.batch_counts_each_operation, "the strictest reading of a $batch against the rate"
    assert knobs.retry_after_omitted > 0


def test_some_429s_come_without_retry_after(bc: Bc) -> None:
    bc.sim.plan.script("GET", r"/customers$", "429", times=4)

    answers = [bc.client.get(bc.url("customers")) for _ in range(4)]

    assert [a.status_code for a in answers] == [429] * 4
    assert all(error_code(a) == "Application_TooManyRequests" for a in answers)
    assert ["retry-after" in a.headers for a in answers] == [True, False, True, False]


def test_the_rate_limit_is_a_sliding_window_per_principal(bc: Bc, server, tls) -> None:
    bc.sim.plan.configure(rate_limit=3, rate_window_seconds=1.0)
    url = bc.url("customers")
    with make_client(server[1], tls, principal="sliding-window") as mine, \
            make_client(server[1], tls, principal="another-app") as other:
        mine.get(url)  # connected before the window starts
        time.sleep(1.05)

        start = time.monotonic()
        first = [mine.get(url).status_code for _ in range(2)]
        time.sleep(max(0.0, start + 0.6 - time.monotonic()))
        third = mine.get(url).status_code
        fourth = mine.get(url).status_code
        other_principal = other.get(url).status_code
        time.sleep(max(0.0, start + 1.15 - time.monotonic()))  # the first two have left the window
        later = [mine.get(url).status_code for _ in range(3)]

    assert first == [200, 200] and third == 200 and fourth == 429 and other_principal == 200
    assert later == [200, 200, 429], "a fixed window would have allowed three"


@pytest.mark.parametrize("each_operation", [True, False])
def test_a_batch_counts_toward_the_rate_limit_as_each_of_its_operations_unless_configured(
        bc: Bc, server, tls, each_operation: bool) -> None:
    bc.sim.plan.configure(rate_limit=4, rate_window_seconds=60.0, batch_counts_each_operation=each_operation)
    batch = {"requests": [{"id": str(n), "method": "GET", "url": bc.url("customers")} for n in range(3)]}
    with make_client(server[1], tls, principal=f"batch-counting-{each_operation}") as client:
        first = client.post("$batch", json=batch).status_code
        second = client.post("$batch", json=batch).status_code

    assert first == 200
    assert second == (429 if each_operation else 200), "3 + 3 operations exceed 4; 1 + 1 requests do not"


# The web client: page 43 "Sales Invoice" opened by URL ---------------------------------------------

@pytest.fixture(scope="module")
def web_client(server: tuple[BcSimulator, str]) -> Iterator[str]:
    """The web client over plain HTTP, as `BC_WEB_CLIENT_URL`."""
    with ServerThread(server[0].web_app, None, name="bc-web") as running:
        yield f"{running.url}/webclient"


def invoice_link(base: str, company: str, number: str, tenant: str = TENANT, environment: str = ENVIRONMENT) -> str:
    """The link the app makes: `{BC_WEB_CLIENT_URL}/{tenant}/{environment}/?company=…&page=43&filter=…`."""
    return (f"{base}/{tenant}/{environment}/?company={quote(company)}&page=43"
            f"&filter={quote(chr(39) + 'No.' + chr(39) + ' IS ' + chr(39) + number + chr(39))}")


def company_name(bc: Bc) -> str:
    return bc.client.get(bc.company).json()["name"]


def test_the_web_client_shows_a_draft_invoice_opened_by_its_number(bc: Bc, web_client: str) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Fabrikam <Spa> & Co")
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=80)
    invoice = bc.client.post(bc.url("salesInvoices"), params={"$expand": "salesInvoiceLines"}, json={
        "customerId": customer["id"], "salesInvoiceLines": [
            {"itemId": item["id"], "quantity": 1.5, "description": "<script>alert(1)</script> 09:00"},
            {"itemId": item["id"], "quantity": 1, "unitPrice": 45.5}]}).json()

    with httpx.Client(timeout=10) as http:
        page = http.get(invoice_link(web_client, company_name(bc), invoice["number"]))

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert f"Sales Invoice <span data-field=\"No.\">{invoice['number']}</span>" in text
    assert customer["number"] in text and "Fabrikam &lt;Spa&gt; &amp; Co" in text and "<Spa>" not in text
    assert "<dt>Status</dt><dd>Draft</dd>" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; 09:00" in text and "<script" not in text
    assert ">1.5<" in text and ">80.00<" in text and ">120.00<" in text and ">45.50<" in text
    assert "<dt>Total Incl. Tax</dt><dd>165.50</dd>" in text


def test_the_web_client_answers_not_found_for_what_the_link_does_not_find(bc: Bc, web_client: str) -> None:
    customer = bc.sim.add_customer(bc.company_id, displayName="Posted Ltd")
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=80)
    invoice = bc.client.post(bc.url("salesInvoices"), json={
        "customerId": customer["id"], "salesInvoiceLines": [{"itemId": item["id"], "quantity": 1}]}).json()
    name = company_name(bc)
    bc.sim.post_invoice(bc.company_id, invoice["id"])

    with httpx.Client(timeout=10) as http:
        posted = http.get(invoice_link(web_client, name, invoice["number"]))
        unknown = http.get(invoice_link(web_client, name, "S-INV999999"))
        no_company = http.get(invoice_link(web_client, "No Such Company", invoice["number"]))
        no_environment = http.get(invoice_link(web_client, name, invoice["number"], environment="nowhere"))
        other_page = http.get(invoice_link(web_client, name, invoice["number"]).replace("page=43", "page=42"))
        bad_filter = http.get(f"{web_client}/{TENANT}/{ENVIRONMENT}/?company={quote(name)}&page=43&filter=No.%3DX")

    assert posted.status_code == 404 and "The Sales Header does not exist" in posted.text
    assert unknown.status_code == 404 and "S-INV999999" in unknown.text
    assert no_company.status_code == 404 and no_environment.status_code == 404 and other_page.status_code == 404
    assert bad_filter.status_code == 400


def test_web_client_filters_follow_the_documented_syntax() -> None:
    assert parse_filter("'No.' IS 'S-INV1001'") == {"No.": "S-INV1001"}
    assert parse_filter("'Sell-to Customer No.' IS '10000' AND 'Location Code' IS 'BLUE'") == {
        "Sell-to Customer No.": "10000", "Location Code": "BLUE"}
    assert parse_filter("'No.' IS 'O''Brien'") == {"No.": "O'Brien"}
    with pytest.raises(ValueError):
        parse_filter("No. = S-INV1001")
