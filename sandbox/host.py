"""Drive the function app in process, the way the Azure Functions host does.

Azure Functions Core Tools cannot be installed here, so tests, the demo and the benchmark use
this small host instead of `func start`. It loads `function_app.app`, and:
- HTTP: matches the route template and method, enforces function keys for non-anonymous routes
  (401 without one, as the host does), and passes `HttpRequest` with `route_params`;
- timers: passes a `TimerRequest`;
- queues: polls every queue that has a trigger, decodes the body as `host.json`'s
  `messageEncoding` says, runs up to `batchSize` messages at once, deletes a message on success,
  makes it visible again after `visibilityTimeout` on failure, and after `maxDequeueCount`
  failed attempts moves it to `<queue>-poison`.
All functions run on one event loop in a background thread, as in the Python worker."""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import azure.functions as func
from azure.functions.queue import QueueMessage
from azure.storage.queue.aio import QueueClient

from shared.hostconfig import queue_settings
from sandbox.queuewatch import WATCH, install
from shared.storage.store import transport_settings

log = logging.getLogger(__name__)

MIN_POLLING_SECONDS = 0.1  # the queue listener's first back-off step after an empty poll
WAKE_SECONDS = 0.05
"""How often a drain checks what this process sent (no storage request)."""
RECOUNT_SECONDS = 2.0
"""How often a drain that waits for messages in other hands counts them, unless a host of this
process finished one or sent one meanwhile (then at once)."""


@dataclass
class QueueStats:
    processed: int = 0
    failed_attempts: int = 0
    poisoned: int = 0
    by_queue: dict[str, int] = field(default_factory=dict)
    finished_at: list[tuple[str, float]] = field(default_factory=list)
    """(queue, `time.perf_counter()`) of every message handled successfully, in order."""


_indexed: dict[int, dict] = {}


async def _cancel_all_but(current: asyncio.Task | None) -> None:
    """Cancel every other task of the running loop and wait until they have ended."""
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=10)


def indexed_functions(app: func.FunctionApp) -> dict:
    """`app.get_functions()` validates names and may be called once per app: index once."""
    if id(app) not in _indexed:
        _indexed[id(app)] = {fn.get_function_name(): fn for fn in app.get_functions()}
    return _indexed[id(app)]


