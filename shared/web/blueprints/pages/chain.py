"""What the pages show of a chain: which BC company each business bills into (by name), its
location (the `INVOICE_DIMENSIONS` values it carries), the bookings list grouped by either, and
the billing runs (the next one, the latest ones)."""

from __future__ import annotations

import asyncio

from shared.flows.invoicing.billing import billing_runs, next_run
from shared.upstream.errors import UpstreamError
from shared.flows.invoicing.uninvoiced import Candidate
from shared.runtime import Runtime
from shared.settings import SettingsError
from shared.storage.store import Store


def company_or_none(settings, business_id: str) -> str | None:
    try:
        return settings.company_of(business_id)
    except SettingsError:
        return None


def locations_of(settings, business_id: str) -> list[str]:
    """The business's dimension values as `CODE=VALUE` (its location, e.g. `LOCATION=OSLO`)."""
    return [f"{code}={value}" for code, value in sorted(settings.dimensions_of(business_id).items())]


def all_locations(settings) -> list[str]:
    return sorted({location for business in settings.business_ids for location in locations_of(settings, business)})


async def company_names(rt: Runtime) -> dict[str, str]:
    """Company id → name as BC has it (asked at most once an hour; the id when BC cannot be asked)."""
    companies = rt.settings.companies
    try:
        clients = [rt.bc_for(company) for company in companies]
    except SettingsError:
        return {company: company for company in companies}
    names = await asyncio.gather(*(client.name() for client in clients), return_exceptions=True)
    return {company: name if isinstance(name, str) else company
            for company, name in zip(companies, names, strict=True)}


async def describe(rt: Runtime) -> dict:
    """Businesses with their company (id and name) and location, for the bookings and setup pages."""
    settings = rt.settings
    try:
        names = await company_names(rt)
    except UpstreamError:
        names = {}
    businesses = []
    for business in settings.business_ids:
        company = company_or_none(settings, business)
        businesses.append({"id": business, "companyId": company, "companyName": names.get(company, company),
                           "mapped": business in settings.business_companies,
                           "locations": locations_of(settings, business)})
    return {"businesses": businesses, "byBusiness": {b["id"]: b for b in businesses},
            "companies": [{"id": c, "name": names.get(c, c), "default": c == settings.bc_company_id}
                          for c in settings.companies],
            "locations": all_locations(settings), "multiCompany": len(settings.companies) > 1,
            "hasLocations": bool(settings.invoice_dimensions)}


def grouped(rows: list[Candidate], group: str | None, setup: dict) -> list[tuple[str | None, list[Candidate]]]:
    """The rows as they are (one group), or grouped by company or location (stable, in row order
    within a group; groups by name)."""
    if group is None:
        return [(None, rows)]
    groups: dict[str, list[Candidate]] = {}
    for candidate in rows:
        business = setup["byBusiness"].get(candidate.booking.business_id, {})
        if group == "company":
            label = business.get("companyName") or "–"
        else:
            label = ", ".join(business.get("locations") or []) or "–"
        groups.setdefault(label, []).append(candidate)
    return sorted(groups.items())


async def billing(rt: Runtime, store: Store) -> dict:
    """The billing setup: period and schedule, the next run and the period it bills, the latest runs."""
    settings = rt.settings
    upcoming = next_run(settings)
    return {"period": settings.billing_period, "schedule": settings.billing_schedule,
            "next": {"at": upcoming[0], "label": upcoming[1].label} if upcoming else None,
            "runs": await billing_runs(store)}
