"""Claims on bookings: what makes each booking's customer billed exactly once.

A booking row records, per customer e-mail, the job that claimed it (`Claims`) and the invoice
that billed it. A job claims every open customer of its bookings with ETag-guarded table
transactions (per partition, at most 100) before anything is queued; a transaction that loses a
race is read again and retried, so two jobs (two requests, two instances) can never both hold
one customer of one booking. The worker records each invoice on its bookings the same way, and a
job that fails or dies gives its claims back (`release`)."""

from __future__ import annotations

import asyncio
from datetime import datetime

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError

from shared.flows.bookings import FREE, Booking
from shared.storage.store import BOOKINGS, MAX_BATCH, UPDATE, Store

_IF_NOT_MODIFIED = MatchConditions.IfNotModified

CLAIM_ATTEMPTS = 6


def _refs(bookings: list[Booking]) -> list[list[str]]:
    return [[b.partition_key, b.row_key] for b in bookings]


async def _read(store: Store, refs: list[list[str]]) -> list[Booking | None]:
    """Current bookings for [partition, row] references, in order (None: gone); a few
    queries per partition rather than a read per booking."""
    by_partition: dict[str, list[str]] = {}
    for partition, row in refs:
        by_partition.setdefault(partition, []).append(row)
    found: dict[tuple[str, str], dict] = {}
    for partition, rows in zip(by_partition, await asyncio.gather(*(
            store.get_many(BOOKINGS, partition, keys) for partition, keys in by_partition.items())), strict=True):
        found |= {(partition, key): row for key, row in rows.items()}
    return [Booking.from_entity(found[(p, r)]) if (p, r) in found else None for p, r in refs]


async def _apply(store: Store, bookings: list[Booking], change, attempts: int = CLAIM_ATTEMPTS
                 ) -> tuple[list[Booking], dict[str, str]]:
    """Apply `change(booking) -> problem | None` to each booking and write the invoicing fields
    back with ETag-guarded transactions (≤ 100 per partition). A transaction that loses a race is
    re-read and retried. Returns the bookings written and the problems by booking id."""
    written: list[Booking] = []
    problems: dict[str, str] = {}
    by_partition: dict[str, list[Booking]] = {}
    for booking in bookings:
        by_partition.setdefault(booking.partition_key, []).append(booking)
    chunks = [group[i:i + MAX_BATCH] for group in by_partition.values() for i in range(0, len(group), MAX_BATCH)]
    gate = asyncio.Semaphore(16)

    async def run(chunk: list[Booking]) -> None:
        async with gate:
            for attempt in range(attempts):
                operations = []
                ready = []
                for booking in chunk:
                    problem = change(booking)
                    if problem:
                        problems[booking.id] = problem
                    else:
                        ready.append(booking)
                        operations.append((UPDATE, booking.invoice_fields(),
                                           {"mode": "merge", "etag": booking.etag,
                                            "match_condition": _IF_NOT_MODIFIED}))
                if not operations:
                    return
                try:
                    answers = await store.transact(BOOKINGS, operations)
                    for booking, answer in zip(ready, answers, strict=True):
                        booking.etag = answer.get("etag") or booking.etag
                    written.extend(ready)
                    return
                except (TableTransactionError, ResourceModifiedError, ResourceNotFoundError):
                    fresh = await _read(store, _refs(ready))
                    chunk = []
                    for old, new in zip(ready, fresh, strict=False):
                        if new is None:
                            problems[old.id] = "the booking no longer exists"
                        else:
                            chunk.append(new)
                    await asyncio.sleep(0.05 * (attempt + 1))
            for booking in chunk:
                problems.setdefault(booking.id, "the booking kept changing; try again")

    await asyncio.gather(*(run(chunk) for chunk in chunks))
    return written, problems


def claimable(now: datetime, invoice_free: bool):
    def check(booking: Booking) -> str | None:
        if booking.cancelled:
            return "cancelled"
        if booking.end >= now:
            return "has not ended yet"
        if booking.missing_email:
            return "customer has no e-mail"
        if booking.price_type == FREE and not invoice_free:
            return "free appointment"
        if not booking.open_emails():
            held = set(booking.claims.values())
            return f"being invoiced by job {sorted(held)[0]}" if held else "already invoiced"
        return None
    return check


async def claim(store: Store, job_id: str, bookings: list[Booking], now: datetime,
                invoice_free: bool) -> tuple[list[Booking], dict[str, str]]:
    """Claim every open customer of each booking for `job_id`."""
    check = claimable(now, invoice_free)

    def take(booking: Booking) -> str | None:
        problem = check(booking)
        if problem is None:
            for email in booking.open_emails():
                booking.claims[email] = job_id
        return problem

    return await _apply(store, bookings, take)


async def release(store: Store, job_id: str, refs: list[list[str]], email: str | None = None) -> int:
    """Give back the claims `job_id` holds (for one customer, or all) on these bookings."""
    current = [b for b in await _read(store, refs) if b is not None]

    def drop(booking: Booking) -> str | None:
        mine = [e for e, j in booking.claims.items() if j == job_id and (email is None or e == email)]
        if not mine:
            return "nothing to release"
        for e in mine:
            del booking.claims[e]
        return None

    written, _ = await _apply(store, current, drop)
    return len(written)
