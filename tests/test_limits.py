"""The upstream limits held for the whole app (`shared/upstream/limits.py`), against the real Azurite: two
in-process hosts stand for two instances of the scaled-out app, each with its own event loop,
store and clients, sharing only the storage account (and the simulators)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager

import pytest

from azure.core.exceptions import ResourceNotFoundError

from shared.upstream.graph import MAILBOX_CONCURRENCY
from shared.upstream.errors import MAX_BUDGET_WAIT_SECONDS, UpstreamThrottled
from shared.upstream.http import ApiClient
from shared.upstream.ledger import SharedRateBudget
from shared.upstream.limits import SharedSlots
from shared.runtime import runtime
from shared.storage.store import encode_key
from sandbox.stack import ENVIRONMENT, TENANT


@pytest.fixture
def hosts(world, sandbox):
    """The test's host and a second instance of the app."""
    from function_app import app
    from sandbox.host import FunctionHost

    other = FunctionHost(app, sandbox.azurite.connection_string, retry_delay=0)
    try:
        yield world.host, other
    finally:
        other.close()


def on_each(hosts, scenario, timeout: float = 60):
    """`scenario(instance_number)` run on every host at the same time; their results."""
    with ThreadPoolExecutor(len(hosts)) as threads:
        running = [threads.submit(host.run, scenario(number), timeout) for number, host in enumerate(hosts)]
        return [future.result() for future in running]


def store():
    return runtime().store


