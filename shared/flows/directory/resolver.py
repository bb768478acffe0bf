"""Resolving Bookings customers and services to BC customers and service items, exactly once.

Each customer (by normalised e-mail) and each service (by id) has a link row. Resolving claims
the row with an ETag (`claims`) before it looks BC up or creates anything, so two workers never
create the same customer; a create whose answer was lost is found again by e-mail (items: by
name) before it is repeated. New records get the named template's defaults (`templates`),
overridden by the Bookings fields; existing BC records keep their values (only blanks are
filled). The same resolution serves the queue-triggered upsert (`upsert_from_message`) and the
invoice worker, so no booking ever needs manual linking."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from datetime import datetime, timedelta, timezone

from azure.core.exceptions import ResourceModifiedError

from shared.flows.directory.claims import Claim, LinkClaims, Wanted
from shared.flows.directory.customer_fields import Countries, Mapped, drop_refused, map_customer, minimal
from shared.flows.directory.links import CUSTOMER, ITEM, Kind, Link, company_scoped, link_of, masked, stored_time
from shared.flows.directory.templates import template_defaults
from shared.flows.messages import (
    CustomerBatchUpsert,
    CustomerSource,
    CustomerUpsert,
    Deferred,
    DirectoryUpsertMessage,
    PermanentFailure,
    ServiceSource,
    throttled_wait,
)
from shared.hostconfig import queue_settings
from shared.runtime import Runtime
from shared.storage import leases
from shared.storage.store import Store, encode_key, to_json
from shared.upstream.bc import BcClient, Wait, explain_refusal
from shared.upstream.errors import NOT_RUN_STATUS, UpstreamAmbiguous, UpstreamConflict, UpstreamError, UpstreamThrottled
from shared.upstream.utf16 import cut

log = logging.getLogger(__name__)

ITEM_NAME_UNITS = 100
"""Item "Description" is Text[100]: UTF-16 units, as BC counts."""

ITEMS_IN_FLIGHT = "directory/items-in-flight.json"
"""Item names whose create may still be running in BC, and since when: `Resolver._names_in_flight`."""

WAIT_FOR_OTHER_SECONDS = 45.0
CREATE_ROUNDS = 3
"""A customer refused for a field is created again without it: at most this many tries."""
MAX_ATTEMPTS = queue_settings().max_dequeue_count
"""Creates without a known outcome before BC is taken to be failing: as often as a message is tried."""


class LinkBusy(Exception):
    """Another worker is resolving the same customer/item right now; retry later."""


def item_fields(source: ServiceSource) -> dict:
    return {"displayName": cut(source.display_name.strip(), ITEM_NAME_UNITS).strip(),
            "unitPrice": round(source.default_price, 2)}


def new_record(kind: Kind, defaults: dict, mapped: dict) -> dict:
    """Template defaults, then the Bookings fields (which win), then the fixed type."""
    fields = {**defaults, **mapped}
    fields["type"] = "Person" if kind is CUSTOMER else "Service"
    return fields


def blanks_to_fill(existing: dict, mapped: dict) -> dict:
    """For an existing BC record, BC wins: only empty fields take the Bookings value."""
    return {name: value for name, value in mapped.items()
            if value not in (None, "") and existing.get(name) in (None, "")}


_countries_cache: weakref.WeakKeyDictionary[BcClient, tuple[float, asyncio.Future]] = weakref.WeakKeyDictionary()
COUNTRIES_CACHE_SECONDS = 3600.0


async def bc_countries(bc: BcClient) -> Countries:
    """BC's Country/Region table, read at most once an hour per process: the directory workers
    that need it at the same moment (a first sync starts a dozen) share one read, rather than
    each taking one of BC's five slots for it."""
    cached = _countries_cache.get(bc)
    if cached is None or cached[0] <= time.monotonic() or (
            cached[1].done() and (cached[1].cancelled() or cached[1].exception() is not None)):
        cached = _countries_cache[bc] = (time.monotonic() + COUNTRIES_CACHE_SECONDS,
                                         asyncio.ensure_future(_read_countries(bc)))
    return await asyncio.shield(cached[1])


