"""The operator pages: Business Central's *Uninvoiced Bookings* and *Bookings Sync. Setup* pages,
rebuilt for the browser, plus invoicing jobs and what needs attention.

Routes live under `/api/pages/`, anonymous at the Functions level because people sign in with the
app itself (`shared.web.signin`, routes in `account.py`); `web.page` refuses anyone else. Each handler
parses its input, calls the same domain function as the JSON API, and renders a template beside
this module."""

from __future__ import annotations

import logging
import re

from datetime import date, datetime, time as clock, timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, field_validator

from shared.flows.attention import needs_attention
from shared.upstream.bc import TEMPLATE_FIELDS, web_client_invoice_url
from shared.web.blueprints.pages import chain
from shared.web.blueprints.pages.render import STATIC, N_
from shared.web.blueprints.pages.web import Page, page, redirect
from shared.flows.checks import all_checks
from shared.flows.directory.health import directory_health
from shared.flows.directory.templates import InvalidTemplate, list_templates, put_template, validate_template
from shared.flows.invoicing.jobs import TooLarge, invoice_bookings
from shared.flows.invoicing.uninvoiced import Filters, NotUninvoiced, after_cursor, candidates, encode_cursor
from shared.flows.invoicing.job_status import job_status, recent_jobs
from shared.settings import settings_in_force
from shared.web.signin import PAGES_PREFIX
from shared.flows.sync.run import last_sync, queue_sync

log = logging.getLogger(__name__)
bp = func.Blueprint()

ANONYMOUS = func.AuthLevel.ANONYMOUS
ROWS_SHOWN = 500
MAX_SELECTED = 10_000
_JOB_ID = TypeAdapter(Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")])


# -- forms ----------------------------------------------------------------------------------------

class BookingFilters(BaseModel):
    """The list's filters; dates are the business's local calendar days, `to` inclusive. A
    company (`BUSINESS_COMPANIES`) or a location (a `CODE=VALUE` of `INVOICE_DIMENSIONS`) stands
    for the businesses that bill into it or carry it; `group` groups the rows by either."""
    model_config = ConfigDict(populate_by_name=True, str_strip_whitespace=True)
    business_id: Annotated[str, StringConstraints(max_length=320)] | None = Field(None, alias="businessId")
    customer_email: Annotated[str, StringConstraints(max_length=254)] | None = Field(None, alias="customerEmail")
    start: date | None = Field(None, alias="from")
    end: date | None = Field(None, alias="to")
    company: Annotated[str, StringConstraints(max_length=36)] | None = Field(None, alias="company")
    location: Annotated[str, StringConstraints(max_length=41)] | None = Field(None, alias="location")
    group: Literal["company", "location"] | None = Field(None, alias="group")

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    def filters(self, settings) -> Filters:
        zone = ZoneInfo(settings.time_zone)
        start = datetime.combine(self.start, clock(), zone) if self.start else None
        end = datetime.combine(self.end + timedelta(days=1), clock(), zone) if self.end else None
        businesses = None
        if self.company or self.location:
            businesses = [b for b in settings.business_ids
                          if (not self.company or chain.company_or_none(settings, b) == self.company)
                          and (not self.location or self.location in chain.locations_of(settings, b))]
        return Filters(self.business_id, self.customer_email, start, end, business_ids=businesses)

    def query(self) -> dict[str, str]:
        values = {"businessId": self.business_id, "customerEmail": self.customer_email,
                  "from": self.start.isoformat() if self.start else None, "to": self.end.isoformat() if self.end else None,
                  "company": self.company, "location": self.location, "group": self.group}
        return {k: v for k, v in values.items() if v}


class InvoiceForm(BaseModel):
    action: Literal["preview", "selected", "all"]
    booking_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=512)]] = Field(
        default_factory=list, max_length=MAX_SELECTED)


FILTER_FIELDS = ("businessId", "customerEmail", "from", "to", "company", "location", "group")


def _filters_of(current: Page) -> tuple[BookingFilters, list[str], list[str]]:
    """The filters, the problems with them (message ids, translated) and their details (runtime
    text, shown escaped, never translated)."""
    raw = {name: current.value(name) for name in FILTER_FIELDS}
    try:
        parsed = BookingFilters.model_validate(raw)
    except ValidationError as error:
        details = [f"{item['loc'][0]}: {item['msg']}" for item in error.errors()]
        return BookingFilters(), [N_("The filters are not valid; showing every booking.")], details
    settings = current.settings
    if parsed.business_id and parsed.business_id not in settings.business_ids:
        return BookingFilters(), [N_("That business is not one of the app's businesses.")], [parsed.business_id]
    if parsed.company and parsed.company not in settings.companies:
        return BookingFilters(), [N_("That company is not one the businesses bill into.")], [parsed.company]
    if parsed.location and parsed.location not in chain.all_locations(settings):
        return BookingFilters(), [N_("That location is not one of INVOICE_DIMENSIONS.")], [parsed.location]
    if parsed.start and parsed.end and parsed.end < parsed.start:
        return parsed, [N_("to: the end date is before the start date")], []
    return parsed, [], []


