"""BC → Bookings: customers and service items pushed into every business, once, without ping-pong."""

from __future__ import annotations

import re

import pytest

from sandbox.stack import CLIENT_ID, TENANT
from sandbox.tokens import BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ, BOOKINGS_READ_WRITE, GRAPH_AUDIENCE
from shared.settings import SettingsError, get_settings
from shared.storage.store import CUSTOMER_LINKS
from tests.helpers import body, rows
from tests.test_invoicing import appointment


WRITE_ROLES = [BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ_WRITE]


def enable_push(world, customers: bool = True, items: bool = True, roles: list[str] = WRITE_ROLES,
                **settings: str) -> None:
    """The push turned on, with the Graph permissions it needs granted (tokens carry the roles
    granted when they were issued: start without cached ones)."""
    world.sandbox.entra.set_roles(TENANT, CLIENT_ID, GRAPH_AUDIENCE, roles)
    world.monkeypatch.setattr("shared.upstream.auth._providers", {})
    world.configure(PUSH_CUSTOMERS_TO_BOOKINGS=str(customers).lower(), PUSH_ITEMS_TO_BOOKINGS=str(items).lower(),
                    **settings)


def by_email(world, business: int = 0) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for customer in world.graph.customers(world.business_ids[business]):
        found.setdefault((customer.get("emailAddress") or "").lower(), []).append(customer)
    return found


def pushed(world) -> dict:
    return body(world.host.http("GET", "status"))["lastSync"]["counts"]


def test_a_bc_customer_appears_once_in_every_business_and_an_edit_in_bc_follows(world2):
    world = world2
    enable_push(world, items=False)
    customer = world.bc.add_customer(world.company_id, type="Person", displayName="Nora Nordmann", email="Nora@Example.NO",
                                     phoneNumber="+47 22 00 00 00", city="Oslo", country="NO")
    world.sync()
    for business in (0, 1):
        [nora] = by_email(world, business)["nora@example.no"]
        assert nora["displayName"] == "Nora Nordmann"
        assert nora["phones"][0]["number"] == "+47 22 00 00 00"
        assert nora["addresses"][0]["city"] == "Oslo" and nora["addresses"][0]["countryOrRegion"] == "Norway"
    assert pushed(world)["customersPushed"] == 2

    world.bc.update(world.company_id, "customers", customer["id"], city="Bergen")
    world.sync()
    for business in (0, 1):
        [nora] = by_email(world, business)["nora@example.no"]
        assert nora["addresses"][0]["city"] == "Bergen"
    assert [c["email"].lower() for c in world.bc.customers(world.company_id)].count("nora@example.no") == 1
    assert len(world.graph.writes(kind="customers", method="POST")) == 2


def test_a_customer_that_came_from_bookings_is_not_pushed_back_or_duplicated(world2):
    world = world2
    enable_push(world, items=False)
    appointment(world, customers=(("ola@example.com", "Ola"),))
    world.graph.put_customer(world.business_ids[0], {"displayName": "Ola", "emailAddress": "ola@example.com"})
    world.sync()
    world.sync()
    assert [c["email"] for c in world.bc.customers(world.company_id)].count("ola@example.com") == 1
    assert len(by_email(world, 0)["ola@example.com"]) == 1
    assert "ola@example.com" not in by_email(world, 1), "a customer from Bookings is not pushed back"
    assert world.graph.writes(kind="customers", method="POST") == []


def test_an_existing_bookings_customer_is_linked_and_only_its_blanks_filled(world):
    enable_push(world, items=False)
    world.graph.put_customer(world.business_ids[0], {"displayName": "Kari (Bookings)", "emailAddress": "KARI@example.com",
                                                     "phones": []})
    world.bc.add_customer(world.company_id, type="Person", displayName="Kari Hansen", email="kari@example.com",
                          phoneNumber="+47 99 99 99 99")
    world.sync()
    [kari] = by_email(world, 0)["kari@example.com"]
    assert kari["displayName"] == "Kari (Bookings)", "Bookings changed the record after BC: kept"
    assert kari["phones"][0]["number"] == "+47 99 99 99 99", "a blank is filled"
    assert world.graph.writes(kind="customers", method="POST") == []


