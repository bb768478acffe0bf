"""A named lease, so overlapping runs (timer + webhook, two instances) never work on the same
thing at once: a blob lease on `locks/<name>` in the app's container, as the Functions host
keeps its singleton locks.

A lease lasts `LEASE_SECONDS` (or the shorter duration its taker asks for: the shared request
slots of `shared/upstream/limits.py` take 15 s, so a crashed instance's slots come back quickly) and its
holder renews it in the background every third of that for as long as it runs, however long that
is. A holder that crashes stops renewing, so its lease runs out within its duration and the next
run takes over. Blob leases cost no table write: an unchanged sync leaves the tables untouched."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import BlobLeaseClient

from shared.storage.store import Store

log = logging.getLogger(__name__)

LEASE_SECONDS = 60
"""How long a lease outlives its last renewal, unless its taker asks for less."""
SHORTEST_SECONDS, LONGEST_SECONDS = 15, 60
"""What Azure allows for a finite lease (infinite ones are never taken here: they outlive a crash)."""
RENEW_SECONDS = 20.0
"""A third of `LEASE_SECONDS` (a shorter lease is renewed in proportion): two renewals may fail
(a passing storage error) before it runs out."""
TAKEN = "LeaseAlreadyPresent"
LOST = ("LeaseIdMismatchWithLeaseOperation", "LeaseNotPresentWithLeaseOperation", "LeaseLost")


@dataclass
class Lease:
    name: str
    owner: str
    """The blob lease id: only the holder that knows it can renew or release the lease."""
    seconds: int = LEASE_SECONDS
    renewed_at: float = field(default_factory=time.monotonic)
    """`time.monotonic()` when the last successful acquire or renewal was sent: the lease holds at
    least `seconds` after it."""
    lost: bool = False
    """A renewal found that another holder has the name: this lease cannot be won back."""
    renewals: int = 0
    """Renewals sent (storage round trips while held)."""
    renewing: asyncio.Task | None = field(default=None, repr=False)


def _lock(store: Store, name: str, owner: str) -> BlobLeaseClient:
    return BlobLeaseClient(store.blob(f"locks/{name}"), lease_id=owner)


async def acquire(store: Store, name: str, seconds: int = LEASE_SECONDS) -> Lease | None:
    """Take the lease for `seconds` (15 to 60) and keep it renewed until `release`, or None if
    someone else holds it."""
    if not SHORTEST_SECONDS <= seconds <= LONGEST_SECONDS:
        raise ValueError(f"a lease lasts {SHORTEST_SECONDS} to {LONGEST_SECONDS} seconds, not {seconds}")
    owner = str(uuid.uuid4())
    sent = time.monotonic()
    try:
        await _take(store, name, owner, seconds)
    except HttpResponseError as error:
        if error.error_code == TAKEN:
            return None
        raise
    lease = Lease(name, owner, seconds, renewed_at=sent)
    lease.renewing = asyncio.create_task(_keep_renewed(store, lease), name=f"renew lease {name}")
    return lease


async def _take(store: Store, name: str, owner: str, seconds: int) -> None:
    """Acquire, creating the lock blob the first time a name is ever used."""
    try:
        await _lock(store, name, owner).acquire(lease_duration=seconds)
    except ResourceNotFoundError:
        try:
            await store.write_blob(f"locks/{name}", b"", "application/octet-stream", overwrite=False)
        except ResourceExistsError:
            pass  # another worker created it at the same moment; the lease decides between us
        await _lock(store, name, owner).acquire(lease_duration=seconds)


async def _keep_renewed(store: Store, lease: Lease) -> None:
    while not lease.lost:
        await asyncio.sleep(RENEW_SECONDS * lease.seconds / LEASE_SECONDS)
        await renew(store, lease)


async def renew(store: Store, lease: Lease) -> bool:
    """Extend the lease to its full duration from now (Azure keeps the one it was taken for). A
    failure is logged, not raised: a passing one is retried on the next round, well before the
    lease runs out; a lost lease (the holder stalled past it and another took over) cannot be won
    back, only reported, and marked `lost` so its holder stops counting on it."""
    sent = time.monotonic()
    lease.renewals += 1
    try:
        await _lock(store, lease.name, lease.owner).renew()
        lease.renewed_at = sent
        return True
    except AzureError as error:
        lost = isinstance(error, HttpResponseError) and error.error_code in LOST
        lease.lost = lease.lost or lost
        log.log(logging.ERROR if lost else logging.WARNING, "lease %s could not be renewed: %s", lease.name,
                "another holder has it" if lost else error,
                extra={"event": "lease_renewal_failed", "lease": lease.name, "lost": lost})
        return False


async def release(store: Store, lease: Lease) -> None:
    """Stop renewing and free the name at once (were the release lost, the lease would still run
    out within its duration)."""
    if lease.renewing:
        lease.renewing.cancel()
    try:
        await _lock(store, lease.name, lease.owner).release()
    except HttpResponseError as error:
        if error.error_code not in LOST:
            raise


class LeaseBusy(Exception):
    pass


@asynccontextmanager
async def held(store: Store, name: str, wait_seconds: float):
    """Hold the lease for the block, waiting up to `wait_seconds` for another holder."""
    deadline = time.monotonic() + wait_seconds
    while (lease := await acquire(store, name)) is None:
        if time.monotonic() > deadline:
            raise LeaseBusy(f"{name} is held by another worker")
        await asyncio.sleep(0.1)
    try:
        yield lease
    finally:
        await release(store, lease)
