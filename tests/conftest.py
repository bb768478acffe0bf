"""Shared fixtures: one real Azurite and the three simulators per test session; per test a clean
storage account, fresh Bookings businesses and a fresh BC company, and an in-process host."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

import pytest

from sandbox.host import FunctionHost
from shared.storage.store import SYNC_BUSINESS_QUEUE
from sandbox.bc.options import BcOptions
from sandbox.graph.options import GraphOptions
from sandbox.stack import CLIENT_ID, ENVIRONMENT, TENANT, Sandbox, SandboxStack, seed_users
from sandbox.tokens import APP_ROLES

pytest_plugins = ["tests.plugins.chaos"]

BC_EXECUTION_LIMIT_SECONDS = 1
"""The simulated BC's execution limit in tests: nothing it is asked lands later than this after it started."""
BC_QUEUE_TIMEOUT_SECONDS = 1
"""The simulated BC's queue in tests: a request waiting longer for a slot is answered 503, never run."""


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    with SandboxStack() as started:
        yield started


@dataclass
class World:
    """What one test works with: its businesses, its BC company, the host and the sandbox."""
    sandbox: Sandbox
    host: FunctionHost
    business_ids: list[str]
    company_id: str
    monkeypatch: pytest.MonkeyPatch

    @property
    def graph(self):
        return self.sandbox.graph

    @property
    def bc(self):
        return self.sandbox.bc

    def configure(self, **settings: str) -> None:
        """Change app settings for the rest of the test (the app re-reads them per call)."""
        for name, value in settings.items():
            self.monkeypatch.setenv(name, value)

    def sync(self):
        """A timer-triggered sync, then every queue drained, as the host would."""
        self.host.timer("sync_bookings")
        return self.host.drain()

    def sync_calendars(self):
        """A timer-triggered sync and its per-business parts, leaving what they queue for the
        directory and invoicing where it is."""
        self.host.timer("sync_bookings")
        return self.host.drain(queues=[SYNC_BUSINESS_QUEUE])


def make_world(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, businesses: int = 1) -> World:
    sandbox.azurite.wipe()
    suffix = uuid.uuid4().hex[:8]
    business_ids = [f"biz{i}-{suffix}@contoso.onmicrosoft.com" for i in range(businesses)]
    for business_id in business_ids:
        sandbox.graph.add_business(business_id)
    company_id = sandbox.bc.add_company(TENANT, ENVIRONMENT)
    for plan in (sandbox.graph.plan, sandbox.bc.plan, sandbox.entra.plan):
        plan.clear()
        plan.reset_stats()
        plan.reset_windows()  # each test starts with the services' rate limits unused
    # Graph's and BC's readings of what the docs leave open, the app's permissions and its place in BC's
    # Entra Applications: back to their defaults (a test may have changed them).
    sandbox.graph.configure(**asdict(GraphOptions()))
    sandbox.bc.configure(**asdict(BcOptions()))
    sandbox.graph.clear_writes()
    for audience, roles in APP_ROLES.items():
        sandbox.entra.set_roles(TENANT, CLIENT_ID, audience, roles)
    seed_users(sandbox.entra)  # the operator and her app role (users and redirect URIs a test adds stay)
    sandbox.entra.reset_sign_in()  # no bad ID token left pending by another test
    sandbox.bc.register_app(TENANT, ENVIRONMENT, CLIENT_ID)
    # What BC finishes after the client gave up lands within the execution limit the app assumes.
    sandbox.bc.plan.configure(execution_limit_seconds=BC_EXECUTION_LIMIT_SECONDS,
                              late_seconds=0.9 * BC_EXECUTION_LIMIT_SECONDS, late_executes=True,
                              queue_timeout_seconds=BC_QUEUE_TIMEOUT_SECONDS)
    sandbox.graph.page_size = 100
    # Business Central may go on running a request for 10 minutes after the app gave up on it, and
    # the app waits that long before it looks for the outcome; the simulated BC is quicker. A write
    # whose answer is lost is looked up 2 x HTTP_TIMEOUT_SECONDS + BC_EXECUTION_LIMIT_SECONDS after it
    # was claimed (3 s here): the simulators answer in milliseconds, a second is plenty.
    overrides = {"BOOKINGS_BUSINESS_IDS": ",".join(business_ids), "BC_COMPANY_ID": company_id,
                 "HTTP_TIMEOUT_SECONDS": "1", "BC_EXECUTION_LIMIT_SECONDS": str(BC_EXECUTION_LIMIT_SECONDS),
                 "BC_QUEUE_TIMEOUT_SECONDS": str(BC_QUEUE_TIMEOUT_SECONDS)}
    for name, value in sandbox.env(**overrides).items():
        monkeypatch.setenv(name, value)
    for name in ("CUSTOMER_TEMPLATE", "ITEM_TEMPLATE", "SYNC_CUSTOMERS", "SYNC_ITEMS", "INVOICE_FREE_BOOKINGS",
                 "WRITE_BACK_TO_BOOKINGS", "BOOKINGS_TIME_ZONE", "SYNC_LOOKBACK_DAYS", "SYNC_LOOKAHEAD_DAYS"):
        monkeypatch.delenv(name, raising=False)
    from function_app import app

    host = FunctionHost(app, sandbox.azurite.connection_string, retry_delay=0)
    return World(sandbox, host, business_ids, company_id, monkeypatch)


@pytest.fixture
def world(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> World:
    made = make_world(sandbox, monkeypatch)
    yield made
    made.host.close()


@pytest.fixture
def world2(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> World:
    """Two Bookings businesses."""
    made = make_world(sandbox, monkeypatch, businesses=2)
    yield made
    made.host.close()
