"""The Business Central simulator's limits checklist (`sandbox/FIDELITY.md`, "Limits checklist"):
the `$filter` node limit, text lengths in UTF-16 units, address lists in E-Mail, the line type
enum, a queue that gives up with 503 and the query-string length. The fixtures are those of
`test_bc_sim.py`: a fresh company per test on one simulator with BC's defaults."""
# ruff: noqa: F811 - the fixtures `bc`, `server` and `tls` are imported from test_bc_sim.py by name

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sandbox.bc import nodes, odata
from sandbox.bc.fields import CUSTOMER, INVOICE, LINE
from tests.sandbox.test_bc_sim import (Bc, bc, emails, error_code, error_message, find, names, server,  # noqa: F401
                                       tls)

NODE_LIMIT_MESSAGE = ("The node count limit of '100' has been exceeded. To increase the limit, set the 'MaxNodeCount' "
                      "property on EnableQueryAttribute or ODataValidationSettings.")
EMOJI = "\N{GRINNING FACE}"  # outside the Basic Multilingual Plane: 2 UTF-16 units, 1 code point


def ored(term: str, n: int) -> str:
    return " or ".join(term.format(i=i) for i in range(n))


# --- the node limit -----------------------------------------------------------------------------------

def test_a_filter_of_more_than_100_nodes_is_refused_with_bcs_message(bc: Bc) -> None:
    bc.sim.add_customer(bc.company_id, displayName="Bob", email="bob@example.com")
    fits = ored("tolower(email) eq 'c{i}@example.com'", 13) + " or tolower(email) eq 'bob@example.com'"  # 14×6+13 = 97
    at_the_limit = f"not (not (not ({fits})))"  # 100
    over = f"not ({at_the_limit})"  # 101

    assert names(find(bc, "customers", fits)) == ["Bob"]
    assert names(find(bc, "customers", at_the_limit)) == []
    refused = find(bc, "customers", over)
    assert refused.status_code == 400 and error_message(refused) == NODE_LIMIT_MESSAGE


def test_every_field_and_value_counts_as_odata_binds_it() -> None:
    rules = odata.FilterRules()

    def count(text: str, entity=CUSTOMER) -> int:
        return nodes.count(odata.parse_filter(text), entity.odata, rules)

    # eq, tolower, conversion of Text[80] to an unbounded Edm.String, email, $it, the constant
    assert count("tolower(email) eq 'a@b.c'") == 6
    assert count("contains(tolower(email),'a@b.c')") == 6
    assert count("externalDocumentNumber eq 'BKI-1'", INVOICE) == 5
    assert count("id eq 5f0f7c3e-7d4a-4b8e-9a57-0c2f1f7d9a10") == 4  # a GUID needs no conversion
    assert count("tolower(email) eq 'a' or tolower(email) eq 'b'") == 13  # each `or` one more


def test_without_conversions_the_count_is_that_of_aspnet_odatas_own_test_data(bc: Bc) -> None:
    """ASP.NET OData's FilterQueryValidatorTest: 21 `SupplierID eq 1` joined by `and` exceed 100
    nodes and 20 do not, so an int property compared with an int is 4 nodes. Without conversions
    (`filter_counts_conversions=False`) the simulator counts an Int32 field the same."""
    rules = odata.FilterRules(count_conversions=False)
    entity = LINE.odata

    def count(text: str) -> int:
        return nodes.count(odata.parse_filter(text), entity, rules)

    assert count(" and ".join(["sequence eq 1"] * 20)) == 99
    assert count(" and ".join(["sequence eq 1"] * 21)) == 104
    bc.sim.configure(filter_counts_conversions=False)
    sixteen = ored("tolower(email) eq 'c{i}@example.com'", 16)  # 16×5+15 = 95 without, 111 with conversions
    assert find(bc, "customers", sixteen).status_code == 200
    bc.sim.configure(filter_counts_conversions=True)
    assert error_message(find(bc, "customers", sixteen)) == NODE_LIMIT_MESSAGE


def test_the_node_limit_holds_inside_a_batch_too(bc: Bc) -> None:
    over = ored("tolower(email) eq 'c{i}@example.com'", 17)
    answer = bc.client.post("$batch", json={"requests": [
        {"id": "1", "method": "GET", "url": bc.url("customers") + "?$filter=" + over}]},
        headers={"Prefer": "odata.continue-on-error"})

    [inner] = answer.json()["responses"]
    assert inner["status"] == 400 and inner["body"]["error"]["message"] == NODE_LIMIT_MESSAGE


# --- text lengths in UTF-16 units ------------------------------------------------------------------------

