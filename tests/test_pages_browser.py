"""The operator pages in a real browser: Debian's Chromium driven by Playwright, against the app
served by `sandbox.serve.AppServer` (a real HTTP server, queue listeners running), signing in at
the simulated Entra ID's sign-in page. Screenshots land in `docs/screenshots/` for the README."""

from __future__ import annotations

import os
import re
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from sandbox.serve import AppServer
from sandbox.stack import USER_NAME
from tests.conftest import make_world
from shared.web.sessions import ROLES_SECONDS
from shared.storage.store import SESSIONS
from tests.helpers import body, merge_row, rows
from tests.test_invoicing import appointment

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None and not os.environ.get("CI"):
    # Installing Debian's chromium needs root; CI always has it (a missing one fails there).
    pytest.skip("Chromium is not installed, so the browser tests of the pages did not run: "
                "`make browser` (as root or with sudo) installs it and runs them", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
# The README's screenshots are refreshed on purpose (`make screenshots`); a normal run keeps its own.
SCREENSHOTS = ROOT / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") else ROOT / ".pytest_cache" / "screenshots"
SCRIPT_NAME = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def site(sandbox):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    """One seeded app behind a real HTTP server for the whole module; each test gets a fresh
    browser context (no cookies), so each signs in again."""
    assert CHROMIUM, "Debian's chromium is needed: `make browser` installs it"
    with pytest.MonkeyPatch.context() as monkeypatch:
        world = make_world(sandbox, monkeypatch)
        # Secret-less, as deployed: people sign in to the app registration with its federated credential.
        monkeypatch.delenv("AZURE_CLIENT_SECRET")
        world.configure(BOOKINGS_TIME_ZONE="Europe/Paris", **sandbox.trust_managed_identity())
        for index, (email, name) in enumerate([("alice@example.com", "Alice Martin"), ("bob@example.com", "Bob Berg"),
                                               ("carol@example.com", "Carol Dubois"),
                                               ("dave@example.com", "Dave Jensen")]):
            appointment(world, customers=((email, name),), price=1234.5 if index == 0 else 60 + index,
                        hours_ago=200 - index * 20)
        appointment(world, customers=(("mallory@example.com", SCRIPT_NAME),), price=45, hours_ago=90)
        appointment(world, customers=(("erin@example.com", "Erin Free"),), price=0, hours_ago=70)
        world.sync()
        with AppServer(world.host, sandbox) as server, playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            try:
                yield world, server, browser
            finally:
                browser.close()
        world.host.close()


@pytest.fixture
def page(site):
    world, server, browser = site
    context = browser.new_context(base_url=server.url, locale="en-GB", viewport={"width": 1280, "height": 900})
    dialogs = []
    opened = context.new_page()
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    opened.dialogs = dialogs
    yield opened
    context.close()


def sign_in(page, path: str = "/api/pages/bookings") -> None:
    page.goto(path)
    page.get_by_role("button", name=re.compile(USER_NAME)).click()
    page.wait_for_url(re.compile(re.escape(path.split("?")[0])))


def listed_ids(page) -> list[str]:
    return page.locator("table.bookings tbody tr[data-booking]").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-booking'))")


def test_signing_in_at_entra_id_shows_the_uninvoiced_bookings(site, page):
    world = site[0]
    page.goto("/api/pages/bookings")
    assert "Pick an account" in page.content(), "the browser went to Entra ID's sign-in page"
    page.get_by_role("button", name=re.compile(USER_NAME)).click()
    page.wait_for_url(re.compile(r"/api/pages/bookings$"))
    expected = [b["id"] for b in body(world.host.http("GET", "bookings/uninvoiced"))["value"]]
    assert set(listed_ids(page)) >= set(expected) and len(expected) >= 5
    assert page.get_by_text(USER_NAME).is_visible()
    page.screenshot(path=str(SCREENSHOTS / "uninvoiced-bookings.png"), full_page=True)


def test_a_filter_narrows_the_list(page):
    sign_in(page)
    page.get_by_label("Customer e-mail").fill("bob@example.com")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"customerEmail=bob"))
    rows = page.locator("table.bookings tbody tr[data-booking]")
    assert rows.count() == 1 and "bob@example.com" in rows.first.inner_text()


