"""The shared HTTP client's throttling rules (the end-to-end cases against the simulators are in
test_directory.py and test_invoicing.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.upstream.errors import MAX_BUDGET_WAIT_SECONDS, UpstreamThrottled
from shared.upstream.http import RateBudget


def test_the_rate_budget_lets_the_quota_through_then_holds_work_back_for_later():
    async def scenario() -> UpstreamThrottled:
        budget = RateBudget(limit=3, window_seconds=300)
        for _ in range(3):
            await budget.acquire("Business Central")
        with pytest.raises(UpstreamThrottled) as refused:
            await budget.acquire("Business Central")
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.code == "ClientRateBudget" and refused.status is None, "certainly not sent"
    assert MAX_BUDGET_WAIT_SECONDS < refused.retry_after <= 300, "comes back when the window has room again"


def test_the_rate_budget_waits_briefly_when_the_window_frees_up_soon_and_never_exceeds_the_quota():
    async def scenario() -> list[float]:
        budget = RateBudget(limit=2, window_seconds=0.05)
        sent = []
        for _ in range(6):
            await budget.acquire("Business Central")
            sent.append(time.monotonic())
        return sent

    sent = asyncio.run(scenario())
    assert len(sent) == 6, "short waits are waited, not refused"
    assert all(later - earlier >= 0.045 for earlier, later in zip(sent, sent[2:], strict=False)), \
        "any three requests span at least one window: never more than two inside one"

