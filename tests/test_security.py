"""Security properties: declared auth levels, OData values that stay values, no secrets or tokens
in logs, a bounded request size, and no stack traces in HTTP answers."""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest

from sandbox.data import graph_datetime
from sandbox.host import indexed_functions
from sandbox.stack import CLIENT_SECRET
from shared.flows.messages import CustomerSource, CustomerUpsert, ItemUpsert, ServiceSource, encode
from shared.storage.store import CUSTOMER_LINKS, ITEM_LINKS
from tests.helpers import body, rows

ANONYMOUS = {"health", "openapi"}
PUBLIC_PAGES = {"pages_home", "pages_static", "pages_signin", "pages_signin_callback"}
"""Anonymous and without data: a redirect, the style sheet and script, and the two steps of signing in."""
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}")


def http_functions() -> dict:
    from function_app import app

    return {name: fn for name, fn in indexed_functions(app).items()
            if type(fn.get_trigger()).__name__ == "HttpTrigger"}


def declared_level(fn) -> str:
    [trigger] = [b for b in json.loads(fn.get_function_json())["bindings"] if b["type"] == "httpTrigger"]
    return trigger["authLevel"].lower()


# -- auth levels ----------------------------------------------------------------------------------

def test_every_http_function_but_health_and_openapi_declares_function_key_auth():
    functions = http_functions()
    levels = {name: declared_level(fn) for name, fn in functions.items()}

    pages = {name for name in functions if name.startswith("pages_")}
    # The pages are anonymous to the Functions host because people sign in with the app itself;
    # every one with data refuses a request without a verified user (next test).
    assert {name for name, level in levels.items() if level == "anonymous"} == ANONYMOUS | pages
    assert {name: level for name, level in levels.items() if name not in ANONYMOUS | pages} == {
        name: "function" for name in functions if name not in ANONYMOUS | pages}
    from function_app import app

    assert str(app.auth_level.value).lower() == "function", "a route added without a level must need a key"


def test_every_keyed_route_refuses_a_request_without_the_right_key(world):
    for name, fn in http_functions().items():
        trigger = fn.get_trigger()
        path = re.sub(r"\{(\w+)\}", lambda m: {"kind": "customer", "code": "STD"}.get(m.group(1), uuid.uuid4().hex),
                      trigger.route)
        if name in PUBLIC_PAGES:
            continue
        for method in (str(m.value) for m in trigger.methods):
            for key in (False, "wrong-" + world.host.function_key, True):
                response = world.host.http(method, path, body={}, key=key)
                if name.startswith("pages_"):  # a key is no sign-in: sent to sign in, or refused
                    expected = 302 if method == "GET" else 401
                    assert response.status_code == expected, (name, method, key, response.status_code)
                    assert method != "GET" or "/api/pages/signin" in response.headers["Location"]
                elif key is not True:
                    assert response.status_code == (200 if name in ANONYMOUS else 401), (name, key)


# -- OData injection ------------------------------------------------------------------------------

INJECTION = "x' or email ne 'y"


def sent_filters(monkeypatch) -> list[str]:
    """Every `$filter` the app sends to an upstream API."""
    from shared.upstream.http import ApiClient

    seen: list[str] = []
    real = ApiClient.request

    async def spy(self, method, url, **kwargs):
        if kwargs.get("params") and "$filter" in kwargs["params"]:
            seen.append(kwargs["params"]["$filter"])
        seen.extend(parse_qs(urlsplit(url).query).get("$filter", []))
        inner = (kwargs.get("json_body") or {}).get("requests", []) if url.endswith("$batch") else []
        seen.extend(f for request in inner for f in parse_qs(urlsplit(request["url"]).query).get("$filter", []))
        return await real(self, method, url, **kwargs)

    monkeypatch.setattr(ApiClient, "request", spy)
    return seen


def test_the_bc_simulator_would_obey_an_injected_filter(world):
    """The check below is only worth something if an unescaped value would match everyone."""
    world.bc.add_customer(world.company_id, displayName="Victim", email="victim@example.com")
    world.bc.add_customer(world.company_id, displayName="Other", email="other@example.com")

    async def raw_filter():
        from shared.runtime import runtime

        return await runtime().bc.list("customers", f"email eq '{INJECTION}'")

    assert len(world.host.run(raw_filter())) == 2


@pytest.mark.parametrize("email", [INJECTION.replace(" ", "") + "@example.com", "victim@example.com'",
                                   "'or'1'eq'1@example.com", "o''brien@example.com", "%27@example.com"])