def test_text_lengths_are_counted_in_utf16_units(bc: Bc) -> None:
    fits = "a" * 98 + EMOJI  # 99 code points, 100 UTF-16 units: Name is Text[100]
    too_long = "a" * 99 + EMOJI  # 100 code points, 101 units

    created = bc.client.post(bc.url("customers"), json={"displayName": fits})
    refused = bc.client.post(bc.url("customers"), json={"displayName": too_long})

    assert created.status_code == 201 and created.json()["displayName"] == fits
    assert refused.status_code == 400 and error_code(refused) == "Application_StringExceededLength"
    assert "The length of the string is 101, but it must be less than or equal to 100 characters." \
        in error_message(refused)


def test_a_filter_literal_is_measured_in_utf16_units_too(bc: Bc) -> None:
    address = EMOJI * 34 + "@example.com"  # 46 code points, 80 units: E-Mail is Text[80]

    assert find(bc, "customers", f"email eq '{address}'").status_code == 200
    refused = find(bc, "customers", f"email eq '{EMOJI}{address}'")
    assert refused.status_code == 400 and error_code(refused) == "Application_FilterErrorException"
    assert "The length of the string is 82" in error_message(refused)


# --- E-Mail holds a list ----------------------------------------------------------------------------------

def test_an_email_field_may_hold_several_addresses_and_contains_finds_any(bc: Bc) -> None:
    created = bc.client.post(bc.url("customers"), json={"displayName": "Two",
                                                        "email": "Front@Example.com; books@example.com"})

    assert created.status_code == 201, created.text
    assert names(find(bc, "customers", "tolower(email) eq 'books@example.com'")) == []
    assert names(find(bc, "customers", "contains(tolower(email),'books@example.com')",
                      **{"$schemaversion": "2.1"})) == ["Two"]
    assert names(find(bc, "customers", "contains(email,'Front@Example.com')")) == ["Two"]
    bad = bc.client.post(bc.url("customers"), json={"displayName": "Bad", "email": "a@example.com;nonsense"})
    assert bad.status_code == 400 and 'The email address "nonsense" is not valid.' in error_message(bad)


# --- the line type enum -----------------------------------------------------------------------------------

def test_a_line_type_is_one_of_the_apiv2_enum(bc: Bc) -> None:
    customer = bc.client.post(bc.url("customers"), json={"displayName": "Lines"}).json()
    refused = bc.client.post(bc.url("salesInvoices"), json={
        "customerId": customer["id"], "salesInvoiceLines": [{"lineType": "Value", "description": "x"}]})

    assert refused.status_code == 400 and "'Value' is not an option" in error_message(refused)
    assert ("Comment,Account,Item,Resource,Fixed Asset,Charge,Allocation Account"
            in error_message(refused))


# --- the request queue and the URL ------------------------------------------------------------------------

def test_a_request_queued_past_its_limit_is_answered_503_and_never_run(bc: Bc) -> None:
    bc.sim.plan.configure(max_concurrency=1, latency_ms=600, queue_timeout_seconds=0.2, retry_after_seconds=2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(bc.client.post, bc.url("customers"), json={"displayName": "First", "email": "a@x.com"})
        time.sleep(0.1)
        second = pool.submit(bc.client.post, bc.url("customers"), json={"displayName": "Second", "email": "b@x.com"})
        answers = [first.result(), second.result()]

    assert [a.status_code for a in answers] == [201, 503]
    assert answers[1].headers["retry-after"] == "2"
    assert emails(bc) == ["a@x.com"], "the queued request was never run"
    assert bc.sim.plan.knobs.queue_timeout_seconds == 0.2
    from sandbox.bc.app import default_knobs
    assert default_knobs().queue_timeout_seconds == 480.0, "BC: queued requests time out after 8 minutes"


@pytest.mark.parametrize("inner", [False, True], ids=["request", "inside-a-batch"])
def test_a_query_string_over_2048_characters_is_refused(bc: Bc, inner: bool) -> None:
    long_filter = ored("number eq 'C{i:05d}'", 120)  # about 2,900 characters once encoded
    short_filter = ored("number eq 'C{i:05d}'", 10)
    if inner:
        answer = bc.client.post("$batch", json={"requests": [
            {"id": str(n), "method": "GET", "url": bc.url("customers") + "?$filter=" + f.replace(" ", "%20")}
            for n, f in enumerate((long_filter, short_filter))]}, headers={"Prefer": "odata.continue-on-error"})
        statuses = [r["status"] for r in answer.json()["responses"]]
    else:
        statuses = [find(bc, "customers", f).status_code for f in (long_filter, short_filter)]

    assert statuses == [414, 200]
