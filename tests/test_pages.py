"""The operator pages in process: who may see them, forms that must be genuine, what they show,
and the catalogs of every language. The real-browser journeys are in `test_pages_browser.py`."""

from __future__ import annotations

import re
import uuid
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest
from babel.messages.catalog import Catalog

from sandbox.i18n import extract, read
from shared.web.blueprints.pages.render import DEFAULT_LANGUAGE, LANGUAGES, translations
from tests.signin_helpers import Browser
from tests.helpers import body
from tests.test_invoicing import appointment

PAGES = ["pages/bookings", "pages/jobs", "pages/setup", "pages/attention"]


def text(response) -> str:
    return response.get_body().decode()


# -- who may see the pages --------------------------------------------------------------------------

def test_a_page_without_a_session_sends_the_browser_to_sign_in(world):
    response = world.host.http("GET", "pages/bookings", params={"from": "2026-01-01"}, key=False)
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.path == "/api/pages/signin"
    assert parse_qs(location.query)["next"] == ["/api/pages/bookings?from=2026-01-01"]


def test_a_form_without_a_session_is_refused_and_changes_nothing(world):
    appointment(world)
    world.sync()
    response = world.host.http("POST", "pages/bookings", body="action=all", key=False,
                               headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 401
    assert world.bc.invoices(world.company_id) == []
    assert world.host.http("GET", "invoices/jobs/" + "0" * 32).status_code == 404


def test_an_easy_auth_principal_header_is_no_sign_in(world):
    """Easy Auth is not supported on Flex Consumption, so nothing vouches for this header."""
    forged = "eyJhdXRoX3R5cCI6ImFhZCIsImNsYWltcyI6W10sIm5hbWVfdHlwIjoibmFtZSIsInJvbGVfdHlwIjoicm9sZXMifQ=="
    response = world.host.http("GET", "pages/bookings", key=False,
                               headers={"x-ms-client-principal": forged, "x-ms-client-principal-name": "eve",
                                        "x-ms-client-principal-id": str(uuid.uuid4())})
    assert response.status_code == 302 and "/api/pages/signin" in response.headers["Location"]


def test_a_session_cookie_the_app_did_not_sign_is_refused(world):
    browser = Browser(world)
    name, _, value = browser.cookie.partition("=")
    tampered = value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB")
    response = world.host.http("GET", "pages/bookings", key=False, headers={"cookie": f"{name}={tampered}"})
    assert response.status_code == 302


def test_a_user_of_another_tenant_is_refused(world):
    response = Browser(world, tid=str(uuid.uuid4())).get("pages/bookings")
    assert response.status_code == 403
    assert "another organisation" in text(response)


def test_by_default_only_holders_of_the_operator_app_role_get_in(world):
    refused = Browser(world, roles=()).get("pages/bookings")
    assert refused.status_code == 403 and "Invoicing.Operator" in text(refused)
    assert Browser(world, roles=("Invoicing.Operator",)).get("pages/bookings").status_code == 200
    world.configure(PAGES_ALLOWED_ROLE="")  # empty is the default, never "no role"
    assert Browser(world, roles=()).get("pages/bookings").status_code == 403


def test_another_role_or_every_member_can_be_chosen(world):
    world.configure(PAGES_ALLOWED_ROLE="Accounting.Clerk")
    assert Browser(world).get("pages/bookings").status_code == 403
    assert Browser(world, roles=("Accounting.Clerk",)).get("pages/bookings").status_code == 200
    world.configure(PAGES_ALLOWED_ROLE="*")
    assert Browser(world, roles=()).get("pages/bookings").status_code == 200


def test_a_form_without_the_session_csrf_token_is_refused_and_invoices_nothing(world):
    appointment(world)
    world.sync()
    browser = Browser(world)
    missing = browser.post("pages/bookings", {"action": "all"}, csrf=False)
    other_session = browser.post("pages/bookings", [("action", "all"), ("csrf", Browser(world).csrf)], csrf=False)
    assert missing.status_code == 403 and other_session.status_code == 403
    assert world.bc.invoices(world.company_id) == []
    assert len(body(world.host.http("GET", "bookings/uninvoiced"))["value"]) == 1


def test_a_form_posted_from_another_site_is_refused(world):
    browser = Browser(world)
    response = browser.post("pages/setup", {"action": "sync"}, headers={"origin": "https://evil.example"})
    assert response.status_code == 403


@pytest.mark.parametrize("path", PAGES)
def test_every_page_is_strict_about_scripts_and_never_holds_a_function_key(world, path):
    response = Browser(world).get(path)
    assert response.status_code == 200, text(response)
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy and "form-action 'self'" in policy and "base-uri 'none'" in policy
    assert response.headers["Cache-Control"] == "no-store" and response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Referrer-Policy"] == "same-origin"
    assert (response.mimetype, response.charset) == ("text/html", "utf-8")
    html = text(response)
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html)), "inline script"
    assert not re.search(r"\son\w+\s*=", html), "inline event handler"
    assert world.host.function_key not in html and "code=" not in html


