"""Dimensions in the Business Central simulator: the read-only `dimensions`/`dimensionValues`
pages, an invoice's `dimensionSetLines`, what its lines inherit, and blocked values. Each
behaviour is a row of `sandbox/FIDELITY.md` ("Dimensions")."""

from __future__ import annotations

import pytest

from tests.sandbox import test_bc_sim
from tests.sandbox.test_bc_sim import Bc, error_code, error_message

# The simulator over HTTPS and a fresh company per test, as in test_bc_sim.
tls, server, bc = test_bc_sim.tls, test_bc_sim.server, test_bc_sim.bc


def _setup(bc: Bc) -> tuple[dict, dict, dict]:
    location = bc.sim.add_dimension(bc.company_id, "LOCATION", "Location")
    oslo = bc.sim.add_dimension_value(bc.company_id, "LOCATION", "OSLO", "Oslo")
    customer = bc.sim.add_customer(bc.company_id, displayName="Chloé", email="chloe@example.com")
    return location, oslo, customer


def _draft(bc: Bc, customer: dict, **extra) -> dict:
    response = bc.client.post(bc.url("salesInvoices"), json={"customerId": customer["id"], **extra})
    assert response.status_code == 201, response.text
    return response.json()


def test_dimensions_and_their_values_are_read_only_pages_without_blocked(bc: Bc) -> None:
    location, oslo, _ = _setup(bc)
    bc.sim.add_dimension_value(bc.company_id, "LOCATION", "BERGEN", "Bergen", blocked=True)

    dimensions = bc.client.get(bc.url("dimensions"), params={"$filter": "code eq 'LOCATION'",
                                                              "$expand": "dimensionValues"}).json()["value"]
    assert [d["code"] for d in dimensions] == ["LOCATION"] and "blocked" not in dimensions[0]
    assert [v["code"] for v in dimensions[0]["dimensionValues"]] == ["BERGEN", "OSLO"]
    assert all("blocked" not in v for v in dimensions[0]["dimensionValues"])
    values = bc.client.get(bc.url(f"dimensions({location['id']})/dimensionValues")).json()["value"]
    assert {v["id"] for v in values} >= {oslo["id"]}
    created = bc.client.post(bc.url("dimensions"), json={"code": "DEPT"})
    assert created.status_code == 405 and error_code(created) == "BadRequest_MethodNotAllowed"


def test_an_invoice_takes_dimension_set_lines_by_code_and_its_later_lines_inherit_them(bc: Bc) -> None:
    location, oslo, customer = _setup(bc)
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=80)
    invoice = _draft(bc, customer, salesInvoiceLines=[{"itemId": item["id"], "quantity": 1}])

    added = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines"),
                           json={"code": "LOCATION", "valueCode": "OSLO"})
    assert added.status_code == 201, added.text
    line = added.json()
    assert (line["id"], line["valueId"], line["parentType"]) == (location["id"], oslo["id"], "Sales_x0020_Invoice")
    later = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines"),
                           json={"itemId": item["id"], "quantity": 2})
    assert later.status_code == 201, later.text

    expanded = bc.client.get(bc.url(f"salesInvoices({invoice['id']})"),
                             params={"$expand": "dimensionSetLines,salesInvoiceLines"}).json()
    assert [(d["code"], d["valueCode"]) for d in expanded["dimensionSetLines"]] == [("LOCATION", "OSLO")]
    first, second = expanded["salesInvoiceLines"]
    assert bc.client.get(bc.url(f"salesInvoiceLines({first['id']})/dimensionSetLines")).json()["value"] == []
    inherited = bc.client.get(bc.url(f"salesInvoiceLines({second['id']})/dimensionSetLines")).json()["value"]
    assert [(d["code"], d["valueCode"]) for d in inherited] == [("LOCATION", "OSLO")]


@pytest.mark.parametrize("body, message", [
    ({"code": "REGION", "valueCode": "OSLO"}, 'The "code" does not match to a Dimension.'),
    ({"code": "LOCATION", "valueCode": "TROMSO"}, 'The "valueCode" does not match to a Dimension Value.'),
    ({"valueCode": "OSLO"}, 'The "id" or "code" field must be filled in.'),
    ({"code": "LOCATION"}, 'The "valueId" or "valueCode" field must be filled in.'),
])
def test_a_dimension_set_line_bc_cannot_match_is_refused_with_the_pages_message(bc: Bc, body: dict,
                                                                                   message: str) -> None:
    _, _, customer = _setup(bc)
    invoice = _draft(bc, customer)

    response = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines"), json=body)

    assert response.status_code == 400 and error_message(response) == message
    assert bc.sim.dimension_sets(bc.company_id) == {}


