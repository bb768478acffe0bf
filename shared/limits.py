"""Upstream limits kept for the whole app, not per process.

Bookings serves 4 requests at a time per mailbox, Business Central about 5 per environment and
6,000 per 5-minute sliding window per user. A per-process semaphore or budget multiplies when the
Functions app scales out to several instances, and the excess comes back as 429s; so these limits
live in the storage account every instance shares:

- `SharedSlots`: `count` request slots, each a short blob lease on `locks/limits/<name>/<i>`
  (`shared/leases.py`, renewed while held). A process keeps a slot while it has work and hands it
  from one request to the next locally, without a storage round trip; a slot left unused for
  `idle_seconds` is released for the other instances. A crashed instance stops renewing, so its
  slots come back within the lease's 15 seconds.
- `SharedRateBudget`: a ledger blob `limits/<name>/ledger` of ticket grants, written with ETag
  optimistic concurrency. A process claims a few tickets at a time and sends with them within
  `ticket_seconds`; a grant counts against the window until `ticket_seconds` + the window after it
  was made, so whenever its tickets were used, no window ever holds more than the limit. Tickets
  a claim did not use are given back with the process's next claim, and a claim is sized by what
  the process used of its last one, so an instance that sends little holds little.

Both raise `UpstreamThrottled` (with `retry_after`) when the wait would be too long: queue workers
already turn that into "run this message again later"."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContentSettings

from shared import leases
from shared.http import MAX_BUDGET_WAIT_SECONDS, UpstreamThrottled
from shared.store import Store

log = logging.getLogger(__name__)

StoreSource = Callable[[], Awaitable[Store]]

FIRST_POLL_SECONDS = 0.1
LAST_POLL_SECONDS = 1.0
"""While every slot is held elsewhere, storage is asked again after 0.1 s, doubling up to 1 s."""
CLOCK_SKEW_SECONDS = 1.0
"""How far apart the instances' clocks may be (Azure hosts keep theirs synchronised far closer):
a grant is kept this much longer, since another instance judges its age by its own clock."""


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
    """Storage round trips (`attempts` to take a lease, `released`) against `served`: requests
    given a slot, most of them one this process already held (`reused`)."""
    attempts: int = 0
    taken: int = 0
    released: int = 0
    served: int = 0

    @property
    def reused(self) -> int:
        return self.served - self.taken


class SharedSlots:
    """`count` request slots shared by every process of the app: `async with pool.slot(service)`.

    One instance per process, event loop and limited resource. Waits for a slot (a local release
    or storage polled with backoff) up to `max_wait_seconds`, then raises `UpstreamThrottled`."""

    def __init__(self, store: StoreSource, name: str, count: int, *, lease_seconds: int = 15,
                 idle_seconds: float = 1.0, max_wait_seconds: float = 60.0, max_hold_seconds: float | None = None):
        self.name, self.count = name, count
        self.max_hold_seconds = max_hold_seconds
        """A slot held this long is given back to storage at its next release instead of being
        passed on within the process, and the process stands back a moment, so busy instances
        take turns (None: kept while in use)."""
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

    @property
    def held(self) -> int:
        """Slots whose lease this process holds, in use or idle."""
        return len(self._held)

    @asynccontextmanager
    async def slot(self, service: str) -> AsyncIterator[None]:
        taken = await self._take(service)
        self.stats.served += 1
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
                if (taken := await self._probe()) is not None:
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
        """Lease free slots from storage: one for this task and one per task waiting behind it.
        Only one task of the process asks storage at a time."""
        self._probing = True
        mine: _Slot | None = None
        tried_all = True
        try:
            store = await self._store()
            start = random.randrange(self.count)  # instances start at different slots: fewer collisions
            for index in [(start + step) % self.count for step in range(self.count)]:
                if mine is not None and not self._waiters:
                    tried_all = False
                    break
                if index in self._held or (slot := await self._lease(store, index)) is None:
                    continue
                if mine is None:
                    mine = slot
                else:
                    self._give(slot)
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
        return slot

    # -- giving back ---------------------------------------------------------------------------

    def _give(self, slot: _Slot) -> None:
        """To the longest-waiting request of this process, or idle until the reaper releases it."""
        if self._held.get(slot.index) is not slot:
            return  # released meanwhile (closed)
        if not _still_ours(slot):
            self._drop(slot)
            return
        if self.max_hold_seconds is not None and time.monotonic() - slot.taken_at > self.max_hold_seconds:
            # Its turn is over: back to storage, where this process's waiters and other
            # instances' have the same chance of it.
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
        try:
            await leases.release(await self._store(), slot.lease)
        except AzureError as error:  # it runs out within lease_seconds all the same
            log.warning("request slot %s/%d could not be released: %s", self.name, slot.index, error,
                        extra={"event": "slot_release_failed", "limit": self.name})


@dataclass
class _Grant:
    id: str
    until: float
    """Epoch seconds: the grant counts against the window until then."""
    count: int


@dataclass
class BudgetStats:
    reads: int = 0
    writes: int = 0
    conflicts: int = 0
    """Writes refused because another instance wrote the ledger first (then read again)."""
    granted: int = 0
    """Tickets handed to requests."""


class SharedRateBudget:
    """A sliding-window quota shared by every process of the app, with `RateBudget`'s contract:
    `await budget.acquire(service)` returns when a request may be sent (at once), waits when the
    window has room again soon, or raises `UpstreamThrottled` (`retry_after` set) when that is
    more than `MAX_BUDGET_WAIT_SECONDS` away. One instance per process, event loop and quota."""

    def __init__(self, store: StoreSource, name: str, limit: int, window_seconds: float, *,
                 chunk: int | None = None, ticket_seconds: float = 10.0,
                 clock_skew_seconds: float = CLOCK_SKEW_SECONDS):
        if limit < 1 or window_seconds <= 0 or ticket_seconds <= 0:
            raise ValueError("a rate budget needs a limit of at least 1 and positive durations")
        self.name, self.limit, self.window = name, limit, window_seconds
        self.chunk = chunk or max(1, limit // 60)
        self.ticket_seconds, self.clock_skew_seconds = ticket_seconds, clock_skew_seconds
        self.stats = BudgetStats()
        self._store = store
        self._path = f"limits/{name}/ledger"
        self._lock = asyncio.Lock()
        self._claim: _Grant | None = None
        self._tickets = 0
        self._usable_until = 0.0
        """`time.monotonic()` after which the current claim's tickets are never used."""
        self._next_size = 1
        self._give_back: tuple[str, int] | None = None
        """A finished claim's id and its unused tickets, taken off the ledger with the next write."""
        self._cached: tuple[list[_Grant], str] | None = None
        """The ledger and its ETag as this process last wrote it: tried first, re-read on a conflict."""

    async def acquire(self, service: str) -> None:
        async with self._lock:
            if self._tickets == 0 or time.monotonic() >= self._usable_until:
                await self._claim_tickets(service)
            self._tickets -= 1
            self.stats.granted += 1

    async def _claim_tickets(self, service: str) -> None:
        self._finish_claim()
        while True:
            fresh = self._cached is None
            grants, etag = self._cached or await self._read()
            self._cached = None
            now, started = time.time(), time.monotonic()
            grants = [grant for grant in grants if grant.until > now]
            if self._give_back is not None:
                claim_id, unused = self._give_back
                grants = [_Grant(g.id, g.until, g.count - unused) if g.id == claim_id else g for g in grants]
                grants = [grant for grant in grants if grant.count > 0]
            room = self.limit - sum(grant.count for grant in grants)
            if room <= 0:
                if fresh:  # else read it again before deciding
                    await self._wait_for_room(service, min(grant.until for grant in grants) - now)
                continue
            claim = _Grant(uuid.uuid4().hex[:12], now + self.ticket_seconds + self.window + self.clock_skew_seconds,
                           min(self._next_size, room))
            written = [*grants, claim]
            try:
                etag = await self._write(written, etag)
            except (ResourceModifiedError, ResourceExistsError):
                self.stats.conflicts += 1
                continue
            self._cached = (written, etag)
            self._claim, self._tickets = claim, claim.count
            self._usable_until = started + self.ticket_seconds
            self._give_back = None
            return

    async def _wait_for_room(self, service: str, seconds: float) -> None:
        """Until the oldest grant stops counting, or `UpstreamThrottled` if that is too far off."""
        if seconds > MAX_BUDGET_WAIT_SECONDS:
            throttled = UpstreamThrottled(service, None, "ClientRateBudget",
                                          f"{self.limit} requests in {self.window:g} s already granted "
                                          f"to the app's instances ({self.name})")
            throttled.retry_after = seconds
            raise throttled
        await asyncio.sleep(max(seconds, 0.0))

    def _finish_claim(self) -> None:
        """The current claim's tickets are spent or expired: size the next claim by its use."""
        if self._claim is None:
            return
        used = self._claim.count - self._tickets
        if self._tickets:
            self._give_back = (self._claim.id, self._tickets)
        self._next_size = max(1, min(self.chunk, 2 * used))
        self._claim, self._tickets = None, 0

    async def _read(self) -> tuple[list[_Grant], str | None]:
        store = await self._store()
        self.stats.reads += 1
        try:
            download = await store.blob(self._path).download_blob()
        except ResourceNotFoundError:
            return [], None
        content = await download.readall()
        try:
            return [_Grant(str(i), float(until), int(count)) for i, until, count in json.loads(content)["grants"]], \
                download.properties.etag
        except (ValueError, TypeError, KeyError) as error:
            # Never written by this code; replacing it (ETag-guarded) beats refusing every request.
            log.error("the rate ledger %s could not be read (%s); starting it again", self._path, error,
                      extra={"event": "rate_ledger_unreadable", "limit": self.name})
            return [], download.properties.etag

    async def _write(self, grants: list[_Grant], etag: str | None) -> str:
        """Write the ledger if nobody else did since `etag` (None: if nobody created it yet)."""
        store = await self._store()
        self.stats.writes += 1
        store.stats.blob_writes += 1
        data = json.dumps({"grants": [[g.id, math.ceil(g.until * 1000) / 1000, g.count] for g in grants]}, separators=(",", ":"))
        condition = ({"overwrite": True, "etag": etag, "match_condition": MatchConditions.IfNotModified}
                     if etag else {"overwrite": False})
        answer = await store.blob(self._path).upload_blob(
            data.encode(), content_settings=ContentSettings(content_type="application/json"), **condition)
        return answer["etag"]
