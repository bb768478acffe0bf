"""The Graph simulator's readings of what Graph's documentation leaves open, over real HTTPS:
business rules on app-only appointment writes, refusals without a reason (``UnknownError``), the
calendar view's parameter names, offset paging and empty pages, and the 4 MB write limit."""

from __future__ import annotations

import dataclasses
import ssl
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import httpx
import pytest

from sandbox import tokens
from sandbox.data import graph_datetime
from sandbox.graph import GraphOptions, GraphSimulator
from sandbox.server import ServerThread
from sandbox.tls import TlsFiles, make_tls_files

WRITER_ROLES = [tokens.BOOKINGS_APPOINTMENT_READ_WRITE, tokens.BOOKINGS_READ_WRITE]


@pytest.fixture(scope="module")
def tls() -> TlsFiles:
    return make_tls_files()


@pytest.fixture(scope="module")
def served(tls: TlsFiles):
    sim = GraphSimulator(page_size=3)
    with ServerThread(sim.app, tls, name="graph-sim-variants") as server:
        yield sim, server.url


@pytest.fixture
def sim(served) -> GraphSimulator:
    simulator, _ = served
    simulator.configure(**dataclasses.asdict(GraphOptions()))
    simulator.plan.clear()
    simulator.clear_writes()
    return simulator


@pytest.fixture
def business(sim) -> str:
    business_id = f"variants-{uuid.uuid4().hex[:12]}@contoso.onmicrosoft.com"
    sim.add_business(business_id)
    return business_id


def client(served, tls: TlsFiles, token: str | None = None) -> httpx.Client:
    _, url = served
    token = token or tokens.issue(tokens.GRAPH_AUDIENCE, "contoso.onmicrosoft.com", "app", roles=WRITER_ROLES)
    return httpx.Client(base_url=f"{url}/v1.0", verify=ssl.create_default_context(cafile=str(tls.ca_bundle)),
                        headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def http(served, tls: TlsFiles):
    with client(served, tls) as opened:
        yield opened


def path(business_id: str, rest: str = "") -> str:
    return f"/solutions/bookingBusinesses/{quote(business_id)}{rest}"


def booked(sim: GraphSimulator, business_id: str, start: datetime, minutes: int = 60) -> str:
    return sim.put_appointment(business_id, {"startDateTime": graph_datetime(start),
                                             "endDateTime": graph_datetime(start + timedelta(minutes=minutes)),
                                             "customers": [], "serviceNotes": "Staff text."})


HOUR = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)


# Business rules on app-only appointment writes --------------------------------------------------------------------

@pytest.mark.parametrize("rules", ["strict", "off"])
def test_app_only_patch_of_a_past_appointment_is_refused_under_business_rules(sim, business, http, rules) -> None:
    sim.configure(app_only_business_rules=rules)
    past = booked(sim, business, HOUR - timedelta(days=2))

    response = http.patch(path(business, f"/appointments/{past}"), json={"serviceNotes": "Invoiced: SI-1"})

    if rules == "strict":
        assert response.status_code == 400 and response.json()["error"]["code"] == "ErrorInvalidRequest"
        assert "minimum lead time" in response.json()["error"]["message"]
        assert sim.appointment(business, past)["serviceNotes"] == "Staff text.", "nothing was changed"
        assert sim.writes(kind="appointments") == []
    else:
        assert response.status_code == 204
        assert sim.appointment(business, past)["serviceNotes"] == "Invoiced: SI-1"


def test_a_future_appointment_within_the_rules_may_be_changed_and_staff_in_bookings_are_not_bound(sim, business,
                                                                                                   http) -> None:
    future = booked(sim, business, HOUR + timedelta(days=3))
    past = booked(sim, business, HOUR - timedelta(days=3))

    assert http.patch(path(business, f"/appointments/{future}"), json={"serviceNotes": "ok"}).status_code == 204
    sim.update_appointment(business, past, serviceNotes="Changed by staff in Bookings.")
    assert sim.appointment(business, past)["serviceNotes"] == "Changed by staff in Bookings."