def test_a_dimension_twice_and_the_read_only_parent_fields_are_refused(bc: Bc) -> None:
    _, _, customer = _setup(bc)
    invoice = _draft(bc, customer)
    url = bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines")
    assert bc.client.post(url, json={"code": "location", "valueCode": "oslo"}).status_code == 201

    again = bc.client.post(url, json={"code": "LOCATION", "valueCode": "OSLO"})
    parent = bc.client.post(url, json={"code": "LOCATION", "valueCode": "OSLO", "parentId": invoice["id"]})

    assert again.status_code == 400 and "already exists" in error_message(again)
    assert parent.status_code == 400 and error_code(parent) == "BadRequest_InvalidOperation"


def test_a_blocked_value_is_taken_by_a_draft_and_refused_when_it_is_posted(bc: Bc) -> None:
    _, _, customer = _setup(bc)
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=80)
    bc.sim.block_dimension_value(bc.company_id, "LOCATION", "OSLO")
    invoice = _draft(bc, customer)

    added = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines"),
                           json={"code": "LOCATION", "valueCode": "OSLO"})
    assert added.status_code == 201
    bc.client.post(bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines"), json={"itemId": item["id"],
                                                                                      "quantity": 1})
    posted = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/Microsoft.NAV.post"))

    assert posted.status_code == 400
    assert "Dimension Value LOCATION - OSLO is blocked." in error_message(posted)


def test_a_blocked_value_is_refused_at_once_when_configured(bc: Bc) -> None:
    _, _, customer = _setup(bc)
    bc.sim.configure(refuse_blocked_dimension_values=True)
    bc.sim.block_dimension_value(bc.company_id, "LOCATION", "OSLO")
    invoice = _draft(bc, customer)

    refused = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines"),
                             json={"code": "LOCATION", "valueCode": "OSLO"})

    assert refused.status_code == 400 and error_message(refused) == "Dimension Value LOCATION - OSLO is blocked."


def test_a_dimension_set_line_changes_the_invoices_etag_and_can_be_changed_and_deleted(bc: Bc) -> None:
    location, _, customer = _setup(bc)
    bc.sim.add_dimension_value(bc.company_id, "LOCATION", "BERGEN", "Bergen")
    invoice = _draft(bc, customer)
    url = bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines")
    line = bc.client.post(url, json={"code": "LOCATION", "valueCode": "OSLO"}).json()
    after = bc.client.get(bc.url(f"salesInvoices({invoice['id']})")).json()
    assert after["@odata.etag"] != invoice["@odata.etag"]

    changed = bc.client.patch(f"{url}({location['id']})", json={"valueCode": "BERGEN"},
                              headers={"If-Match": line["@odata.etag"]})
    assert changed.status_code == 200 and changed.json()["valueCode"] == "BERGEN"
    deleted = bc.client.delete(f"{url}({location['id']})", headers={"If-Match": changed.json()["@odata.etag"]})
    assert deleted.status_code == 204 and bc.client.get(url).json()["value"] == []


def test_a_line_sent_again_with_its_sequence_is_refused_as_the_aggregator_refuses_it(bc: Bc) -> None:
    _, _, customer = _setup(bc)
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=80)
    invoice = _draft(bc, customer)
    url = bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines")

    first = bc.client.post(url, json={"itemId": item["id"], "quantity": 1, "sequence": 10000})
    again = bc.client.post(url, json={"itemId": item["id"], "quantity": 1, "sequence": 10000})

    assert first.status_code == 201
    assert again.status_code == 400 and error_code(again) == "Application_DialogException"
    assert error_message(again) == "You cannot insert a line because a line already exists."
    assert len(bc.client.get(url).json()["value"]) == 1


