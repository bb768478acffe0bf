"""The operator pages of a chain: the bookings list by company and location, the setup page's
mappings, dimensions and next billing run, billing runs on the jobs page; in process and, for
the list, in Chromium."""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from sandbox.serve import AppServer
from sandbox.stack import USER_NAME
from shared.flows.invoicing.billing import last_closed_period
from tests.test_billing import bill, booking
from tests.test_chains import chain, make_chain  # noqa: F401 - the three-location, two-company world
from tests.test_invoicing import appointment
from tests.test_pages import Browser, text

MARKUP = '"><script>alert(1)</script>'


def seeded(world) -> dict[str, str]:
    """One booking per location, the customers named after it."""
    return {code: appointment(world, business=index, customers=((f"{code.lower()}@example.com", code.title()),))
            for index, code in enumerate(("OSLO", "BERGEN", "STOCKHOLM"))}


def listed(html: str) -> list[str]:
    return re.findall(r'data-booking="([^"]+)"', html)


def test_the_list_shows_company_and_location_and_filters_by_each(chain):  # noqa: F811
    ids = seeded(chain)
    chain.sync()
    browser = Browser(chain)

    everything = text(browser.get("pages/bookings"))
    sweden = text(browser.get("pages/bookings", {"company": chain.second_company}))
    bergen = text(browser.get("pages/bookings", {"location": "LOCATION=BERGEN"}))

    assert set(listed(everything)) == set(ids.values())
    assert "Contoso Sweden AB" in everything and "LOCATION=OSLO" in everything
    assert listed(sweden) == [ids["STOCKHOLM"]]
    assert listed(bergen) == [ids["BERGEN"]]


def test_the_list_groups_rows_by_company_or_location(chain):  # noqa: F811
    seeded(chain)
    chain.sync()
    browser = Browser(chain)

    by_company = text(browser.get("pages/bookings", {"group": "company"}))
    by_location = text(browser.get("pages/bookings", {"group": "location"}))

    headings = re.findall(r'<th scope="rowgroup"[^>]*>([^<]+)<', by_company)
    assert [h.strip() for h in headings] == sorted(h.strip() for h in headings) and len(headings) == 2
    assert "Contoso Sweden AB" in headings[1] or "Contoso Sweden AB" in headings[0]
    assert len(re.findall(r'<th scope="rowgroup"', by_location)) == 3


@pytest.mark.parametrize("name", ["company", "location", "group", "businessId"])
def test_a_filter_made_of_markup_is_refused_and_shown_as_text(chain, name):  # noqa: F811
    response = Browser(chain).get("pages/bookings", {name: MARKUP})

    html = text(response)
    assert response.status_code == 400 and "<script>alert(1)" not in html


def test_setup_shows_each_business_company_and_dimensions_and_the_next_billing_run(chain):  # noqa: F811
    chain.configure(BILLING_PERIOD="month", BILLING_SCHEDULE="0 0 6 1 * *")
    html = text(Browser(chain).get("pages/setup"))

    section = html[html.index('id="companies"'):html.index('id="billing"')]
    assert section.count("Contoso Sweden AB") == 1 and "LOCATION=STOCKHOLM" in section
    upcoming = last_closed_period("month", "UTC", datetime.now(timezone.utc) + timedelta(days=32)).label
    assert "Next billing run" in html and upcoming in html


def test_setup_says_when_there_are_no_billing_runs(chain):  # noqa: F811
    assert "No billing runs: set BILLING_PERIOD" in text(Browser(chain).get("pages/setup"))


def test_a_billing_run_shows_as_a_job_with_its_period(chain):  # noqa: F811
    chain.configure(BILLING_PERIOD="week")
    period = last_closed_period("week", "UTC", datetime.now(timezone.utc))
    booking(chain, period.start + timedelta(days=1))
    chain.sync()
    result = bill(chain)

    jobs = text(Browser(chain).get("pages/jobs"))
    job = text(Browser(chain).get(f"pages/jobs/{result['jobId']}"))
    setup = text(Browser(chain).get("pages/setup"))

    assert f"Billing run: {period.label}" in jobs and f"Billing run: {period.label}" in job
    assert f"/api/pages/jobs/{result['jobId']}" in setup


def test_the_list_filters_and_groups_by_company_and_location_in_chromium(sandbox, monkeypatch):
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: `make browser` installs it"
    world = make_chain(sandbox, monkeypatch)
    ids = seeded(world)
    world.sync()
    try:
        with AppServer(world.host, sandbox) as server, playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium)
            try:
                page = browser.new_context(base_url=server.url, locale="de-DE").new_page()
                page.goto("/api/pages/bookings")
                page.get_by_role("button", name=re.compile(USER_NAME)).click()
                page.wait_for_url(re.compile(r"/api/pages/bookings$"))
                page.get_by_label("Mandant").select_option(label="Contoso Sweden AB")
                page.get_by_role("button", name="Filtern").click()
                page.wait_for_url(re.compile(r"company="))
                rows = page.locator("table.bookings tbody tr[data-booking]")
                assert rows.count() == 1 and rows.first.get_attribute("data-booking") == ids["STOCKHOLM"]
                page.goto("/api/pages/bookings?group=location")
                headings = page.locator("table.bookings tr.group-heading").all_inner_texts()
                assert [h.split(" (")[0] for h in headings] == ["LOCATION=BERGEN", "LOCATION=OSLO",
                                                                 "LOCATION=STOCKHOLM"]
            finally:
                browser.close()
    finally:
        world.host.close()
