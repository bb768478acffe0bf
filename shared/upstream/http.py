"""What the Graph and Business Central clients share: one `httpx.AsyncClient` per process and
event loop, bearer tokens, bounded concurrency, retries that honour `Retry-After`, and errors
mapped from the APIs' `{"error": {"code", "message"}}` bodies (`shared/upstream/errors.py`).

Retrying a request that may already have taken effect would bill or create twice, so a POST is
retried only when the server certainly did not act on it (429 or 503, or a connection never made).
Any other failure of a POST raises `UpstreamAmbiguous`: the server may still be executing it, so
the caller waits until it cannot be (Business Central: its execution limit), then looks the
record up by its natural key before trying again.

Throttling slows the app down rather than failing it: without `Retry-After` the client backs
off exponentially with jitter, a `RateBudget` keeps the client under a service's sliding-window
quota, and a request still throttled after every retry raises `UpstreamThrottled`, which queue
workers turn into "run this message again later". A semaphore per `limit_key` bounds the
requests of this process; `shared/upstream/limits.py` bounds those of all the app's instances together
(shared slots, a shared budget), when the client is given them."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections import defaultdict, deque
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable

import httpx

from shared.upstream.errors import (
    MAX_BUDGET_WAIT_SECONDS,
    NOT_RUN_STATUS,
    ApiResponse,
    UpstreamAmbiguous,
    UpstreamError,
    UpstreamThrottled,
    error_from_body,
    parse_retry_after,
)

if TYPE_CHECKING:
    from shared.upstream.ledger import SharedRateBudget
    from shared.upstream.limits import SharedSlots

log = logging.getLogger(__name__)

TokenSource = Callable[[], Awaitable[str]]


class RateBudget:
    """A sliding-window quota kept on the client side (Business Central: 6,000 requests per 5
    minutes per user), so the app slows itself down before the service starts refusing."""

    def __init__(self, limit: int, window_seconds: float):
        self.limit, self.window = limit, window_seconds
        self._sent: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self, service: str, count: int = 1) -> None:
        """Room for `count` requests (a `$batch` may count as each of its operations)."""
        async with self._lock:
            for _ in range(count):
                now = time.monotonic()
                while self._sent and now - self._sent[0] >= self.window:
                    self._sent.popleft()
                if len(self._sent) >= self.limit:
                    wait = self._sent[0] + self.window - now
                    if wait > MAX_BUDGET_WAIT_SECONDS:
                        throttled = UpstreamThrottled(service, None, "ClientRateBudget",
                                                      f"{self.limit} requests in {self.window:.0f} s already sent")
                        throttled.retry_after = wait
                        raise throttled
                    await asyncio.sleep(wait)
                    self._sent.popleft()
                self._sent.append(time.monotonic())


class ApiClient:
    """A JSON API behind bearer tokens. One instance per API, process and event loop."""

    def __init__(self, service: str, token: TokenSource, *, timeout: float,
                 max_concurrency: int, max_attempts: int = 7, backoff_seconds: float = 0.25,
                 max_backoff_seconds: float = 20.0, max_connections: int = 32,
                 budget: RateBudget | SharedRateBudget | None = None,
                 shared_slots: Callable[[str], SharedSlots] | None = None,
                 attempts_by_code: dict[str, int] | None = None):
        """`shared_slots(limit_key)`: the app-wide slots of that key, held besides this process's
        own semaphore while a request is under way. `attempts_by_code`: fewer attempts for answers
        with these error codes (e.g. Graph's `UnknownError`, mostly a refusal without a reason)."""
        self.service = service
        self.budget = budget
        self._shared_slots = shared_slots
        self._token = token
        self._max_concurrency = max_concurrency
        self._gates: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(self._max_concurrency))
        self.max_attempts = max_attempts
        self.attempts_by_code = dict(attempts_by_code or {})
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.requests_sent = 0
        self.retries = 0
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Accept": "application/json"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def granted_roles(self) -> set[str] | None:
        """The application permissions (`roles`) in this client's own app-only access token, read
        without verifying it (the API does that); None if the token is not a readable JWT."""
        token = await self._token()
        try:
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (IndexError, ValueError):
            return None
        if not isinstance(claims, dict):
            return None
        roles = claims.get("roles", [])  # an app-only token without the claim was granted nothing
        return set(roles) if isinstance(roles, list) else None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.max_backoff_seconds, self.backoff_seconds * (2 ** attempt))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security

    async def request(self, method: str, url: str, *, json_body: Any = None,
                      params: dict | None = None, headers: dict | None = None,
                      limit_key: str = "*", idempotent: bool | None = None,
                      send_by: float | None = None, decode: Callable[[bytes], Any] | None = None,
                      cost: int = 1) -> ApiResponse:
        """Send one request with retries; return the parsed answer or raise `UpstreamError`.

        `decode` reads a successful answer's raw bytes instead of `json.loads` (a pydantic
        `model_validate_json`: parsing and validating in one pass); a `ValueError` from it makes
        the answer malformed, as invalid JSON does.

        `send_by` (a `time.monotonic()` deadline) bounds when the request may still be sent, a
        retry included: the caller promises that nothing it started lands later than that plus
        the service's execution limit. Past it, `UpstreamThrottled` (certainly not sent).

        `cost`: what the request takes of the rate budget (a `$batch`: one per operation in it)."""
        idempotent = method in ("GET", "PUT", "DELETE", "PATCH", "HEAD") if idempotent is None else idempotent
        token_refreshed = False
        attempt = 0
        retry_after: float | None = None
        while True:
            attempt += 1
            if send_by is not None and time.monotonic() > send_by:
                raise self._late("retried", retry_after)
            retry_after = None
            try:
                token = await self._token()
            except UpstreamError as error:
                failure = error
                wait = failure.retry_after if isinstance(failure, UpstreamThrottled) else None
                if wait is not None and wait > MAX_BUDGET_WAIT_SECONDS:
                    raise  # the token source is throttled for longer than a request waits: put the work off
                if not failure.retryable or not self._may_retry(attempt, failure, method, url):
                    raise
                await asyncio.sleep(self._delay(attempt, wait))
                continue
            try:
                request_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
                # The shared slot before the budget: a rate ticket is good for seconds, not for a
                # wait for a slot.
                async with self._gates[limit_key], self._shared_slot(limit_key):
                    if self.budget is not None:
                        await self.budget.acquire(self.service, cost)
                    if send_by is not None and time.monotonic() > send_by:
                        raise self._late("sent", None)
                    self.requests_sent += 1
                    response = await self._http.request(method, url, json=json_body, params=params,
                                                        headers=request_headers)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
                failure = UpstreamError(self.service, None, type(error).__name__, "connection failed")
            except (httpx.TimeoutException, httpx.TransportError) as error:
                failure = UpstreamError(self.service, None, type(error).__name__,
                                        "the connection failed before an answer arrived")
                if not idempotent:
                    raise UpstreamAmbiguous(self.service, None, failure.code, failure.message) from error
            else:
                outcome = self._interpret(response, decode)
                if isinstance(outcome, ApiResponse):
                    return outcome
                failure = outcome
                if response.status_code == 401 and not token_refreshed:
                    token_refreshed = True
                    await self._token_refresh()
                    continue
                if not failure.retryable:
                    raise failure
                if not idempotent and response.status_code not in NOT_RUN_STATUS:
                    raise UpstreamAmbiguous(self.service, failure.status, failure.code, failure.message)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                if isinstance(failure, UpstreamThrottled):
                    failure.retry_after = retry_after
            if not self._may_retry(attempt, failure, method, url):
                raise failure
            await asyncio.sleep(self._delay(attempt, retry_after))

    def _shared_slot(self, limit_key: str) -> AbstractAsyncContextManager:
        return nullcontext() if self._shared_slots is None else self._shared_slots(limit_key).slot(self.service)

    def _late(self, waited_to_be: str, retry_after: float | None) -> UpstreamThrottled:
        late = UpstreamThrottled(self.service, None, "SendWindowPassed",
                                 f"not sent: its send window passed while it waited to be {waited_to_be}")
        late.retry_after = retry_after
        return late

    def _interpret(self, response: httpx.Response, decode: Callable[[bytes], Any] | None = None
                   ) -> ApiResponse | UpstreamError:
        if decode is not None and response.is_success and response.content:
            try:
                return ApiResponse(response.status_code, response.headers, decode(response.content))
            except ValueError as error:
                malformed = UpstreamError(self.service, response.status_code, "MalformedResponse",
                                          "the answer could not be read: " + " ".join(str(error).splitlines()[:2]))
                malformed.retryable_override = True
                return malformed
        text = response.text
        try:
            body = response.json() if text else None
        except ValueError:
            if response.is_success:
                malformed = UpstreamError(self.service, response.status_code, "MalformedResponse",
                                          "the answer was not valid JSON")
                malformed.retryable_override = True
                return malformed
            body = None
        if response.is_success:
            return ApiResponse(response.status_code, response.headers, body)
        return error_from_body(self.service, response.status_code, body, text)

    def _may_retry(self, attempt: int, failure: UpstreamError, method: str, url: str) -> bool:
        if attempt >= self.attempts_by_code.get(failure.code, self.max_attempts):
            log.warning("giving up on %s %s after %d attempts: %s", method, _path(url), attempt, failure,
                        extra={"event": "upstream_gave_up", "service": self.service, "status": failure.status})
            return False
        self.retries += 1
        log.info("retrying %s %s after %s", method, _path(url), failure.code,
                 extra={"event": "upstream_retry", "service": self.service, "status": failure.status,
                        "attempt": attempt})
        return True

    async def _token_refresh(self) -> None:
        refresh = getattr(self._token, "refresh", None)
        if refresh:
            await refresh()


def _path(url: str) -> str:
    """The URL without its query string (which may carry skip tokens), for logs."""
    return url.split("?", 1)[0]
