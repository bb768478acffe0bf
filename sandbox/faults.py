"""Latency, concurrency limits, rate limits and injected faults for the simulators.

`FaultMiddleware` wraps a simulator's ASGI app. Everything is driven by `Knobs` (changeable at
run time) and is deterministic for a given seed, so a failing chaos run can be replayed.

Fault kinds:
- ``429``: throttled, with ``Retry-After`` and the API's error body.
- ``500`` / ``503``: server errors with the API's error body.
- ``timeout``: the response is held for ``Knobs.hang_seconds`` (longer than the client waits).
- ``reset``: the connection is dropped after the status line, before a complete body.
- ``malformed``: ``200`` with a truncated JSON body.
- ``lost``: the request is *executed* (an entity is created) but the answer is lost (``reset``);
  only for POST requests, the "created but the response was lost" case.
- ``late``: the request is executed only ``Knobs.late_seconds`` after it arrived (longer than the
  client waits: the client sees its own timeout), and its answer is sent then, to nobody. The
  write commits even if the client has closed the connection.
- ``408`` / ``504``: answered at once (with the API's error body), and the request is still
  executed ``late_seconds`` after it arrived (``Knobs.late_executes=False``: never).
- ``queued``: the request waits ``Knobs.queued_seconds`` as if for a slot in the service's queue
  (longer than the client waits), then runs like a ``late`` one: executed ``late_seconds`` after
  it got its turn, its answer sent to nobody. One that would wait longer than
  ``Knobs.queue_timeout_seconds`` is never executed (the service answers 503, to nobody).
- ``502``: a gateway error with ``Retry-After``; the request was not executed.

A late execution runs in a background task that needs neither the connection nor the ASGI
``send``, from a copy of the request body read up front, so it survives the client going away.
Nothing is executed later than ``Knobs.execution_limit_seconds`` after it started executing
(``Knobs.execution_limit_from="start"``: after its turn came, however long it was queued) or,
with ``"arrival"``, after it arrived (the service aborts what runs longer): a later execution is
dropped, and a ``late`` request is then answered 504 at the limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from collections.abc import Callable

FAULT_KINDS = ("429", "500", "502", "503", "timeout", "reset", "malformed", "lost", "late", "408", "504", "queued")

log = logging.getLogger(__name__)


@dataclass
class Knobs:
    latency_ms: float = 0.0
    """Added to every request (after it gets a concurrency slot)."""
    max_concurrency: int | None = None
    """Requests per key served at once; more wait in line."""
    max_queued: int | None = None
    """Requests per key allowed to wait; beyond that the answer is 429 (None: unbounded)."""
    rate_limit: int | None = None
    """At most this many requests per key within `rate_window_seconds`, else 429."""
    rate_window_seconds: float = 1.0
    batch_counts_each_operation: bool = False
    """A JSON ``$batch`` counts toward `rate_limit` as each of its operations (True) or as one
    request (False)."""
    fault_rate: float = 0.0
    """Probability that a request gets a fault drawn from `fault_kinds`."""
    fault_kinds: tuple[str, ...] = ("429", "500", "503", "reset", "malformed")
    retry_after_seconds: int = 1
    retry_after_omitted: float = 0.0
    """Fraction of 429 answers sent without ``Retry-After`` (deterministic: with 0.5 every second
    one, counted from when this knob was last configured), for services that do not promise it."""
    hang_seconds: float = 30.0
    late_seconds: float = 90.0
    """``late``/``408``/``504``: how long after its arrival the request is executed."""
    late_executes: bool = True
    """``408``/``504``: False for the variant in which the timed-out request is never executed."""
    execution_limit_seconds: float = 600.0
    """Nothing is executed later than this after it started (BC aborts requests after 10 minutes)."""
    execution_limit_from: str = "start"
    """Where the execution limit counts from: ``"start"``, when the request got its turn (its time
    queued for a slot not counted: the strictest reading of "Request execution time is limited to
    10 minutes"), or ``"arrival"``."""
    queued_seconds: float = 420.0
    """``queued``: how long the request waits for its turn before it runs."""
    queue_timeout_seconds: float | None = None
    """A request waiting for a concurrency slot longer than this is answered 503 with
    ``Retry-After`` and never executed (BC: queued requests "time out after 8 minutes")."""
    max_query_chars: int | None = None
    """A request whose query string (as sent, percent-encoded) is longer is answered 414 and not
    executed (None: no limit)."""
    seed: int = 0


@dataclass
class ScriptedFault:
    method: str
    path: re.Pattern
    kind: str
    remaining: int
    skip: int = 0
    """Matching requests still to let through before the fault applies."""


@dataclass
class Stats:
    requests: Counter = field(default_factory=Counter)
    """Requests by ``"METHOD /path-shape"``."""
    faults: Counter = field(default_factory=Counter)
    """Injected faults by kind (throttling by the limits counts as ``429``)."""
    executed_late: int = 0
    """Requests executed after the client stopped waiting (``late``, ``408``, ``504``, ``queued``)."""
    max_in_flight: Counter = field(default_factory=Counter)
    """Highest number of requests served at once, by key (never above ``max_concurrency``)."""
    peak_in_flight: Counter = field(default_factory=Counter)
    """Highest number of requests of a key at the service at once, whatever became of them
    (served, waiting in line, or turned away by a limit): what the clients together sent at once."""

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())


