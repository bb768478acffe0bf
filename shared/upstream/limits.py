"""Upstream limits kept for the whole app, not per process.

Bookings serves 4 requests at a time per mailbox, Business Central about 5 per environment and
6,000 per 5-minute sliding window per user. A per-process semaphore or budget multiplies when the
Functions app scales out to several instances, and the excess comes back as 429s; so these limits
live in the storage account every instance shares. A single busy instance should pay almost
nothing for that: its storage round trips grow with the minutes it works, not with its requests.

- `SharedSlots`: `count` request slots, each a short blob lease on `locks/limits/<name>/<i>`
  (`shared/storage/leases.py`, renewed while held). A process takes as many free slots at once as it has
  requests waiting, keeps them while it has work and hands them from one request to the next
  locally, without a storage round trip; a slot left unused for `idle_seconds` is released for
  the other instances. A crashed instance stops renewing, so its slots come back within the
  lease's 15 seconds. Busy instances take turns only when one of them is left without any slot:
  it says so in `limits/<name>/waiting`, which holders read every few seconds while they hold
  slots, and a holder then gives back each slot it has held longer than `max_hold_seconds`.
- `SharedRateBudget` (`shared/upstream/ledger.py`): the 6,000 requests per 5 minutes, as a ledger of
  ticket grants in storage.

Both raise `UpstreamThrottled` (with `retry_after`) when the wait would be too long: queue workers
already turn that into "run this message again later"."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import ContentSettings

from shared.storage import leases
from shared.upstream.errors import UpstreamThrottled
from shared.storage.store import Store

log = logging.getLogger(__name__)

StoreSource = Callable[[], Awaitable[Store]]

FIRST_POLL_SECONDS = 0.1
LAST_POLL_SECONDS = 1.0
"""While every slot is held elsewhere, storage is asked again after 0.1 s, doubling up to 1 s."""
CLOCK_SKEW_SECONDS = 1.0
"""How far apart the instances' clocks may be (Azure hosts keep theirs synchronised far closer):
a grant is kept this much longer, since another instance judges its age by its own clock."""
MARK_EVERY_SECONDS = 1.0
WAITING_MARK_SECONDS = 3.0
"""A starved instance's mark (`limits/<name>/waiting`) counts this long after it was written (plus
the clock skew): it rewrites it every `MARK_EVERY_SECONDS` at most, as long as it waits."""


@dataclass(eq=False)
class _Slot:
    index: int
    lease: leases.Lease
    idle_since: float = 0.0
    taken_at: float = 0.0


def _still_ours(slot: _Slot) -> bool:
    """Whether the slot's lease certainly still holds: not taken over, and renewed within its
    duration (less a second for the round trip)."""
    lease = slot.lease
    return not lease.lost and time.monotonic() - lease.renewed_at < lease.seconds - 1


@dataclass
class SlotStats:
    """Storage round trips (`attempts` to take a lease, `released`, lease `renewals`, waiting
    `marks` written and `watches` of the waiting mark) against `served`: requests given a slot,
    most of them one this process already held (`reused`). `turns`: slots given back because
    another instance was waiting; `waited_seconds`: what requests spent waiting for a slot, most of
    it for one another request of this process was using."""
    attempts: int = 0
    taken: int = 0
    released: int = 0
    served: int = 0
    renewals: int = 0
    marks: int = 0
    watches: int = 0
    turns: int = 0
    waited_seconds: float = 0.0
    probe_seconds: float = 0.0
    """Of `waited_seconds`, what requests spent asking storage for slots (round trips on their path)."""

    @property
    def reused(self) -> int:
        return self.served - self.taken

    @property
    def round_trips(self) -> int:
        return self.attempts + self.released + self.renewals + self.marks + self.watches


class SharedSlots:
    """`count` request slots shared by every process of the app: `async with pool.slot(service)`.

    One instance per process, event loop and limited resource. Waits for a slot (a local release
    or storage polled with backoff) up to `max_wait_seconds`, then raises `UpstreamThrottled`."""

    def __init__(self, store: StoreSource, name: str, count: int, *, lease_seconds: int = 15,
                 idle_seconds: float = 1.0, max_wait_seconds: float = 60.0, max_hold_seconds: float | None = None):
        self.name, self.count = name, count
        self.max_hold_seconds = max_hold_seconds
        """While another instance is waiting without a slot, a slot held this long is given back
        to storage at its next release instead of being passed on within the process, and the
        process stands back a moment, so busy instances take turns (None: kept while in use,
        whoever waits)."""
        self.lease_seconds, self.idle_seconds, self.max_wait_seconds = lease_seconds, idle_seconds, max_wait_seconds
        self.stats = SlotStats()
        self._store = store
        self._held: dict[int, _Slot] = {}
        self._idle: list[_Slot] = []
        """Held, unused slots, oldest first: the newest is reused first, so extra ones go cold."""
        self._waiters: deque[asyncio.Future[_Slot]] = deque()
        self._probing = False
        self._next_probe = 0.0
        self._backoff = FIRST_POLL_SECONDS
        self._reaper: asyncio.Task | None = None
        self._releasing: set[asyncio.Task] = set()
        self._closed = False
        self._instance = uuid.uuid4().hex[:12]
        self._contended = False
        """Another instance said, recently, that it waits without any slot."""
        self._watcher: asyncio.Task | None = None
        self._next_mark = 0.0

    @property
    def held(self) -> int:
        """Slots whose lease this process holds, in use or idle."""
        return len(self._held)

    @asynccontextmanager
    async def slot(self, service: str) -> AsyncIterator[None]:
        started = time.monotonic()
        taken = await self._take(service)
        self.stats.served += 1
        self.stats.waited_seconds += time.monotonic() - started
        try:
            yield
        finally:
            self._give(taken)

    def retire(self) -> None:
        """Keep no slot idle from now on: what is idle is released at once, the rest as soon as
        its request is done (for clients being replaced while their requests still run)."""
        self.idle_seconds = 0.0
        if self._reaper is not None:
            self._reaper.cancel()  # it may be waiting for a later moment
            self._reaper = None
        self._reap()

    async def aclose(self) -> None:
        """Release every lease this process holds (another instance may take them at once)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()  # it only ever waits: its releases run as tasks of their own
        if self._watcher is not None:
            self._watcher.cancel()
        slots = list(self._held.values())
        self._held.clear()
        self._idle.clear()
        await asyncio.gather(*self._releasing, *(self._release(slot) for slot in slots))

    # -- taking --------------------------------------------------------------------------------

    async def _take(self, service: str) -> _Slot:
        deadline = time.monotonic() + self.max_wait_seconds
        while True:
            if self._closed:
                raise RuntimeError(f"the request slots {self.name} are closed")
            if (reused := self._reuse()) is not None:
                return reused
            now = time.monotonic()
            if not self._probing and now >= self._next_probe:
                taken = await self._probe()
                self.stats.probe_seconds += time.monotonic() - now
                if taken is not None:
                    return taken
                continue
            if now >= deadline:
                throttled = UpstreamThrottled(service, None, "SharedConcurrencyLimit",
                                              f"all {self.count} request slots of {self.name} stayed busy "
                                              f"for {self.max_wait_seconds:g} s")
                throttled.retry_after = float(self.lease_seconds)
                raise throttled
            wait = self._backoff if self._probing else self._next_probe - now
            if (handed := await self._wait(min(wait, deadline - now))) is not None:
                return handed

    def _reuse(self) -> _Slot | None:
        while self._idle:
            slot = self._idle.pop()
            if not _still_ours(slot):
                self._drop(slot)
                continue
            return slot
        return None

    async def _wait(self, seconds: float) -> _Slot | None:
        """A slot another request of this process handed over within `seconds`, or None."""
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=max(seconds, 0.0))
        except BaseException:
            self._forget(waiter)
            if waiter.done() and not waiter.cancelled():
                self._give(waiter.result())  # handed over as this task was cancelled: pass it on
            raise
        self._forget(waiter)
        return waiter.result() if waiter.done() and not waiter.cancelled() else None

    def _forget(self, waiter: asyncio.Future) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()

    async def _probe(self) -> _Slot | None:
        """Lease free slots from storage, all at once: one for this task and one per task waiting
        behind it. Only one task of the process asks storage at a time. Without any slot while
        another instance holds some, say so (`_mark_waiting`): holders then take turns."""
        self._probing = True
        mine: _Slot | None = None
        tried_all = True
        try:
            store = await self._store()
            start = random.randrange(self.count)  # instances start at different slots: fewer collisions
            free = [(start + step) % self.count for step in range(self.count)]
            free = [index for index in free if index not in self._held]
            while free:
                wanted = (1 if mine is None else 0) + len(self._waiters)
                if wanted == 0:
                    tried_all = False
                    break
                batch, free = free[:wanted], free[wanted:]
                for slot in await asyncio.gather(*(self._lease(store, index) for index in batch)):
                    if slot is None:
                        continue
                    if mine is None:
                        mine = slot
                    else:
                        self._give(slot)
            if mine is None and not self._held:
                await self._mark_waiting(store)
        except BaseException:
            if mine is not None:
                self._give(mine)
            raise
        finally:
            self._probing = False
        if tried_all and (mine is None or self._waiters):
            self._next_probe = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, LAST_POLL_SECONDS)
        else:
            self._next_probe, self._backoff = 0.0, FIRST_POLL_SECONDS
        return mine

    async def _mark_waiting(self, store: Store) -> None:
        """Tell the holders that this instance waits without any slot (at most once a second)."""
        if self.max_hold_seconds is None or time.monotonic() < self._next_mark:
            return
        self._next_mark = time.monotonic() + MARK_EVERY_SECONDS
        self.stats.marks += 1
        mark = json.dumps({"instance": self._instance, "at": time.time()}).encode()
        try:
            await store.blob(self._waiting_path).upload_blob(
                mark, overwrite=True, content_settings=ContentSettings(content_type="application/json"))
        except AzureError as error:
            log.warning("could not say that %s waits for a slot: %s", self.name, error,
                        extra={"event": "slot_mark_failed", "limit": self.name})

    @property
    def _waiting_path(self) -> str:
        return f"limits/{self.name}/waiting"

    async def _watch_turns(self) -> None:
        """While this process holds slots, look every half turn whether another instance waits
        without any (one storage read each time)."""
        period = max(self.max_hold_seconds / 2, 0.05)
        while self._held and not self._closed:
            await asyncio.sleep(period)
            self.stats.watches += 1
            try:
                store = await self._store()
                content = await (await store.blob(self._waiting_path).download_blob()).readall()
                mark = json.loads(content)
                self._contended = (mark.get("instance") != self._instance and
                                   time.time() - float(mark.get("at", 0)) < WAITING_MARK_SECONDS + CLOCK_SKEW_SECONDS)
            except ResourceNotFoundError:
                self._contended = False
            except (AzureError, ValueError, TypeError, AttributeError) as error:
                log.warning("could not read whether another instance waits for %s: %s", self.name, error,
                            extra={"event": "slot_watch_failed", "limit": self.name})
        self._contended = False

    async def _lease(self, store: Store, index: int) -> _Slot | None:
        self.stats.attempts += 1
        try:
            lease = await leases.acquire(store, f"limits/{self.name}/{index}", self.lease_seconds)
        except AzureError as error:
            log.warning("request slot %s/%d could not be leased: %s", self.name, index, error,
                        extra={"event": "slot_lease_failed", "limit": self.name})
            return None
        if lease is None:
            return None
        slot = _Slot(index, lease, taken_at=time.monotonic())
        if self._closed:
            await self._release(slot)
            return None
        self.stats.taken += 1
        self._held[index] = slot
        if self.max_hold_seconds is not None and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.create_task(self._watch_turns(), name=f"watch turns {self.name}")
        return slot

    # -- giving back ---------------------------------------------------------------------------

    def _give(self, slot: _Slot) -> None:
        """To the longest-waiting request of this process, or idle until the reaper releases it."""
        if self._held.get(slot.index) is not slot:
            return  # released meanwhile (closed)
        if not _still_ours(slot):
            self._drop(slot)
            return
        if (self._contended and self.max_hold_seconds is not None
                and time.monotonic() - slot.taken_at > self.max_hold_seconds):
            # Its turn is over and another instance waits: back to storage, where this
            # process's waiters and other instances' have the same chance of it.
            self.stats.turns += 1
            self._held.pop(slot.index, None)
            self._release_soon(slot)
            # Stand back for longer than other instances wait between their looks at storage
            # (else this process, first to know, would take the slot again at once).
            self._next_probe, self._backoff = time.monotonic() + LAST_POLL_SECONDS + 0.1, FIRST_POLL_SECONDS
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        slot.idle_since = time.monotonic()
        self._idle.append(slot)
        self._reap()

    def _reap(self) -> None:
        if self._idle and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.create_task(self._release_idle(), name=f"release idle slots {self.name}")

    def _drop(self, slot: _Slot) -> None:
        """A slot whose lease may have run out (this process stalled past it, or storage refused
        its renewals): never used again, released in case it is still ours."""
        log.warning("request slot %s/%d given up: its lease %s", self.name, slot.index,
                    "was taken over" if slot.lease.lost else "could not be renewed in time",
                    extra={"event": "slot_lease_lost", "limit": self.name})
        self._held.pop(slot.index, None)
        self._release_soon(slot)

    async def _release_idle(self) -> None:
        while self._idle:
            due = self._idle[0].idle_since + self.idle_seconds - time.monotonic()
            if due > 0:
                await asyncio.sleep(due)
                continue
            now = time.monotonic()
            expired = [slot for slot in self._idle if now - slot.idle_since >= self.idle_seconds]
            self._idle = self._idle[len(expired):]
            for slot in expired:
                self._held.pop(slot.index, None)
                self._release_soon(slot)

    def _release_soon(self, slot: _Slot) -> None:
        releasing = asyncio.create_task(self._release(slot), name=f"release slot {self.name}/{slot.index}")
        self._releasing.add(releasing)
        releasing.add_done_callback(self._releasing.discard)

    async def _release(self, slot: _Slot) -> None:
        self.stats.released += 1
        self.stats.renewals += slot.lease.renewals
        try:
            await leases.release(await self._store(), slot.lease)
        except AzureError as error:  # it runs out within lease_seconds all the same
            log.warning("request slot %s/%d could not be released: %s", self.name, slot.index, error,
                        extra={"event": "slot_release_failed", "limit": self.name})
