"""Health's setup checks: the app's permissions, every Bookings business and BC reachable with its
identity, the templates named in settings."""

from __future__ import annotations

import pytest

from sandbox.stack import CLIENT_ID, ENVIRONMENT, TENANT
from sandbox.tokens import BC_AUDIENCE, GRAPH_AUDIENCE
from tests.helpers import body


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Checks are cached per process for five minutes; each test starts without."""
    monkeypatch.setattr("shared.flows.checks._cache", {})


def status(world) -> dict:
    response = world.host.http("GET", "status")
    assert response.status_code == 200, response.get_body()
    return body(response)


def checks(world) -> dict[str, dict]:
    return {check["name"]: check for check in status(world)["checks"]}


def test_a_working_setup_passes_both_checks_and_names_the_company(world):
    found = checks(world)
    assert found["businessCentral"]["ok"] and "CRONUS" in found["businessCentral"]["message"]
    assert found["templates"]["ok"]


def test_a_company_bc_does_not_have_fails_the_check_naming_the_settings_to_fix(world):
    world.configure(BC_COMPANY_ID="0d1e2f3a-0000-4000-8000-000000000404")
    world.sync()
    found = checks(world)["businessCentral"]
    assert not found["ok"] and "BC_ENVIRONMENT and BC_COMPANY_ID" in found["message"]
    assert status(world)["status"] == "degraded"


def test_credentials_entra_id_refuses_fail_the_check_saying_what_to_check(world, monkeypatch):
    monkeypatch.setattr("shared.upstream.auth._providers", {})
    world.configure(AZURE_CLIENT_SECRET="not-the-secret")
    found = checks(world)["businessCentral"]
    assert not found["ok"] and "Check the app's credentials (AZURE_CLIENT_ID" in found["message"]
    assert "not-the-secret" not in found["message"]


def test_a_template_named_in_settings_but_missing_fails_the_check_naming_both(world):
    world.configure(CUSTOMER_TEMPLATE="SALON")
    found = checks(world)["templates"]
    assert not found["ok"] and "'SALON'" in found["message"] and "CUSTOMER_TEMPLATE" in found["message"]


def test_bc_is_asked_once_however_often_health_and_status_are_polled(world):
    world.bc.plan.reset_stats()
    for _ in range(5):
        status(world)
        assert world.host.http("GET", "health", key=False).status_code == 200
    assert world.bc.plan.stats.total_requests == 1


# -- permissions ----------------------------------------------------------------------------------

@pytest.fixture
def fresh_tokens(monkeypatch):
    """Tokens carry the permissions granted when they were issued: start without cached ones."""
    monkeypatch.setattr("shared.upstream.auth._providers", {})


def test_a_missing_graph_read_permission_is_named_with_where_to_grant_it(world, fresh_tokens):
    world.sandbox.entra.set_roles(TENANT, CLIENT_ID, GRAPH_AUDIENCE, [])
    found = checks(world)["graph"]
    assert not found["ok"] and "Bookings.Read.All" in found["message"] and "Grant admin consent" in found["message"]
    world.sync()
    [error] = status(world)["lastSync"]["errors"][:1]
    assert "Bookings.Read.All" in error["message"], "the sync says which permission it lacks too"


def test_write_back_without_its_permission_is_named_only_when_write_back_is_on(world, fresh_tokens):
    world.sandbox.entra.set_roles(TENANT, CLIENT_ID, GRAPH_AUDIENCE, ["Bookings.Read.All"])
    assert checks(world)["graph"]["ok"]
    world.configure(WRITE_BACK_TO_BOOKINGS="true")
    found = checks(world)["graph"]
    assert not found["ok"] and "BookingsAppointment.ReadWrite.All" in found["message"]
    assert "WRITE_BACK_TO_BOOKINGS" in found["message"]


def test_a_missing_business_central_permission_is_named(world, fresh_tokens):
    world.sandbox.entra.set_roles(TENANT, CLIENT_ID, BC_AUDIENCE, [])
    found = checks(world)["businessCentral"]
    assert not found["ok"] and "API.ReadWrite.All" in found["message"]


def test_an_app_business_central_does_not_know_is_told_to_register_there(world):
    world.bc.register_app(TENANT, ENVIRONMENT, CLIENT_ID, registered=False)
    found = checks(world)["businessCentral"]
    assert not found["ok"] and "Microsoft Entra Applications" in found["message"]
    assert "401" in found["message"]


def test_every_configured_business_is_checked_by_name(world2):
    world2.graph.set_inaccessible(world2.business_ids[1])
    found = checks(world2)["graph"]
    assert not found["ok"] and f"no access to business {world2.business_ids[1]}" in found["message"]
    assert world2.business_ids[0] not in found["message"]


def test_bookings_read_write_all_alone_is_not_taken_as_enough_for_appointments(world, fresh_tokens):
    """Graph's tables name Bookings.ReadWrite.All for appointments; app-only calls with it alone
    have been refused. Strictest reading (the simulator's default): refused, and health names what
    to add; the documented reading: accepted, and health warns."""
    world.sandbox.entra.set_roles(TENANT, CLIENT_ID, GRAPH_AUDIENCE, ["Bookings.ReadWrite.All"])
    refused = checks(world)["graph"]
    assert not refused["ok"] and "lacks the Microsoft Graph application permission Bookings.Read.All" in refused["message"]

    monkeypatch_cache = world.monkeypatch
    monkeypatch_cache.setattr("shared.flows.checks._cache", {})
    from sandbox.graph.options import READ_ROLES
    world.graph.configure(appointment_read_roles=READ_ROLES)
    warned = checks(world)["graph"]
    assert warned["ok"] and warned["message"].startswith("Warning: the app reads appointments with "
                                                         "Bookings.ReadWrite.All alone")
    assert "add Bookings.Read.All" in warned["message"] and "Grant admin consent" in warned["message"]
    anonymous = body(world.host.http("GET", "health", key=False))
    assert "graph" not in anonymous["failedChecks"], "a warning is not a failed check"


def test_a_calendar_graph_refuses_app_only_fails_health_even_with_the_role(world):
    """App-only calendar reads have been reported refused although the permission is granted
    ("does not support the token type: App"): the business itself reads fine, its calendar does not."""
    world.graph.configure(appointment_read_roles=frozenset())
    found = checks(world)["graph"]
    assert not found["ok"] and world.business_ids[0] in found["message"]
    assert "Graph refuses the app's calendar reads (403 ErrorAccessDenied) although the app holds" in found["message"]
    assert "Bookings.Read.All" in found["message"]
    assert "graph" in body(world.host.http("GET", "health", key=False))["failedChecks"]


def test_calendar_views_under_the_other_parameter_names_are_read_and_the_sync_works(world):
    """A community report says Bookings wants startDateTime/endDateTime; the app tries them once
    when the documented start/end are refused."""
    from tests.test_invoicing import appointment

    world.graph.configure(calendar_view_params="startDateTime/endDateTime")
    a = appointment(world)
    found = checks(world)["graph"]
    assert found["ok"] and "calendars readable" in found["message"]
    world.sync()
    assert [row["id"] for row in body(world.host.http("GET", "bookings/uninvoiced"))["value"]] == [a]
    world.graph.configure(calendar_view_params="start/end")
    world.sync()
    assert status(world)["lastSync"]["outcome"] == "succeeded", "and back, should Graph take the documented ones"
