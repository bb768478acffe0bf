"""Invoicing triggers: list uninvoiced bookings, start a job, read a job, and the queue worker."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal
from urllib.parse import urlencode, urlsplit

import azure.functions as func
from pydantic import BaseModel, Field, StringConstraints, field_validator, model_validator

from shared.web.api import ApiRequest, ApiResult, BadRequest, Conflict, NotFound, Problem, ProblemField, StrictModel, endpoint
from shared.flows.invoicing.billing import run_billing
from shared.web.blueprints.common import send_later, send_to_poison
from shared.flows.invoicing.worker import give_up, invoice_parts
from shared.flows.invoicing.jobs import TooLarge, invoice_bookings
from shared.flows.invoicing.uninvoiced import Filters, NotUninvoiced, after_cursor, candidates, encode_cursor
from shared.flows.invoicing.job_status import job_status
from shared.flows.messages import InvoiceJobPart, process_message
from shared.runtime import runtime
from shared.storage.store import INVOICE_QUEUE

bp = func.Blueprint()

MAX_BOOKING_IDS = 10_000
BookingId = Annotated[str, StringConstraints(min_length=1, max_length=512)]
Email = Annotated[str, StringConstraints(min_length=3, max_length=254)]
BusinessId = Annotated[str, StringConstraints(min_length=1, max_length=320)]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("the time is out of range once converted to UTC") from None


class UninvoicedQuery(StrictModel):
    business_id: BusinessId | None = Field(None, alias="businessId")
    customer_email: Email | None = Field(None, alias="customerEmail", description="Matched trimmed and "
                                         "case-insensitively")
    start_from: datetime | None = Field(None, alias="from", description="Start time, inclusive (ISO 8601)")
    start_to: datetime | None = Field(None, alias="to", description="Start time, exclusive (ISO 8601)")
    top: int = Field(100, ge=1, le=1000)
    skip_token: Annotated[str, StringConstraints(max_length=1000)] | None = Field(
        None, alias="skipToken", description="Continuation token from nextLink")

    _as_utc = field_validator("start_from", "start_to")(_utc)


class CustomerLine(BaseModel):
    email: str | None
    name: str | None
    quantity: float
    amount: float


class UninvoicedBooking(BaseModel):
    id: str
    business_id: str = Field(alias="businessId")
    service_id: str | None = Field(alias="serviceId")
    service_name: str | None = Field(alias="serviceName")
    start: str
    end: str
    price_type: str | None = Field(alias="priceType")
    price: float
    customers: list[CustomerLine]
    amount: float
    invoiceable: bool
    reason: str | None


class UninvoicedPage(BaseModel):
    value: list[UninvoicedBooking]
    next_link: str | None = Field(alias="nextLink")


class InvoiceRequest(StrictModel):
    booking_ids: list[BookingId] | None = Field(None, alias="bookingIds", min_length=1,
                                                max_length=MAX_BOOKING_IDS)
    all: bool | None = None
    business_id: BusinessId | None = Field(None, alias="businessId")
    customer_email: Email | None = Field(None, alias="customerEmail")
    to: datetime | None = Field(None, description="With all: only bookings that ended before this instant (ISO 8601)")
    dry_run: bool = Field(False, alias="dryRun")

    _as_utc = field_validator("to")(_utc)

    @model_validator(mode="after")
    def _one_selection(self):
        if self.booking_ids is not None and self.all is not None:
            raise ValueError("give either bookingIds or all, not both")
        if self.booking_ids is None and self.all is not True:
            raise ValueError("give bookingIds, or all: true")
        if self.booking_ids is not None and (self.business_id or self.customer_email or self.to):
            raise ValueError("businessId, customerEmail and to filter only with all: true")
        return self


class JobAccepted(BaseModel):
    job_id: str = Field(alias="jobId")
    status: Literal["queued"]
    booking_count: int = Field(alias="bookingCount")
    status_url: str = Field(alias="statusUrl")


class NothingToInvoice(BaseModel):
    job_id: None = Field(None, alias="jobId")
    booking_count: Literal[0] = Field(0, alias="bookingCount")


class PreviewLine(BaseModel):
    booking_id: str = Field(alias="bookingId")
    description: str
    quantity: float
    unit_price: float = Field(alias="unitPrice")
    amount: float


class PreviewInvoice(BaseModel):
    customer_email: str = Field(alias="customerEmail")
    customer_name: str | None = Field(alias="customerName")
    company_id: str | None = Field(None, alias="companyId", description="The BC company the draft would be made in")
    dimensions: dict[str, str] = Field(default_factory=dict, description="The dimension values (code → value) the "
                                       "draft would carry (INVOICE_DIMENSIONS)")
    amount: float
    booking_ids: list[str] = Field(alias="bookingIds")
    lines: list[PreviewLine]


class DryRun(BaseModel):
    dry_run: Literal[True] = Field(True, alias="dryRun")
    booking_count: int = Field(alias="bookingCount")
    invoices: list[PreviewInvoice]


class NotNoted(BaseModel):
    booking_id: str = Field(alias="bookingId")
    outcome: Literal["refused", "failed", "gone", "unreadable", "too-long"] = Field(
        description="refused: Bookings refused the change (e.g. its business rules for apps, or UnknownError); "
                    "failed: no usable answer after retries; gone: the appointment is no longer in Bookings; "
                    "unreadable: it could not be read; too-long: the staff notes had no room for the line")
    message: str


class WriteBack(BaseModel):
    noted: int = Field(description="Bookings whose staff notes carry the invoice's marker line")
    not_noted: list[NotNoted] = Field(alias="notNoted", description="Bookings whose notes do not, and why (at most "
                                                                    "50); the invoice is made all the same")


class JobInvoice(BaseModel):
    customer_email: str = Field(alias="customerEmail")
    invoice_id: str = Field(alias="invoiceId")
    invoice_number: str | None = Field(alias="invoiceNumber")
    amount: float | None
    booking_ids: list[str] = Field(alias="bookingIds")
    write_back: WriteBack | None = Field(None, alias="writeBack",
                                         description="With WRITE_BACK_TO_BOOKINGS: what became of the invoice's "
                                                     "marker line in its appointments' staff notes")


class JobError(BaseModel):
    booking_id: str | None = Field(alias="bookingId")
    message: str


class JobWaiting(BaseModel):
    customer_email: str | None = Field(alias="customerEmail")
    until: str | None = Field(description="When the invoice is looked for (and created if missing) again, UTC")
    since: str | None = Field(None, description="While Business Central is asked to confirm a create whose "
                              "answer was lost (timeout, dropped connection, 408/502/504): since when, UTC; "
                              "null when the part waits for another reason (BC throttling)")
    reason: str = Field(description="Why it waits, e.g. \"waiting for Business Central to confirm, since "
                        "2026-05-04T10:00:02+00:00\"")


class JobStatus(BaseModel):
    job_id: str = Field(alias="jobId")
    status: Literal["queued", "running", "succeeded", "partial", "failed"]
    booking_count: int = Field(alias="bookingCount")
    invoices: list[JobInvoice]
    errors: list[JobError]
    waiting: list[JobWaiting] = Field(default_factory=list, description="Invoices that wait for Business Central "
                                      "(the job is still running): BC is asked to confirm a create whose answer "
                                      "was lost (looked up within seconds, then less often), or BC is throttling")


def _base_url(req: func.HttpRequest) -> str:
    parts = urlsplit(req.url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""


@bp.route(route="bookings/uninvoiced", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@endpoint("list_uninvoiced", "GET", "bookings/uninvoiced", "Ended, uncancelled bookings not yet invoiced",
          query=UninvoicedQuery, responses={200: UninvoicedPage})
async def list_uninvoiced(request: ApiRequest) -> UninvoicedPage:
    query: UninvoicedQuery = request.query
    rt = runtime()
    store = await rt.store()
    found = await candidates(rt, store, Filters(query.business_id, query.customer_email, query.start_from,
                                                query.start_to))
    try:
        found = after_cursor(found, query.skip_token)
    except ValueError as error:
        raise BadRequest(str(error), [ProblemField(field="skipToken", message=str(error))]) from None
    page = found[:query.top]
    next_link = None
    if len(found) > query.top:
        params = {k: v for k, v in request.raw.params.items() if k != "skipToken"}
        params["skipToken"] = encode_cursor(page[-1])
        next_link = f"{_base_url(request.raw)}/api/bookings/uninvoiced?{urlencode(params)}"
    return UninvoicedPage.model_validate({"value": [c.row() for c in page], "nextLink": next_link})


@bp.route(route="invoices", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@endpoint("create_invoices", "POST", "invoices", "Invoice all, one or a selection of uninvoiced bookings",
          body=InvoiceRequest, responses={200: NothingToInvoice | DryRun, 202: JobAccepted, 409: Problem})
async def create_invoices(request: ApiRequest) -> ApiResult:
    body: InvoiceRequest = request.body
    rt = runtime()
    store = await rt.store()
    filters = None if body.booking_ids is not None else Filters(body.business_id, body.customer_email,
                                                                ended_before=body.to)
    try:
        outcome = await invoice_bookings(rt, store, booking_ids=body.booking_ids, filters=filters,
                                         dry_run=body.dry_run,
                                         request=body.model_dump(mode="json", by_alias=True, exclude={"booking_ids"}))
    except NotUninvoiced as error:
        raise _conflict(error.problems) from None
    except TooLarge as error:
        raise BadRequest(str(error)) from None
    if outcome.invoices is not None:
        return ApiResult(DryRun(bookingCount=outcome.booking_count, invoices=outcome.invoices))
    if outcome.job_id is None:
        return ApiResult(NothingToInvoice())
    location = f"/api/invoices/jobs/{outcome.job_id}"
    accepted = JobAccepted(jobId=outcome.job_id, status="queued", bookingCount=outcome.booking_count,
                           statusUrl=f"{_base_url(request.raw)}{location}")
    return ApiResult(accepted, status=202, headers={"Location": location})


def _conflict(problems: dict[str, str]) -> Conflict:
    shown = list(problems.items())[:100]
    return Conflict(f"{len(problems)} of the listed bookings cannot be invoiced; nothing was queued.",
                    [ProblemField(field=f"bookingIds[{ident}]", message=reason) for ident, reason in shown],
                    bookingIds=[ident for ident, _ in shown])


JobId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


@bp.route(route="invoices/jobs/{jobId}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@endpoint("get_invoice_job", "GET", "invoices/jobs/{jobId}", "Status, invoices and errors of an invoicing job",
          route_params={"jobId": JobId}, responses={200: JobStatus, 404: Problem})
async def get_invoice_job(request: ApiRequest) -> JobStatus:
    store = await runtime().store()
    status = await job_status(store, request.route["jobId"])
    if status is None:
        raise NotFound(f"There is no invoicing job {request.route['jobId']}.")
    return JobStatus.model_validate(status)


@bp.timer_trigger(arg_name="timer", schedule="%BILLING_SCHEDULE%", run_on_startup=False, use_monitor=True)
async def billing_run(timer: func.TimerRequest) -> None:
    """Bill the last closed period (BILLING_PERIOD), once however often this fires."""
    await run_billing(runtime(), trigger="timer:past-due" if timer.past_due else "timer")


@bp.queue_trigger(arg_name="message", queue_name=INVOICE_QUEUE, connection="AzureWebJobsStorage")
async def invoice_worker(message: func.QueueMessage) -> None:
    rt = runtime()
    # The queue message's id: a retry of this message (after a crash) takes its parts back,
    # another copy of it (a duplicate delivery) leaves them to the first.
    owner = message.id or uuid.uuid4().hex

    async def handle(part: InvoiceJobPart) -> None:
        await invoice_parts(rt, part, owner)

    async def abandon(part: InvoiceJobPart, reason: str) -> None:
        await give_up(rt, part, reason, owner)

    await process_message(message, INVOICE_QUEUE, InvoiceJobPart, handle, abandon, send_to_poison, send_later)
