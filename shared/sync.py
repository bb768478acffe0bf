"""Sync: pull each Bookings business's calendar window from Graph into the `bookings` table.

Only rows whose content changed are written (a content hash per row), in transactions of at
most 100 per partition. An appointment that vanished from a *complete* pull is marked cancelled,
never deleted; after a failed or partial pull nothing is cancelled, so a business that cannot be
read keeps its rows exactly as they were. New or changed customers and services are queued for
the directory upsert (up to 100 per message) as soon as they are read, so Business Central work
overlaps the calendar pull. A blob lease keeps overlapping runs apart.

The run's summary goes to one blob, overwritten by the next run: `GET /api/health` and the
queued-request check read it back; the history of runs is in the logs (`sync_run_finished`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError

from shared import leases
from shared.bookings import Booking, normalise_email
from shared.graph import Appointment, BookingCustomer, BookingService, NoAccessToBusiness
from shared.http import UpstreamError, UpstreamNotFound
from shared.messages import (SOURCE_TEXT, CustomerBatchUpsert, CustomerSource, CustomerUpsert, ItemBatchUpsert, ItemUpsert,
                             ServiceSource, SyncRequest, encode, pack)
from shared.push import push_directory
from shared.runtime import Runtime
from shared.store import (BOOKINGS, CUSTOMER_LINKS, DIRECTORY_QUEUE, ITEM_LINKS, SYNC_QUEUE, UPDATE, UPSERT, Store,
                          decode_key, encode_key)

log = logging.getLogger(__name__)

SYNC_LEASE = "sync"
LAST_RUN = "sync/last-run.json"
CANCELLED_HASH = "cancelled"
CUSTOMER_PARTITION = "customer"
CUSTOMERS_PER_HANDOVER = 100
"""Customers handed to the directory queue at a time while their list is read (a Graph page)."""
ITEM_PARTITION = "item"
SUB_WINDOW = timedelta(days=7)
"""Each business's window is read as slices of this length, side by side."""


@dataclass
class BusinessPull:
    business_id: str
    bookings: list[Booking] = field(default_factory=list)
    customers: list[BookingCustomer] = field(default_factory=list)
    services: list[BookingService] = field(default_factory=list)
    complete: bool = False
    """Every page was read and every appointment could be read."""
    directory_complete: bool = False
    invalid: int = 0
    unreadable: set = field(default_factory=set)
    """Ids of appointments the read returned but that could not be read (each reported once)."""
    confirmed: int = 0
    """Stored appointments the read did not return, read by id."""
    errors: list[str] = field(default_factory=list)


@dataclass
class BusinessCounts:
    fetched: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    cancelled: int = 0
    invalid: int = 0


@dataclass
class SyncResult:
    run_id: str
    trigger: str
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str = "succeeded"
    counts: dict = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    table_writes: int = 0

    def summary(self) -> dict:
        return {"at": _iso(self.finished_at) if self.finished_at else None,
                "outcome": self.outcome, "counts": self.counts, "errors": self.errors}


def window(settings, now: datetime) -> tuple[datetime, datetime]:
    return (now - timedelta(days=settings.sync_lookback_days), now + timedelta(days=settings.sync_lookahead_days))