def test_a_booking_that_cannot_be_invoiced_shows_why(page):
    sign_in(page)
    row = page.locator("tr.blocked", has_text="Erin Free")
    assert "The appointment has no price." in row.inner_text()
    assert row.locator("input[type=checkbox]").count() == 0


def test_a_customer_named_like_a_script_is_shown_as_text(page):
    sign_in(page)
    row = page.locator("table.bookings tbody tr", has_text="mallory@example.com")
    assert SCRIPT_NAME in row.locator("td").nth(2).inner_text()
    assert page.locator("script").count() == 1  # the page's own app.js, nothing from the name
    assert page.dialogs == []


def test_selecting_two_bookings_and_invoicing_makes_their_drafts_and_shows_the_numbers(site, page):
    world = site[0]
    sign_in(page)
    before = {i["number"] for i in world.bc.invoices(world.company_id)}
    chosen = []
    for name in ("Carol Dubois", "Dave Jensen"):
        row = page.locator("table.bookings tbody tr", has_text=name)
        row.locator("input[type=checkbox]").check()
        chosen.append(row.get_attribute("data-booking"))
    page.get_by_role("button", name="Invoice selected").click()
    page.wait_for_url(re.compile(r"/api/pages/jobs/[0-9a-f]{32}$"))
    page.locator("[data-status=succeeded]").wait_for(timeout=60_000)  # the page polls until the job ends
    made = [i for i in world.bc.invoices(world.company_id) if i["number"] not in before]
    assert len(made) == 2
    shown = page.locator("a.invoice-number").all_inner_texts()
    assert sorted(shown) == sorted(i["number"] for i in made)
    billed = {line["description"] for i in made for line in i["salesInvoiceLines"]}
    assert len(billed) == 2
    remaining = {b["id"] for b in body(world.host.http("GET", "bookings/uninvoiced"))["value"]}
    assert not remaining & set(chosen)
    page.screenshot(path=str(SCREENSHOTS / "invoicing-job.png"), full_page=True)
    page.locator("a.invoice-number").first.click()  # opens BC's web client (the simulator) in a new tab
    opened = page.context.pages[-1]
    opened.wait_for_load_state()
    assert shown[0] in opened.content()


def test_norwegian_and_french_translate_the_labels_and_format_amounts(page):
    sign_in(page)
    page.get_by_label("Language").select_option("nb")
    page.get_by_role("button", name="Change").click()
    page.wait_for_url(re.compile(r"lang=nb"))
    assert page.locator("html").get_attribute("lang") == "nb"
    norwegian = page.locator("main h1").inner_text()
    assert norwegian != "Uninvoiced bookings"
    assert "1\u00a0234,50" in page.locator("table.bookings").inner_text()
    page.locator("#lang").select_option("fr")
    page.locator("form.language button").click()
    page.wait_for_url(re.compile(r"lang=fr"))
    french = page.locator("main h1").inner_text()
    assert french not in ("Uninvoiced bookings", norwegian)
    assert "1\u202f234,50" in page.locator("table.bookings").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "uninvoiced-bookings-fr.png"), full_page=True)
    page.goto("/api/pages/jobs")  # the choice is remembered
    assert page.locator("html").get_attribute("lang") == "fr"


def test_a_form_without_the_csrf_token_is_refused(site, page):
    world = site[0]
    sign_in(page)
    before = len(world.bc.invoices(world.company_id))
    answer = page.request.post("/api/pages/bookings", form={"action": "all"},
                               headers={"origin": page.url.split("/api/")[0]})
    assert answer.status == 403
    assert len(world.bc.invoices(world.company_id)) == before


