"""The per-process clients: built on first use, reused by every invocation.

The Functions worker runs async functions on one event loop for the life of the process; tests
and the demo may use several loops, so clients are kept per loop (an httpx or aiohttp client
belongs to the loop that made it). Settings are read on first use, never at import, so a missing
setting fails only the function that needs it."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

from shared.settings import BC_SCOPE, GRAPH_SCOPE, Settings, get_settings


@dataclass
class Runtime:
    settings: Settings
    _store: object | None = None
    _graph: object | None = None
    _bc: object | None = None
    _closers: list = field(default_factory=list)

    async def store(self):
        from shared.store import Store

        if self._store is None:
            self._store = Store(self.settings)
            self._closers.append(self._store.aclose)
        await self._store.ensure_ready()
        return self._store

    @property
    def graph(self):
        from shared.auth import token_provider
        from shared.graph import MAILBOX_CONCURRENCY, GraphClient
        from shared.http import ApiClient

        if self._graph is None:
            tokens = token_provider(self.settings)
            api = ApiClient("Graph", tokens.source(GRAPH_SCOPE), timeout=self.settings.http_timeout_seconds,
                            max_concurrency=MAILBOX_CONCURRENCY)
            self._closers.append(api.aclose)
            self._graph = GraphClient(api, self.settings.graph_base_url)
        return self._graph

    @property
    def bc(self):
        from shared.auth import token_provider
        from shared.bc import ENVIRONMENT_CONCURRENCY, REQUESTS_PER_WINDOW, WINDOW_SECONDS, BcClient
        from shared.http import ApiClient, RateBudget

        if self._bc is None:
            self.settings.require("tenant_id", "bc_environment", "bc_company_id")
            tokens = token_provider(self.settings)
            api = ApiClient("Business Central", tokens.source(BC_SCOPE),
                            timeout=self.settings.http_timeout_seconds, max_concurrency=ENVIRONMENT_CONCURRENCY,
                            budget=RateBudget(REQUESTS_PER_WINDOW, WINDOW_SECONDS))
            self._closers.append(api.aclose)
            self._bc = BcClient(api, self.settings)
        return self._bc

    async def aclose(self) -> None:
        for close in reversed(self._closers):
            await close()
        self._closers.clear()
        self._store = self._graph = self._bc = None


_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = weakref.WeakKeyDictionary()


def runtime() -> Runtime:
    """The clients for the running loop, rebuilt when the settings changed (tests do that)."""
    loop = asyncio.get_running_loop()
    settings = get_settings()
    current = _runtimes.get(loop)
    if current is None or current.settings is not settings:
        current = _runtimes[loop] = Runtime(settings)
    return current
