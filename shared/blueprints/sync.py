"""Sync triggers: the timer, the queued webhook request, and `POST /api/sync`."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.api import ApiRequest, ApiResult, Problem, Status, endpoint
from shared.blueprints.common import send_later, send_to_poison
from shared.messages import Deferred, SyncRequest, process_message
from shared.runtime import runtime
from shared.store import SYNC_QUEUE
from shared.sync import last_run_started, queue_sync, run_sync

log = logging.getLogger(__name__)
bp = func.Blueprint()

RETRY_WHEN_BUSY_SECONDS = 30


@bp.timer_trigger(arg_name="timer", schedule="%SYNC_SCHEDULE%", run_on_startup=False, use_monitor=True)
async def sync_bookings(timer: func.TimerRequest) -> None:
    if timer.past_due:
        log.info("sync timer is past due", extra={"event": "sync_timer_past_due"})
    await run_sync(runtime(), trigger="timer")


@bp.queue_trigger(arg_name="message", queue_name=SYNC_QUEUE, connection="AzureWebJobsStorage")
async def run_requested_sync(message: func.QueueMessage) -> None:
    async def handle(request: SyncRequest) -> None:
        rt = runtime()
        started = await last_run_started(await rt.store())
        if request.requested_at and started and started > request.requested_at:
            log.info("sync request already covered by a later run", extra={"event": "sync_request_covered"})
            return
        if await run_sync(rt, trigger=f"request:{request.reason}") is None:
            # A run is in progress and may have read the calendar before the change that
            # prompted this request: run again once it is done.
            raise Deferred(RETRY_WHEN_BUSY_SECONDS, "another sync run is in progress")

    await process_message(message, SYNC_QUEUE, SyncRequest, handle, poison=send_to_poison, later=send_later)


@bp.route(route="sync", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@endpoint("request_sync", "POST", "sync", "Queue a sync run soon (webhook for near-real-time sync)",
          responses={202: Status, 503: Problem})
async def request_sync(request: ApiRequest) -> ApiResult:
    await queue_sync(await runtime().store(), "http")
    return ApiResult(Status(status="queued"), status=202)
