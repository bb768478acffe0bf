"""Claims on link rows: how two workers never create the same BC customer or item.

A worker takes a link row (insert, or an ETag-guarded replace) before it looks BC up or creates
anything; a fresh claim of another worker (younger than `CLAIM_STALE_AFTER`) is waited for, a
stale one taken over. The claim records since when a create may have been sent (`PendingSince`),
so whoever comes next waits until that create cannot be running any more before creating
again. Links, waits and failures are written under the claim's ETag."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError

from shared.flows.directory.customer_fields import Mapped
from shared.flows.directory.links import Kind, Link, link_partition, masked, stored_time
from shared.flows.messages import kept_by_an_earlier_business, same_source_data
from shared.runtime import Runtime
from shared.storage.store import CREATE, MAX_BATCH, UPDATE, Store, encode_key, fit_string
from shared.upstream.bc import Wait

log = logging.getLogger(__name__)

CLAIM_STALE_AFTER = timedelta(seconds=90)


@dataclass
class Wanted:
    """One customer/item to resolve: its key, the Bookings fields, and how BC would know it."""
    key: str
    mapped: Mapped
    lookup: str
    source_hash: str | None = None


@dataclass(frozen=True)
class Claim:
    """A link row taken by this worker: its ETag, and since when an earlier worker may have sent
    a create for it (None: certainly never, or its outcome is known)."""
    etag: str
    earlier_pending: datetime | None
    at: datetime
    attempts: int = 0
    """Attempts that ended without a known outcome so far (see `Wait.attempt`)."""
    confirming: datetime | None = None
    """Since when an earlier create's outcome is unknown (BC is being asked to confirm it)."""