def sub_windows(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """[start, end) cut into `SUB_WINDOW` slices, read side by side."""
    slices, cursor = [], start
    while cursor < end:
        slices.append((cursor, min(cursor + SUB_WINDOW, end)))
        cursor += SUB_WINDOW
    return slices


async def pull_calendar(rt: Runtime, pull: BusinessPull, start: datetime, end: datetime) -> None:
    """Read one business's calendar window into `pull`; never raises for upstream trouble,
    reports it instead. The window is read as weekly sub-windows side by side (the client keeps
    within Bookings' 4 requests per mailbox); an appointment that overlaps two of them is kept
    once. Which appointments a read returns (those overlapping the window, or those starting in
    it) does not matter: what is missing is confirmed by id before anything is cancelled."""
    seen: dict[str, Booking] = {}

    async def read(slice_start: datetime, slice_end: datetime) -> None:
        async for raw in rt.graph.calendar_view(pull.business_id, slice_start, slice_end):
            ident = raw.get("id") if isinstance(raw, dict) else None
            try:
                booking = Booking.from_appointment(pull.business_id, Appointment.model_validate(raw))
            except (ValidationError, ValueError, TypeError) as error:
                if ident not in pull.unreadable:
                    pull.invalid += 1
                    pull.errors.append(f"appointment {ident or '(no id)'} could not be read: "
                                       f"{str(error).splitlines()[0]}")
                pull.unreadable.add(ident)
                continue
            seen[booking.id] = booking

    reads = [asyncio.ensure_future(read(*part)) for part in sub_windows(start, end)]
    try:
        await asyncio.gather(*reads)
    except UpstreamError as error:
        pull.errors.append(error.message if isinstance(error, NoAccessToBusiness) else str(error))
        return
    finally:
        for task in reads:
            task.cancel()
    pull.bookings = list(seen.values())
    pull.complete = pull.invalid == 0


async def confirm_missing(rt: Runtime, pull: BusinessPull, existing: dict[str, dict], start: datetime,
                          end: datetime) -> set[str]:
    """Stored appointments of the window that the read did not return: each is read by id.
    Gone (404) → its row key is returned, to be marked cancelled; still there → it joins
    `pull.bookings` as it is now (perhaps moved); anything else → left as it was, and said so.
    A read that was not complete (a page or an appointment could not be read) confirms nothing:
    its business keeps its rows exactly as they were."""
    if not pull.complete:
        return set()
    returned = {encode_key(booking.id) for booking in pull.bookings}
    missing = [row for key, row in existing.items()
               if key not in returned and not row.get("Cancelled") and _overlaps(row, start, end)]
    gone: set[str] = set()

    async def confirm(row: dict) -> None:
        ident = row.get("AppointmentId") or decode_key(row["RowKey"])
        try:
            appointment = await rt.graph.get_appointment(pull.business_id, ident)
        except UpstreamNotFound as error:
            if error.code == "ErrorFolderNotFound":  # the business, not the appointment
                pull.errors.append(f"appointment {ident} could not be checked: {error.message}")
            else:
                gone.add(row["RowKey"])
            return
        except UpstreamError as error:
            pull.errors.append(f"appointment {ident} was not in the calendar read and could not be read by id "
                               f"({error.code}); it is left as it was")
            return
        try:
            pull.bookings.append(Booking.from_appointment(pull.business_id, appointment))
        except (ValueError, TypeError) as error:
            pull.errors.append(f"appointment {ident} could not be read: {str(error).splitlines()[0]}")

    await asyncio.gather(*(confirm(row) for row in missing))
    pull.confirmed = len(missing)
    return gone


async def pull_directory(rt: Runtime, pull: BusinessPull, upserts: DirectoryQueue) -> None:
    """Read one business's customers and services into `pull` (reported, never raised), handing
    each page of customers and then the services to `upserts` as they arrive."""
    graph = rt.graph
    services = asyncio.ensure_future(_collect(graph.services(pull.business_id)))
    try:
        page: list[BookingCustomer] = []
        async for raw in graph.customers(pull.business_id):
            try:
                page.append(BookingCustomer.model_validate(raw))
            except ValidationError:
                pull.errors.append("a Bookings customer could not be read")
            if len(page) == CUSTOMERS_PER_HANDOVER:
                pull.customers += page
                await upserts.customers_read(pull.business_id, page)
                page = []
        pull.customers += page
        await upserts.customers_read(pull.business_id, page)
        raw_services = await services
    except UpstreamError as error:
        services.cancel()
        pull.errors.append(f"customers/services: {error.message if isinstance(error, NoAccessToBusiness) else error}")
        return
    except BaseException:
        services.cancel()
        raise
    finally:
        await upserts.customers_done(pull.business_id)
    for raw in raw_services:
        try:
            pull.services.append(BookingService.model_validate(raw))
        except ValidationError:
            pull.errors.append("a Bookings service could not be read")
    await upserts.services_read(pull.business_id, pull.services)
    pull.directory_complete = True


async def _collect(pages) -> list:
    return [item async for item in pages]


async def stored_rows(store: Store, business_id: str) -> dict[str, dict]:
    """What the table holds for a business: just enough to tell what changed."""
    return {row["RowKey"]: row for row in await store.partition(
        BOOKINGS, encode_key(business_id),
        select=["RowKey", "AppointmentId", "SourceHash", "Cancelled", "StartUtc", "EndUtc"])}


async def store_business(store: Store, pull: BusinessPull, existing: dict[str, dict], gone: set[str]
                         ) -> BusinessCounts:
    """Write what changed; mark cancelled what Graph confirmed gone (`confirm_missing`)."""
    counts = BusinessCounts(fetched=len(pull.bookings), invalid=pull.invalid)
    partition = encode_key(pull.business_id)
    operations: list[tuple] = []
    for booking in pull.bookings:
        entity = booking.sync_entity()
        row = existing.pop(entity["RowKey"], None)
        if row is None:
            counts.created += 1
            entity["InvoiceState"] = "none"
        elif row.get("SourceHash") == entity["SourceHash"]:
            counts.unchanged += 1
            continue
        else:
            counts.updated += 1
        operations.append((UPSERT, entity, {"mode": "merge"}))
    for row_key in sorted(gone):
        counts.cancelled += 1
        operations.append((UPDATE, {"PartitionKey": partition, "RowKey": row_key, "Cancelled": True,
                                    "SourceHash": CANCELLED_HASH}, {"mode": "merge"}))
    await store.write_batches(BOOKINGS, operations)
    return counts


def _overlaps(row: dict, start: datetime, end: datetime) -> bool:
    row_start, row_end = row.get("StartUtc"), row.get("EndUtc")
    if row_start is None or row_end is None:
        return False
    return row_end > start and row_start < end


def _digest(model) -> str:
    return hashlib.sha256(encode(model).encode()).hexdigest()[:32]


def customer_source(customer: BookingCustomer, business_id: str) -> CustomerSource | None:
    """What the directory upsert needs of a Bookings customer record (it has the address)."""
    email = normalise_email(customer.email_address)
    if not email:
        return None
    address = customer.addresses[0] if customer.addresses else None
    phone = next((p.number for p in customer.phones if p.number), None)
    return CustomerSource(
        email=email, displayName=_clip(customer.display_name), phone=_clip(phone),
        addressLine1=_clip(address and address.street), city=_clip(address and address.city),
        state=_clip(address and address.state), country=_clip(address and address.country_or_region),
        postalCode=_clip(address and address.postal_code), businessId=business_id)


def appointment_customer_sources(pulls: list[BusinessPull]) -> dict[str, CustomerSource]:
    """Customers as appointments carry them (for people without a Bookings customer record)."""
    sources: dict[str, CustomerSource] = {}
    for pull in pulls:
        for booking in pull.bookings:
            for customer in booking.customers:
                if customer.email and customer.email not in sources:
                    sources[customer.email] = CustomerSource(
                        email=customer.email, displayName=_clip(customer.name),
                        phone=_clip(customer.phone), businessId=pull.business_id)
    return sources


def service_source(service: BookingService, business_id: str) -> ServiceSource:
    return ServiceSource(serviceId=service.id, businessId=business_id,
                         displayName=_clip(service.display_name, 100) or service.id[:100],
                         defaultPrice=max(service.default_price or 0.0, 0.0), defaultPriceType=service.default_price_type)


def _clip(value: str | None, limit: int = SOURCE_TEXT) -> str | None:
    value = (value or "").strip()
    return value[:limit] or None


async def known_hashes(store: Store) -> tuple[dict[str, str], dict[str, str]]:
    """What the last successful upserts recorded on the customer and item link rows."""
    customers, items = await asyncio.gather(*(store.partition(table, partition, select=["RowKey", "SourceHash"])
                                              for table, partition in ((CUSTOMER_LINKS, CUSTOMER_PARTITION),
                                                                       (ITEM_LINKS, ITEM_PARTITION))))
    return ({row["RowKey"]: row.get("SourceHash") for row in customers},
            {row["RowKey"]: row.get("SourceHash") for row in items})


def _changed(known: dict[str, str], sources: dict, queued: set[str]) -> list[tuple]:
    """(source, digest) of the sources not queued yet in this run whose digest differs from the
    link row's; marks them queued."""
    changed = []
    for key, source in sources.items():
        if key in queued:
            continue
        queued.add(key)
        digest = _digest(source)
        if known.get(encode_key(key)) != digest:
            changed.append((source, digest))
    return changed


class DirectoryQueue:
    """Queues the customers and services a run finds new or changed for the directory upsert:
    each once, in messages of up to 100 (`pack`), as soon as they are read, so BC work starts
    while the calendars are still paging.

    A customer known to several businesses is taken from the first business in
    `BOOKINGS_BUSINESS_IDS` order that has a record of them (as if the lists were read one after
    the other), so what is queued, and its hash, never depends on which answer came first: a
    business's pages wait until the businesses before it have been read. People known only from
    appointments come last (`bookings_read`)."""

    def __init__(self, rt: Runtime, store: Store, businesses: list[str]):
        self.rt, self.store, self.businesses = rt, store, businesses
        self.known = asyncio.ensure_future(known_hashes(store))
        self.queued: tuple[set[str], set[str]] = (set(), set())
        self.customers = self.items = 0
        self._waiting: dict[str, list[BookingCustomer]] = {b: [] for b in businesses}
        self._read: set[str] = set()
        self._sending: list[asyncio.Task] = []

    async def customers_read(self, business_id: str, customers: list[BookingCustomer]) -> None:
        self._waiting[business_id] += customers
        await self._release()

    async def customers_done(self, business_id: str) -> None:
        """The business's customer list is read (or could not be)."""
        self._read.add(business_id)
        await self._release()

    async def _release(self) -> None:
        known = (await self.known)[0]
        sources: dict[str, CustomerSource] = {}
        for business_id in self.businesses:
            for customer in self._waiting[business_id]:
                source = customer_source(customer, business_id)
                if source and source.email not in sources:
                    sources[source.email] = source
            self._waiting[business_id] = []
            if business_id not in self._read:
                break
        self._send_customers(_changed(known, sources, self.queued[0]))

    async def services_read(self, business_id: str, services: list[BookingService]) -> None:
        known = (await self.known)[1]
        changed = _changed(known, {s.id: service_source(s, business_id) for s in services}, self.queued[1])
        if self.rt.settings.sync_items and changed:
            self.items += len(changed)
            self._send(pack([ItemUpsert(service=source, sourceHash=digest) for source, digest in changed],
                            lambda chunk: ItemBatchUpsert(services=chunk)))

    async def bookings_read(self, pulls: list[BusinessPull]) -> None:
        known = (await self.known)[0]
        self._send_customers(_changed(known, appointment_customer_sources(pulls), self.queued[0]))

    def _send_customers(self, changed: list[tuple]) -> None:
        if self.rt.settings.sync_customers and changed:
            self.customers += len(changed)
            self._send(pack([CustomerUpsert(customer=source, sourceHash=digest) for source, digest in changed],
                            lambda chunk: CustomerBatchUpsert(customers=chunk)))

    def _send(self, messages: list[str]) -> None:
        self._sending.append(asyncio.create_task(self.store.send_many(DIRECTORY_QUEUE, messages)))

    async def finish(self) -> None:
        """Wait until every message is sent (raises if one could not be)."""
        await asyncio.gather(*self._sending)

    async def abandon(self) -> None:
        self.known.cancel()
        await asyncio.gather(self.known, *self._sending, return_exceptions=True)


async def run_sync(rt: Runtime, trigger: str, now: datetime | None = None) -> SyncResult | None:
    """One sync run over every configured business. None when another run holds the lease."""
    settings = rt.settings
    settings.require("business_ids")
    store = await rt.store()
    lease = await leases.acquire(store, SYNC_LEASE)
    if lease is None:
        log.info("sync skipped: another run is in progress", extra={"event": "sync_skipped", "trigger": trigger})
        return None
    started = datetime.now(timezone.utc)
    now = now or started
    result = SyncResult(run_id=f"{started:%Y%m%dT%H%M%S}-{lease.owner[:8]}", trigger=trigger, started_at=started)
    writes_before = store.stats.table_writes
    booking_writes_before = store.stats.by_table.get(BOOKINGS, 0)
    clock = time.monotonic()
    try:
        start, end = window(settings, now)
        businesses = settings.business_ids
        pulls = [BusinessPull(business) for business in businesses]
        # Graph, the stored rows and the link rows are read side by side; customers and
        # services are queued for the directory upsert page by page as they arrive.
        upserts = DirectoryQueue(rt, store, businesses)
        calendars = asyncio.gather(*(pull_calendar(rt, pull, start, end) for pull in pulls))
        stored = asyncio.gather(*(stored_rows(store, business) for business in businesses))
        try:
            await asyncio.gather(*(pull_directory(rt, pull, upserts) for pull in pulls))
            await calendars
            await upserts.bookings_read(pulls)
            await upserts.finish()
        except BaseException:
            calendars.cancel()
            stored.cancel()
            await upserts.abandon()
            raise
        totals = BusinessCounts()
        per_business = {}
        for pull, existing in zip(pulls, await stored, strict=True):
            gone = await confirm_missing(rt, pull, existing, start, end)
            counts = await store_business(store, pull, existing, gone)
            per_business[pull.business_id] = counts.__dict__ | {"complete": pull.complete,
                                                                 "confirmedById": pull.confirmed}
            for name, value in counts.__dict__.items():
                setattr(totals, name, getattr(totals, name) + value)
            for message in pull.errors[:20]:
                result.errors.append({"businessId": pull.business_id, "message": message})
        pushed = await push_directory(rt, store, pulls)
        for business, push in pushed.items():
            per_business[business]["push"] = push.counts()
            for message in push.errors[:20]:
                result.errors.append({"businessId": business, "message": message})
        reconciled = await _reconcile(rt, store)
        failed = [p for p in pulls if not p.complete and not p.bookings]
        if len(failed) == len(pulls):
            result.outcome = "failed"
        elif result.errors or any(not p.complete for p in pulls):
            result.outcome = "partial"
        result.counts = totals.__dict__ | {"customersQueued": upserts.customers, "itemsQueued": upserts.items,
                                           "businesses": per_business, **reconciled}
        if pushed:
            result.counts |= {"customersPushed": sum(p.customers.created for p in pushed.values()),
                              "servicesPushed": sum(p.services.created for p in pushed.values()),
                              "pushUpdated": sum(p.customers.updated + p.services.updated for p in pushed.values()),
                              "pushFailed": sum(p.customers.failed + p.services.failed for p in pushed.values())}
    except Exception as error:
        result.outcome = "failed"
        result.errors.append({"businessId": None, "message": f"sync failed: {error}"})
        log.exception("sync run failed", extra={"event": "sync_run_failed", "run_id": result.run_id})
    finally:
        result.finished_at = datetime.now(timezone.utc)
        result.table_writes = store.stats.table_writes - writes_before
        result.counts["tableWrites"] = result.table_writes
        result.counts["bookingWrites"] = store.stats.by_table.get(BOOKINGS, 0) - booking_writes_before
        result.counts["seconds"] = round(time.monotonic() - clock, 3)
        try:
            await _record(store, result)
        finally:
            await leases.release(store, lease)
    # Prefixed: a bare `created` would collide with the LogRecord attribute of that name.
    flat = {f"count_{k}": v for k, v in result.counts.items() if isinstance(v, (int, float))}
    log.info("sync run %s %s", result.run_id, result.outcome,
             extra={"event": "sync_run_finished", "run_id": result.run_id, "outcome": result.outcome,
                    "trigger": trigger, **flat})
    return result


async def _reconcile(rt: Runtime, store: Store) -> dict:
    from shared.reconcile import reconcile_invoices

    return await reconcile_invoices(rt, store)


async def _record(store: Store, result: SyncResult) -> None:
    """Replace the last run's summary (one blob write, never a table entity)."""
    record = {"runId": result.run_id, "trigger": result.trigger, "startedAt": _iso(result.started_at),
              **result.summary()}
    await store.write_blob(LAST_RUN, json.dumps(record).encode(), "application/json")


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def _last_run(store: Store) -> dict | None:
    content = await store.read_blob(LAST_RUN)
    return json.loads(content) if content else None


async def last_run_started(store: Store) -> datetime | None:
    """When the latest sync run started (a queued request older than that is already served)."""
    run = await _last_run(store)
    return datetime.fromisoformat(run["startedAt"]) if run else None


async def last_sync(store: Store) -> dict | None:
    """The latest run as `GET /api/health` reports it."""
    run = await _last_run(store)
    return {name: run[name] for name in ("at", "outcome", "counts", "errors")} if run else None


async def queue_sync(store: Store, reason: str) -> None:
    """Queue a sync run soon (`POST /api/sync`, the setup page's "Sync now")."""
    await store.send(SYNC_QUEUE, encode(SyncRequest(reason=reason, requestedAt=datetime.now(timezone.utc))))