class Inside:
    """How many are inside a limit at once, counted across threads (instances)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = self.done = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1
            self.done += 1


def test_two_instances_never_hold_more_slots_than_the_limit_and_all_work_completes(hosts):
    inside = Inside()

    async def instance(number: int) -> tuple[int, int]:
        pool = SharedSlots(store(), "test/three", 3, idle_seconds=0.2)

        async def worker() -> None:
            for _ in range(5):
                async with pool.slot("Test"):
                    inside.enter()
                    await asyncio.sleep(0.005)  # the request's own duration
                    inside.leave()

        await asyncio.gather(*(worker() for _ in range(12)))
        await pool.aclose()
        return pool.stats.attempts, pool.stats.reused

    (attempts_a, reused_a), (attempts_b, reused_b) = on_each(hosts, instance)
    assert inside.done == 2 * 12 * 5
    assert inside.peak == 3, "never more than three inside, and the three are used"
    assert reused_a + reused_b > 60, "most requests take a slot their process already holds: no storage round trip"


def test_a_slot_is_reused_locally_then_handed_to_the_other_instance_once_idle(hosts):
    first, second = hosts

    async def hold_then_idle() -> SharedSlots:
        pool = SharedSlots(store(), "test/one", 1, idle_seconds=0.5)
        for _ in range(10):
            async with pool.slot("Test"):
                pass
        assert (pool.stats.attempts, pool.stats.reused, pool.held) == (1, 9, 1), \
            "one lease taken, kept for the next nine requests, still held while fresh"
        return pool

    pool = first.run(hold_then_idle(), 30)

    async def take_it() -> SharedSlots:
        other = SharedSlots(store(), "test/one", 1, max_wait_seconds=10)
        async with other.slot("Test"):
            pass
        await other.aclose()
        return other

    other = second.run(take_it(), 30)
    assert other.stats.taken == 1, "the other instance got the slot (within its 10 s)"
    assert (pool.held, pool.stats.released) == (0, 1), "the first instance let it go after being idle"


def test_clients_being_replaced_hand_their_idle_slots_over_at_once(hosts):
    first, second = hosts

    async def use_then_retire() -> SharedSlots:
        pool = SharedSlots(store(), "test/retired", 1, idle_seconds=60)
        async with pool.slot("Test"):
            pass
        pool.retire()
        return pool

    pool = first.run(use_then_retire(), 30)

    async def take_it() -> None:
        other = SharedSlots(store(), "test/retired", 1, max_wait_seconds=5)
        async with other.slot("Test"):  # refused after 5 s, were the slot kept idle for its 60
            pass
        await other.aclose()

    second.run(take_it(), 30)
    assert (pool.held, pool.stats.released) == (0, 1)


def test_closing_the_runtime_releases_its_slots_at_once(world):
    business = world.business_ids[0]
    name = f"graph/{encode_key(business.lower())}"

    async def scenario() -> list[str]:
        await runtime().graph.get_business(business)
        assert runtime().shared_slots(name, MAILBOX_CONCURRENCY).held == 1, "kept for the next request"
        await runtime().aclose()
        states = []
        for index in range(MAILBOX_CONCURRENCY):
            try:
                blob = (await runtime().store()).blob(f"locks/limits/{name}/{index}")
                properties = await blob.get_blob_properties()
            except ResourceNotFoundError:
                continue
            states.append(properties.lease.state)
        return states

    assert world.host.run(scenario(), 30) == ["available"], "one slot was used, and it is free again"


def test_slots_of_an_instance_that_stops_without_releasing_come_back_within_the_lease(hosts):
    """The one slow test: Azure's shortest lease is 15 s, and nothing short of a release ends it
    sooner. The vanished instance is frozen (its loop blocked: no renewal runs), not closed."""
    survivor, vanishing = hosts
    held = AsyncExitStack()

    async def take_both() -> SharedSlots:
        pool = SharedSlots(store(), "test/two", 2)
        for _ in range(2):
            await held.enter_async_context(pool.slot("Test"))
        return pool

    lost = vanishing.run(take_both(), 30)
    thaw = threading.Event()
    held_here = AsyncExitStack()

    async def freeze() -> None:
        thaw.wait(60)  # blocks the instance's loop: it stops renewing, as a crashed process does

    with ThreadPoolExecutor(1) as thread:
        frozen = thread.submit(vanishing.run, freeze(), 90)
        try:
            async def wait_for_one() -> tuple[UpstreamThrottled, float, SharedSlots]:
                impatient = SharedSlots(store(), "test/two", 2, max_wait_seconds=0.5)
                with pytest.raises(UpstreamThrottled) as refused:
                    async with impatient.slot("Test"):
                        pass
                pool = SharedSlots(store(), "test/two", 2, max_wait_seconds=30)
                started = time.monotonic()
                await held_here.enter_async_context(pool.slot("Test"))
                return refused.value, time.monotonic() - started, pool

            refused, waited, pool = survivor.run(wait_for_one(), 60)
        finally:
            thaw.set()
            frozen.result()

    assert refused.code == "SharedConcurrencyLimit" and refused.status is None and refused.retry_after == 15
    assert waited < 15 + 2, "back within the lease (and one poll)"

    async def come_back() -> None:
        await held.aclose()
        await lost.aclose()  # releasing a lease it lost leaves the new holder alone

    vanishing.run(come_back(), 30)

    async def still_held() -> None:
        third = SharedSlots(store(), "test/two", 2, max_wait_seconds=0.5)
        async with third.slot("Test"):
            with pytest.raises(UpstreamThrottled):
                async with third.slot("Test"):
                    pass
        await third.aclose()
        await held_here.aclose()
        await pool.aclose()

    survivor.run(still_held(), 60)


def windows_within(times: list[float], window: float, limit: int) -> bool:
    times = sorted(times)
    return all(sum(1 for later in times[i:] if later - start < window) <= limit for i, start in enumerate(times))


def test_two_instances_share_one_rate_budget_and_no_window_holds_more_than_the_limit(hosts):
    lock = threading.Lock()
    granted: list[float] = []

    async def instance(number: int) -> SharedRateBudget:
        budget = SharedRateBudget(store(), "test/budget", 20, 2.0, chunk=5, ticket_seconds=0.5,
                                  clock_skew_seconds=0.1)

        async def sender() -> None:
            for _ in range(5):
                await budget.acquire("Test")
                with lock:
                    granted.append(time.monotonic())

        await asyncio.gather(*(sender() for _ in range(3)))
        return budget

    budgets = on_each(hosts, instance)
    assert len(granted) == 30 and all(budget.stats.granted == 15 for budget in budgets), \
        "the ten beyond the budget waited for the window to move, none was refused"
    assert windows_within(granted, 2.0, 20), "no 2-second window holds more than 20"
    for budget in budgets:
        claims = budget.stats.writes - budget.stats.conflicts
        assert 15 / 5 <= claims < 15, "tickets are claimed a few at a time (at most five), not one by one"


def test_a_batch_takes_a_ticket_for_each_of_its_operations_and_no_window_holds_more(hosts):
    granted: list[float] = []

    async def instance(number: int) -> SharedRateBudget:
        budget = SharedRateBudget(store(), "test/batches", 30, 2.0, chunk=10, ticket_seconds=0.5,
                                  clock_skew_seconds=0.1)
        for _ in range(3):
            await budget.acquire("Test", 12)  # a $batch of 12 operations
            granted.extend([time.monotonic()] * 12)
        return budget

    budgets = on_each(hosts, instance)
    assert len(granted) == 72 and all(budget.stats.granted == 36 for budget in budgets)
    assert windows_within(granted, 2.0, 30), "no 2-second window holds more than 30 operations"


def test_a_batch_bigger_than_a_claim_is_sent_on_tickets_of_one_claim_never_on_stale_ones(hosts):
    async def scenario(number: int) -> SharedRateBudget:
        budget = SharedRateBudget(store(), "test/one-claim", 30, 60.0, chunk=10, ticket_seconds=60.0)
        await budget.acquire("Test", 3)
        await budget.acquire("Test", 12)  # 7 tickets left are not enough: a fresh claim holds all 12
        return budget

    async def too_big() -> None:
        await SharedRateBudget(store(), "test/one-claim", 30, 60.0).acquire("Test", 31)

    [budget] = on_each(hosts[:1], scenario)
    assert budget.stats.granted == 15 and budget.stats.claims == 2
    with pytest.raises(ValueError):
        hosts[0].run(too_big(), 30)


def test_a_request_beyond_the_shared_budget_is_held_back_for_later_on_every_instance(hosts):
    async def two_then_refused(number: int) -> UpstreamThrottled:
        budget = SharedRateBudget(store(), "test/small", 2, 60.0, ticket_seconds=1.0)
        if number == 0:
            for _ in range(2):
                await budget.acquire("Business Central")
        with pytest.raises(UpstreamThrottled) as refused:
            await budget.acquire("Business Central")
        return refused.value

    first, second = hosts
    refusals = [first.run(two_then_refused(0), 30), second.run(two_then_refused(1), 30)]
    for refused in refusals:
        assert refused.code == "ClientRateBudget" and refused.status is None, "certainly not sent"
        assert MAX_BUDGET_WAIT_SECONDS < refused.retry_after <= 60 + 1 + 1


@contextmanager
def knobs(plan, **changes):
    """The simulator's knobs changed for the block, then as they were (they outlive a test)."""
    before = {name: getattr(plan.knobs, name) for name in changes}
    plan.configure(**changes)
    try:
        yield
    finally:
        plan.configure(**before)