def test_static_files_are_served_and_nothing_else(world):
    assert world.host.http("GET", "pages/static/app.js", key=False).status_code == 200
    assert world.host.http("GET", "pages/static/app.css", key=False).mimetype == "text/css"
    for name in ("..%2F__init__.py", "render.py", ".hidden.css"):
        assert world.host.http("GET", f"pages/static/{name}", key=False).status_code == 404


# -- what the pages show and do ---------------------------------------------------------------------

def test_the_list_shows_bookings_in_local_time_and_customer_names_as_text(world):
    world.configure(BOOKINGS_TIME_ZONE="Europe/Oslo")
    appointment(world, customers=(("mallory@example.com", "<script>alert(1)</script>"),), price=1234.5)
    world.sync()
    html = text(Browser(world).get("pages/bookings"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "1,234.50" in html


def test_a_booking_that_cannot_be_invoiced_shows_why_and_what_to_do(world):
    appointment(world, price=0, price_type="fixedPrice", customers=(("bob@example.com", "Bob"),))
    world.sync()
    html = text(Browser(world).get("pages/bookings"))
    assert "The appointment has no price." in html
    assert "Set a price for the appointment or its service in Bookings." in html
    attention = text(Browser(world).get("pages/attention"))
    assert "The appointment has no price." in attention and "Bob" in attention


def test_preview_shows_the_drafts_and_makes_none(world):
    appointment(world, customers=(("alice@example.com", "Alice"),), price=80)
    appointment(world, customers=(("alice@example.com", "Alice"),), price=20, hours_ago=30)
    world.sync()
    response = Browser(world).post("pages/bookings", {"action": "preview"})
    assert response.status_code == 200
    html = text(response)
    assert "alice@example.com" in html and "100.00" in html
    assert world.bc.invoices(world.company_id) == []


def test_invoicing_a_selection_makes_those_drafts_and_the_job_page_links_them_in_bc(world):
    first = appointment(world, customers=(("alice@example.com", "Alice"),))
    appointment(world, customers=(("bob@example.com", "Bob"),), hours_ago=30)
    world.sync()
    browser = Browser(world)
    response = browser.post("pages/bookings", [("action", "selected"), ("bookingId", first)])
    assert response.status_code == 303
    job_path = response.headers["Location"]
    assert re.fullmatch(r"/api/pages/jobs/[0-9a-f]{32}", job_path)
    world.host.drain()
    invoices = world.bc.invoices(world.company_id)
    assert [i["customerNumber"] for i in invoices] and len(invoices) == 1
    html = text(browser.get(job_path.removeprefix("/api/")))
    number = invoices[0]["number"]
    link = re.search(r'<a class="invoice-number" href="([^"]+)"[^>]*>' + re.escape(number) + "</a>", html)
    assert link, html
    url = link.group(1).replace("&amp;", "&")
    assert url.startswith(world.sandbox.env()["BC_WEB_CLIENT_URL"]) and "page=43" in url
    assert f"%27No.%27%20IS%20%27{number}%27" in url
    remaining = body(world.host.http("GET", "bookings/uninvoiced"))["value"]
    assert [b["customers"][0]["email"] for b in remaining] == ["bob@example.com"]


def test_a_job_made_through_the_json_api_shows_on_the_jobs_pages_as_made_by_hand(world):
    first = appointment(world, customers=(("carol@example.com", "Carol"),))
    world.sync()
    made = world.host.http("POST", "invoices", body={"bookingIds": [first]})
    assert made.status_code == 202
    job_id = body(made)["jobId"]
    world.host.drain()
    browser = Browser(world)
    listed, shown = browser.get("pages/jobs"), browser.get(f"pages/jobs/{job_id}")
    assert listed.status_code == 200 and shown.status_code == 200
    assert f"/api/pages/jobs/{job_id}" in text(listed) and "By hand" in text(listed) and "By hand" in text(shown)


def test_invoicing_a_booking_that_is_no_longer_uninvoiced_queues_nothing_and_says_why(world):
    first = appointment(world)
    world.sync()
    browser = Browser(world)
    assert browser.post("pages/bookings", [("action", "selected"), ("bookingId", first)]).status_code == 303
    again = browser.post("pages/bookings", [("action", "selected"), ("bookingId", first)])
    assert again.status_code == 409
    assert "Nothing was invoiced" in text(again) and first in text(again)


def test_a_template_bc_would_refuse_shows_the_error_beside_the_field(world):
    world.host.http("PUT", "templates/customer/BOOKINGS", body={"country": "FR"})
    browser = Browser(world)
    refused = browser.post("pages/templates/customer/BOOKINGS", {"country": "FRANCE-TOO-LONG", "city": "Paris"})
    assert refused.status_code == 400
    assert re.search(r'class="field-error" id="[^"]*-country-error">[^<]*10 characters', text(refused))
    assert body(world.host.http("GET", "templates"))["value"][0]["fields"] == {"country": "FR"}
    saved = browser.post("pages/templates/customer/BOOKINGS", {"country": "NO", "city": "Oslo"})
    assert saved.status_code == 303
    assert body(world.host.http("GET", "templates"))["value"][0]["fields"] == {"country": "NO", "city": "Oslo"}


def test_sync_now_queues_a_sync_that_the_queue_function_runs(world):
    appointment(world)
    response = Browser(world).post("pages/setup", {"action": "sync"})
    assert response.status_code == 303 and response.headers["Location"].endswith("?queued=1")
    world.host.drain()
    assert len(body(world.host.http("GET", "bookings/uninvoiced"))["value"]) == 1


def test_setup_shows_settings_with_secrets_hidden(world):
    html = text(Browser(world).get("pages/setup"))
    assert "AZURE_CLIENT_SECRET" in html and world.sandbox.env()["AZURE_CLIENT_SECRET"] not in html
    assert "AccountKey" not in html
    assert "BOOKINGS_BUSINESS_IDS" in html and world.business_ids[0] in html


def test_needs_attention_lists_messages_the_app_gave_up_on(world):
    world.host.send("invoice-jobs", "this is not json")
    world.host.drain()
    html = text(Browser(world).get("pages/attention"))
    assert "invoice-jobs-poison" in html and "not a valid" in html


# -- languages --------------------------------------------------------------------------------------

def test_the_language_follows_the_browser_and_the_switcher_remembers_a_choice(world):
    appointment(world, price=1234.5)
    world.sync()
    browser = Browser(world)
    french = text(browser.get("pages/bookings", headers={"accept-language": "fr-CH, fr;q=0.9, en;q=0.8"}))
    assert '<html lang="fr">' in french
    title = translations("fr").gettext("Uninvoiced bookings")
    assert title != "Uninvoiced bookings" and f"<h1>{title}</h1>" in french
    assert "1\u202f234,50" in french
    switched = browser.get("pages/bookings", params={"lang": "nb"}, headers={"accept-language": "fr"})
    assert '<html lang="nb">' in text(switched) and "1\u00a0234,50" in text(switched)
    assert "bi_lang=nb" in switched.headers["Set-Cookie"]
    filtered = text(browser.get("pages/bookings", params={"customerEmail": "alice@example.com", "from": "2026-01-01"}))
    assert '<input type="hidden" name="customerEmail" value="alice@example.com">' in filtered, \
        "switching the language keeps the filters"


def _placeholders(message: str) -> set[str]:
    return set(re.findall(r"%\((\w+)\)s", message))


@pytest.mark.parametrize("language", [code for code in LANGUAGES if code != DEFAULT_LANGUAGE])
def test_every_message_of_the_pages_is_translated(language):
    wanted: Catalog = extract()
    catalog = read(language)
    missing = [m.id for m in wanted if m.id and (m.id not in catalog or not catalog[m.id].string
                                                 or catalog[m.id].fuzzy)]
    assert not missing, f"{language}: run `make i18n` and translate {missing[:5]}…"
    for message in wanted:
        if message.id:
            assert _placeholders(catalog[message.id].string) == _placeholders(message.id), message.id


def test_signing_out_ends_the_session_in_the_browser(world):
    browser = Browser(world)
    response = browser.post("pages/signout", {})
    assert response.status_code == 200
    assert "Max-Age=0" in response.headers["Set-Cookie"] and response.headers["Set-Cookie"].startswith("bi_session=;")


def test_a_long_list_is_shown_page_by_page_with_its_filters(world, monkeypatch):
    monkeypatch.setattr("shared.web.blueprints.pages.ROWS_SHOWN", 2)
    for hours in (100, 90, 80, 70, 60):
        appointment(world, hours_ago=hours, customers=(("pat@example.com", "Pat"),))
    appointment(world, hours_ago=50, customers=(("other@example.com", "Other"),))
    world.sync()
    browser = Browser(world)
    seen: list[str] = []
    params = {"customerEmail": "pat@example.com"}
    for _ in range(5):
        html = text(browser.get("pages/bookings", params=params))
        seen += re.findall(r'data-booking="([^"]+)"', html)
        following = re.search(r'<a rel="next" href="/api/pages/bookings\?([^"]+)"', html)
        if not following:
            break
        params = dict(parse_qsl(following.group(1).replace("&amp;", "&")))
        assert params["customerEmail"] == "pat@example.com"
    listed = [b["id"] for b in body(world.host.http("GET", "bookings/uninvoiced", params={"customerEmail": "pat@example.com"}))["value"]]
    assert seen == listed and len(seen) == 5
