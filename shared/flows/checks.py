"""Checks of the setup the app depends on, for `GET /api/status` and the setup page (health names
the failed ones): does the app's identity hold the permissions it needs, can it read every
Bookings business and reach Business Central, and do the templates named in settings exist?

A failed check names what to fix and where (BC's *Microsoft Entra Applications* page, the app
registration's API permissions, a setting), because "403" in a log helps nobody. Health is polled
often and anonymously, so BC is asked at most once every `CHECK_EVERY_SECONDS` per process."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone

from shared.upstream.bc import API_ROLE
from shared.flows.invoicing.dimensions import company_dimensions, problems_in, refusals_of, wanted_in
from shared.flows.directory.links import CUSTOMER, ITEM
from shared.flows.directory.templates import get_template
from shared.upstream.graph import CUSTOMER_WRITE_ROLES, GENEROUS_ROLE, READ_ROLES, SERVICE_WRITE_ROLES, WRITE_ROLES
from shared.upstream.errors import UpstreamError
from shared.runtime import Runtime
from shared.settings import SettingsError
from shared.storage.store import Store
from shared.flows.invoicing.write_back import check as notes_check

log = logging.getLogger(__name__)

CHECK_EVERY_SECONDS = 300.0

REGISTER_IN_BC = ("In Business Central, open the Microsoft Entra Applications page, add the app's client id "
                  "(AZURE_CLIENT_ID), set State to Enabled and assign permission sets that allow reading and writing "
                  "customers, items and sales invoices (e.g. D365 BUS FULL ACCESS; SUPER cannot be assigned to apps).")
API_PERMISSION = ("In the Entra admin center, give the app registration the Dynamics 365 Business Central "
                  "application permission API.ReadWrite.All and grant admin consent.")


def grant_graph(permissions: list[str]) -> str:
    return (f"In the Entra admin center, open the app registration (AZURE_CLIENT_ID) → API permissions → Add a "
            f"permission → Microsoft Graph → Application permissions → {', '.join(permissions)}; then Grant admin "
            "consent.")

_cache: dict[tuple, tuple[float, dict]] = {}


def _check(name: str, ok: bool, message: str) -> dict:
    return {"name": name, "ok": ok, "message": message}


async def graph_access(rt: Runtime) -> dict:
    """The app's Graph token carries the permissions it needs, and every business is readable."""
    settings = rt.settings
    try:
        settings.require("business_ids")
        roles = await rt.graph.api.granted_roles()
    except SettingsError as error:
        return _check("graph", False, str(error))
    except (UpstreamError, ValueError) as error:
        return _check("graph", False, f"No Graph token: {error} Check the app's credentials (AZURE_CLIENT_ID, the "
                                      "secret, or the federated credential trusting the managed identity) in Entra ID.")
    missing: dict[str, str] = {}
    warnings: list[str] = []
    generous = roles is not None and GENEROUS_ROLE in roles
    if roles is not None and not roles & READ_ROLES:
        if not generous or not await _appointments_readable(rt, settings.business_ids[0]):
            missing["Bookings.Read.All"] = ""
        else:
            warnings.append(f"the app reads appointments with {GENEROUS_ROLE} alone, which Graph's documentation "
                            "allows but app-only calls have been refused with; add Bookings.Read.All")
    if roles is not None and settings.write_back_to_bookings and not roles & WRITE_ROLES:
        if generous:
            warnings.append(f"WRITE_BACK_TO_BOOKINGS writes appointments with {GENEROUS_ROLE} alone, which app-only "
                            "calls have been refused with; add BookingsAppointment.ReadWrite.All")
        else:
            missing["BookingsAppointment.ReadWrite.All"] = "WRITE_BACK_TO_BOOKINGS"
    if roles is not None and settings.push_customers and not roles & CUSTOMER_WRITE_ROLES:
        missing.setdefault("BookingsAppointment.ReadWrite.All", "PUSH_CUSTOMERS_TO_BOOKINGS")
    if roles is not None and settings.push_items and not roles & SERVICE_WRITE_ROLES:
        missing["Bookings.ReadWrite.All"] = "PUSH_ITEMS_TO_BOOKINGS"
    if missing:
        names = " and ".join(f"{role} (needed by {why})" if why else role for role, why in missing.items())
        return _check("graph", False, f"The app's token lacks the Microsoft Graph application permission "
                                      f"{names}. {grant_graph(list(missing))}")
    found = await asyncio.gather(*(_business_problem(rt, business_id, roles) for business_id in settings.business_ids))
    problems = [problem for problem in found if problem]
    if problems:
        return _check("graph", False, "; ".join(problems))
    readable = f"{len(settings.business_ids)} Bookings business(es) and their calendars readable with the app's identity"
    if warnings:
        added = ", ".join(sorted({w.rsplit("add ", 1)[1] for w in warnings}))
        return _check("graph", True, f"Warning: {'; '.join(warnings)}. {grant_graph(added.split(', '))} "
                                     f"({readable})")
    return _check("graph", True, readable)