def test_blocked_and_filtered_out_customers_are_not_pushed(world):
    enable_push(world, items=False, BC_CUSTOMER_FILTER="city eq 'Oslo'")
    world.bc.add_customer(world.company_id, type="Person", displayName="In Oslo", email="oslo@example.com", city="Oslo")
    world.bc.add_customer(world.company_id, type="Person", displayName="In Bergen", email="bergen@example.com", city="Bergen")
    world.bc.add_customer(world.company_id, type="Person", displayName="Blocked", email="blocked@example.com", city="Oslo",
                          blocked="All")
    world.bc.add_customer(world.company_id, type="Person", displayName="No mail", city="Oslo")
    world.sync()
    assert set(by_email(world, 0)) == {"oslo@example.com"}


def test_a_bad_filter_is_a_settings_error_naming_the_setting(world):
    world.configure(BC_ITEM_FILTER="itemCategory eq 'HAIR'")
    with pytest.raises(SettingsError, match="BC_ITEM_FILTER"):
        get_settings()
    response = world.host.http("GET", "health", key=False)
    assert response.status_code == 503 and "BC_ITEM_FILTER" in body(response)["detail"]


def test_bc_service_items_become_bookings_services_once(world2):
    world = world2
    enable_push(world, customers=False)
    world.bc.add_item(world.company_id, displayName="Colour consultation", type="Service", unitPrice=80)
    world.bc.add_item(world.company_id, displayName="Shampoo bottle", type="Inventory", unitPrice=12)
    world.sync()
    world.sync()
    for business in world.business_ids:
        services = [s for s in world.graph.services(business) if s["displayName"] == "Colour consultation"]
        assert len(services) == 1 and services[0]["defaultPrice"] == 80
        assert services[0]["defaultPriceType"] == "fixedPrice"
        assert not [s for s in world.graph.services(business) if s["displayName"] == "Shampoo bottle"]
    # The services the push made come back to BC as links, not as new items.
    assert [i["displayName"] for i in world.bc.items(world.company_id)].count("Colour consultation") == 1


def test_without_the_services_permission_the_status_names_it_and_nothing_is_written(world):
    enable_push(world, customers=False, roles=[BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE])
    world.bc.add_item(world.company_id, displayName="Massage", type="Service", unitPrice=60)
    world.sync()
    status = body(world.host.http("GET", "status"))
    graph = next(c for c in status["checks"] if c["name"] == "graph")
    assert not graph["ok"] and "Bookings.ReadWrite.All" in graph["message"] and "PUSH_ITEMS_TO_BOOKINGS" in graph["message"]
    assert world.graph.writes(kind="services") == []
    assert status["lastSync"]["counts"]["pushFailed"] >= 1 or status["lastSync"]["errors"]


def test_a_create_whose_answer_was_lost_is_found_by_email_and_not_made_twice(world):
    enable_push(world, items=False)
    world.bc.add_customer(world.company_id, type="Person", displayName="Lost Answer", email="lost@example.com")
    world.graph.plan.script("POST", r"/customers$", "lost", times=1)
    world.sync()
    world.sync()
    world.sync()
    assert len(by_email(world, 0)["lost@example.com"]) == 1
    assert len(world.graph.writes(kind="customers", method="POST")) == 1


@pytest.mark.parametrize("text", ["city eq 'Oslo'", "country eq 'NO' and (salespersonCode eq 'JR' or salespersonCode eq 'AH')",
                                  "startswith(postalCode, '01')", "tolower(city) eq 'o''hara'", "not (blocked eq 'All')",
                                  " or ".join(["city eq 'x'"] * 15)])
def test_filters_bc_takes_are_accepted(text):
    from shared.odata_filter import CUSTOMER_FILTER_FIELDS, validate_filter

    assert validate_filter(f"  {text} ", CUSTOMER_FILTER_FIELDS) == text


