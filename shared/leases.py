"""A named lease in Table Storage, so overlapping runs (timer + webhook, two instances) never
work on the same thing at once. Taken by insert or by an ETag-guarded takeover of an expired
lease; a crashed holder's lease simply expires."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from shared.store import LEASES, Store, encode_key

PARTITION = "lease"


@dataclass
class Lease:
    name: str
    owner: str
    etag: str


async def acquire(store: Store, name: str, ttl: timedelta) -> Lease | None:
    """Take the lease, or None if someone else holds an unexpired one."""
    owner = uuid.uuid4().hex
    now = datetime.now(timezone.utc)
    entity = {"PartitionKey": PARTITION, "RowKey": encode_key(name), "Owner": owner,
              "TakenAt": now, "ExpiresAt": now + ttl}
    try:
        result = await store.insert(LEASES, entity)
        return Lease(name, owner, result["etag"])
    except ResourceExistsError:
        pass
    current = await store.get(LEASES, PARTITION, encode_key(name))
    if current is None:
        return None
    expires = current["ExpiresAt"]
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    if expires > now:
        return None
    try:
        result = await store.update(LEASES, entity, current.metadata["etag"], merge=False)
    except (ResourceModifiedError, ResourceNotFoundError):
        return None
    return Lease(name, owner, result["etag"])


async def release(store: Store, lease: Lease) -> None:
    try:
        await store.delete(LEASES, PARTITION, encode_key(lease.name), etag=lease.etag)
    except (ResourceModifiedError, ResourceNotFoundError):
        pass


class LeaseBusy(Exception):
    pass


@asynccontextmanager
async def held(store: Store, name: str, ttl: timedelta, wait_seconds: float):
    """Hold the lease for the block, waiting up to `wait_seconds` for another holder."""
    deadline = time.monotonic() + wait_seconds
    while (lease := await acquire(store, name, ttl)) is None:
        if time.monotonic() > deadline:
            raise LeaseBusy(f"{name} is held by another worker")
        await asyncio.sleep(0.1)
    try:
        yield lease
    finally:
        await release(store, lease)