async def _business_problem(rt: Runtime, business_id: str, roles: set[str] | None) -> str | None:
    """What stops the app reading a business: the business itself, or its calendar (an hour of
    it: app-only calendar reads have been reported refused although the permission is granted)."""
    try:
        await rt.graph.get_business(business_id)
    except UpstreamError as error:
        if error.status == 403:
            return f"{business_id}: access denied ({error.code}). {grant_graph(['Bookings.Read.All'])}"
        if error.code == "ErrorFolderNotFound":
            return (f"no access to business {business_id}: check the id in BOOKINGS_BUSINESS_IDS (the Bookings "
                    "mailbox address) and that the business still exists")
        return f"{business_id}: {error}"
    now = datetime.now(timezone.utc)
    try:
        async for _ in rt.graph.calendar_view(business_id, now, now + timedelta(hours=1)):
            break
    except UpstreamError as error:
        held = sorted((roles or set()) & READ_ROLES)
        if error.status in (401, 403) and held:
            return (f"{business_id}: Graph refuses the app's calendar reads ({error.status} {error.code}) although the "
                    f"app holds {', '.join(held)}, so no appointment of this business can be synced or invoiced. Check "
                    "in the Entra admin center that admin consent is granted for the app's Microsoft Graph application "
                    "permissions, and the business in Bookings.")
        if error.status in (401, 403):
            return f"{business_id}: its calendar cannot be read ({error.code}). {grant_graph(['Bookings.Read.All'])}"
        return f"{business_id}: its calendar cannot be read: {error}"
    return None


async def _appointments_readable(rt: Runtime, business_id: str) -> bool:
    """Whether Graph lets the app read a business's appointments (an hour of its calendar)."""
    now = datetime.now(timezone.utc)
    try:
        async for _ in rt.graph.calendar_view(business_id, now, now + timedelta(hours=1)):
            break
    except UpstreamError as error:
        return error.status not in (401, 403)  # anything else is for the business check below to report
    return True


async def business_central(rt: Runtime) -> dict:
    """Reach every company the businesses bill into with the app's own token."""
    try:
        companies = rt.settings.companies
        if not companies:
            rt.settings.require("bc_company_id")
        clients = [rt.bc_for(company) for company in companies]
        roles = await clients[0].api.granted_roles()
        if roles is not None and API_ROLE not in roles:
            return _check("businessCentral", False, f"The app's token lacks the Business Central application "
                                                    f"permission {API_ROLE}. {API_PERMISSION}")
        names, failed = [], []
        for client in clients:
            try:
                company = await client.company()
            except UpstreamError as error:
                if error.status != 404 or len(clients) == 1:
                    raise
                failed.append(f"company {client.company_id} not found: check BUSINESS_COMPANIES and BC_COMPANY_ID "
                              f"(Business Central has no such company in environment {rt.settings.bc_environment})")
                continue
            names.append(company.get("displayName") or company.get("name") or company["id"])
    except SettingsError as error:
        return _check("businessCentral", False, str(error))
    except ValueError as error:  # MSAL refuses the authority (tenant) before any request is made
        return _check("businessCentral", False, f"No token could be requested: {error} Check AZURE_TENANT_ID and "
                                                "AZURE_AUTHORITY_HOST.")
    except UpstreamError as error:
        if error.status == 401:
            advice = f"{API_PERMISSION} {REGISTER_IN_BC}"
        elif error.status == 403:
            advice = REGISTER_IN_BC
        elif error.status == 404:
            advice = "Check BC_ENVIRONMENT and BC_COMPANY_ID: Business Central has no such environment or company."
        elif error.service != "Business Central":
            advice = ("Check the app's credentials (AZURE_CLIENT_ID, and its secret or the federated credential "
                      "trusting the managed identity) in Entra ID.")
        else:
            advice = "Business Central could not be reached; this is retried on its own."
        return _check("businessCentral", False, f"{error} {advice}")
    if failed:
        return _check("businessCentral", False, "; ".join(failed))
    if len(names) == 1:
        return _check("businessCentral", True, f"company '{names[0]}' reachable with the app's identity")
    return _check("businessCentral", True, f"{len(names)} companies ({', '.join(repr(n) for n in names)}) reachable "
                                           "with the app's identity")