def test_an_e_mail_made_to_break_the_filter_never_links_another_bc_customer(world, monkeypatch, email):
    victim = world.bc.add_customer(world.company_id, displayName="Victim", email="victim@example.com")
    filters = sent_filters(monkeypatch)
    world.host.send("directory-upserts", encode(CustomerUpsert(customer=CustomerSource(email=email,
                                                                                      displayName="Mallory"),
                                                               sourceHash="h")))
    world.host.drain()

    [link] = rows(world, CUSTOMER_LINKS)
    assert link["Status"] == "linked" and link["BcId"] != victim["id"]
    assert [c for c in world.bc.customers(world.company_id) if c["id"] == victim["id"]] == [
        {**victim, "@odata.etag": victim["@odata.etag"]}], "the victim was not touched"
    literal = "contains(tolower(email),'" + email.lower().replace("'", "''") + "')"
    assert any(literal in f for f in filters), filters


def test_a_service_name_made_to_break_the_filter_never_links_another_bc_item(world, monkeypatch):
    existing = world.bc.add_item(world.company_id, displayName="Haircut", type="Service")
    name = "Haircut' or displayName ne 'x"
    filters = sent_filters(monkeypatch)
    world.host.send("directory-upserts", encode(ItemUpsert(service=ServiceSource(serviceId="svc-evil", displayName=name,
                                                                                 defaultPrice=1.0), sourceHash="h")))
    world.host.drain()

    [link] = rows(world, ITEM_LINKS)
    assert link["Status"] == "linked" and link["BcId"] != existing["id"]
    assert sorted(i["displayName"] for i in world.bc.items(world.company_id)) == ["Haircut", name]
    literal = "tolower(displayName) eq 'haircut'' or displayname ne ''x'"
    assert any(literal in f for f in filters), filters


def test_the_bc_client_escapes_an_injection_that_the_message_schema_would_refuse(world):
    world.bc.add_customer(world.company_id, displayName="Victim", email="victim@example.com")

    async def lookup():
        from shared.runtime import runtime

        return await runtime().bc.customers_by_emails([INJECTION, "nobody@example.com"])

    assert all(found == [] for found in world.host.run(lookup()).values())


# -- secrets and tokens in logs -------------------------------------------------------------------

def everything_logged(records: list[logging.LogRecord]) -> str:
    """Message, arguments, exception text and every `extra` of every record."""
    formatter = logging.Formatter()
    parts = []
    for record in records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
        parts += [repr(value) for value in vars(record).values()]
    return "\n".join(parts)


def test_a_sync_run_survives_info_logging_as_the_functions_host_enables_it(world, caplog):
    """host.json logs at Information, so every `log.info` builds its record in Azure; an `extra`
    named like a LogRecord attribute (`created`, `name`, `message`…) then raises KeyError."""
    caplog.set_level(logging.INFO)

    world.sync_calendars()

    assert any(getattr(r, "event", None) == "sync_run_finished" for r in caplog.records)


def test_no_secret_key_or_token_is_ever_logged_even_when_things_fail(world, monkeypatch, caplog):
    monkeypatch.setattr("shared.upstream.auth._providers", {})  # tokens are requested while the logs are captured
    world.configure(HTTP_TIMEOUT_SECONDS="0.5")  # unknown outcomes are waited out: keep the waits short
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    for index in range(12):
        begin = start - timedelta(hours=5 + index)
        world.graph.put_appointment(world.business_ids[0], {
            "id": f"AAMk{uuid.uuid4().hex}=", "startDateTime": graph_datetime(begin),
            "endDateTime": graph_datetime(begin + timedelta(hours=1)), "duration": "PT1H", "serviceId": "svc-1",
            "serviceName": "Massage", "price": 70.0, "priceType": "fixedPrice", "customers": [],
            "customerEmailAddress": f"client{index % 4}@example.com", "customerName": "Client"})
    for plan, kinds in ((world.graph.plan, ("429", "500", "503", "reset", "malformed")),
                        (world.bc.plan, ("429", "500", "503", "reset", "malformed", "lost"))):
        plan.configure(fault_rate=0.25, fault_kinds=kinds, seed=5, retry_after_seconds=0, retry_after_omitted=0.0)
    world.graph.plan.script("GET", r"/calendarView", "503", times=2)
    world.bc.plan.script("GET", r"", "503", times=2)
    world.bc.plan.script("POST", r"", "lost", times=1)
    caplog.set_level(logging.DEBUG)

    world.sync()
    response = world.host.http("POST", "invoices", body={"all": True})
    world.host.drain()
    world.host.http("GET", "health")
    world.host.http("GET", "bookings/uninvoiced", key=False)
    for plan in (world.graph.plan, world.bc.plan):
        plan.clear()

    logged = everything_logged(caplog.records)
    assert response.status_code in (200, 202)
    assert world.sandbox.entra.plan.stats.total_requests >= 2, "tokens were requested while capturing"
    assert world.graph.plan.stats.total_faults and world.bc.plan.stats.total_faults
    assert len(caplog.records) > 50
    assert CLIENT_SECRET not in logged
    assert world.host.function_key not in logged
    assert not JWT.findall(logged), JWT.findall(logged)[:3]
    assert "Bearer " not in logged