def test_a_request_without_a_signed_in_user_is_refused(site, page):
    server = site[1]
    answer = page.request.post(f"{server.url}/api/pages/setup", form={"action": "sync"}, max_redirects=0)
    assert answer.status == 401
    opened = page.request.get(f"{server.url}/api/pages/setup", max_redirects=0)
    assert opened.status == 302 and "/api/pages/signin" in opened.headers["location"]


def test_the_preview_totals_each_draft(page):
    sign_in(page)
    page.get_by_role("button", name="Preview").click()
    drafts = page.locator("section.draft")
    assert drafts.count() >= 1
    alice = drafts.filter(has_text="alice@example.com")
    assert Decimal(alice.locator(".total").inner_text().replace(",", "")) == Decimal("1234.50")


@pytest.mark.parametrize("path", ["/api/pages/bookings", "/api/pages/setup", "/api/pages/jobs", "/api/pages/attention"])
def test_every_control_has_a_name_and_the_keyboard_reaches_it(page, path):
    sign_in(page, path)
    unnamed = page.locator("input:not([type=hidden]), select, textarea, button").evaluate_all(
        """els => els.filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                                  && !el.textContent.trim()).map(el => el.outerHTML)""")
    assert unnamed == []
    focusable = page.locator("a[href], input:not([type=hidden]), select, button").count()
    reached = set()
    for _ in range(focusable + 2):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement && document.activeElement.outerHTML"))
    assert len(reached) >= min(focusable, 10)


def test_a_selection_can_be_invoiced_with_the_keyboard_alone(site, page):
    world = site[0]
    sign_in(page)
    before = len(world.bc.invoices(world.company_id))
    checkbox = page.locator("table.bookings tbody tr", has_text="Bob Berg").locator("input[type=checkbox]")
    checkbox.focus()
    page.keyboard.press("Space")
    assert checkbox.is_checked()
    page.get_by_role("button", name="Invoice selected").focus()
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/api/pages/jobs/[0-9a-f]{32}$"))
    page.locator("[data-status=succeeded]").wait_for(timeout=60_000)
    assert len(world.bc.invoices(world.company_id)) == before + 1


def test_signing_out_ends_the_session_here_and_at_entra_id(site, page):
    sign_in(page)
    assert any(c["name"] == "sim_sso" for c in page.context.cookies()), "signed in at Entra ID too"
    copied = next(c["value"] for c in page.context.cookies() if c["name"] == "bi_session")
    visited = []
    page.on("request", lambda request: visited.append(request.url))

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="You are signed out").wait_for()
    page.wait_for_url(re.compile(r"/api/pages/signin/callback$"))

    assert any("/oauth2/v2.0/logout?post_logout_redirect_uri=" in url for url in visited), visited
    assert not any(c["name"] in ("sim_sso", "bi_session") for c in page.context.cookies())
    replayed = page.request.get("/api/pages/bookings", max_redirects=0, headers={"cookie": f"bi_session={copied}"})
    assert replayed.status == 302 and "/api/pages/signin" in replayed.headers["location"], "the copied cookie is dead"


def test_roles_older_than_the_hour_are_read_again_without_a_prompt(site, page):
    world = site[0]
    sign_in(page, "/api/pages/jobs")
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "bi_session")
    before = {r["PartitionKey"] for r in rows(world, SESSIONS)}
    for row in rows(world, SESSIONS):
        merge_row(world, SESSIONS, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"],
                                    "RolesAt": float(row["RolesAt"]) - ROLES_SECONDS - 1})

    page.reload()
    page.wait_for_url(re.compile(r"/api/pages/jobs$"))

    assert page.get_by_role("heading", name="Invoicing jobs").is_visible(), "back on the page, no account picker"
    assert next(c["value"] for c in page.context.cookies() if c["name"] == "bi_session") != token
    assert {r["PartitionKey"] for r in rows(world, SESSIONS)} - before, "a new session with fresh roles"
