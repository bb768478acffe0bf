"""Claims always end: crashes while claiming or queueing are repaired by the next sync."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from shared.flows.invoicing.reconcile import recover_stale_claims
from shared.runtime import runtime
from tests.test_invoicing import appointment, invoice, uninvoiced


def recover(world, minutes_later: int) -> dict:
    async def run():
        rt = runtime()
        return await recover_stale_claims(rt, await rt.store(), datetime.now(timezone.utc) + timedelta(minutes=minutes_later))
    return world.host.run(run())


def test_a_crash_while_claiming_is_released_once_the_claim_is_stale(world, monkeypatch):
    ids = [appointment(world, hours_ago=30 + i) for i in range(3)]
    world.sync()
    import shared.flows.invoicing.jobs as invoicing

    def crash(*args, **kwargs):
        raise RuntimeError("process died while claiming")

    with monkeypatch.context() as patch:
        patch.setattr(invoicing, "group_by_customer", crash)
        assert invoice(world, {"bookingIds": ids}).status_code == 500
    assert uninvoiced(world)["value"] == [], "claimed by the crashed request"

    assert recover(world, 1)["staleClaimsReleased"] == 0, "a fresh claim may still be in progress"
    assert recover(world, 20)["staleClaimsReleased"] == 3
    assert sorted(r["id"] for r in uninvoiced(world)["value"]) == sorted(ids)


def test_a_job_whose_messages_were_lost_is_queued_again_and_completes_once(world, monkeypatch):
    ids = [appointment(world, hours_ago=30 + i) for i in range(2)]
    world.sync()
    from shared.storage.store import Store

    real_send_many = Store.send_many

    async def lose(self, queue, messages, concurrency=16):
        if queue == "invoice-jobs":
            raise ConnectionError("queue unreachable")
        return await real_send_many(self, queue, messages, concurrency)

    with monkeypatch.context() as patch:
        patch.setattr(Store, "send_many", lose)
        assert invoice(world, {"bookingIds": ids}).status_code == 500
    world.host.drain()
    assert world.bc.invoices(world.company_id) == []

    assert recover(world, 45)["partsRequeued"] == 1
    world.host.drain()
    assert recover(world, 90)["partsRequeued"] == 0

    [draft] = world.bc.invoices(world.company_id)
    assert len(draft["salesInvoiceLines"]) == 2
    assert uninvoiced(world)["value"] == []