# -- the bookings list ---------------------------------------------------------------------------

@bp.route(route="pages", methods=["GET"], auth_level=ANONYMOUS)
async def pages_home(req: func.HttpRequest) -> func.HttpResponse:
    return redirect(f"{PAGES_PREFIX}/bookings", status=302)


@bp.route(route="pages/bookings", methods=["GET", "POST"], auth_level=ANONYMOUS)
@page
async def pages_bookings(current: Page) -> func.HttpResponse:
    filters, problems, details = _filters_of(current)
    store = await current.rt.store()
    if current.req.method == "POST" and not problems:
        try:
            form = InvoiceForm.model_validate({"action": current.value("action"),
                                               "booking_ids": current.values("bookingId")})
        except ValidationError:
            problems = [N_("Choose Preview, Invoice selected or Invoice all.")]
        else:
            return await _invoice(current, store, filters, form)
    return await _list(current, store, filters, problems, status=400 if problems else 200, details=details)


async def _list(current: Page, store, filters: BookingFilters, problems: list[str], status: int = 200,
                conflicts: dict[str, str] | None = None, notice: str | None = None,
                details: list[str] | None = None) -> func.HttpResponse:
    found = await candidates(current.rt, store, filters.filters(current.settings))
    # Pages of ROWS_SHOWN, continued after the last row shown (the JSON API's cursor).
    after = current.req.params.get("after") if current.req.method == "GET" else None
    try:
        rest = after_cursor(found, after)
    except ValueError:
        rest, problems = found, [*problems, N_("The page link is not valid; showing the first page.")]
    shown = rest[:ROWS_SHOWN]
    next_query = {**filters.query(), "after": encode_cursor(shown[-1])} if len(rest) > len(shown) else None
    setup = await chain.describe(current.rt)
    return current.render("bookings.html", status, nav="bookings", groups=chain.grouped(shown, filters.group, setup),
                          total=len(found), shown_count=len(shown),
                          invoiceable=sum(1 for c in found if c.invoiceable), filters=filters, chain=setup,
                          businesses=current.settings.business_ids, problems=problems, details=details or [],
                          conflicts=conflicts or {}, notice=notice, selected=set(current.values("bookingId")),
                          next_query=next_query, first_page=bool(after))


async def _invoice(current: Page, store, filters: BookingFilters, form: InvoiceForm) -> func.HttpResponse:
    selection = form.booking_ids if form.action == "selected" or (form.action == "preview" and form.booking_ids) \
        else None
    if form.action == "selected" and not selection:
        return await _list(current, store, filters, [N_("Select at least one booking, or use Invoice all.")], 400)
    scope = Filters() if selection else filters.filters(current.settings)
    try:
        outcome = await invoice_bookings(current.rt, store, booking_ids=selection, filters=scope,
                                         dry_run=form.action == "preview",
                                         request={"source": "pages", "user": current.principal.oid,
                                                  "action": form.action, **filters.query()})
    except NotUninvoiced as error:
        return await _list(current, store, filters, [N_("Nothing was invoiced: some selected bookings cannot be.")], 409,
                           conflicts=error.problems)
    except TooLarge as error:
        return await _list(current, store, filters, [N_("Too many bookings for one customer in one request; select "
                                                        "fewer.")], 400, details=[str(error)])
    if outcome.invoices is not None:
        return current.render("preview.html", nav="bookings", invoices=outcome.invoices,
                              booking_count=outcome.booking_count, filters=filters, selection=selection or [])
    if outcome.job_id is None:
        return await _list(current, store, filters, [], notice="nothing")
    log.info("invoicing job started from the pages", extra={"event": "pages_invoice_job", "job_id": outcome.job_id,
                                                           "bookings": outcome.booking_count,
                                                           "user_oid": current.principal.oid})
    return current.redirect(f"{PAGES_PREFIX}/jobs/{outcome.job_id}")


# -- jobs ----------------------------------------------------------------------------------------

@bp.route(route="pages/jobs", methods=["GET"], auth_level=ANONYMOUS)
@page
async def pages_jobs(current: Page) -> func.HttpResponse:
    jobs = await recent_jobs(await current.rt.store())
    return current.render("jobs.html", nav="jobs", jobs=jobs)