def test_a_draft_reads_with_every_lines_dimension_set_lines_in_one_multi_level_expand(bc: Bc) -> None:
    _, _, customer = _setup(bc)
    item = bc.sim.add_item(bc.company_id, displayName="Massage", type="Service", unitPrice=80)
    invoice = _draft(bc, customer)
    bc.client.post(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines"),
                   json={"code": "LOCATION", "valueCode": "OSLO"})
    bc.client.post(bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines"), json={"itemId": item["id"]})

    read = bc.client.get(bc.url(f"salesInvoices({invoice['id']})"),
                         params={"$expand": "dimensionSetLines,salesInvoiceLines($expand=dimensionSetLines)"})
    wrong = bc.client.get(bc.url(f"salesInvoices({invoice['id']})"),
                          params={"$expand": "salesInvoiceLines($expand=nothing)"})

    assert read.status_code == 200, read.text
    [line] = read.json()["salesInvoiceLines"]
    assert [(d["code"], d["valueCode"]) for d in line["dimensionSetLines"]] == [("LOCATION", "OSLO")]
    assert wrong.status_code == 400


def _dimensions_of(bc: Bc, path: str) -> dict[str, str]:
    lines = bc.client.get(bc.url(f"{path}/dimensionSetLines")).json()["value"]
    return {line["code"]: line["valueCode"] for line in lines}


def test_a_new_invoice_starts_with_the_default_dimensions_of_its_customer_salesperson_and_location(bc: Bc) -> None:
    _setup(bc)
    for code, values in (("DEPARTMENT", ("SALES", "ADM")), ("AREA", ("NORTH", "SOUTH"))):
        bc.sim.add_dimension(bc.company_id, code, code.title())
        for value in values:
            bc.sim.add_dimension_value(bc.company_id, code, value, value.title())
    bc.sim.add_dimension_value(bc.company_id, "LOCATION", "BERGEN", "Bergen")
    customer = bc.sim.add_customer(bc.company_id, displayName="Dag", salespersonCode="PS", locationCode="BLUE")
    bc.sim.add_default_dimension(bc.company_id, "customers", customer["number"], "LOCATION", "BERGEN")
    bc.sim.add_default_dimension(bc.company_id, "customers", "", "LOCATION", "OSLO")  # every customer: the record's wins
    bc.sim.add_default_dimension(bc.company_id, "salespeople", "PS", "DEPARTMENT", "SALES")
    bc.sim.add_default_dimension(bc.company_id, "salespeople", "PS", "LOCATION", "OSLO")  # the customer came first
    bc.sim.add_default_dimension(bc.company_id, "locations", "BLUE", "AREA", "NORTH")

    invoice = _draft(bc, customer)

    assert _dimensions_of(bc, f"salesInvoices({invoice['id']})") == {
        "LOCATION": "BERGEN", "DEPARTMENT": "SALES", "AREA": "NORTH"}
    again = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines"),
                           json={"code": "LOCATION", "valueCode": "OSLO"})
    assert again.status_code == 400 and error_message(again).startswith("The dimension set line already exists.")
    [location] = [line for line in bc.client.get(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines")).json()[
        "value"] if line["code"] == "LOCATION"]
    changed = bc.client.patch(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines({location['id']})"),
                              json={"valueCode": "OSLO"}, headers={"If-Match": location["@odata.etag"]})
    assert changed.status_code == 200 and changed.json()["valueCode"] == "OSLO"


@pytest.mark.parametrize("item_wins", [True, False])
def test_a_new_line_merges_its_items_default_dimensions_into_the_headers(bc: Bc, item_wins: bool) -> None:
    _, _, customer = _setup(bc)
    bc.sim.configure(line_default_dims_override_header=item_wins)
    bc.sim.add_dimension_value(bc.company_id, "LOCATION", "BERGEN", "Bergen")
    bc.sim.add_dimension(bc.company_id, "PRODUCT", "Product")
    bc.sim.add_dimension_value(bc.company_id, "PRODUCT", "HAIR", "Hair")
    item = bc.sim.add_item(bc.company_id, displayName="Cut", type="Service", unitPrice=40)
    bc.sim.add_default_dimension(bc.company_id, "items", item["number"], "LOCATION", "BERGEN")
    bc.sim.add_default_dimension(bc.company_id, "items", "", "PRODUCT", "HAIR")
    invoice = _draft(bc, customer)
    bc.client.post(bc.url(f"salesInvoices({invoice['id']})/dimensionSetLines"),
                   json={"code": "LOCATION", "valueCode": "OSLO"})

    line = bc.client.post(bc.url(f"salesInvoices({invoice['id']})/salesInvoiceLines"),
                          json={"itemId": item["id"], "quantity": 1}).json()

    assert _dimensions_of(bc, f"salesInvoiceLines({line['id']})") == {
        "LOCATION": "BERGEN" if item_wins else "OSLO", "PRODUCT": "HAIR"}
    assert _dimensions_of(bc, f"salesInvoices({invoice['id']})") == {"LOCATION": "OSLO"}
