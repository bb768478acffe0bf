"""Health's setup checks: BC reachable with the app's identity, the templates named in settings."""

from __future__ import annotations

import pytest

from tests.helpers import body


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Checks are cached per process for five minutes; each test starts without."""
    monkeypatch.setattr("shared.checks._cache", {})


def health(world) -> dict:
    response = world.host.http("GET", "health", key=False)
    assert response.status_code == 200, response.get_body()
    return body(response)


def checks(world) -> dict[str, dict]:
    return {check["name"]: check for check in health(world)["checks"]}


def test_a_working_setup_passes_both_checks_and_names_the_company(world):
    found = checks(world)
    assert found["businessCentral"]["ok"] and "CRONUS" in found["businessCentral"]["message"]
    assert found["templates"]["ok"]


def test_a_company_bc_does_not_have_fails_the_check_naming_the_settings_to_fix(world):
    world.configure(BC_COMPANY_ID="0d1e2f3a-0000-4000-8000-000000000404")
    world.sync()
    found = checks(world)["businessCentral"]
    assert not found["ok"] and "BC_ENVIRONMENT and BC_COMPANY_ID" in found["message"]
    assert health(world)["status"] == "degraded"


def test_credentials_entra_id_refuses_fail_the_check_saying_what_to_check(world, monkeypatch):
    monkeypatch.setattr("shared.auth._providers", {})
    world.configure(AZURE_CLIENT_SECRET="not-the-secret")
    found = checks(world)["businessCentral"]
    assert not found["ok"] and "Check the app's credentials (AZURE_CLIENT_ID" in found["message"]
    assert "not-the-secret" not in found["message"]


def test_a_template_named_in_settings_but_missing_fails_the_check_naming_both(world):
    world.configure(CUSTOMER_TEMPLATE="SALON")
    found = checks(world)["templates"]
    assert not found["ok"] and "'SALON'" in found["message"] and "CUSTOMER_TEMPLATE" in found["message"]


def test_bc_is_asked_once_however_often_health_is_polled(world):
    world.bc.plan.reset_stats()
    for _ in range(5):
        health(world)
    assert world.bc.plan.stats.total_requests == 1