@bp.route(route="pages/jobs/{jobId}", methods=["GET"], auth_level=ANONYMOUS)
@page
async def pages_job(current: Page) -> func.HttpResponse:
    try:
        job_id = _JOB_ID.validate_python(current.req.route_params.get("jobId", ""))
    except ValidationError:
        job_id = None
    status = await job_status(await current.rt.store(), job_id) if job_id else None
    if status is None:
        return current.render("error.html", 404, title=N_("Not found"), detail=N_("There is no such invoicing job."),
                              sign_in=False)
    names = await chain.company_names(current.rt) if status["invoices"] else {}
    links = {invoice["invoiceNumber"]: web_client_invoice_url(
                 current.settings, names.get(invoice.get("companyId") or current.settings.bc_company_id),
                 invoice["invoiceNumber"])
             for invoice in status["invoices"] if invoice.get("invoiceNumber")}
    template = "job_progress.html" if current.req.params.get("fragment") == "1" else "job.html"
    return current.render(template, nav="jobs", job=status, links=links,
                          running=status["status"] in ("queued", "running"))


# -- setup and status ----------------------------------------------------------------------------

@bp.route(route="pages/setup", methods=["GET", "POST"], auth_level=ANONYMOUS)
@page
async def pages_setup(current: Page) -> func.HttpResponse:
    store = await current.rt.store()
    if current.req.method == "POST":
        if current.value("action") != "sync":
            return current.render("error.html", 400, title=N_("Not a form"), detail=N_("Unknown action."), sign_in=False)
        await queue_sync(store, "pages")
        log.info("sync requested from the pages", extra={"event": "pages_sync_requested",
                                                         "user_oid": current.principal.oid})
        return current.redirect(f"{PAGES_PREFIX}/setup?queued=1")
    return await _setup(current, store)


async def _setup(current: Page, store, status: int = 200, template_errors: dict | None = None,
                 edited: dict | None = None) -> func.HttpResponse:
    last = await last_sync(store)
    checks = await all_checks(current.rt, store)
    directory = await directory_health(store)
    templates = await list_templates(store)
    fields = {kind: list(model.model_fields) for kind, model in TEMPLATE_FIELDS.items()}
    booleans = {kind: [name for name, info in model.model_fields.items() if info.annotation in (bool | None, bool)]
                for kind, model in TEMPLATE_FIELDS.items()}
    return current.render("setup.html", status, nav="setup", last=last, checks=checks, directory=directory,
                          templates=templates,
                          chain=await chain.describe(current.rt), billing=await chain.billing(current.rt, store),
                          template_fields=fields, boolean_fields=booleans, settings=settings_in_force(current.settings),
                          businesses=current.settings.business_ids, queued=current.req.params.get("queued") == "1",
                          template_errors=template_errors or {}, edited=edited or {},
                          saved=current.req.params.get("saved"))


@bp.route(route="pages/templates/{kind}/{code}", methods=["POST"], auth_level=ANONYMOUS)
@page
async def pages_template(current: Page) -> func.HttpResponse:
    kind, code = current.req.route_params.get("kind"), current.req.route_params.get("code", "")
    return await _save_template(current, kind, code)


@bp.route(route="pages/templates", methods=["POST"], auth_level=ANONYMOUS)
@page
async def pages_new_template(current: Page) -> func.HttpResponse:
    return await _save_template(current, current.value("kind"), (current.value("code") or "").strip())


async def _save_template(current: Page, kind: str | None, code: str) -> func.HttpResponse:
    store = await current.rt.store()
    if kind not in TEMPLATE_FIELDS:
        return await _setup(current, store, 400, {"_": {"kind": N_("Choose customer or item.")}})
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,19}", code):
        return await _setup(current, store, 400, {f"{kind}/{code}": {"code": N_("A code is 1–20 letters, digits, '_', "
                                                                                 "'.' or '-'.")}})
    body = {name: value.strip() for name in TEMPLATE_FIELDS[kind].model_fields
            if (value := current.value(name)) is not None and value.strip()}
    try:
        fields = validate_template(kind, body)
    except InvalidTemplate as error:
        return await _setup(current, store, 400, {f"{kind}/{code}": dict(error.problems)},
                            edited={f"{kind}/{code}": body})
    await put_template(store, kind, code, fields)
    return current.redirect(f"{PAGES_PREFIX}/setup?saved={kind}/{code}#templates")


# -- needs attention -----------------------------------------------------------------------------

@bp.route(route="pages/attention", methods=["GET"], auth_level=ANONYMOUS)
@page
async def pages_attention(current: Page) -> func.HttpResponse:
    found = await needs_attention(current.rt, await current.rt.store())
    return current.render("attention.html", nav="attention", attention=found)


# -- static files --------------------------------------------------------------------------------

STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


@bp.route(route="pages/static/{name}", methods=["GET"], auth_level=ANONYMOUS)
async def pages_static(req: func.HttpRequest) -> func.HttpResponse:
    name = req.route_params.get("name", "")
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        return func.HttpResponse(status_code=404)
    return func.HttpResponse(path.read_bytes(), status_code=200, mimetype=STATIC_TYPES[path.suffix],
                             headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})