def hammer(hosts, requests_per_instance: int, call) -> list:
    async def instance(number: int):
        return await asyncio.gather(*(call() for _ in range(requests_per_instance)))

    return on_each(hosts, instance)


def test_two_instances_hammering_one_mailbox_meet_bookings_limit_without_a_429(world, hosts):
    business = world.business_ids[0]
    with knobs(world.graph.plan, latency_ms=20):  # under Graph's limits: four at once, the fifth a 429
        answers = hammer(hosts, 24, lambda: runtime().graph.get_business(business))
    stats = world.graph.plan.stats
    assert sum(len(each) for each in answers) == 48
    assert stats.faults["429"] == 0
    assert stats.peak_in_flight[business.lower()] == 4, "four at once from both instances together, never more"


def test_per_process_limits_alone_overrun_the_mailbox(world, hosts):
    """What the shared slots prevent: each instance keeps its own four, the mailbox gets eight."""
    from shared.upstream.auth import token_provider
    from shared.upstream.graph import GraphClient
    from shared.settings import GRAPH_SCOPE, get_settings

    business = world.business_ids[0]

    async def instance(number: int) -> None:
        settings = get_settings()
        api = ApiClient("Graph", token_provider(settings).source(GRAPH_SCOPE), timeout=5,
                        max_concurrency=MAILBOX_CONCURRENCY, max_attempts=1)
        graph = GraphClient(api, settings.graph_base_url)
        await asyncio.gather(*(graph.get_business(business) for _ in range(16)), return_exceptions=True)
        await api.aclose()

    with knobs(world.graph.plan, latency_ms=100):
        on_each(hosts, instance)
    stats = world.graph.plan.stats
    assert stats.peak_in_flight[business.lower()] > 4 and stats.faults["429"] > 0


