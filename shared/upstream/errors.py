"""What an upstream answer means: the errors the Graph and Business Central clients raise (mapped
from the APIs' `{"error": {"code", "message"}}` bodies), which of them may be retried, and how long
a `Retry-After` or a rate budget may make a request wait.

Below `http` (which sends the requests) and `limits`/`ledger` (which hold the app-wide budgets): all
three raise these, so none of them needs another's module for it."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any

import httpx

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
NOT_RUN_STATUS = {429, 503}
"""Answers that mean the service did not run the request, so even a create may simply be sent
again after the delay: throttled (429), or unavailable (503: BC answers it to a request that
waited too long in its queue, and both BC and Graph document it as "retry after a delay", with
`Retry-After`). Any other failure of a create leaves its outcome unknown (408, 500, 502, 504, a
timeout, a dropped connection): BC may have run it, or may still be running it."""
MAX_RETRY_AFTER_SECONDS = 120.0
MAX_BUDGET_WAIT_SECONDS = 20.0
"""A request that would wait longer than this for the rate budget is not sent now: the caller's
work is queued again for later instead of holding a function invocation."""


class UpstreamError(Exception):
    """An external API refused or failed a request. `code` is the API's error code."""

    def __init__(self, service: str, status: int | None, code: str, message: str):
        self.service, self.status, self.code, self.message = service, status, code, message
        where = f"{service} answered {status}" if status else f"{service} could not be reached"
        super().__init__(f"{where} ({code}): {message}")

    retryable_override: bool | None = None

    @property
    def retryable(self) -> bool:
        if self.retryable_override is not None:
            return self.retryable_override
        return self.status is None or self.status in RETRYABLE_STATUS


class UpstreamThrottled(UpstreamError):
    """Still throttled (429) after every retry, or held back by the client's own rate budget or
    send deadline. The request was certainly not executed. `retry_after`: seconds to wait, when
    known."""

    retry_after: float | None = None


class UpstreamAmbiguous(UpstreamError):
    """A write may or may not have happened (lost answer): look it up before repeating it."""


class UpstreamNotFound(UpstreamError):
    pass


class UpstreamConflict(UpstreamError):
    """The record changed since it was read (ETag) or already exists."""


@dataclass
class ApiResponse:
    status: int
    headers: httpx.Headers
    body: Any

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_SECONDS)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return min(max(parsed.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER_SECONDS)


def error_from_body(service: str, status: int, body: Any, text: str) -> UpstreamError:
    code, message = f"HTTP{status}", text[:300] or "no details"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = str(error.get("code") or code)
            message = str(error.get("message") or "no reason given")
        elif isinstance(error, str):
            code, message = error, str(body.get("error_description") or message)
    kind = {404: UpstreamNotFound, 409: UpstreamConflict, 412: UpstreamConflict,
            429: UpstreamThrottled}.get(status, UpstreamError)
    return kind(service, status, code, message)
