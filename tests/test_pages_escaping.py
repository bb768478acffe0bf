"""Runtime text on the operator pages is text, never markup, never a format string: every template
rendered with hostile text in every variable, and every page route requested, signed in and not,
with hostile text in every query parameter, form field and route parameter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
from jinja2 import nodes

from sandbox.host import indexed_functions
from shared.upstream.bc import TEMPLATE_FIELDS
from shared.web.blueprints.pages import FILTER_FIELDS
from shared.web.blueprints.pages.render import LANGUAGES, N_, TEMPLATES, environment, render
from shared.web.sessions import Principal
from tests.signin_helpers import Browser

PROBE = "<x-probe a=\"1\" b='2'>"
HOSTILE = f"{PROBE}</textarea><script>alert(\"x'%\")</script> 100% %s %(x)s {{{{7*7}}}} 𝄞😀 &amp;"
"""Markup, both quotes, `%` and format specifiers, a Jinja expression and astral characters."""
ISO = "2026-11-20T09:00:00Z"


def assert_inert(html: str) -> None:
    assert PROBE not in html and "<script>alert" not in html, "markup reflected unescaped"
    assert "&lt;x-probe" in html, "the text is shown (escaped), not dropped"


# -- templates ---------------------------------------------------------------------------------------

@dataclass
class FakeCandidate:
    invoiceable: bool
    reason: str = HOSTILE
    reason_code: str = HOSTILE

    def row(self) -> dict:
        return {"id": HOSTILE, "businessId": HOSTILE, "start": ISO, "serviceName": HOSTILE, "priceType": HOSTILE,
                "amount": 12.5,
                "customers": [{"name": HOSTILE, "email": HOSTILE, "quantity": 1.0}]}


class FakeFilters:
    business_id = customer_email = company = location = group = HOSTILE
    start = end = None

    def query(self) -> dict:
        return {"customerEmail": HOSTILE, HOSTILE: HOSTILE}


@dataclass
class FakeGroup:
    code: str
    count: int
    bookings: list


@dataclass
class FakePoisoned:
    queue: str = HOSTILE
    summary: str = HOSTILE
    reason: str = HOSTILE
    failed_at: str = ISO


@dataclass
class FakeAttention:
    groups: list
    refused: list
    poisoned: list
    empty: bool = False


JOB = {"jobId": HOSTILE, "status": HOSTILE, "bookingCount": 2, "createdAt": ISO,
       "invoices": [{"invoiceNumber": HOSTILE, "invoiceId": HOSTILE, "customerEmail": HOSTILE,
                     "bookingIds": [HOSTILE], "amount": 10,
                     "writeBack": {"noted": 0, "notNoted": [{"bookingId": HOSTILE, "outcome": HOSTILE,
                                                             "message": HOSTILE}]}}],
       "waiting": [{"customerEmail": HOSTILE, "reason": HOSTILE, "until": ISO, "since": None},
                   {"customerEmail": HOSTILE, "reason": HOSTILE, "until": None, "since": ISO}],
       "errors": [{"bookingId": HOSTILE, "message": HOSTILE}],
       "request": {"source": "billing", "label": HOSTILE, "period": HOSTILE}}
CHAIN = {"businesses": [{"id": HOSTILE, "companyId": HOSTILE, "companyName": HOSTILE, "mapped": False,
                         "locations": [HOSTILE]}],
         "byBusiness": {HOSTILE: {"companyName": HOSTILE, "locations": [HOSTILE]}},
         "companies": [{"id": HOSTILE, "name": HOSTILE, "default": True}], "locations": [HOSTILE],
         "multiCompany": True, "hasLocations": True}
FIELDS = {kind: list(model.model_fields) for kind, model in TEMPLATE_FIELDS.items()}
COMMON = {"user": Principal(HOSTILE, HOSTILE, HOSTILE, HOSTILE, (HOSTILE,)), "csrf": HOSTILE, "path": HOSTILE,
          "nav": HOSTILE, "status": 200, "keep": {HOSTILE: HOSTILE}}
CONTEXTS = {
    "error.html": {"title": HOSTILE, "detail": N_("Microsoft Entra ID did not sign you in: %(detail)s",
                                                  detail=HOSTILE), "sign_in": True},
    "bookings.html": {"groups": [(HOSTILE, [FakeCandidate(True), FakeCandidate(False)]),
                                 (None, [FakeCandidate(False, reason_code="no-price")])],
                      "total": 4, "shown_count": 3, "invoiceable": 1, "chain": CHAIN, "details": [HOSTILE], "filters": FakeFilters(), "businesses": [HOSTILE],
                      "problems": [HOSTILE, N_("to: the end date is before the start date")],
                      "conflicts": {HOSTILE: HOSTILE}, "notice": HOSTILE, "selected": {HOSTILE},
                      "next_query": {HOSTILE: HOSTILE}, "first_page": True},
    "job.html": {"job": JOB, "links": {HOSTILE: f"https://bc.example/?q={HOSTILE}"}, "running": True},
    "job_progress.html": {"job": JOB, "links": {HOSTILE: HOSTILE}, "running": True},
    "jobs.html": {"jobs": [JOB]},
    "preview.html": {"invoices": [{"customerName": HOSTILE, "customerEmail": HOSTILE, "amount": 3,
                                   "lines": [{"description": HOSTILE, "quantity": 1, "unitPrice": 3, "amount": 3}]}],
                     "booking_count": 1, "filters": FakeFilters(), "selection": [HOSTILE]},
    "setup.html": {"last": {"at": ISO, "outcome": HOSTILE, "counts": {"fetched": 3},
                            "errors": [{"businessId": HOSTILE, "message": HOSTILE}]},
                   "queued": True, "businesses": [HOSTILE], "checks": [{"ok": False, "name": HOSTILE, "message": HOSTILE}],
                   "templates": [{"kind": "customer", "code": HOSTILE, "fields": {FIELDS["customer"][0]: HOSTILE}}],
                   "template_errors": {"_": {"kind": HOSTILE},
                                       f"customer/{HOSTILE}": {"code": HOSTILE, FIELDS["customer"][0]: HOSTILE}},
                   "edited": {}, "saved": HOSTILE, "template_fields": FIELDS,
                   "boolean_fields": {"customer": [], "item": []},
                   "settings": [(HOSTILE, HOSTILE, False), (HOSTILE, None, False), (HOSTILE, None, True)],
                   "directory": {"customerFailures": 1, "itemFailures": 2, "waiting": 3, "customersWithFieldsLeftOut": 4},
                   "chain": CHAIN,
                   "billing": {"period": "month", "schedule": HOSTILE, "next": {"at": ISO, "label": HOSTILE},
                               "runs": [{"label": HOSTILE, "status": "done", "bookingCount": 1, "jobId": HOSTILE}]}},
    "attention.html": {"attention": FakeAttention(
        [FakeGroup("customer-refused", 1, [FakeCandidate(False)]), FakeGroup(HOSTILE, 1, [FakeCandidate(False)])],
        [{"kind": "customer", "key": HOSTILE, "reason": HOSTILE, "at": ISO}], [FakePoisoned()])},
    "signed_out.html": {"end_session": f"https://login.example/logout?x={HOSTILE}"},
}


def test_every_template_is_covered():
    templates = {path.name for path in TEMPLATES.glob("*.html") if not path.name.startswith("_")} - {"base.html"}
    assert templates == set(CONTEXTS)


@pytest.mark.parametrize("language", list(LANGUAGES))
@pytest.mark.parametrize("template", sorted(CONTEXTS))
def test_every_template_shows_hostile_text_in_every_variable_as_text(template, language):
    html = render(template, language, "Europe/Oslo", **COMMON, **CONTEXTS[template])
    assert_inert(html)
    assert "{{7*7}}" in html, "text that looks like a template expression stays text"


def test_only_constant_message_ids_reach_the_translation_functions():
    env = environment("fr")
    offenders = []
    for path in sorted(TEMPLATES.glob("*.html")):
        tree = env.parse(path.read_text(encoding="utf-8"))
        for call in tree.find_all(nodes.Call):
            if isinstance(call.node, nodes.Name) and call.node.name in ("_", "gettext", "ngettext"):
                if not call.args or not isinstance(call.args[0], nodes.Const):
                    offenders.append(f"{path.name}:{call.lineno}")
    assert offenders == []


def test_a_message_with_runtime_values_escapes_them_and_keeps_a_percent():
    from shared.web.blueprints.pages.render import say

    shown = say("de", N_("Template %(name)s saved.", name=HOSTILE))
    assert PROBE not in shown and "&lt;x-probe" in shown and "100%" in shown
    assert say("en", HOSTILE).count("&lt;") >= 2, "runtime text is escaped, never read as a message"


# -- every page route, signed in and not ------------------------------------------------------------

QUERY = [*FILTER_FIELDS, "after", "lang", "fragment", "queued", "saved", "next",
         "renew", "error", "error_description", "code", "state", "session_state", "client_info", HOSTILE]
FORM = [*FILTER_FIELDS, "action", "bookingId", "kind", "code", "lang",
        *{name for fields in FIELDS.values() for name in fields}, HOSTILE]


def page_routes() -> list[tuple[str, str, str]]:
    from function_app import app

    found = []
    for name, fn in indexed_functions(app).items():
        trigger = fn.get_trigger()
        if name.startswith("pages_") and type(trigger).__name__ == "HttpTrigger":
            for method in trigger.methods:
                found.append((name, str(getattr(method, "value", method)), trigger.route))
    return sorted(found)


def hostile_path(route: str) -> str:
    return re.sub(r"\{\w+\}", lambda _: HOSTILE.replace("/", "%2F"), route)


@pytest.mark.parametrize("signed_in", [False, True], ids=["anonymous", "signed-in"])
def test_every_page_route_answers_hostile_input_without_reflecting_it_or_failing(world, signed_in):
    """Each parameter alone (one bad value must not hide another's path) and all at once."""
    browser = Browser(world) if signed_in else None
    tried = []
    for name, method, route in page_routes():
        names = QUERY if method == "GET" else FORM
        variants = [(route, [(field, HOSTILE)]) for field in names] + [
            (route, [(field, HOSTILE) for field in names]), (hostile_path(route), [(field, HOSTILE) for field in names])]
        for path, fields in variants:
            headers = {"cookie": browser.cookie} if browser else {}
            if method == "GET":
                answer = world.host.http("GET", path, params=dict(fields), key=False, headers=headers)
            else:
                form = fields + ([("csrf", browser.csrf)] if browser else [])
                answer = world.host.http("POST", path, body=urlencode(form), key=False, params={"lang": HOSTILE},
                                         headers={**headers, "content-type": "application/x-www-form-urlencoded",
                                                  "origin": "http://localhost:7071"})
            tried.append((name, method, answer.status_code))
            assert answer.status_code < 500, (name, method, path, fields[:1], answer.get_body()[:300])
            body = (answer.get_body() or b"").decode("utf-8", "replace")
            assert PROBE not in body and "<script>alert" not in body, (name, method, path, fields[:1])
            assert "<" not in answer.headers.get("Location", ""), (name, method, path, fields[:1])
    assert {name for name, _, _ in tried} >= {"pages_bookings", "pages_setup", "pages_signin",
                                              "pages_signin_callback", "pages_template", "pages_signout"}
    if signed_in:
        assert {status for name, _, status in tried if name == "pages_bookings"} >= {200, 400}