@pytest.mark.parametrize(("text", "says"), [("cty eq 'Oslo'", "'cty' at position 1 is not a field"),
                                            ("city eq 'Oslo", "not closed"), ("city = 'Oslo'", "unexpected '='"),
                                            ("city eq 'a' city eq 'b'", "missing 'and'/'or'"),
                                            ("(city eq 'a'", "expected ')'"), ("city eq", "ends too early"),
                                            ("city eq 'a' or country eq 'NO'",
                                             "'or' at position 13 combines different fields (city, country)"),
                                            ("country eq 'NO' and (salespersonCode eq 'JR' or currencyCode ne 'EUR')",
                                             "'or' at position 46 combines different fields"),
                                            ("contains(tolower(email), 'x')", "tolower() at position 10 is inside contains()"),
                                            ("'Oslo' eq 'Oslo'", "must compare a field with a value"),
                                            (" or ".join(["city eq 'x'"] * 16),
                                             "the filter has 95 nodes as OData counts them"),
                                            (" or ".join(["city eq 'x'"] * 16), "passes the limit at position 226")])
def test_a_filter_bc_would_refuse_is_explained(text, says):
    from shared.odata_filter import CUSTOMER_FILTER_FIELDS, InvalidFilter, validate_filter

    with pytest.raises(InvalidFilter, match=re.escape(says)):
        validate_filter(text, CUSTOMER_FILTER_FIELDS)


# -- Bookings' own readings: refusals without a reason, offset paging ------------------------------

def customer_posts(world) -> int:
    return sum(count for shape, count in world.graph.plan.stats.requests.items()
               if shape.startswith("POST ") and shape.endswith("/customers"))


@pytest.mark.parametrize("style", ["precise", "unknown-400", "unknown-500"])
def test_a_customer_bookings_refuses_with_unknown_error_is_not_posted_five_times(world, style):
    enable_push(world, items=False)
    world.graph.configure(refusal_style=style, field_limits={"bookingCustomer.displayName": 5})
    world.bc.add_customer(world.company_id, type="Person", displayName="Too Long A Name", email="refused@example.com")

    runs = 3 if style == "unknown-500" else 1  # a 500 may have made it: looked for in two more runs' lists first
    for _ in range(runs):
        world.sync()
    errors = [e["message"] for e in body(world.host.http("GET", "status"))["lastSync"]["errors"]]
    for _ in range(3):
        world.sync()

    assert customer_posts(world) == 1, "sent once, never again until BC changes it"
    assert "refused@example.com" not in by_email(world, 0)
    said = next(message for message in errors if "refused@example.com" in message)
    assert "push of customer" in said
    if style != "precise":
        assert "without giving a reason" in said and "UnknownError" in said
    [link] = [row for row in rows(world, CUSTOMER_LINKS) if row["PartitionKey"].startswith("push:")]
    assert link["Status"] == "failed"


def test_a_customer_the_list_walk_skipped_is_not_created_twice(world):
    """Graph may page by offsets: a customer deleted in Bookings during the app's list walk makes
    the walk skip the one after it. The push reads a linked customer by its id before creating."""
    enable_push(world, items=False)
    business = world.business_ids[0]
    first, second = (world.graph.put_customer(business, {"displayName": f"Walk-in {n}", "emailAddress": None})
                     for n in (1, 2))
    customer = world.bc.add_customer(world.company_id, type="Person", displayName="Nora", email="nora@example.no")
    world.sync()
    [nora] = by_email(world, 0)["nora@example.no"]
    world.bc.update(world.company_id, "customers", customer["id"], city="Bergen")  # in BC's change window again

    world.graph.configure(paging="offset")
    world.graph.page_size = 2
    deleted = []

    def delete_during_the_walk(business_id: str, collection: str) -> None:
        if collection == "customers" and business_id == business and not deleted:
            world.graph.delete_customer(business, first)
            deleted.append(first)

    world.graph.page_served = delete_during_the_walk
    try:
        world.sync()
    finally:
        world.graph.page_served = None

    assert deleted and [c["id"] for c in by_email(world, 0)["nora@example.no"]] == [nora["id"]]
    assert len(world.graph.writes(kind="customers", method="POST")) == 1
    assert by_email(world, 0)["nora@example.no"][0]["addresses"][0]["city"] == "Bergen", "BC's change followed"
    assert second in [c["id"] for c in world.graph.customers(business)]