def test_minimum_lead_time_and_business_hours_are_the_businesss_own(sim, business, http) -> None:
    sim.set_scheduling(business, minimum_lead_time="P2D")
    soon = booked(sim, business, HOUR + timedelta(days=1))
    assert http.patch(path(business, f"/appointments/{soon}"), json={"serviceNotes": "x"}).status_code == 400

    sim.set_scheduling(business, minimum_lead_time="PT0S", time_zone="UTC", business_hours=[
        {"day": day, "timeSlots": [{"startTime": "08:00:00.0000000", "endTime": "17:00:00.0000000"}]}
        for day in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")])
    late = booked(sim, business, (HOUR + timedelta(days=5)).replace(hour=20))
    daytime = booked(sim, business, (HOUR + timedelta(days=5)).replace(hour=9))
    refused = http.patch(path(business, f"/appointments/{late}"), json={"serviceNotes": "x"})
    assert refused.status_code == 400 and "outside the business hours" in refused.json()["error"]["message"]
    assert http.patch(path(business, f"/appointments/{daytime}"), json={"serviceNotes": "x"}).status_code == 204
    shown = http.get(path(business)).json()
    assert shown["schedulingPolicy"]["minimumLeadTime"] == "PT0S" and len(shown["businessHours"]) == 7


# Refusals without a reason ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("style, status", [("precise", 400), ("unknown-400", 400), ("unknown-500", 500)])
def test_a_refused_write_can_be_an_unknown_error_without_a_message_and_runs_nothing(sim, business, http, style,
                                                                                   status) -> None:
    sim.configure(refusal_style=style)
    past = booked(sim, business, HOUR - timedelta(days=1))

    answers = [http.post(path(business, "/customers"), json={"@odata.type": "#microsoft.graph.bookingCustomer",
                                                              "emailAddress": "no-name@example.com"}),
               http.post(path(business, "/services"), json={"displayName": "No duration"}),
               http.patch(path(business, f"/appointments/{past}"), json={"serviceNotes": "Invoiced"})]

    for answer in answers:
        error = answer.json()["error"]
        assert answer.status_code == status
        if style == "precise":
            assert error["code"] != "UnknownError" and error["message"]
        else:
            assert (error["code"], error["message"]) == ("UnknownError", "")
            assert {"date", "request-id", "client-request-id"} <= set(error["innerError"])
    assert sim.writes(business_id=business) == [] and sim.customers(business) == []


def test_errors_that_are_not_refusals_of_content_stay_precise(sim, business, http) -> None:
    sim.configure(refusal_style="unknown-500")
    missing = http.patch(path(business, "/appointments/AAMkADgone="), json={"serviceNotes": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "ErrorItemNotFound"


# The calendar view's parameters -------------------------------------------------------------------------------------

def test_calendar_view_with_the_other_parameter_names_is_a_bad_request(sim, business, http) -> None:
    booked(sim, business, HOUR - timedelta(hours=5))
    documented = {"start": (HOUR - timedelta(days=1)).isoformat(), "end": HOUR.isoformat()}
    reported = {"startDateTime": documented["start"], "endDateTime": documented["end"]}

    assert http.get(path(business, "/calendarView"), params=documented).status_code == 200
    assert http.get(path(business, "/calendarView"), params=reported).status_code == 400

    sim.configure(calendar_view_params="startDateTime/endDateTime")
    refused = http.get(path(business, "/calendarView"), params=documented)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "ErrorInvalidRequest"
    assert len(http.get(path(business, "/calendarView"), params=reported).json()["value"]) == 1


# Paging ------------------------------------------------------------------------------------------------------------

def walk(http, url: str, between=None) -> list[str]:
    """Every id of a collection by its next links; `between(page_number)` runs after each page."""
    seen, number = [], 0
    while url:
        body = http.get(url).json()
        seen += [item["id"] for item in body["value"]]
        url = body.get("@odata.nextLink")
        number += 1
        if between:
            between(number)
    return seen


def customers(sim, business: str, count: int) -> list[str]:
    return [sim.put_customer(business, {"displayName": f"C{n}", "emailAddress": f"c{n}@example.com"})
            for n in range(count)]


def test_offset_paging_skips_an_item_when_one_before_the_cursor_is_removed_during_the_walk(sim, business,
                                                                                           http) -> None:
    ids = customers(sim, business, 7)
    sim.configure(paging="offset")

    def delete_the_first(page_number: int) -> None:
        if page_number == 1:
            sim.delete_customer(business, ids[0])  # a staff member, during the walk

    seen = walk(http, path(business, "/customers"), delete_the_first)

    assert seen == ids[:3] + ids[4:], "the item that moved into the page already read is never served"
    assert "$skip=3" in http.get(path(business, "/customers")).json()["@odata.nextLink"]


def test_keyset_paging_sees_every_remaining_item_once_whatever_changes_during_the_walk(sim, business, http) -> None:
    ids = customers(sim, business, 7)

    def delete_the_first(page_number: int) -> None:
        if page_number == 1:
            sim.delete_customer(business, ids[0])

    assert walk(http, path(business, "/customers"), delete_the_first) == ids


@pytest.mark.parametrize("paging", ["keyset", "offset"])
def test_a_page_may_hold_no_items_and_still_lead_on(sim, business, http, paging) -> None:
    ids = customers(sim, business, 7)
    sim.configure(paging=paging, empty_pages=0.5)
    pages = []
    url = path(business, "/customers")
    while url:
        body = http.get(url).json()
        pages.append(len(body["value"]))
        url = body.get("@odata.nextLink")
    assert 0 in pages and sum(pages) == len(ids)


# The 4 MB write limit ----------------------------------------------------------------------------------------------

def test_a_write_over_four_megabytes_is_answered_413_and_runs_nothing(sim, business, http) -> None:
    body = {"@odata.type": "#microsoft.graph.bookingCustomer", "displayName": "Big", "emailAddress": "big@example.com",
            "phones": [{"number": "1", "type": "home"}] * 200_000}
    response = http.post(path(business, "/customers"), json=body)
    assert response.status_code == 413 and response.json()["error"]["message"] == "Request entity too large"
    assert sim.customers(business) == []
