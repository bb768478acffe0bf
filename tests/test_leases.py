"""Named leases as blob leases, against the real Azurite blob service."""

from __future__ import annotations

import asyncio
import logging

import pytest
from azure.storage.blob.aio import BlobLeaseClient

from shared.storage import leases
from shared.runtime import runtime


def run(world, coroutine):
    return world.host.run(coroutine, timeout=60)


async def store():
    return await runtime().store()


def test_only_one_of_two_acquirers_wins_and_a_release_lets_the_other_in(world):
    async def scenario():
        s = await store()
        first, second = await asyncio.gather(leases.acquire(s, "job"), leases.acquire(s, "job"))
        winner = first or second
        assert winner is not None and (first is None or second is None), "exactly one holds it"
        assert await leases.acquire(s, "job") is None
        assert await leases.acquire(s, "other") is not None, "names are independent"
        await leases.release(s, winner)
        again = await leases.acquire(s, "job")
        assert again is not None and again.owner != winner.owner
        await leases.release(s, again)

    run(world, scenario())


def test_a_lease_is_finite_so_a_crashed_holder_frees_the_name(world):
    async def scenario():
        s = await store()
        lease = await leases.acquire(s, "sync")
        properties = await s.blob("locks/sync").get_blob_properties()
        await leases.release(s, lease)
        return properties.lease

    lease = run(world, scenario())
    assert (lease.state, lease.duration) == ("leased", "fixed"), "never an infinite lease"


def test_the_holder_keeps_renewing_until_it_releases(world, monkeypatch):
    """The renewal round is shortened from 20 s to a moment; every renewal is a real one."""
    monkeypatch.setattr(leases, "RENEW_SECONDS", 0.05)
    renewals: list[bool] = []
    real_renew = leases.renew

    async def counted(store, lease):
        renewals.append(await real_renew(store, lease))
        return renewals[-1]

    monkeypatch.setattr(leases, "renew", counted)

    async def scenario():
        s = await store()
        async with leases.held(s, "sync", wait_seconds=0) as lease:
            while len(renewals) < 3:
                await asyncio.sleep(0.05)
            assert await leases.acquire(s, "sync") is None, "still held after three renewals"
        assert lease.renewing.done(), "renewing stops with the release"
        settled = len(renewals)
        await asyncio.sleep(0.2)
        assert len(renewals) == settled
        other = await leases.acquire(s, "sync")
        assert other is not None
        await leases.release(s, other)

    run(world, scenario())
    assert all(renewals) and len(renewals) >= 3


def test_a_lease_lost_to_another_holder_is_reported_not_renewed(world, caplog):
    caplog.set_level(logging.WARNING, logger="shared.storage.leases")

    async def scenario():
        s = await store()
        lease = await leases.acquire(s, "sync")
        # The holder stalled past its lease and another took over (broken at once here).
        await BlobLeaseClient(s.blob("locks/sync")).break_lease(lease_break_period=0)
        other = await leases.acquire(s, "sync")
        assert other is not None
        renewed = await leases.renew(s, lease)
        await leases.release(s, lease)
        assert await leases.acquire(s, "sync") is None, "releasing a lost lease leaves the new holder alone"
        await leases.release(s, other)
        return renewed

    assert run(world, scenario()) is False
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "lease_renewal_failed"]
    assert record.levelno == logging.ERROR and record.lost


def test_held_waits_for_the_other_holder_then_gives_up(world):
    async def scenario():
        s = await store()
        lease = await leases.acquire(s, "directory-items")
        with pytest.raises(leases.LeaseBusy):
            async with leases.held(s, "directory-items", wait_seconds=0.3):
                pass

        async def release_soon():
            await asyncio.sleep(0.3)
            await leases.release(s, lease)

        releasing = asyncio.create_task(release_soon())
        async with leases.held(s, "directory-items", wait_seconds=10) as mine:
            assert releasing.done() and mine.owner != lease.owner

    run(world, scenario())


def test_a_lease_may_be_shorter_but_never_outside_what_azure_allows(world):
    async def scenario():
        s = await store()
        lease = await leases.acquire(s, "short", seconds=15)
        assert lease.seconds == 15 and await leases.renew(s, lease)
        assert await leases.acquire(s, "short") is None
        await leases.release(s, lease)
        for seconds in (14, 61, -1):  # -1 would be Azure's infinite lease, which outlives a crash
            with pytest.raises(ValueError):
                await leases.acquire(s, "short", seconds=seconds)

    run(world, scenario())
