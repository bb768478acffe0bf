"""What this process puts on storage queues, and when each message becomes visible.

The Functions host's queue listener learns at once of messages its own functions add (the WebJobs
SDK's SharedQueueWatcher) and finds the others by polling with a back-off. `sandbox.host` does the
same for everything this process sends through the storage SDK (the app's `Store`, the host's own
retries, a test's `host.send`): it looks at a queue when a message is due there, including a
deferred one (sent with a visibility timeout) at the moment it comes back, instead of asking
storage every few hundred milliseconds whether anything arrived. The app is not changed: the
SDK's `send_message` and `update_message` are observed, once per process (`install`)."""

from __future__ import annotations

import bisect
import threading
import time

from azure.storage.queue.aio import QueueClient

VISIBLE_MARGIN_SECONDS = 0.05
"""Storage makes a message visible its visibility timeout after it handled the send, which is
before the send returned here: looking this much after the timeout finds it."""
FORGET_SECONDS = 120.0


class QueueWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[str, list[float]] = {}
        """Per queue URL, the `time.monotonic()` moments messages sent to it become visible, sorted."""
        self.changes = 0
        """Bumped by every send seen and every message a host finished with."""

    def sent(self, url: str, visible_in: float = 0.0) -> None:
        at = time.monotonic() + max(visible_in, 0.0) + (VISIBLE_MARGIN_SECONDS if visible_in else 0.0)
        with self._lock:
            times = self._due.setdefault(_key(url), [])
            bisect.insort(times, at)
            while times and times[0] < at - FORGET_SECONDS:
                times.pop(0)
            self.changes += 1

    def forget(self, prefix: str) -> None:
        """Drop what was sent to the queues under `prefix` (an account wiped for the next test)."""
        prefix = _key(prefix)
        with self._lock:
            for url in [url for url in self._due if url.startswith(prefix)]:
                del self._due[url]
            self.changes += 1

    def finished(self) -> None:
        with self._lock:
            self.changes += 1

    def due(self, url: str, after: float, until: float) -> bool:
        """Whether a message sent to `url` became visible after `after` and by `until`."""
        with self._lock:
            times = self._due.get(_key(url), [])
            index = bisect.bisect_right(times, after)
            return index < len(times) and times[index] <= until

    def coming(self, url: str, now: float) -> bool:
        """Whether a message sent to `url` becomes visible later than `now`."""
        with self._lock:
            times = self._due.get(_key(url), [])
            return bool(times) and times[-1] > now


def _key(url: str) -> str:
    return url.split("?", 1)[0].rstrip("/").lower()


WATCH = QueueWatch()
_installed = False
_install_lock = threading.Lock()


def install() -> QueueWatch:
    """Observe the storage SDK's sends in this process (idempotent)."""
    global _installed
    with _install_lock:
        if not _installed:
            send_message, update_message = QueueClient.send_message, QueueClient.update_message

            async def observed_send(self, content, **kwargs):
                answer = await send_message(self, content, **kwargs)
                WATCH.sent(self.url, kwargs.get("visibility_timeout") or 0)
                return answer

            async def observed_update(self, message, pop_receipt=None, content=None, **kwargs):
                answer = await update_message(self, message, pop_receipt, content, **kwargs)
                WATCH.sent(self.url, kwargs.get("visibility_timeout") or 0)
                return answer

            QueueClient.send_message = observed_send
            QueueClient.update_message = observed_update
            _installed = True
    return WATCH