async def _read_countries(bc: BcClient) -> Countries:
    return Countries(await bc.countries())


class Resolver(LinkClaims):
    """Find or create BC records for customers/items, exactly once across workers, in bulk.

    Per call: link rows are read; unlinked ones are claimed (ETag); BC is searched for all of
    them with a few `or` filters; what is missing is created with one `$batch` per batch size.
    The queue-triggered upsert and the invoice worker both resolve through here.

    A create whose outcome is unknown (timeout, lost answer, 408/500/502/504) may have happened or
    may still be running in BC: the link row waits for BC to confirm (`Status` `waiting`,
    `WaitUntil`, `ConfirmSince`), and `Deferred` has the work run again in seconds, then less
    often (`shared.upstream.bc.CONFIRM_DELAYS`), each time looking the record up; it is linked as soon as BC
    shows it. A claimed row records since when a create may have been sent (`PendingSince`): a
    worker that does not find the record creates it only once that create cannot be running any
    more. 429 and 503 mean BC did not run the create: it is sent again after the delay."""

    def __init__(self, rt: Runtime, store: Store, bc: BcClient, expect_new: bool = False):
        """`expect_new`: most records are probably not linked yet (the sync's upserts), so the
        link rows are claimed by insert straight away; a row that exists fails the insert and
        that group is read and claimed the usual way."""
        super().__init__(rt, store, bc.company_id)
        self.bc = bc
        self.expect_new = expect_new

    async def customers(self, entries: list[tuple[CustomerSource, str | None]]) -> dict[str, Link]:
        countries = await bc_countries(self.bc) if any(s.country for s, _ in entries) else None
        wanted = [Wanted(s.email, map_customer(s, countries), s.email, h) for s, h in entries]
        return await self._resolve(CUSTOMER, wanted, self.bc.customers_by_emails)

    async def items(self, entries: list[tuple[ServiceSource, str | None]]) -> dict[str, Link]:
        # Found by the name BC will hold: a name cut to BC's length is looked up as cut.
        wanted = [Wanted(s.service_id, Mapped(fields := item_fields(s)), fields["displayName"], h) for s, h in entries]
        return await self._resolve(ITEM, wanted, self.bc.items_by_names)

    async def _resolve(self, kind: Kind, wanted: list[Wanted], find) -> dict[str, Link]:
        pending = {w.key: w for w in wanted}
        self._claimed_for |= {w.key: w.source_hash for w in wanted if w.source_hash}
        links: dict[str, Link] = {}
        waits: dict[str, Wait] = {}
        deadline = time.monotonic() + WAIT_FOR_OTHER_SECONDS

        async def link(claimed: dict[str, Claim]) -> None:
            """Looks up or creates the records this worker claimed, which are pending no more."""
            if claimed:
                found, waiting = await self._link_claimed(kind, [pending.pop(key) for key in claimed], claimed, find)
                links.update(found)
                waits.update(waiting)

        if self.expect_new:
            await link(await self._claim_new(kind, list(pending)))
        while pending:
            rows = await self.store.get_many(kind.table, self._pk(kind), [encode_key(key) for key in pending])
            now = datetime.now(timezone.utc)
            unlinked: dict[str, dict | None] = {}
            refreshes = []
            for key, want in list(pending.items()):
                row = rows.get(encode_key(key))
                if row and row.get("Status") == "linked" and row.get("BcId"):
                    links[key] = link_of(row)
                    if self._changed_since(row.get("SourceHash"), want.source_hash):
                        refreshes.append(self._refresh(kind, row, links[key], want.mapped.fields, want.source_hash))
                    del pending[key]
                elif row and row.get("Status") == "waiting" and stored_time(row.get("WaitUntil")) \
                        and stored_time(row.get("WaitUntil")) > now:
                    waits[key] = Wait(stored_time(row["WaitUntil"]), stored_time(row.get("PendingSince")),
                                      row.get("LastError") or "waiting for Business Central")
                    del pending[key]
                elif self._made_by_another(row, want, now):
                    del pending[key]  # another worker is making this very record: it records the link
                else:
                    unlinked[key] = row
            await asyncio.gather(*refreshes)  # side by side, within BC's 5 requests at a time
            await link(await self._claim_all(kind, unlinked))
            if pending:
                if time.monotonic() > deadline:
                    raise LinkBusy(f"another worker has been resolving {kind.name} "
                                   f"{', '.join(masked(k) for k in list(pending)[:3])} for too long")
                await asyncio.sleep(0.2)
        if waits:
            until = max(wait.until for wait in waits.values())
            reason = next(iter(waits.values())).reason
            raise Deferred((until - datetime.now(timezone.utc)).total_seconds(),
                           f"{len(waits)} {kind.name}(s) wait until {until:%H:%M:%S} UTC: {reason}")
        return links

    async def _link_claimed(self, kind: Kind, wanted: list[Wanted], claims: dict[str, Claim], find
                            ) -> tuple[dict[str, Link], dict[str, Wait]]:
        if kind is CUSTOMER:
            return await self._find_or_create(kind, wanted, claims, find)
        # Items are known to BC by name, not by the service id their link rows are claimed
        # by: two services of one name (two businesses) must not race to create two items.
        async with leases.held(self.store, company_scoped("directory-items", self.company, self.rt.settings),
                               WAIT_FOR_OTHER_SECONDS):
            return await self._find_or_create(kind, wanted, claims, find)

    async def _find_or_create(self, kind: Kind, wanted: list[Wanted], claims: dict[str, Claim], find
                              ) -> tuple[dict[str, Link], dict[str, Wait]]:
        claimed_at = datetime.now(timezone.utc)
        send_by = self.bc.send_by(min(claim.at for claim in claims.values()))
        failures: dict[str, Exception] = {}
        records: dict[str, tuple[dict, str]] = {}
        waits: dict[str, Wait] = {}
        try:
            found = await find([w.lookup for w in wanted])
            to_create = []
            for want in wanted:
                existing = found.get(want.lookup.strip().lower())
                earlier = claims[want.key].earlier_pending
                if existing:
                    await self._fill_blanks(kind, existing[0], want.mapped.fields)
                    records[want.key] = (existing[0], "linked")
                elif earlier and self.bc.settled_at(earlier) > datetime.now(timezone.utc):
                    # Not there (yet): an earlier create may still land. Ask again soon.
                    waits[want.key] = self.bc.confirm(earlier, claims[want.key].confirming or earlier)
                elif claims[want.key].attempts >= MAX_ATTEMPTS:
                    failures[want.key] = PermanentFailure(
                        f"Business Central gave no answer to {claims[want.key].attempts} attempts to create the "
                        f"{kind.name}, and it does not have it; it is tried again on the next sync")
                else:
                    to_create.append(want)
            if to_create:
                code = self.rt.settings.customer_template if kind is CUSTOMER else self.rt.settings.item_template
                defaults = await template_defaults(self.store, kind, code)
                # Entries BC would know by the same name (e.g. one service offered by two
                # businesses) share one new record, as they would have shared an existing one.
                first: dict[str, Wanted] = {}
                for want in to_create:
                    first.setdefault(want.lookup.strip().lower(), want)
                name_waits: dict[str, Wait] = {}
                if kind is ITEM:
                    for name, since in (await self._names_in_flight(list(first), claimed_at)).items():
                        del first[name]
                        name_waits[name] = self.bc.confirm(since, since)
                leaders = list(first.values())
                earlier = {w.key: claims[w.key].earlier_pending for w in leaders}
                created, failed, waiting = await self._create(kind, leaders, defaults, claimed_at, earlier, send_by) \
                    if leaders else ({}, {}, {})
                for want in to_create:
                    leader = first.get(want.lookup.strip().lower())
                    if leader is None:
                        waits[want.key] = name_waits[want.lookup.strip().lower()]
                    elif leader.key in created:
                        records[want.key] = (created[leader.key], "created" if want is leader else "linked")
                    elif leader.key in failed:
                        failures[want.key] = failed[leader.key]
                    elif leader.key in waiting:
                        waits[want.key] = waiting[leader.key]
        except UpstreamThrottled as error:
            until = datetime.now(timezone.utc) + timedelta(seconds=throttled_wait(error))
            waits |= {w.key: Wait(until, claims[w.key].earlier_pending, f"Business Central is throttling: {error}")
                      for w in wanted if w.key not in records and w.key not in waits}
        except Exception as error:  # noqa: BLE001 - recorded on every link row below, then raised
            failures |= {w.key: error for w in wanted if w.key not in records and w.key not in waits}
        by_key = {w.key: w for w in wanted}
        links = await self._record_links(kind, [(by_key[key], *records[key]) for key in records], claims)
        for key, wait in waits.items():
            await self._mark_waiting(kind, key, wait, claims[key])
        for key, error in failures.items():
            # A failure after a create may have been sent keeps the row pending: whoever tries
            # next waits for BC rather than create a second record.
            maybe_sent = isinstance(error, UpstreamAmbiguous) or not isinstance(error, (UpstreamError, PermanentFailure))
            await self._mark_failed(kind, encode_key(key), key, str(error), claims[key].etag,
                                    claimed_at if maybe_sent else claims[key].earlier_pending)
        if failures:
            first_error = next(iter(failures.values()))
            if all(_permanent(error) for error in failures.values()):
                reasons = "; ".join(f"{masked(key)}: {error}" for key, error in list(failures.items())[:5])
                raise PermanentFailure(f"Business Central refused {len(failures)} {kind.name}(s): {reasons}") \
                    from first_error
            raise first_error
        return links, waits

    async def _create(self, kind: Kind, wanted: list[Wanted], defaults: dict, claimed_at: datetime,
                      earlier: dict[str, datetime | None], send_by: float
                      ) -> tuple[dict[str, dict], dict[str, Exception], dict[str, Wait]]:
        """Create the records; a customer BC refuses for one of its fields is created again
        without it (the field is left out and reported). Returns what was created, what BC
        refused for good, and what must wait (unknown outcome, or throttled)."""
        created: dict[str, dict] = {}
        failures: dict[str, Exception] = {}
        waits: dict[str, Wait] = {}
        remaining = list(wanted)
        for _ in range(CREATE_ROUNDS):
            answers = await self.bc.create_many(kind.entity_set, [new_record(kind, defaults, w.mapped.fields)
                                                                  for w in remaining], send_by)
            retry = []
            for want, answer in zip(remaining, answers, strict=True):
                if isinstance(answer, dict):
                    created[want.key] = answer
                elif isinstance(answer, UpstreamAmbiguous):
                    # BC may have created it, or may still be: looked up soon, repeated only once
                    # it cannot be running any more.
                    waits[want.key] = self.bc.confirm(claimed_at, attempt=True)
                elif answer.retryable:
                    # Throttled or unavailable, not sent, or a server error inside a finished batch: not created.
                    until = datetime.now(timezone.utc) + timedelta(seconds=throttled_wait(answer))
                    waits[want.key] = Wait(until, earlier.get(want.key),
                                           f"Business Central did not create it yet ({answer.code}); trying again later",
                                           attempt=answer.status is not None and answer.status not in NOT_RUN_STATUS)
                elif kind is CUSTOMER and (drop_refused(want.mapped, answer.message)
                                           or minimal(want.mapped, answer.message)):
                    log.warning("customer %s refused by BC; trying again with fields left out: %s", masked(want.key),
                                ", ".join(sorted(want.mapped.left_out)),
                                extra={"event": "customer_fields_left_out", "status": answer.status})
                    retry.append(want)
                else:
                    failures[want.key] = PermanentFailure(explain_refusal(answer.message)) \
                        if answer.status and 400 <= answer.status < 500 else answer
            remaining = retry
            if not remaining:
                break
        for want in remaining:
            failures.setdefault(want.key, PermanentFailure(f"Business Central kept refusing the {kind.name}"))
        return created, failures, waits

    async def _names_in_flight(self, names: list[str], now: datetime) -> dict[str, datetime]:
        """Items are found in BC by name but waited for by service id, so two services of one name
        must not see BC differently: one may not create a name whose create by the other may
        still be running. Under the items lease (held by every item create), the names an earlier
        create may still be creating are returned with since when; the others are recorded as
        being created from `now` (the blob `ITEMS_IN_FLIGHT`, name → since)."""
        blob = company_scoped("directory", self.company, self.rt.settings) + ITEMS_IN_FLIGHT.removeprefix("directory")
        raw = await self.store.read_blob(blob)
        recorded = {name: when for name, text in (json.loads(raw) if raw else {}).items()
                    if (when := stored_time(text)) and self.bc.settled_at(when) > now}
        in_flight = {name: recorded[name] for name in names if name in recorded}
        recorded |= {name: now for name in names if name not in in_flight}
        await self.store.write_blob(blob, to_json({n: t.isoformat() for n, t in recorded.items()}).encode(),
                                    "application/json")
        return in_flight

    async def _fill_blanks(self, kind: Kind, record: dict, mapped: dict) -> None:
        for _ in range(3):
            changes = blanks_to_fill(record, mapped)
            if not changes:
                return
            try:
                await self.bc.update(kind.entity_set, record["id"], record.get("@odata.etag", "*"), changes)
                return
            except UpstreamConflict:
                record = await self.bc.get(kind.entity_set, record["id"]) or record

    async def _refresh(self, kind: Kind, row: dict, link: Link, mapped: dict, source_hash: str) -> None:
        """Bookings data changed since the last upsert: fill blanks (customers, linked items) or
        follow the Bookings name and price (items this service created)."""
        record = await self.bc.get(kind.entity_set, link.bc_id)
        if record is not None:
            if kind is ITEM and link.origin == "created":
                changes = {k: v for k, v in mapped.items() if record.get(k) != v}
                if changes:
                    await self.bc.update(kind.entity_set, record["id"], record.get("@odata.etag", "*"), changes)
            else:
                await self._fill_blanks(kind, record, mapped)
        try:
            await self.store.update(kind.table, {"PartitionKey": self._pk(kind), "RowKey": row["RowKey"],
                                                 "SourceHash": source_hash, "LastError": ""},
                                    etag=row.metadata["etag"])
        except ResourceModifiedError:
            pass


