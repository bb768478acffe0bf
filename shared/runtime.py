"""The per-process clients: built on first use, reused by every invocation.

The Functions worker runs async functions on one event loop for the life of the process; tests
and the demo may use several loops, so clients are kept per loop (an httpx or aiohttp client
belongs to the loop that made it). Settings are read on first use, never at import, so a missing
setting fails only the function that needs it.

The upstream limits hold for the whole app, however many instances it runs on: Graph's 4 requests
per mailbox and BC's 5 per environment are slots shared through storage, BC's 6,000 requests per
5 minutes a shared budget (`shared/upstream/limits.py`)."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

from shared.settings import BC_SCOPE, GRAPH_SCOPE, Settings, get_settings


BC_TURN_SECONDS = 10.0
"""Instances busy with Business Central take turns with its 5 slots while one of them waits
without any: a holder then gives a slot back once it has held it this long. A lone busy instance
keeps its slots (a mailbox is mostly one business's sync: no turns)."""


@dataclass
class Runtime:
    settings: Settings
    _store: object | None = None
    _graph: object | None = None
    _bc_api: object | None = None
    _bc: dict = field(default_factory=dict)
    _slots: dict = field(default_factory=dict)
    _gates: dict = field(default_factory=dict)
    _closers: list = field(default_factory=list)

    async def store(self):
        from shared.storage.store import Store

        if self._store is None:
            self._store = Store(self.settings)
            self._closers.append(self._store.aclose)
        await self._store.ensure_ready()
        return self._store

    @property
    def graph(self):
        from shared.upstream.auth import token_provider
        from shared.upstream.graph import MAILBOX_CONCURRENCY, UNKNOWN_ERROR_ATTEMPTS, GraphClient
        from shared.upstream.http import ApiClient
        from shared.storage.store import encode_key

        if self._graph is None:
            tokens = token_provider(self.settings)
            # GraphClient's limit_key is the business id, its mailbox address: case-insensitive.
            api = ApiClient("Graph", tokens.source(GRAPH_SCOPE), timeout=self.settings.http_timeout_seconds,
                            max_concurrency=MAILBOX_CONCURRENCY, attempts_by_code=UNKNOWN_ERROR_ATTEMPTS,
                            shared_slots=lambda mailbox: self.shared_slots(f"graph/{encode_key(mailbox.lower())}",
                                                                           MAILBOX_CONCURRENCY))
            self._closers.append(api.aclose)
            self._graph = GraphClient(api, self.settings.graph_base_url)
        return self._graph

    @property
    def bc(self):
        """The client of `BC_COMPANY_ID`."""
        self.settings.require("tenant_id", "bc_environment", "bc_company_id")
        return self.bc_for(self.settings.bc_company_id)

    def bc_of(self, business_id: str):
        """The client of the company the business bills into (`BUSINESS_COMPANIES`)."""
        return self.bc_for(self.settings.company_of(business_id))

    def bc_for(self, company_id: str):
        """The client of one company. Every company of the environment shares one `ApiClient`:
        BC's limits are per environment and principal, not per company."""
        from shared.upstream.auth import token_provider
        from shared.upstream.bc import ENVIRONMENT_CONCURRENCY, REQUESTS_PER_WINDOW, WINDOW_SECONDS, BcClient
        from shared.upstream.http import ApiClient
        from shared.upstream.ledger import SharedRateBudget

        client = self._bc.get(company_id)
        if client is not None:
            return client
        if self._bc_api is None:
            self.settings.require("tenant_id", "bc_environment")
            tokens = token_provider(self.settings)
            # One environment, one principal (the app's): one pool and one budget, whatever the key.
            name = f"bc/{self.settings.tenant_id}/{self.settings.bc_environment}".lower()
            api = ApiClient("Business Central", tokens.source(BC_SCOPE),
                            timeout=self.settings.http_timeout_seconds, max_concurrency=ENVIRONMENT_CONCURRENCY,
                            budget=SharedRateBudget(self.store, name, REQUESTS_PER_WINDOW, WINDOW_SECONDS),
                            shared_slots=lambda _key: self.shared_slots(name, ENVIRONMENT_CONCURRENCY,
                                                                        max_hold_seconds=BC_TURN_SECONDS))
            self._closers.append(api.aclose)
            self._bc_api = api
        client = self._bc[company_id] = BcClient(self._bc_api, self.settings, company_id)
        return client

    def shared_slots(self, name: str, count: int, max_hold_seconds: float | None = None):
        """The app-wide request slots `name` (`shared/upstream/limits.py`), one pool per name and loop."""
        from shared.upstream.limits import SharedSlots

        pool = self._slots.get(name)
        if pool is None:
            pool = self._slots[name] = SharedSlots(self.store, name, count, max_hold_seconds=max_hold_seconds)
        return pool

    def gate(self, name: str, count: int) -> asyncio.Semaphore:
        """At most `count` pieces of work `name` at a time in this process (one per name and loop)."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = asyncio.Semaphore(count)
        return gate

    def retire(self) -> None:
        """Being replaced: keep no request slot idle (the new clients will want them)."""
        for pool in self._slots.values():
            pool.retire()

    async def aclose(self) -> None:
        pools, self._slots = list(self._slots.values()), {}
        for pool in pools:  # before the store they need: other instances get the slots at once
            await pool.aclose()
        for close in reversed(self._closers):
            await close()
        self._closers.clear()
        self._store = self._graph = self._bc_api = None
        self._bc = {}


_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = weakref.WeakKeyDictionary()
_replaced: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Runtime]] = weakref.WeakKeyDictionary()
"""Runtimes replaced after a settings change, per loop: requests of theirs may still be running, so
their clients are closed with the loop's (`close_runtimes`), never left to the garbage collector."""


def runtime() -> Runtime:
    """The clients for the running loop, rebuilt when the settings changed (tests do that)."""
    loop = asyncio.get_running_loop()
    settings = get_settings()
    current = _runtimes.get(loop)
    if current is None or current.settings is not settings:
        if current is not None:
            current.retire()
            _replaced.setdefault(loop, []).append(current)
        current = _runtimes[loop] = Runtime(settings)
    return current


async def close_runtimes() -> None:
    """Close every client made on the running loop: the current runtime's and those replaced
    since. For whoever owns the loop (the worker, a test host), when it stops."""
    loop = asyncio.get_running_loop()
    for made in [*_replaced.pop(loop, []), *filter(None, [_runtimes.pop(loop, None)])]:
        await made.aclose()
