"""The function app as the host sees it: indexing, bindings, host.json, settings, OpenAPI."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

from openapi_spec_validator import validate

from sandbox.host import indexed_functions
from tests.helpers import body

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_FUNCTIONS = {
    "sync_bookings", "run_requested_sync", "sync_one_business", "request_sync", "upsert_directory", "list_templates", "put_template",
    "list_uninvoiced", "create_invoices", "get_invoice_job", "invoice_worker", "billing_run", "health", "status", "openapi",
} | {"pages_home", "pages_bookings", "pages_jobs", "pages_job", "pages_setup", "pages_template", "pages_new_template",
     "pages_attention", "pages_signin", "pages_signin_callback", "pages_signout", "pages_static"}


def functions():
    from function_app import app

    return indexed_functions(app)


def test_the_app_indexes_every_function_with_an_empty_environment():
    script = "from function_app import app\nprint(sorted(f.get_function_name() for f in app.get_functions()))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr
    assert set(eval(result.stdout)) == EXPECTED_FUNCTIONS  # noqa: S307 - our own printed list


def test_every_functions_binding_names_match_its_parameters():
    for name, fn in functions().items():
        parameters = set(inspect.signature(fn.get_user_function()).parameters)
        bindings = {b.name for b in fn.get_bindings()} - {"$return"}
        assert parameters == bindings, f"{name}: parameters {parameters} vs bindings {bindings}"


def test_queue_and_timer_bindings_use_the_settings_the_host_resolves():
    triggers = {name: fn.get_trigger() for name, fn in functions().items()}
    assert triggers["sync_bookings"].schedule == "%SYNC_SCHEDULE%"
    assert triggers["billing_run"].schedule == "%BILLING_SCHEDULE%"
    queues = {name: t.queue_name for name, t in triggers.items() if type(t).__name__ == "QueueTrigger"}
    assert queues == {"run_requested_sync": "sync-requests", "sync_one_business": "sync-businesses",
                      "upsert_directory": "directory-upserts",
                      "invoice_worker": "invoice-jobs"}
    assert all(t.connection == "AzureWebJobsStorage" for t in triggers.values() if hasattr(t, "queue_name"))


def test_host_json_pins_the_bundle_and_chooses_queue_behaviour_on_purpose():
    host = json.loads((ROOT / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensionBundle"]["version"] == "[4.*, 5.0.0)"
    queues = host["extensions"]["queues"]
    assert queues["messageEncoding"] == "base64" and queues["maxDequeueCount"] == 5
    assert queues["batchSize"] >= 1 and queues["visibilityTimeout"]


def test_http_routes_and_auth_levels_are_as_the_contract_says():
    routes = {}
    for _name, fn in functions().items():
        trigger = fn.get_trigger()
        if type(trigger).__name__ == "HttpTrigger":
            level = str(getattr(trigger.auth_level, "value", trigger.auth_level)).lower()
            for method in trigger.methods:
                routes[(str(getattr(method, "value", method)), trigger.route)] = level
    pages = {route: level for route, level in routes.items() if route[1] == "pages" or route[1].startswith("pages/")}
    # The pages sign people in themselves (Easy Auth is not supported on Flex Consumption) and refuse
    # anyone without a verified session: see tests/test_pages.py.
    assert set(pages.values()) == {"anonymous"}
    assert {route for route in pages if route[0] == "POST"} == {
        ("POST", "pages/bookings"), ("POST", "pages/setup"), ("POST", "pages/templates/{kind}/{code}"),
        ("POST", "pages/templates"), ("POST", "pages/signout")}
    routes = {route: level for route, level in routes.items() if route not in pages}
    assert routes == {
        ("GET", "health"): "anonymous", ("GET", "openapi.json"): "anonymous", ("GET", "status"): "function",
        ("POST", "sync"): "function", ("GET", "bookings/uninvoiced"): "function",
        ("POST", "invoices"): "function", ("GET", "invoices/jobs/{jobId}"): "function",
        ("GET", "templates"): "function", ("PUT", "templates/{kind}/{code}"): "function",
    }


def test_openapi_document_is_valid_3_1_and_describes_every_registered_route(world):
    response = world.host.http("GET", "openapi.json", key=False)
    assert response.status_code == 200
    document = body(response)
    validate(document)
    assert document["openapi"].startswith("3.1")
    registered = set()
    for fn in functions().values():
        trigger = fn.get_trigger()
        if type(trigger).__name__ == "HttpTrigger" and not trigger.route.startswith("pages"):
            for method in trigger.methods:
                registered.add((str(getattr(method, "value", method)).lower(), f"/api/{trigger.route}"))
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert described == registered, "every JSON route is described (the HTML pages are not an API)"
    invoices = document["paths"]["/api/invoices"]["post"]
    assert invoices["requestBody"]["content"]["application/json"]["schema"]
    for status in ("200", "202", "400", "409"):
        assert status in invoices["responses"], status
    assert "application/problem+json" in invoices["responses"]["409"]["content"]
    query = {p["name"] for p in document["paths"]["/api/bookings/uninvoiced"]["get"]["parameters"]}
    assert {"businessId", "customerEmail", "from", "to", "top"} <= query
    assert document["paths"]["/api/health"]["get"]["security"] == []
    assert "security" not in document["paths"]["/api/status"]["get"], "the full status needs the function key"
    health = document["paths"]["/api/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(health["properties"]) == {"status", "lastSync", "failedChecks"}
    assert set(document["components"]["schemas"]["LastSyncOutcome"]["properties"]) == {"at", "outcome"}


def test_a_missing_setting_fails_only_what_needs_it_with_its_name(world):
    world.monkeypatch.delenv("BC_COMPANY_ID")
    world.host.http("POST", "sync")  # storage is enough for this
    world.host.send("directory-upserts", json.dumps({"kind": "item", "service": {
        "serviceId": "s1", "displayName": "Cut", "defaultPrice": 1}, "sourceHash": "h"}))
    world.host.drain(queues=["directory-upserts"])
    [poisoned] = world.host.peek_poison("directory-upserts")
    assert "BC_COMPANY_ID" in poisoned["reason"]

    world.monkeypatch.delenv("AzureWebJobsStorage")
    response = world.host.http("GET", "health", key=False)
    assert response.status_code == 503 and response.mimetype == "application/problem+json"
    assert "AzureWebJobsStorage" in body(response)["detail"] and "Traceback" not in response.get_body().decode()


def test_an_invalid_setting_value_is_named(world):
    world.configure(SYNC_LOOKBACK_DAYS="many")
    response = world.host.http("POST", "sync")
    assert response.status_code == 503 and "SYNC_LOOKBACK_DAYS" in body(response)["detail"]


def test_the_sample_settings_are_valid_and_point_at_local_storage(monkeypatch):
    from shared.settings import get_settings

    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = get_settings()
    assert settings.storage_connection == "UseDevelopmentStorage=true"
    assert settings.business_ids == ["contoso@contoso.onmicrosoft.com"]
    assert settings.sync_lookback_days == 60 and settings.sync_lookahead_days == 30
    assert not settings.is_public_authority, "the sample points at a local authority"