def _permanent(error: Exception) -> bool:
    """Retrying cannot help: a missing template, or BC refusing the record itself (4xx)."""
    if isinstance(error, PermanentFailure):
        return True
    return isinstance(error, UpstreamError) and not isinstance(error, UpstreamAmbiguous) and not error.retryable \
        and error.status is not None and 400 <= error.status < 500


def company_of_source(rt: Runtime, source: CustomerSource | ServiceSource) -> str:
    """The company a customer or service is upserted into: its business's (BC_COMPANY_ID's when
    the message names no business)."""
    if source.business_id and source.business_id in rt.settings.business_ids:
        return rt.settings.company_of(source.business_id)
    rt.settings.require("bc_company_id")
    return rt.settings.bc_company_id


async def upsert_from_message(rt: Runtime, message: DirectoryUpsertMessage) -> dict[str, Link]:
    """The queue-triggered upsert, into the company of each entry's business. Disabled sides
    (`SYNC_CUSTOMERS`/`SYNC_ITEMS`) do nothing."""
    customers = isinstance(message, (CustomerUpsert, CustomerBatchUpsert))
    if not (rt.settings.sync_customers if customers else rt.settings.sync_items):
        return {}
    store = await rt.store()
    by_company: dict[str, list] = {}
    for entry in message.entries():
        by_company.setdefault(company_of_source(rt, entry[0]), []).append(entry)
    links: dict[str, Link] = {}
    for company, entries in by_company.items():
        resolver = Resolver(rt, store, rt.bc_for(company), expect_new=True)
        links |= await (resolver.customers(entries) if customers else resolver.items(entries))
    return links
