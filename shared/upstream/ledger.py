"""A sliding-window quota kept for the whole app, not per process: Business Central's 6,000
requests per 5 minutes per user, shared by every instance of the scaled-out app.

`SharedRateBudget` keeps a ledger blob `limits/<name>/ledger` of ticket grants, written with ETag
optimistic concurrency. A process claims tickets in blocks, sized by its requests waiting and by
what it used of its last claim (doubled), and sends with them within `ticket_seconds`; a grant
counts against the window until `ticket_seconds` + the window after it was made, so whenever its
tickets were used, no window ever holds more than the limit. Tickets a claim did not use are
given back with the process's next claim, so an instance that sends little holds little; a busy
one writes the ledger about once per `ticket_seconds`, whatever its number of requests."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContentSettings

from shared.upstream.errors import MAX_BUDGET_WAIT_SECONDS, UpstreamThrottled
from shared.upstream.limits import CLOCK_SKEW_SECONDS, StoreSource

log = logging.getLogger(__name__)


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
    claims: int = 0
    """Claims written (each a block of tickets)."""
    claim_seconds: float = 0.0
    """Time spent claiming (storage round trips every request waiting for a ticket waits for)."""

    @property
    def round_trips(self) -> int:
        return self.reads + self.writes


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
        self._wanting = 0
        """Requests of this process asking for a ticket right now (the claim is sized to them)."""

    async def acquire(self, service: str, count: int = 1) -> None:
        """Tickets for `count` requests (a `$batch` may count as each of its operations)."""
        if not 1 <= count <= self.limit:
            raise ValueError(f"a request of {count} operations never fits a budget of {self.limit}")
        self._wanting += count
        try:
            async with self._lock:
                # All of a request's tickets come from one claim taken before it is sent: tickets
                # gathered from an older claim while waiting for room would be spent after that
                # claim's ticket time, outside the window it was counted in.
                if self._tickets < count or time.monotonic() >= self._usable_until:
                    started = time.monotonic()
                    try:
                        await self._claim_tickets(service, count)
                    finally:
                        self.stats.claim_seconds += time.monotonic() - started
                self._tickets -= count
                self.stats.granted += count
        finally:
            self._wanting -= count

    async def _claim_tickets(self, service: str, need: int) -> None:
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
            if room < need:
                if fresh:  # else read it again before deciding
                    await self._wait_for_room(service, min(grant.until for grant in grants) - now)
                continue
            # The work in hand: what this process used of its last claim (doubled), and at least
            # every request asking now; never less than the request in hand.
            size = max(min(max(self._next_size, self._wanting), self.chunk, room), need)
            claim = _Grant(uuid.uuid4().hex[:12], now + self.ticket_seconds + self.window + self.clock_skew_seconds, size)
            written = [*grants, claim]
            try:
                etag = await self._write(written, etag)
            except (ResourceModifiedError, ResourceExistsError):
                self.stats.conflicts += 1
                continue
            self.stats.claims += 1
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