class FunctionHost:
    def __init__(self, app: func.FunctionApp, connection_string: str, retry_delay: float | None = None):
        self.app = app
        self.connection_string = connection_string
        self.settings = queue_settings()
        self.retry_delay = self.settings.visibility_timeout_seconds if retry_delay is None else retry_delay
        self.function_key = secrets.token_urlsafe(24)
        self.stats = QueueStats()
        self._functions = indexed_functions(app)
        install()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="functions-host", daemon=True)
        self._thread.start()
        self._queue_clients: dict[str, QueueClient] = {}
        self._created: set[str] = set()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    def run(self, coroutine, timeout: float | None = None) -> Any:
        """Run a coroutine on the host's loop (where the app's clients live)."""
        if self._closed:
            coroutine.close()
            raise RuntimeError("the function host is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def close(self) -> None:
        """Stop as the Functions host does: what still runs is cancelled (a test that failed or
        was interrupted may leave a drain or a function behind), then every client is closed,
        then the loop. Whoever waits on this host gets an answer at once, never a hang."""
        async def shutdown() -> None:
            from shared.runtime import close_runtimes

            await _cancel_all_but(asyncio.current_task())
            for client in self._queue_clients.values():
                await client.close()
            await close_runtimes()
            await _cancel_all_but(asyncio.current_task())

        if self._closed:
            return
        try:
            self.run(shutdown(), timeout=30)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> FunctionHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- invoking ------------------------------------------------------------------------------

    def function(self, name: str):
        return self._functions[name]

    @staticmethod
    def _trigger_name(fn) -> str:
        return next(b.name for b in fn.get_bindings() if b.type.endswith("Trigger"))

    async def _invoke(self, fn, argument) -> Any:
        user_function = fn.get_user_function()
        kwargs = {self._trigger_name(fn): argument}
        if inspect.iscoroutinefunction(user_function):
            return await user_function(**kwargs)
        return await asyncio.to_thread(user_function, **kwargs)

    def timer(self, name: str = "sync_bookings", past_due: bool = False, timeout: float = 600) -> Any:
        return self.run(self.timer_async(name, past_due), timeout)

    async def timer_async(self, name: str = "sync_bookings", past_due: bool = False) -> Any:
        from azure.functions.timer import TimerRequest

        return await self._invoke(self.function(name), TimerRequest(past_due=past_due))

    # -- HTTP ----------------------------------------------------------------------------------

    def _route(self, method: str, path: str):
        allowed = False
        for fn in self._functions.values():
            trigger = fn.get_trigger()
            if type(trigger).__name__ != "HttpTrigger":
                continue
            pattern = "^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(trigger.route)) + "$"
            match = re.match(pattern, path)
            if match:
                methods = [str(getattr(m, "value", m)).upper() for m in (trigger.methods or [])]
                if methods and method.upper() not in methods:
                    allowed = True
                    continue
                return fn, trigger, match.groupdict()
        return None, "method" if allowed else None, {}

    def http(self, method: str, path: str, body: Any = None, params: dict | None = None,
             headers: dict | None = None, key: str | None | bool = True, timeout: float = 600,
             base_url: str = "http://localhost:7071") -> func.HttpResponse:
        """Call `/api/<path>`. `key=True` sends the host's function key; `False`/None sends none."""
        return self.run(self.http_async(method, path, body, params, headers, key, base_url), timeout)

    async def http_async(self, method: str, path: str, body: Any = None, params: dict | None = None,
                         headers: dict | None = None, key: str | None | bool = True,
                         base_url: str = "http://localhost:7071") -> func.HttpResponse:
        """`base_url` is where the request came in (scheme and host), as the host's `HttpRequest.url` says."""
        path = path.lstrip("/").removeprefix("api/")
        fn, trigger, route_params = self._route(method, path)
        if fn is None:
            status = 405 if trigger == "method" else 404
            return func.HttpResponse(status_code=status)
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        params = dict(params or {})
        level = str(getattr(trigger.auth_level, "value", trigger.auth_level)).lower()
        if level != "anonymous":
            supplied = headers.get("x-functions-key") or params.get("code")
            if key is True:
                supplied = supplied or self.function_key
            elif isinstance(key, str):
                supplied = key
            if supplied != self.function_key:
                return func.HttpResponse(status_code=401)
        if isinstance(body, (dict, list)):
            raw = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        elif isinstance(body, str):
            raw = body.encode()
        else:
            raw = body or b""
        query = f"?{urlencode(params)}" if params else ""
        request = func.HttpRequest(method.upper(), f"{base_url}/api/{path}{query}", headers=headers,
                                   params=params, route_params=route_params, body=raw)
        return await self._invoke(fn, request)

    # -- queues --------------------------------------------------------------------------------

    def _queue_triggers(self) -> dict[str, Any]:
        found = {}
        for fn in self._functions.values():
            trigger = fn.get_trigger()
            if type(trigger).__name__ == "QueueTrigger":
                found[trigger.queue_name] = fn
        return found

    def _client(self, queue: str) -> QueueClient:
        client = self._queue_clients.get(queue)
        if client is None:
            client = self._queue_clients[queue] = QueueClient.from_connection_string(self.connection_string, queue,
                                                                                      **transport_settings())
        return client

    async def _ensure_queue(self, queue: str) -> QueueClient:
        """The host creates the queues its triggers listen to, as the Functions host does."""
        client = self._client(queue)
        if queue not in self._created:
            try:
                await client.create_queue()
            except Exception:  # noqa: BLE001 - it exists already
                pass
            self._created.add(queue)
        return client

    def drain(self, timeout: float = 600, queues: list[str] | None = None) -> QueueStats:
        """Process queue messages until every triggered queue is empty (retries included)."""
        return self.run(self._drain(timeout, queues), timeout + 30)

    def run_listening(self, coroutine, timeout: float = 600) -> tuple[Any, float]:
        """Run a trigger (e.g. `host.timer_async(...)`) while the queue listeners run, as the
        Functions host does: queue functions start on what the trigger enqueues while it is still
        running. Returns when the trigger has finished and every queue is empty: (the trigger's
        result, seconds until the trigger finished)."""
        return self.run(self._run_listening(coroutine, timeout), timeout + 30)

    async def listen(self, stop: asyncio.Future) -> QueueStats:
        """Run the queue listeners until `stop` is done, as a long-running host does."""
        return await self._drain(float("inf"), None, while_running=stop)

    async def _run_listening(self, coroutine, timeout: float) -> tuple[Any, float]:
        started = time.perf_counter()
        trigger = asyncio.ensure_future(coroutine)
        trigger_seconds: list[float] = []
        trigger.add_done_callback(lambda _: trigger_seconds.append(time.perf_counter() - started))
        try:
            await self._drain(timeout, None, while_running=trigger)
        finally:
            if not trigger.done():
                trigger.cancel()
        return trigger.result(), trigger_seconds[0]

    async def _drain(self, timeout: float, only: list[str] | None,
                     while_running: asyncio.Future | None = None) -> QueueStats:
        """Like the host: fetch `batchSize` messages, and fetch again as soon as no more than
        `newBatchThreshold` are still running, so work never waits for a whole batch. A queue
        found empty is looked at again after 100 ms, doubling up to `maxPollingInterval`, as the
        host's queue listener backs off; and at once when this process sent it a message that is
        now visible (`sandbox.queuewatch`), as the host is told of messages its own functions add. When nothing runs here and nothing is visible, what is
        left is counted (messages in another instance's hands, or sent where this process cannot
        see): none left, the drain is over."""
        triggers = {q: fn for q, fn in self._queue_triggers().items() if only is None or q in only}
        for queue in triggers:
            await self._ensure_queue(queue)
        deadline = time.monotonic() + timeout
        running: dict[str, set[asyncio.Task]] = {queue: set() for queue in triggers}
        urls = {queue: self._client(queue).url for queue in triggers}
        looked = dict.fromkeys(triggers, float("-inf"))
        """When each queue was last looked at (`time.monotonic()`, taken before the look)."""
        ceiling = self.settings.max_polling_interval_seconds
        pause = dict.fromkeys(triggers, MIN_POLLING_SECONDS)
        counted = (-1, float("-inf"))
        """`WATCH.changes` and the time of the last count that found messages left."""

        while True:
            now = time.monotonic()
            fetched = False
            for queue, fn in triggers.items():
                if len(running[queue]) > self.settings.new_batch_threshold:
                    continue
                if now - looked[queue] < pause[queue] and not WATCH.due(urls[queue], looked[queue], now):
                    continue
                looked[queue] = now
                messages = await self._receive(queue)
                for message in messages:
                    task = asyncio.create_task(self._handle(queue, fn, message))
                    running[queue].add(task)
                    task.add_done_callback(running[queue].discard)
                if messages:
                    fetched = True
                    pause[queue] = MIN_POLLING_SECONDS
                    if len(messages) >= self.settings.batch_size:
                        looked[queue] = float("-inf")  # more may be waiting
                else:
                    pause[queue] = min(pause[queue] * 2, ceiling)
            busy = set().union(*running.values())
            if busy:
                await asyncio.wait(busy, timeout=WAKE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                continue
            if fetched:
                continue
            if now > deadline:
                raise TimeoutError(f"queues still busy after {timeout} s")
            if while_running is not None:
                if not while_running.done():
                    await asyncio.wait({while_running}, timeout=WAKE_SECONDS)
                    continue
                if while_running.exception() is not None:
                    return self.stats
            # Nothing runs here and nothing visible was found: what is left is counted, again as
            # soon as another host of the process finished or sent something, unless a message
            # this process sent is yet to become visible (then every `RECOUNT_SECONDS`: it may
            # have been removed meanwhile).
            coming = any(WATCH.coming(urls[queue], now) for queue in triggers)
            if (WATCH.changes != counted[0] and now - counted[1] >= MIN_POLLING_SECONDS and not coming) \
                    or now - counted[1] >= RECOUNT_SECONDS:
                changes = WATCH.changes
                if not await self._anything_left(triggers):
                    return self.stats
                counted = (changes, time.monotonic())
            await asyncio.sleep(WAKE_SECONDS)

    async def _anything_left(self, triggers) -> bool:
        for queue in triggers:
            try:
                properties = await self._client(queue).get_queue_properties()
            except Exception:  # noqa: BLE001 - queue not created yet
                continue
            if properties.approximate_message_count:
                return True
        return False

    async def _receive(self, queue: str) -> list:
        try:
            return [m async for m in self._client(queue).receive_messages(
                messages_per_page=self.settings.batch_size, max_messages=self.settings.batch_size,
                visibility_timeout=300)]
        except Exception:  # noqa: BLE001 - the queue does not exist until the app creates it
            return []

    async def _handle(self, queue: str, fn, message) -> None:
        client = self._client(queue)
        try:
            body = self._decode(message.content)
            argument = QueueMessage(id=message.id, body=body, dequeue_count=message.dequeue_count,
                                    expiration_time=message.expires_on, insertion_time=message.inserted_on,
                                    time_next_visible=message.next_visible_on, pop_receipt=message.pop_receipt)
            await self._invoke(fn, argument)
        except Exception as error:  # noqa: BLE001 - the host catches everything a function raises
            self.stats.failed_attempts += 1
            if message.dequeue_count >= self.settings.max_dequeue_count:
                log.warning("host: moving a %s message to poison after %d attempts: %s", queue,
                            message.dequeue_count, error)
                poison = self._client(f"{queue}-poison")
                try:
                    await poison.create_queue()
                except Exception:  # noqa: BLE001 - exists
                    pass
                await poison.send_message(message.content)
                await client.delete_message(message.id, message.pop_receipt)
                self.stats.poisoned += 1
            else:
                await client.update_message(message.id, message.pop_receipt, visibility_timeout=int(self.retry_delay))
            WATCH.finished()
            return
        await client.delete_message(message.id, message.pop_receipt)
        self.stats.processed += 1
        self.stats.by_queue[queue] = self.stats.by_queue.get(queue, 0) + 1
        self.stats.finished_at.append((queue, time.perf_counter()))
        WATCH.finished()

    def _decode(self, content: str) -> bytes:
        if self.settings.message_encoding == "base64":
            try:
                return base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ValueError("the message is not valid base64 (host.json messageEncoding)") from error
        return content.encode()

    def peek_poison(self, queue: str) -> list[dict]:
        """Messages in `<queue>-poison`, decoded (for tests and the demo summary)."""
        async def peek() -> list[dict]:
            client = self._client(f"{queue}-poison")
            try:
                messages = await client.peek_messages(max_messages=32)
            except Exception:  # noqa: BLE001 - no poison queue yet
                return []
            found = []
            for m in messages:
                try:
                    text = self._decode(m.content).decode(errors="replace")
                except ValueError:
                    text = m.content
                try:
                    found.append(json.loads(text))
                except ValueError:
                    found.append({"raw": text})
            return found
        return self.run(peek(), 60)

    def send(self, queue: str, text: str, encode: bool = True) -> None:
        """Put a raw message on a queue, encoded as the app would (or not, to test bad input)."""
        content = base64.b64encode(text.encode()).decode() if encode and self.settings.message_encoding == "base64" \
            else text
        async def send() -> None:
            await (await self._ensure_queue(queue)).send_message(content)

        self.run(send(), 60)