class LinkClaims:
    """The link rows of one BC company, taken and written by one worker: each customer or item is
    claimed (ETag-guarded) before BC is asked about it, so two workers never create the same
    record; the claim records since when a create may have been sent (`PendingSince`), and the
    outcome (linked, waiting for BC to confirm, failed) is written under the claim's ETag."""

    def __init__(self, rt: Runtime, store: Store, company: str | None):
        self.rt, self.store = rt, store
        self.company = company
        self.owner = uuid.uuid4().hex
        self._claimed_for: dict[str, str] = {}
        """The Bookings data (`SourceHash`) each key is resolved for: written on its claim."""

    def _pk(self, kind: Kind) -> str:
        """The link rows' partition of this resolver's company."""
        return link_partition(kind, self.company, self.rt.settings)

    def _made_by_another(self, row: dict | None, want: Wanted, now: datetime) -> bool:
        """A fresh claim of another worker that came from the same Bookings data (another
        business's sync queued the same customer): nothing for this message to wait for. Were
        that worker to fail, the next sync queues the record again."""
        return bool(row and want.source_hash and self._claimed_by_another(row, now)
                    and same_source_data(row.get("ClaimedFor"), want.source_hash))

    def _claimed_by_another(self, row: dict, now: datetime) -> bool:
        """Another worker holds a fresh claim on the link row."""
        claimed_at = row.get("ClaimedAt")
        return bool(row.get("Status") == "linking" and row.get("Owner") != self.owner and claimed_at
                    and now - claimed_at < CLAIM_STALE_AFTER)

    def _changed_since(self, recorded: str | None, incoming: str | None) -> bool:
        """Whether Bookings data differs from what the link row records: not when it is the
        same data (from whichever business), nor when an earlier business keeps the record."""
        return bool(incoming) and recorded != incoming and not same_source_data(recorded, incoming) and \
            not kept_by_an_earlier_business(recorded, incoming, self.rt.settings.business_ids)

    async def _record_links(self, kind: Kind, found: list[tuple[Wanted, dict, str]], claims: dict[str, Claim]
                            ) -> dict[str, Link]:
        """Write the links (one transaction per 100, guarded by our claims' ETags)."""
        now = datetime.now(timezone.utc)
        entities = {}
        for want, record, origin in found:
            entity = {"PartitionKey": self._pk(kind), "RowKey": encode_key(want.key), "Key": want.key,
                      "Status": "linked", "BcId": record["id"], "BcNumber": record.get("number") or "",
                      "Origin": origin, "Owner": "", "LastError": "", "UpdatedAt": now, "PendingSince": "",
                      "WaitUntil": "", "Attempts": 0, "LeftOut": fit_string(want.mapped.summary(), 4000)}
            if want.source_hash:
                entity["SourceHash"] = want.source_hash
            entities[want.key] = entity
            left_out = sorted(want.mapped.left_out)
            log.info("%s %s %s as %s%s", kind.name, origin, masked(want.key), record.get("number"),
                     f" without {', '.join(left_out)}" if left_out else "",
                     extra={"event": f"{kind.name}_{origin}", "bc_id": record["id"], "left_out": ",".join(left_out)})
        keys = list(entities)
        for start in range(0, len(keys), MAX_BATCH):
            chunk = keys[start:start + MAX_BATCH]
            try:
                await self.store.transact(kind.table, [
                    (UPDATE, entities[key], {"mode": "merge", "etag": claims[key].etag,
                                             "match_condition": MatchConditions.IfNotModified}) for key in chunk])
                continue
            except (TableTransactionError, ResourceModifiedError, ResourceNotFoundError):
                pass
            for key in chunk:
                try:
                    await self.store.update(kind.table, entities[key], etag=claims[key].etag)
                except (ResourceModifiedError, ResourceNotFoundError):
                    # We were slow and another worker took over the claim: it finds this record in BC.
                    log.warning("lost the claim on %s %s after linking it", kind.name, masked(key))
        return {want.key: Link(want.key, record["id"], record.get("number"), origin) for want, record, origin in found}

    def _claim_operation(self, kind: Kind, key: str, row: dict | None, now: datetime) -> tuple | None:
        """The table operation that takes a link row for this worker; None if another worker
        holds a fresh claim on it. The claim marks a create as possibly sent from now on."""
        claim = {"PartitionKey": self._pk(kind), "RowKey": encode_key(key), "Key": key, "Status": "linking",
                 "Owner": self.owner, "ClaimedAt": now, "PendingSince": now.isoformat(),
                 "ClaimedFor": self._claimed_for.get(key, "")}
        if row is None:
            return (CREATE, claim)
        if self._claimed_by_another(row, now):
            return None
        return (UPDATE, claim, {"mode": "replace", "etag": row.metadata["etag"],
                                "match_condition": MatchConditions.IfNotModified})

    async def _claim_all(self, kind: Kind, rows: dict[str, dict | None]) -> dict[str, Claim]:
        """Claim many link rows in one transaction (they share a partition); if another worker
        got in between, claim them one by one."""
        now = datetime.now(timezone.utc)
        operations = {key: op for key, row in rows.items() if (op := self._claim_operation(kind, key, row, now))}
        earlier = {key: stored_time(row.get("PendingSince")) if row else None for key, row in rows.items()}
        attempts = {key: int(row.get("Attempts") or 0) if row else 0 for key, row in rows.items()}
        confirming = {key: stored_time(row.get("ConfirmSince")) if row else None for key, row in rows.items()}
        claimed: dict[str, Claim] = {}
        keys = list(operations)
        for start in range(0, len(keys), MAX_BATCH):
            chunk = keys[start:start + MAX_BATCH]
            try:
                answers = await self.store.transact(kind.table, [operations[key] for key in chunk])
                claimed |= {key: Claim(answer["etag"], earlier[key], now, attempts[key], confirming[key])
                            for key, answer in zip(chunk, answers, strict=True)}
                continue
            except (TableTransactionError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                pass
            for key in chunk:
                etag = await self._claim_one(kind, operations[key])
                if etag:
                    claimed[key] = Claim(etag, earlier[key], now, attempts[key], confirming[key])
        return claimed

    async def _claim_new(self, kind: Kind, keys: list[str]) -> dict[str, Claim]:
        """Claim link rows by inserting them, one transaction per 100, without reading first. A
        transaction fails whole if any of its rows exists: its keys are left to the read path."""
        now = datetime.now(timezone.utc)
        claimed: dict[str, Claim] = {}
        for start in range(0, len(keys), MAX_BATCH):
            chunk = keys[start:start + MAX_BATCH]
            try:
                answers = await self.store.transact(kind.table, [self._claim_operation(kind, key, None, now)
                                                                 for key in chunk])
            except (TableTransactionError, ResourceExistsError):
                continue
            claimed |= {key: Claim(answer["etag"], None, now) for key, answer in zip(chunk, answers, strict=True)}
        return claimed

    async def _claim_one(self, kind: Kind, operation: tuple) -> str | None:
        try:
            if operation[0] == CREATE:
                return (await self.store.insert(kind.table, operation[1]))["etag"]
            return (await self.store.update(kind.table, operation[1], etag=operation[2]["etag"], merge=False))["etag"]
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
            return None

    async def _mark_waiting(self, kind: Kind, key: str, wait: Wait, claim: Claim) -> None:
        log.warning("%s %s waits until %s: %s", kind.name, masked(key), wait.until.isoformat(), wait.reason,
                    extra={"event": f"{kind.name}_waiting"})
        try:
            await self.store.update(kind.table, {
                "PartitionKey": self._pk(kind), "RowKey": encode_key(key), "Key": key, "Status": "waiting",
                "Owner": "", "WaitUntil": wait.until.isoformat(), "LastError": wait.reason[:2000],
                "PendingSince": wait.pending_since.isoformat() if wait.pending_since else "",
                "ConfirmSince": wait.confirming_since.isoformat() if wait.confirming_since else "",
                "Attempts": claim.attempts + (1 if wait.attempt else 0),
                "UpdatedAt": datetime.now(timezone.utc)}, etag=claim.etag)
        except (ResourceModifiedError, ResourceNotFoundError):
            pass

    async def _mark_failed(self, kind: Kind, row_key: str, key: str, reason: str, etag: str | None,
                           pending_since: datetime | None) -> None:
        try:
            await self.store.update(kind.table, {"PartitionKey": self._pk(kind), "RowKey": row_key, "Key": key,
                                                 "Status": "failed", "Owner": "", "LastError": reason[:2000],
                                                 "PendingSince": pending_since.isoformat() if pending_since else "",
                                                 "Attempts": 0, "UpdatedAt": datetime.now(timezone.utc)}, etag=etag)
        except (ResourceModifiedError, ResourceNotFoundError):
            pass
