"""Directory: Bookings customers and services as BC customers and service items.

Each customer (by normalised e-mail) and each service (by id) has a link row. Resolving claims
the row with an ETag before it looks BC up or creates anything, so two workers never create the
same customer; a create whose answer was lost is found again by e-mail (items: by name) before it
is repeated. New records get the named template's defaults, overridden by the Bookings fields;
existing BC records keep their values (only blanks are filled). The same resolution serves the
queue-triggered upsert and the invoice worker, so no booking ever needs manual linking."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError
from pydantic import ValidationError

from shared.storage import leases
from shared.upstream.bc import TEMPLATE_FIELDS, BcClient, Wait, explain_refusal
from shared.hostconfig import queue_settings
from shared.flows.directory.customer_fields import Countries, Mapped, drop_refused, map_customer, minimal
from shared.upstream.errors import NOT_RUN_STATUS, UpstreamAmbiguous, UpstreamConflict, UpstreamError, UpstreamThrottled
from shared.flows.messages import (CustomerBatchUpsert, kept_by_an_earlier_business, same_source_data, CustomerSource, CustomerUpsert, Deferred, DirectoryUpsertMessage,
                             PermanentFailure, ServiceSource, throttled_wait)
from shared.runtime import Runtime
from shared.upstream.utf16 import cut
from shared.storage.store import (CREATE, CUSTOMER_LINKS, ITEM_LINKS, MAX_BATCH, TEMPLATES, UPDATE, Store, encode_key,
                          fit_string, to_json)

log = logging.getLogger(__name__)

ITEM_NAME_UNITS = 100
"""Item "Description" is Text[100]: UTF-16 units, as BC counts."""
CUSTOMER_PARTITION = "customer"
ITEM_PARTITION = "item"
ITEMS_IN_FLIGHT = "directory/items-in-flight.json"
"""Item names whose create may still be running in BC, and since when: `Resolver._names_in_flight`."""
CLAIM_STALE_AFTER = timedelta(seconds=90)
WAIT_FOR_OTHER_SECONDS = 45.0
CREATE_ROUNDS = 3
"""A customer refused for a field is created again without it: at most this many tries."""
MAX_ATTEMPTS = queue_settings().max_dequeue_count
"""Creates without a known outcome before BC is taken to be failing: as often as a message is tried."""


class TemplateNotFound(PermanentFailure):
    pass


class LinkBusy(Exception):
    """Another worker is resolving the same customer/item right now; retry later."""


@dataclass(frozen=True)
class Link:
    key: str
    bc_id: str
    bc_number: str | None
    origin: str
    """`created` (from a template by this service) or `linked` (an existing BC record)."""


@dataclass(frozen=True)
class Kind:
    name: str
    table: str
    partition: str
    entity_set: str
    setting: str


CUSTOMER = Kind("customer", CUSTOMER_LINKS, CUSTOMER_PARTITION, "customers", "CUSTOMER_TEMPLATE")
ITEM = Kind("item", ITEM_LINKS, ITEM_PARTITION, "items", "ITEM_TEMPLATE")
KINDS = {"customer": CUSTOMER, "item": ITEM}


def link_partition(kind: Kind, company_id: str | None, settings) -> str:
    """Link rows are per BC company: a customer of two businesses that bill into two companies
    is one BC customer in each. `BC_COMPANY_ID`'s rows keep the kind's own partition (so links
    made before businesses had companies of their own stay valid); another company's are
    `<kind>@<company id>`."""
    if not company_id or company_id == settings.bc_company_id:
        return kind.partition
    return f"{kind.partition}@{company_id}"


def link_partitions(kind: Kind, settings) -> dict[str, str]:
    """Partition → company, for every company the businesses bill into."""
    companies = settings.companies or [settings.bc_company_id]
    return {link_partition(kind, company, settings): company for company in companies}


def company_scoped(name: str, company_id: str | None, settings) -> str:
    """A lease or blob name of the directory, one per company (BC_COMPANY_ID's keeps its name)."""
    return name if not company_id or company_id == settings.bc_company_id else f"{name}@{company_id}"


# -- templates ---------------------------------------------------------------------------------

_template_cache: dict[tuple, tuple[float, dict]] = {}
TEMPLATE_CACHE_SECONDS = 15.0


async def get_template(store: Store, kind: str, code: str) -> dict | None:
    row = await store.get(TEMPLATES, kind, encode_key(code))
    return json.loads(row["Fields"]) if row else None


async def template_defaults(store: Store, kind: Kind, code: str | None) -> dict:
    """The defaults of the template named in settings; {} when none is named."""
    if not code:
        return {}
    cache_key = (id(store), kind.name, code)
    cached = _template_cache.get(cache_key)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    fields = await get_template(store, kind.name, code)
    if fields is None:
        raise TemplateNotFound(f"The {kind.name} template '{code}' named in {kind.setting} does not exist; "
                               f"create it with PUT /api/templates/{kind.name}/{code}.")
    _template_cache[cache_key] = (time.monotonic() + TEMPLATE_CACHE_SECONDS, fields)
    return fields


class InvalidTemplate(ValueError):
    """A template names fields a template may not set, or values BC would refuse; `problems`
    are (field, message) pairs, for an HTTP problem or a form's inline errors."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("The template is not valid: " + "; ".join(message for _, message in problems) + ".")
        self.problems = problems


def validate_template(kind: str, body: object) -> dict:
    """The template's fields as BC takes them (`CustomerFields` / `ItemFields`), or `InvalidTemplate`."""
    try:
        return TEMPLATE_FIELDS[kind].model_validate(body).model_dump(exclude_none=True)
    except ValidationError as error:
        problems = []
        for item in error.errors()[:20]:
            name = ".".join(str(part) for part in item["loc"])
            message = (f"'{name}' is not a field a {kind} template may set"
                       if item["type"] == "extra_forbidden" else item["msg"])
            problems.append((name, message))
        raise InvalidTemplate(problems) from None


async def put_template(store: Store, kind: str, code: str, fields: dict) -> dict:
    now = datetime.now(timezone.utc)
    await store.upsert(TEMPLATES, {"PartitionKey": kind, "RowKey": encode_key(code), "Code": code,
                                   "Fields": to_json(fields), "UpdatedAt": now}, merge=False)
    _template_cache.clear()
    return {"kind": kind, "code": code, "fields": fields, "updatedAt": now}


async def list_templates(store: Store) -> list[dict]:
    rows = await store.query(TEMPLATES)
    return [{"kind": row["PartitionKey"], "code": row.get("Code") or row["RowKey"],
             "fields": json.loads(row.get("Fields") or "{}"), "updatedAt": row.get("UpdatedAt")}
            for row in sorted(rows, key=lambda r: (r["PartitionKey"], r["RowKey"]))]


# -- mapping to BC fields ----------------------------------------------------------------------

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


# -- resolution --------------------------------------------------------------------------------

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


class Resolver:
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
        self.rt, self.store, self.bc = rt, store, bc
        self.company = bc.company_id
        self.owner = uuid.uuid4().hex
        self.expect_new = expect_new
        self._claimed_for: dict[str, str] = {}
        """The Bookings data (`SourceHash`) each key is resolved for: written on its claim."""

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
        if self.expect_new:
            claimed = await self._claim_new(kind, list(pending))
            if claimed:
                batch = [pending.pop(key) for key in claimed]
                found, waiting = await self._link_claimed(kind, batch, claimed, find)
                links |= found
                waits |= waiting
        while pending:
            rows = await self.store.get_many(kind.table, self._pk(kind), [encode_key(key) for key in pending])
            now = datetime.now(timezone.utc)
            unlinked: dict[str, dict | None] = {}
            refreshes = []
            for key, want in list(pending.items()):
                row = rows.get(encode_key(key))
                if row and row.get("Status") == "linked" and row.get("BcId"):
                    links[key] = _link(row)
                    if self._changed_since(row.get("SourceHash"), want.source_hash):
                        refreshes.append(self._refresh(kind, row, links[key], want.mapped.fields, want.source_hash))
                    del pending[key]
                elif row and row.get("Status") == "waiting" and _when(row.get("WaitUntil")) \
                        and _when(row.get("WaitUntil")) > now:
                    waits[key] = Wait(_when(row["WaitUntil"]), _when(row.get("PendingSince")),
                                      row.get("LastError") or "waiting for Business Central")
                    del pending[key]
                elif self._made_by_another(row, want, now):
                    del pending[key]  # another worker is making this very record: it records the link
                else:
                    unlinked[key] = row
            await asyncio.gather(*refreshes)  # side by side, within BC's 5 requests at a time
            claimed = await self._claim_all(kind, unlinked)
            if claimed:
                batch = [pending.pop(key) for key in claimed]
                found, waiting = await self._link_claimed(kind, batch, claimed, find)
                links |= found
                waits |= waiting
            if pending:
                if time.monotonic() > deadline:
                    raise LinkBusy(f"another worker has been resolving {kind.name} "
                                   f"{', '.join(_mask(k) for k in list(pending)[:3])} for too long")
                await asyncio.sleep(0.2)
        if waits:
            until = max(wait.until for wait in waits.values())
            reason = next(iter(waits.values())).reason
            raise Deferred((until - datetime.now(timezone.utc)).total_seconds(),
                           f"{len(waits)} {kind.name}(s) wait until {until:%H:%M:%S} UTC: {reason}")
        return links

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
                reasons = "; ".join(f"{_mask(key)}: {error}" for key, error in list(failures.items())[:5])
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
                    log.warning("customer %s refused by BC; trying again with fields left out: %s", _mask(want.key),
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
            log.info("%s %s %s as %s%s", kind.name, origin, _mask(want.key), record.get("number"),
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
                    log.warning("lost the claim on %s %s after linking it", kind.name, _mask(key))
        return {want.key: Link(want.key, record["id"], record.get("number"), origin) for want, record, origin in found}

    async def _names_in_flight(self, names: list[str], now: datetime) -> dict[str, datetime]:
        """Items are found in BC by name but waited for by service id, so two services of one name
        must not see BC differently: one may not create a name whose create by the other may
        still be running. Under the items lease (held by every item create), the names an earlier
        create may still be creating are returned with since when; the others are recorded as
        being created from `now` (the blob `ITEMS_IN_FLIGHT`, name → since)."""
        blob = company_scoped("directory", self.company, self.rt.settings) + ITEMS_IN_FLIGHT.removeprefix("directory")
        raw = await self.store.read_blob(blob)
        recorded = {name: when for name, text in (json.loads(raw) if raw else {}).items()
                    if (when := _when(text)) and self.bc.settled_at(when) > now}
        in_flight = {name: recorded[name] for name in names if name in recorded}
        recorded |= {name: now for name in names if name not in in_flight}
        await self.store.write_blob(blob, to_json({n: t.isoformat() for n, t in recorded.items()}).encode(),
                                    "application/json")
        return in_flight

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
        earlier = {key: _when(row.get("PendingSince")) if row else None for key, row in rows.items()}
        attempts = {key: int(row.get("Attempts") or 0) if row else 0 for key, row in rows.items()}
        confirming = {key: _when(row.get("ConfirmSince")) if row else None for key, row in rows.items()}
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

    async def _mark_waiting(self, kind: Kind, key: str, wait: Wait, claim: Claim) -> None:
        log.warning("%s %s waits until %s: %s", kind.name, _mask(key), wait.until.isoformat(), wait.reason,
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


def _when(value) -> datetime | None:
    """A stored ISO time (or a datetime), None when blank."""
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _permanent(error: Exception) -> bool:
    """Retrying cannot help: a missing template, or BC refusing the record itself (4xx)."""
    if isinstance(error, PermanentFailure):
        return True
    return isinstance(error, UpstreamError) and not isinstance(error, UpstreamAmbiguous) and not error.retryable \
        and error.status is not None and 400 <= error.status < 500


def _link(row: dict) -> Link:
    return Link(row.get("Key") or row["RowKey"], row["BcId"], row.get("BcNumber") or None,
                row.get("Origin") or "linked")


def _mask(key: str) -> str:
    """E-mail addresses are personal data: log only enough to recognise one."""
    if "@" not in key:
        return key
    local, _, domain = key.partition("@")
    return f"{local[:2]}…@{domain}"


async def record_failure(store: Store, kind_name: str, key: str, reason: str, partition: str | None = None) -> None:
    """Make a failure visible on the link row (health, invoice reasons) without a claim.
    `partition`: the company's (`link_partition`); BC_COMPANY_ID's when not given."""
    kind = KINDS[kind_name]
    partition = partition or kind.partition
    row_key = encode_key(key)
    row = await store.get(kind.table, partition, row_key)
    if row and row.get("Status") == "linked":
        await store.update(kind.table, {"PartitionKey": partition, "RowKey": row_key,
                                        "LastError": reason[:2000]}, etag=None)
        return
    await store.upsert(kind.table, {"PartitionKey": partition, "RowKey": row_key, "Key": key,
                                    "Status": "failed", "Owner": "", "LastError": reason[:2000],
                                    "UpdatedAt": datetime.now(timezone.utc)})


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


async def _rows_of_companies(store: Store, kind: Kind, settings, condition: str, select: list[str]) -> list[dict]:
    """Link rows of every company's partition that meet `condition` (an OData filter)."""
    partitions = link_partitions(kind, settings) if settings is not None else {kind.partition: None}
    found = await asyncio.gather(*(store.query(kind.table, f"PartitionKey eq @pk and ({condition})",
                                               [*select, "PartitionKey"], {"pk": partition})
                                   for partition in partitions))
    return [row | {"companyId": partitions[row["PartitionKey"]]} for rows in found for row in rows]


async def directory_health(store: Store, settings=None) -> dict:
    """Customers and items BC refused, waiting ones, and customers created with fields left out,
    over every company the businesses bill into."""
    failures = {"customer": 0, "item": 0}
    recent, left_out = [], []
    waiting = 0
    for kind in (CUSTOMER, ITEM):
        rows = await _rows_of_companies(store, kind, settings, "Status eq 'failed' or Status eq 'waiting'",
                                        ["RowKey", "Key", "Status", "LastError", "UpdatedAt"])
        failures[kind.name] = sum(1 for r in rows if r.get("Status") == "failed")
        waiting += sum(1 for r in rows if r.get("Status") == "waiting")
        recent += [{"kind": kind.name, "key": _mask(r.get("Key") or r["RowKey"]), "reason": r.get("LastError"),
                    "at": r.get("UpdatedAt")} for r in rows if r.get("Status") == "failed"]
    partial = await _rows_of_companies(store, CUSTOMER, settings, "Status eq 'linked' and LeftOut ne ''",
                                       ["RowKey", "Key", "LeftOut", "UpdatedAt"])
    left_out = [{"kind": "customer", "key": _mask(r.get("Key") or r["RowKey"]), "leftOut": r.get("LeftOut"),
                 "at": r.get("UpdatedAt")} for r in partial]
    for entries in (recent, left_out):
        entries.sort(key=lambda r: r["at"] or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
        for item in entries:
            item["at"] = item["at"].isoformat() if item["at"] else None
    return {"customerFailures": failures["customer"], "itemFailures": failures["item"], "recent": recent[:10],
            "waiting": waiting, "customersWithFieldsLeftOut": len(left_out), "leftOut": left_out[:10]}


async def refusals(store: Store, settings=None, limit: int = 200) -> list[dict]:
    """Customers and items BC refused (in any company), newest first, with BC's reason (and the
    fix, where known), for signed-in operators: keys are shown whole, unlike in the anonymous
    health answer."""
    found = []
    for kind in (CUSTOMER, ITEM):
        rows = await _rows_of_companies(store, kind, settings, "Status eq 'failed'",
                                        ["RowKey", "Key", "LastError", "UpdatedAt"])
        found += [{"kind": kind.name, "key": r.get("Key") or r["RowKey"], "reason": r.get("LastError") or "",
                   "at": r.get("UpdatedAt"), "companyId": r["companyId"]} for r in rows]
    found.sort(key=lambda r: r["at"] or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
    return found[:limit]