# -- request size and error answers ---------------------------------------------------------------

@pytest.mark.parametrize("method, path", [("POST", "invoices"), ("PUT", "templates/customer/STD")])
def test_a_body_over_one_mebibyte_is_refused_with_413(world, method, path):
    limit = 1_048_576
    over = b'{"x": "' + b"a" * (limit - 8) + b'"}'
    assert len(over) == limit + 1

    refused = world.host.http(method, path, body=over, headers={"Content-Type": "application/json"})
    at_limit = world.host.http(method, path, body=over[:-2] + b"}", headers={"Content-Type": "application/json"})

    assert refused.status_code == 413 and refused.mimetype == "application/problem+json"
    assert body(refused)["status"] == 413 and body(refused)["title"] and body(refused)["detail"]
    assert at_limit.status_code == 400, "the limit is 1 MiB, not less"


def no_trace(response) -> str:
    text = response.get_body().decode()
    assert "Traceback" not in text and 'File "' not in text and ".py" not in text, text
    return text


def test_an_invalid_setting_answers_503_naming_it_without_a_stack_trace(world):
    world.configure(BOOKINGS_TIME_ZONE="Not/AZone")
    for method, path in (("GET", "bookings/uninvoiced"), ("POST", "invoices"), ("GET", "health"), ("POST", "sync")):
        response = world.host.http(method, path, body={"all": True})
        assert response.status_code == 503 and response.mimetype == "application/problem+json", (path, response)
        assert "BOOKINGS_TIME_ZONE" in no_trace(response)


def test_an_unexpected_error_answers_500_with_nothing_of_its_insides(world, monkeypatch):
    from shared.storage.store import Store

    async def broken(*args, **kwargs):
        raise RuntimeError("internal detail: /srv/app/shared/store.py password=hunter2")

    monkeypatch.setattr(Store, "query", broken)
    for method, path in (("GET", "bookings/uninvoiced"), ("POST", "invoices")):
        response = world.host.http(method, path, body={"all": True})
        text = no_trace(response)
        assert response.status_code == 500 and response.mimetype == "application/problem+json"
        assert "hunter2" not in text and "internal detail" not in text


# -- what anyone may learn ------------------------------------------------------------------------

def test_anonymous_health_says_nothing_private_while_the_keyed_status_says_everything(world):
    from tests.test_directory import customer_message

    missing = "closed-salon@contoso.onmicrosoft.com"
    world.configure(BOOKINGS_BUSINESS_IDS=f"{world.business_ids[0]},{missing}")
    world.host.send("directory-upserts", customer_message("ann@example.com", "Ann Private", phone="555 0102 ext. 7",
                                                          country="Narnia", city="Cair Paravel"))
    world.sync()

    status = body(world.host.http("GET", "status"))
    [bc_check] = [check for check in status["checks"] if check["name"] == "businessCentral"]
    company = re.search(r"company '([^']+)'", bc_check["message"]).group(1)
    anonymous = world.host.http("GET", "health", key=False)
    text = anonymous.get_body().decode()
    health = json.loads(text)

    assert status["lastSync"]["errors"] and missing in json.dumps(status), "the status names the business"
    assert set(health) == {"status", "lastSync", "failedChecks"} and set(health["lastSync"]) == {"at", "outcome"}
    assert health["status"] == "degraded" and health["failedChecks"] == ["graph"]
    for private in (missing, world.business_ids[0], "Ann", "555 0102", "Narnia", "ann@", company,
                    "ErrorFolderNotFound", "BOOKINGS_BUSINESS_IDS"):
        assert private not in text, private


def test_every_test_docs_security_md_names_exists():
    """The ASVS checklist names the test that holds each requirement: each of them must exist."""
    from pathlib import Path

    root = Path(__file__).resolve().parent
    text = (root.parent / "docs" / "SECURITY.md").read_text(encoding="utf-8")
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", text))
    defined = {m for path in root.rglob("test_*.py") for m in re.findall(r"^def (test_[a-z0-9_]+)",
                                                                        path.read_text(encoding="utf-8"), re.MULTILINE)}
    assert len(named) > 40 and named <= defined, sorted(named - defined)