async def invoice_dimensions(rt: Runtime, store: Store) -> dict | None:
    """The dimension values of `INVOICE_DIMENSIONS` exist in the companies their businesses bill
    into; values BC refused on an invoice (blocked) are named until one goes through. None when
    no business has dimensions."""
    settings = rt.settings
    if not settings.invoice_dimensions:
        return None
    problems: list[str] = []
    companies = list(dict.fromkeys(settings.company_of(business) for business in settings.invoice_dimensions))
    for company in companies:
        try:
            found = await company_dimensions(rt, company, fresh=True)
            name = await rt.bc_for(company).name()
        except (UpstreamError, SettingsError) as error:
            problems.append(f"the dimensions of company {company} could not be read: {error}")
            continue
        problems += problems_in(found, wanted_in(settings, company), name)
        for values, refusal in (await refusals_of(store, company)).items():
            problems.append(f"Business Central company '{name}' refused the dimension values {values} on an invoice: "
                            f"{refusal['message']} Fix: clear Blocked on the dimension value (BC's Dimensions page → "
                            "Dimension Values), then invoice those bookings again.")
    if problems:
        return _check("dimensions", False, "; ".join(problems))
    count = sum(len(dims) for dims in settings.invoice_dimensions.values())
    return _check("dimensions", True, f"{count} dimension value(s) of INVOICE_DIMENSIONS present in Business Central")


async def templates(rt: Runtime, store: Store) -> dict:
    missing = []
    for kind, code in ((CUSTOMER, rt.settings.customer_template), (ITEM, rt.settings.item_template)):
        if code and await get_template(store, kind.name, code) is None:
            missing.append(f"the {kind.name} template '{code}' named in {kind.setting} does not exist "
                           f"(create it with PUT /api/templates/{kind.name}/{code})")
    if missing:
        return _check("templates", False, "; ".join(missing))
    named = [code for code in (rt.settings.customer_template, rt.settings.item_template) if code]
    return _check("templates", True, f"{len(named)} template(s) named in settings, all present")


async def setup_checks(rt: Runtime, store: Store) -> list[dict]:
    key = (id(rt.settings), id(store))
    cached = _cache.get(key)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    found = await asyncio.gather(graph_access(rt), business_central(rt), templates(rt, store),
                                 invoice_dimensions(rt, store))
    checks = [check for check in found if check is not None]
    for check in checks:
        if not check["ok"]:
            log.warning("setup check %s failed: %s", check["name"], check["message"],
                        extra={"event": "setup_check_failed", "check": check["name"]})
        elif check["message"].startswith("Warning:"):
            log.warning("setup check %s: %s", check["name"], check["message"],
                        extra={"event": "setup_check_warning", "check": check["name"]})
    _cache[key] = (time.monotonic() + CHECK_EVERY_SECONDS, checks)
    return checks


async def all_checks(rt: Runtime, store: Store) -> list[dict]:
    """The setup checks (asked of the services at most every `CHECK_EVERY_SECONDS`), and, with
    WRITE_BACK_TO_BOOKINGS, whether Bookings took the latest write-back's notes (read each time:
    one blob)."""
    checks = list(await setup_checks(rt, store))
    if rt.settings.write_back_to_bookings:
        checks.append(await notes_check(store))
    return checks