def test_two_instances_share_business_centrals_five_slots_and_its_budget(world, hosts):
    with knobs(world.bc.plan, latency_ms=20):
        answers = hammer(hosts, 20, lambda: runtime().bc.company())
    stats = world.bc.plan.stats
    assert sum(len(each) for each in answers) == 40 and stats.faults["429"] == 0
    # BC queues what is over its five (up to 95) rather than refusing it: only the peak shows it.
    assert stats.peak_in_flight[f"/{TENANT}/{ENVIRONMENT}".lower()] == 5, \
        "five at once from both instances together, never more"

    async def tickets() -> int:
        return runtime().bc.api.budget.stats.granted

    assert [host.run(tickets(), 10) for host in hosts] == [20, 20], "every request drew on the shared budget"


def test_two_busy_instances_take_turns_with_a_slot_instead_of_one_keeping_it(hosts):
    served_by: list[int] = []

    async def instance(number: int) -> int:
        pool = SharedSlots(store(), "test/turns", 1, idle_seconds=5.0, max_hold_seconds=0.3, max_wait_seconds=20)
        deadline = time.monotonic() + 6.0
        served = 0
        try:
            while time.monotonic() < deadline:  # always busy: without turns it would keep the slot
                async with pool.slot("Test"):
                    served_by.append(number)
                    served += 1
                    await asyncio.sleep(0.01)
        finally:
            await pool.aclose()
        return served

    served = on_each(hosts, instance)

    assert all(count > 0 for count in served), served
    turns = sum(1 for a, b in itertools.pairwise(served_by) if a != b)
    assert turns >= 3, "the slot went back and forth between the instances"


def test_a_lone_busy_instance_keeps_its_slots_past_the_turn_and_pays_storage_by_the_minute_not_by_request(world):
    async def busy() -> tuple[SharedSlots, int]:
        pool = SharedSlots(store(), "test/lone", 2, idle_seconds=5.0, max_hold_seconds=0.2)
        deadline = time.monotonic() + 1.5

        async def worker() -> None:
            while time.monotonic() < deadline:
                async with pool.slot("Test"):
                    await asyncio.sleep(0.002)

        await asyncio.gather(*(worker() for _ in range(6)))
        held = pool.held
        await pool.aclose()
        return pool, held

    pool, held = world.host.run(busy(), 30)
    stats = pool.stats
    assert stats.served > 300 and held == 2
    assert (stats.taken, stats.turns) == (2, 0), "both slots taken once, at once, and kept: nobody else waited"
    assert stats.round_trips - stats.released < 2 + 1.5 / 0.1 + 3, \
        "a lease per slot and a look for waiting instances every half turn, whatever the requests"


def test_ledger_tickets_are_claimed_in_a_block_for_every_request_waiting(world):
    async def burst() -> SharedRateBudget:
        budget = SharedRateBudget(store(), "test/block", 6000, 300.0)
        await asyncio.gather(*(budget.acquire("Test") for _ in range(40)))
        return budget

    budget = world.host.run(burst(), 30)
    assert budget.stats.granted == 40
    assert budget.stats.claims <= 2, "one claim for the first request and one block for the 39 queued behind it"
