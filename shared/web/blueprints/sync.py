"""Sync triggers: the timer, `POST /api/sync` (queued), and the per-business parts of a run."""

from __future__ import annotations

import logging
from datetime import datetime

import azure.functions as func

from shared.web.api import ApiRequest, ApiResult, Problem, Status, endpoint
from shared.web.blueprints.common import send_later, send_to_poison
from shared.flows.messages import BusinessSync, Deferred, InvoiceReconciliation, SyncRequest, process_message, sync_part
from shared.runtime import runtime
from shared.storage.store import SYNC_BUSINESS_QUEUE, SYNC_QUEUE
from shared.flows.sync.run import last_run, queue_sync, reconcile_run, start_run, sync_business

log = logging.getLogger(__name__)
bp = func.Blueprint()

RETRY_WHEN_BUSY_SECONDS = 30


@bp.timer_trigger(arg_name="timer", schedule="%SYNC_SCHEDULE%", run_on_startup=False, use_monitor=True)
async def sync_bookings(timer: func.TimerRequest) -> None:
    if timer.past_due:
        log.info("sync timer is past due", extra={"event": "sync_timer_past_due"})
    await start_run(runtime(), trigger="timer")


@bp.queue_trigger(arg_name="message", queue_name=SYNC_QUEUE, connection="AzureWebJobsStorage")
async def run_requested_sync(message: func.QueueMessage) -> None:
    async def handle(request: SyncRequest) -> None:
        rt = runtime()
        run = await last_run(await rt.store())
        if request.requested_at and run and datetime.fromisoformat(run["startedAt"]) > request.requested_at:
            log.info("sync request already covered by a later run", extra={"event": "sync_request_covered"})
            return
        await start_run(rt, trigger=f"request:{request.reason}", requested_at=request.requested_at)

    await process_message(message, SYNC_QUEUE, SyncRequest, handle, poison=send_to_poison, later=send_later)


@bp.queue_trigger(arg_name="message", queue_name=SYNC_BUSINESS_QUEUE, connection="AzureWebJobsStorage")
async def sync_one_business(message: func.QueueMessage) -> None:
    async def handle(part: BusinessSync | InvoiceReconciliation) -> None:
        rt = runtime()
        if isinstance(part, InvoiceReconciliation):
            await reconcile_run(rt, part)  # None: another run's reconciliation is at it, which will do
            return
        if part.business_id not in rt.settings.business_ids:
            log.info("sync of a business skipped: it is no longer in BOOKINGS_BUSINESS_IDS",
                     extra={"event": "sync_skipped", "business_id": part.business_id, "run_id": part.run_id})
            return
        if await sync_business(rt, part) is None and part.trigger != "timer":
            # Another sync of this business is running and may have read its calendar before
            # the change that prompted this request: run again once it is done.
            raise Deferred(RETRY_WHEN_BUSY_SECONDS, "another sync of this business is in progress")

    await process_message(message, SYNC_BUSINESS_QUEUE, sync_part, handle, poison=send_to_poison, later=send_later)


@bp.route(route="sync", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@endpoint("request_sync", "POST", "sync", "Queue a sync run soon (webhook for near-real-time sync)",
          responses={202: Status, 503: Problem})
async def request_sync(request: ApiRequest) -> ApiResult:
    await queue_sync(await runtime().store(), "http")
    return ApiResult(Status(status="queued"), status=202)