# A long segment is an id only if it has a digit, `@`, `=` or `%`: names such as
# `bookingBusinesses` or `salesInvoiceLines` are just as long and must stay readable.
_ID_SEGMENT = re.compile(r"\([^)]*\)|/(?=[^/]*[0-9@=%])[A-Za-z0-9_\-=.@%+]{16,}(?=/|$)")


def path_shape(path: str) -> str:
    """`/companies(abc)/customers(123)` → `/companies()/customers()`; long ids → `/{id}`."""
    return _ID_SEGMENT.sub(lambda m: "()" if m.group(0).startswith("(") else "/{id}", path)


class FaultPlan:
    """Thread-safe holder of knobs, scripted faults and counters, shared with the middleware."""

    def __init__(self, knobs: Knobs | None = None):
        self.knobs = knobs or Knobs()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._scripted: list[ScriptedFault] = []
        self._random = random.Random(self.knobs.seed)
        self._throttled = 0
        self.window_generation = 0
        """Bumped by `reset_windows`: the rate windows start empty again."""

    def reset_windows(self) -> None:
        """Forget what the rate limit has counted so far (a test starting afresh)."""
        with self._lock:
            self.window_generation += 1

    def configure(self, **changes) -> None:
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self.knobs, name):
                    raise AttributeError(f"unknown knob {name!r}")
                setattr(self.knobs, name, value)
            if "seed" in changes:
                self._random = random.Random(self.knobs.seed)
            if "retry_after_omitted" in changes:
                self._throttled = 0

    def script(self, method: str, path_regex: str, kind: str, times: int = 1, skip: int = 0) -> None:
        """The next `times` requests matching `method` and `path_regex` (searched in the path and
        query string) get `kind`, after `skip` matching ones went through untouched."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._scripted.append(
                ScriptedFault(method.upper(), re.compile(path_regex), kind, times, skip)
            )

    def clear(self) -> None:
        """Forget scripted faults and random faults; keep latency and limits."""
        with self._lock:
            self._scripted.clear()
            self.knobs.fault_rate = 0.0

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()

    def pick_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            for scripted in self._scripted:
                if scripted.remaining > 0 and scripted.method in (method, "*") and scripted.path.search(path):
                    if scripted.skip > 0:
                        scripted.skip -= 1
                        continue
                    scripted.remaining -= 1
                    if scripted.remaining == 0:
                        self._scripted.remove(scripted)
                    return scripted.kind
            if self.knobs.fault_rate and self._random.random() < self.knobs.fault_rate:
                kinds = [k for k in self.knobs.fault_kinds if k != "lost" or method == "POST"]
                return self._random.choice(kinds) if kinds else None
        return None

    def omit_retry_after(self) -> bool:
        """Whether this 429 goes without ``Retry-After`` (`Knobs.retry_after_omitted` of them)."""
        with self._lock:
            fraction = self.knobs.retry_after_omitted
            if fraction <= 0:
                return False
            self._throttled += 1
            return math.floor(self._throttled * fraction) > math.floor((self._throttled - 1) * fraction)

    def count(self, method: str, path: str) -> None:
        with self._lock:
            self.stats.requests[f"{method} {path_shape(path)}"] += 1

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self.stats.faults[kind] += 1

    def arrived(self, key: str, present: int) -> None:
        with self._lock:
            if present > self.stats.peak_in_flight[key]:
                self.stats.peak_in_flight[key] = present


ErrorBody = Callable[[int, str, str], dict]


def default_error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


class _KeyGate:
    """Concurrency slots and a sliding-window rate counter for one key (a mailbox, an environment)."""

    def __init__(self) -> None:
        self.present = 0
        """Requests at the service now: served, waiting or being turned away."""
        self.in_flight = 0
        self.waiting = 0
        self.condition: asyncio.Condition | None = None
        self.recent: deque[float] = deque()
        self.generation = 0


class FaultMiddleware:
    """ASGI middleware applying a `FaultPlan` to every request except those under `/_sim`.

    `key_of(path)` names the resource whose limits apply (e.g. the Bookings mailbox);
    `rate_key_of(path, headers)`, when given, the one the rate limit counts for (e.g. the calling
    user in an environment), with lower-case header names."""

    def __init__(self, app, plan: FaultPlan, key_of: Callable[[str], str] = lambda path: "*",
                 error_body: ErrorBody = default_error_body,
                 rate_key_of: Callable[[str, dict[str, str]], str] | None = None):
        self.app = app
        self.plan = plan
        self.key_of = key_of
        self.rate_key_of = rate_key_of
        self.error_body = error_body
        self._gates: dict[str, _KeyGate] = defaultdict(_KeyGate)
        self._background: set[asyncio.Task] = set()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/_sim"):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        arrived = time.monotonic()
        plan = self.plan
        plan.count(method, path)
        limit = plan.knobs.max_query_chars
        if limit is not None and len(scope.get("query_string", b"")) > limit:
            plan.count_fault("414")
            await self._json(send, 414, self.error_body(414, "RequestUriTooLong", (
                f"The query string is {len(scope.get('query_string', b''))} characters long; at most {limit} "
                "are accepted.")))
            return
        cost = 1
        if plan.knobs.batch_counts_each_operation and method == "POST" and path.endswith("/$batch"):
            body = await _read_body(receive)
            cost = _operations(body)
            receive = _replay(body)
        key = self.key_of(path)
        gate = self._gates[key]
        if gate.condition is None:
            gate.condition = asyncio.Condition()
        gate.present += 1
        plan.arrived(key, gate.present)
        try:
            await self._limited(gate, key, scope, receive, send, arrived, cost)
        finally:
            gate.present -= 1

    async def _limited(self, gate: _KeyGate, key: str, scope, receive, send, arrived: float, cost: int = 1) -> None:
        """The request through the rate and concurrency limits of its key, then served."""
        method, path = scope["method"], scope["path"]
        plan, knobs = self.plan, self.plan.knobs
        if knobs.rate_limit:
            rate_gate = gate
            if self.rate_key_of is not None:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
                rate_gate = self._gates["rate:" + self.rate_key_of(path, headers)]
            now = time.monotonic()
            if rate_gate.generation != plan.window_generation:
                rate_gate.recent.clear()
                rate_gate.generation = plan.window_generation
            while rate_gate.recent and now - rate_gate.recent[0] > knobs.rate_window_seconds:
                rate_gate.recent.popleft()
            if len(rate_gate.recent) + cost > knobs.rate_limit:
                plan.count_fault("429")
                await self._throttled(send)
                return
            rate_gate.recent.extend([now] * cost)

        limit = knobs.max_concurrency
        if limit:
            if knobs.max_queued is not None and gate.in_flight >= limit and gate.waiting >= knobs.max_queued:
                plan.count_fault("429")
                await self._throttled(send)
                return
            async with gate.condition:
                gate.waiting += 1
                try:
                    async with asyncio.timeout(knobs.queue_timeout_seconds):
                        await gate.condition.wait_for(lambda: gate.in_flight < (knobs.max_concurrency or 1 << 30))
                except TimeoutError:
                    gate.waiting -= 1
                    plan.count_fault("503")
                    await self._json(send, 503, self.error_body(
                        503, "ServiceUnavailable", "The request waited too long for its turn and was not processed."),
                        [(b"retry-after", str(knobs.retry_after_seconds).encode())])
                    return
                gate.waiting -= 1
                gate.in_flight += 1
        else:
            gate.in_flight += 1
        with plan._lock:
            if gate.in_flight > plan.stats.max_in_flight[key]:
                plan.stats.max_in_flight[key] = gate.in_flight
        try:
            if knobs.latency_ms:
                await asyncio.sleep(knobs.latency_ms / 1000)
            query = scope.get("query_string", b"").decode("latin-1")
            fault = plan.pick_fault(method, f"{path}?{query}" if query else path)
            if fault:
                plan.count_fault(fault)
            await self._serve(fault, scope, receive, send, arrived, time.monotonic())
        finally:
            async with gate.condition:
                gate.in_flight -= 1
                gate.condition.notify_all()

    async def _serve(self, fault: str | None, scope, receive, send, arrived: float, started: float) -> None:
        if fault is None:
            await self.app(scope, receive, send)
        elif fault == "429":
            await self._throttled(send)
        elif fault in ("500", "502", "503"):
            status = int(fault)
            code = {500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable"}[status]
            # Services often say when to come back after a 502 or 503, as after a 429.
            headers = [(b"retry-after", str(self.plan.knobs.retry_after_seconds).encode())] if status != 500 else None
            await self._json(send, status, self.error_body(status, code, "Injected server error."), headers)
        elif fault == "timeout":
            await asyncio.sleep(self.plan.knobs.hang_seconds)
            await self._json(send, 504, self.error_body(504, "GatewayTimeout", "Injected timeout."))
        elif fault == "reset":
            await self._drop(send)
        elif fault == "malformed":
            await self._raw(send, 200, b'{"value": [{"id": "trunc', "application/json")
        elif fault == "lost":
            async def swallow(message):
                return None
            await self.app(scope, receive, swallow)
            await self._drop(send)
        elif fault in ("late", "408", "504", "queued"):
            await self._late(fault, scope, receive, send, arrived, started)

    async def _late(self, fault: str, scope, receive, send, arrived: float, started: float) -> None:
        knobs = self.plan.knobs
        body = await _read_body(receive)
        answer: list[dict] = []
        execution = None
        if fault == "queued":
            if knobs.queue_timeout_seconds is not None and knobs.queued_seconds > knobs.queue_timeout_seconds:
                await asyncio.sleep(knobs.queue_timeout_seconds)  # answered 503 by then, to a client long gone
                await self._json(send, 503, self.error_body(
                    503, "ServiceUnavailable", "The request waited too long for its turn and was not processed."),
                    [(b"retry-after", str(knobs.retry_after_seconds).encode())])
                return
            started += knobs.queued_seconds
        origin = started if knobs.execution_limit_from == "start" else arrived
        runs_at = (arrived if fault in ("408", "504") else started) + knobs.late_seconds
        if (fault in ("late", "queued") or knobs.late_executes) and runs_at <= origin + knobs.execution_limit_seconds:
            delay = max(0.0, runs_at - time.monotonic())
            execution = asyncio.create_task(self._execute_later(dict(scope), body, delay, answer))
            self._background.add(execution)
            execution.add_done_callback(self._background.discard)
        if fault == "408":
            await self._json(send, 408, self.error_body(408, "RequestTimeout", "The request timed out."))
        elif fault == "504":
            await self._json(send, 504, self.error_body(
                504, "GatewayTimeout", "The request did not complete within the time limit."))
        elif execution is not None:
            await asyncio.shield(execution)
            try:
                for message in answer:
                    await send(message)
            except Exception:
                pass  # the client is long gone; the execution has committed all the same
        else:
            await asyncio.sleep(max(0.0, origin + knobs.execution_limit_seconds - time.monotonic()))
            await self._json(send, 504, self.error_body(
                504, "GatewayTimeout", "The request did not complete within the time limit and was aborted."))

    async def _execute_later(self, scope, body: bytes, delay: float, answer: list[dict]) -> None:
        """Run the request after `delay` from its buffered body, keeping the answer in `answer`."""
        await asyncio.sleep(delay)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def keep(message):
            answer.append(message)

        try:
            await self.app(scope, replay, keep)
        except Exception:
            log.exception("a late execution of %s %s failed", scope.get("method"), scope.get("path"))
        with self.plan._lock:
            self.plan.stats.executed_late += 1

    async def _throttled(self, send) -> None:
        seconds = self.plan.knobs.retry_after_seconds
        body = self.error_body(429, "TooManyRequests", "Too many requests. Retry later.")
        headers = [] if self.plan.omit_retry_after() else [(b"retry-after", str(seconds).encode())]
        await self._json(send, 429, body, headers)

    async def _json(self, send, status: int, body: dict, headers: list | None = None) -> None:
        await self._raw(send, status, json.dumps(body).encode(), "application/json", headers)

    @staticmethod
    async def _raw(send, status: int, body: bytes, content_type: str, headers: list | None = None) -> None:
        all_headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": all_headers + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _drop(send) -> None:
        """Promise a body, send part of it, then fail: the server closes the connection."""
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise ConnectionResetError("injected connection reset")


def _operations(body: bytes) -> int:
    """The operations of a JSON ``$batch`` body (1 for a body that is not one)."""
    try:
        requests = json.loads(body).get("requests")
    except (ValueError, AttributeError):
        return 1
    return max(1, len(requests)) if isinstance(requests, list) else 1


def _replay(body: bytes):
    """An ASGI `receive` that gives the app a body already read."""
    delivered = False

    async def receive():
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


async def _read_body(receive) -> bytes:
    """The whole request body, read before the request is put off (the connection may be gone
    by the time it runs)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)
