"""Sync: pull each Bookings business's calendar window from Graph into the `bookings` table.

A run fans out: the timer (or a request) queues one message per business, and the queue workers
sync the businesses on as many instances as the plan gives, each business under its own lease, so
one slow or failing business delays no other. A business's calendar is read slice by slice
(`SUB_WINDOW`, shorter for a dense calendar), page by page, against the stored rows of the same
slice, so memory does not grow with the calendar.

Only rows whose content changed are written (a content hash per row), in transactions of at
most 100. An appointment that vanished from a *complete* read of its slice is confirmed gone by
id and marked cancelled, never deleted; after a failed or partial read nothing is cancelled. New
or changed customers and services are queued for the directory upsert (up to 100 per message) as
soon as they are read, so Business Central work overlaps the calendar pull.

Each business's latest result goes to one blob (`sync/businesses/<id>.json`), overwritten by its
next sync; `GET /api/status` adds them up. The history of runs is in the logs
(`sync_business_finished`, and `sync_run_finished` once the run's last part is done)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from azure.core import MatchConditions
from azure.core.exceptions import (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError, ServiceRequestError,
                                   ServiceResponseError)
from azure.data.tables import TableTransactionError

from shared.storage import leases
from shared.flows.bookings import Booking, normalise_email
from shared.flows.directory.resolver import CUSTOMER, ITEM, link_partition
from shared.upstream.graph import BookingCustomer, BookingService, NoAccessToBusiness, Unreadable
from shared.upstream.errors import UpstreamError, UpstreamNotFound
from shared.flows.messages import (SOURCE_TEXT, BusinessSync, CustomerBatchUpsert, CustomerSource, CustomerUpsert,
                             InvoiceReconciliation, ItemBatchUpsert, ItemUpsert, ServiceSource, SyncRequest, encode,
                             kept_by_an_earlier_business, pack, same_source_data, source_hash)
from shared.flows.directory.push import push_directory
from shared.runtime import Runtime
from shared.storage.store import (BOOKINGS, CREATE, CUSTOMER_LINKS, DIRECTORY_QUEUE, ITEM_LINKS, MAX_BATCH, SYNC_BUSINESS_QUEUE,
                          SYNC_QUEUE, UPDATE, UPSERT, Store, StoreStats, decode_key, encode_key,
                          writes_of_this_task)

log = logging.getLogger(__name__)

SYNC_LEASE = "sync"
"""Each business's lease is `sync/<business>`: one sync of a business at a time, on any instance."""
RECONCILE_LEASE = "reconcile"
LAST_RUN = "sync/last-run.json"
"""The latest run: its id, trigger, start and businesses (written when it fans out)."""
BUSINESS_RESULT = "sync/businesses/{business}.json"
"""Each business's latest result (counts, errors, outcome), overwritten by its next sync."""
RECONCILED = "sync/reconciled.json"
RUN_FINISHED = "sync/finished.json"
"""The id of the latest run whose summary was logged (so it is logged once)."""
CANCELLED_HASH = "cancelled"
CUSTOMER_PARTITION = "customer"
CUSTOMERS_PER_HANDOVER = 100
"""Customers handed to the directory queue at a time while their list is read (a Graph page)."""
ITEM_PARTITION = "item"
SUB_WINDOW = timedelta(days=7)
"""Each business's window is read as slices of this length, `SLICES_AT_ONCE` side by side."""
SLICE_APPOINTMENTS = 2_000
"""A business whose last sync read more than this many appointments a week gets shorter slices,
so a slice holds about this many stored rows, whatever the calendar's size."""
SHORTEST_SLICE = timedelta(hours=6)
WRITE_ATTEMPTS = 4
SLICES_AT_ONCE = 4
BUSINESSES_AT_ONCE = 4
"""Businesses one instance syncs at a time. The host hands an instance up to 16 messages at once
(`host.json` `batchSize`); a business's sync holds one slice's rows per slice it reads, so four at
a time keep an instance's memory that of four businesses, whatever the chain's size."""
MAX_ERRORS = 40
"""A business's result keeps this many error messages (the logs have them all)."""


@dataclass
class BusinessPull:
    """What a business's sync read of its customers and services, and what went wrong."""
    business_id: str
    customers: list[BookingCustomer] = field(default_factory=list)
    services: list[BookingService] = field(default_factory=list)
    directory_complete: bool = False
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
class CalendarRead:
    """A business's calendar as the sync went through it, slice by slice. Only what is needed
    across slices is kept (counts, errors, customers met in appointments), never the
    appointments themselves: memory does not grow with the calendar."""
    business_id: str
    start: datetime
    end: datetime
    slice_length: timedelta = SUB_WINDOW
    counts: BusinessCounts = field(default_factory=BusinessCounts)
    complete: bool = True
    """Every page was read and every appointment could be read, in every slice."""
    confirmed: int = 0
    """Stored appointments the read did not return, read by id."""
    customers: dict[str, tuple[tuple, CustomerSource]] = field(default_factory=dict)
    """People as appointments carry them (for those without a Bookings customer record): as the
    latest of their appointments has them, whatever order the slices were read in."""
    errors: list[str] = field(default_factory=list)

    def owns(self, booking: Booking, slice_start: datetime, slice_end: datetime) -> bool:
        """Each appointment belongs to the one slice its start falls in (clamped to the window),
        so one that overlaps two slices is handled once."""
        start = min(max(booking.start, self.start), self.end - timedelta(microseconds=1))
        return slice_start <= start < slice_end

    def met(self, booking: Booking) -> None:
        order = (booking.start, booking.id)
        for customer in booking.customers:
            known = self.customers.get(customer.email) if customer.email else None
            if customer.email and (known is None or known[0] < order):
                self.customers[customer.email] = (order, CustomerSource(
                    email=customer.email, displayName=_clip(customer.name), phone=_clip(customer.phone),
                    businessId=self.business_id))

    def customer_sources(self) -> dict[str, CustomerSource]:
        return {email: source for email, (_, source) in sorted(self.customers.items())}


@dataclass(slots=True)
class StoredRow:
    """What the table holds of an appointment: just enough to tell what changed (a slice may
    hold thousands of these, so no more). Its id and times are read only for a row the calendar
    read did not return (`missing_rows`)."""
    source_hash: str | None
    cancelled: bool
    appointment_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None


def window(settings, now: datetime) -> tuple[datetime, datetime]:
    return (now - timedelta(days=settings.sync_lookback_days), now + timedelta(days=settings.sync_lookahead_days))


def slice_length(start: datetime, end: datetime, last_fetched: int | None) -> timedelta:
    """A week, or less for a calendar denser than `SLICE_APPOINTMENTS` a week (judged by what the
    business's last sync read), in whole hours, at least `SHORTEST_SLICE`."""
    if not last_fetched:
        return SUB_WINDOW
    per_week = last_fetched * SUB_WINDOW / max(end - start, SHORTEST_SLICE)
    if per_week <= SLICE_APPOINTMENTS:
        return SUB_WINDOW
    hours = int(SUB_WINDOW / timedelta(hours=1) * SLICE_APPOINTMENTS / per_week)
    return max(timedelta(hours=hours), SHORTEST_SLICE)


def sub_windows(start: datetime, end: datetime, length: timedelta = SUB_WINDOW) -> list[tuple[datetime, datetime]]:
    """[start, end) cut into slices of `length`."""
    slices, cursor = [], start
    while cursor < end:
        slices.append((cursor, min(cursor + length, end)))
        cursor += length
    return slices


async def stored_slice(store: Store, read: CalendarRead, slice_start: datetime, slice_end: datetime
                       ) -> dict[str, StoredRow]:
    """The stored rows a slice owns: those starting in it (the first slice also those that
    started before the window and end inside it)."""
    first = slice_start == read.start
    query = ("PartitionKey eq @pk and StartUtc lt @end and EndUtc gt @start" if first
             else "PartitionKey eq @pk and StartUtc ge @start and StartUtc lt @end")
    rows: dict[str, StoredRow] = {}
    async for row in store.iterate(BOOKINGS, query, ["RowKey", "SourceHash", "Cancelled"],
                                   {"pk": encode_key(read.business_id), "start": read.start if first else slice_start,
                                    "end": slice_end}):
        rows[row["RowKey"]] = StoredRow(row.get("SourceHash"), bool(row.get("Cancelled")))
    return rows


async def missing_rows(store: Store, read: CalendarRead, stored: dict[str, StoredRow], returned: set[str]
                       ) -> list[tuple[str, StoredRow]]:
    """The stored rows of a slice the read did not return, not cancelled and inside the window,
    with their ids and times (read now: the slice's query left them out)."""
    keys = [key for key, row in stored.items() if key not in returned and not row.cancelled]
    if not keys:
        return []
    missing = []
    for key, entity in (await store.get_many(BOOKINGS, encode_key(read.business_id), keys)).items():
        row = stored[key]
        row.appointment_id = entity.get("AppointmentId") or decode_key(key)
        row.start, row.end = entity.get("StartUtc"), entity.get("EndUtc")
        if _overlaps(row, read.start, read.end):
            missing.append((key, row))
    return missing


class SliceWriter:
    """Writes a slice's changes as they are found, 100 to a transaction. A new row is created
    (never upserted over an existing one): an appointment that moved here from another slice
    already has a row, with its invoicing state, which a create cannot overwrite; such a row is
    then merged, source fields only."""

    def __init__(self, store: Store, read: CalendarRead):
        self.store, self.read = store, read
        self.pending: list[tuple] = []
        self.writing: list[asyncio.Task] = []

    def add(self, operation: tuple) -> None:
        self.pending.append(operation)
        if len(self.pending) == MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writing.append(asyncio.create_task(self._write(self.pending)))
            self.pending = []

    async def _write(self, operations: list[tuple]) -> None:
        """One transaction, tried again after a passing transport error: every operation in it is
        safe to repeat (a create that did land is then found existing and merged)."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                await self.store.transact(BOOKINGS, operations)
                return
            except TableTransactionError as error:
                if error.error_code != "EntityAlreadyExists":
                    raise
                await asyncio.gather(*(self._one(operation) for operation in operations))
                return
            except (ServiceRequestError, ServiceResponseError) as error:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.warning("writing bookings failed (%s), trying again", error,
                            extra={"event": "storage_retry", "business_id": self.read.business_id})
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))

    async def _one(self, operation: tuple) -> None:
        kind, entity = operation[0], operation[1]
        if kind != CREATE:
            await self.store.upsert(BOOKINGS, entity)
            return
        try:
            await self.store.insert(BOOKINGS, entity)
        except ResourceExistsError:
            del entity["InvoiceState"]
            await self.store.upsert(BOOKINGS, entity)
            self.read.counts.created -= 1
            self.read.counts.updated += 1

    async def finish(self) -> None:
        self._flush()
        try:
            await asyncio.gather(*self.writing)
        finally:
            for task in self.writing:
                task.cancel()

    def write(self, booking: Booking, stored: StoredRow | None) -> None:
        entity = booking.sync_entity()
        if stored is None:
            self.read.counts.created += 1
            self.add((CREATE, entity | {"InvoiceState": "none"}))
        elif stored.source_hash == entity["SourceHash"]:
            self.read.counts.unchanged += 1
        else:
            self.read.counts.updated += 1
            self.add((UPSERT, entity, {"mode": "merge"}))


async def sync_slice(rt: Runtime, store: Store, read: CalendarRead, writer: SliceWriter, slice_start: datetime,
                     slice_end: datetime) -> None:
    """Read one slice of a business's calendar page by page against the stored rows of the
    same slice; hand what changed to `writer` as it is found (the caller waits for its writes);
    then confirm by id what the read did not return, and mark cancelled only what Graph says is
    gone. Never raises for upstream trouble: a slice that could not be read completely cancels
    nothing."""
    stored = await stored_slice(store, read, slice_start, slice_end)
    returned: set[str] = set()
    unreadable: set = set()
    try:
        async for item in rt.graph.calendar_view(read.business_id, slice_start, slice_end):
            try:
                if isinstance(item, Unreadable):
                    raise ValueError(item.reason)
                booking = Booking.from_appointment(read.business_id, item)
            except (ValueError, TypeError) as error:
                ident = item.id
                if ident not in unreadable:
                    read.counts.invalid += 1
                    read.errors.append(f"appointment {ident or '(no id)'} could not be read: "
                                       f"{str(error).splitlines()[0]}")
                unreadable.add(ident)
                continue
            if not read.owns(booking, slice_start, slice_end) or booking.row_key in returned:
                continue
            returned.add(booking.row_key)
            read.counts.fetched += 1
            read.met(booking)
            writer.write(booking, stored.get(booking.row_key))
    except UpstreamError as error:
        read.complete = False
        read.errors.append(error.message if isinstance(error, NoAccessToBusiness) else str(error))
        return
    if unreadable:
        read.complete = False
        return
    missing = await missing_rows(store, read, stored, returned)
    read.confirmed += len(missing)
    await asyncio.gather(*(_confirm(rt, read, writer, key, row, slice_start, slice_end) for key, row in missing))


async def _confirm(rt: Runtime, read: CalendarRead, writer: SliceWriter, key: str, row: StoredRow,
                   slice_start: datetime, slice_end: datetime) -> None:
    """A stored appointment of the slice that the read did not return, read by id. Gone (404) →
    marked cancelled; still there → written as it is now (unless it moved to another slice of
    the window, which writes it); anything else → left as it was, and said so."""
    try:
        appointment = await rt.graph.get_appointment(read.business_id, row.appointment_id)
    except UpstreamNotFound as error:
        if error.code == "ErrorFolderNotFound":  # the business, not the appointment
            read.errors.append(f"appointment {row.appointment_id} could not be checked: {error.message}")
            return
        read.counts.cancelled += 1
        writer.add((UPDATE, {"PartitionKey": encode_key(read.business_id), "RowKey": key, "Cancelled": True,
                             "SourceHash": CANCELLED_HASH}, {"mode": "merge"}))
        return
    except UpstreamError as error:
        read.errors.append(f"appointment {row.appointment_id} was not in the calendar read and could not be read by "
                           f"id ({error.code}); it is left as it was")
        return
    try:
        booking = Booking.from_appointment(read.business_id, appointment)
    except (ValueError, TypeError) as error:
        read.errors.append(f"appointment {row.appointment_id} could not be read: {str(error).splitlines()[0]}")
        return
    if _overlaps(booking, read.start, read.end) and not read.owns(booking, slice_start, slice_end):
        return  # moved to another slice of the window: that slice's read writes it
    read.counts.fetched += 1
    read.met(booking)
    writer.write(booking, row)


async def sync_calendar(rt: Runtime, store: Store, read: CalendarRead) -> None:
    """Every slice of the window, `SLICES_AT_ONCE` at a time (Bookings serves 4 requests per
    mailbox at once, so more would only queue)."""
    gate = asyncio.Semaphore(SLICES_AT_ONCE)

    async def one(part: tuple[datetime, datetime]) -> None:
        writer = SliceWriter(store, read)
        try:
            async with gate:
                await sync_slice(rt, store, read, writer, *part)
        finally:  # the slice's last writes, outside the gate: the next slice reads meanwhile
            await writer.finish()

    await asyncio.gather(*(one(part) for part in sub_windows(read.start, read.end, read.slice_length)))


async def pull_directory(rt: Runtime, pull: BusinessPull, upserts: DirectoryQueue) -> None:
    """Read one business's customers and services into `pull` (reported, never raised), handing
    each page of customers and then the services to `upserts` as they arrive."""
    graph = rt.graph
    services = asyncio.ensure_future(_collect(graph.services(pull.business_id)))
    try:
        page: list[BookingCustomer] = []
        async for customer in graph.customers(pull.business_id):
            if isinstance(customer, Unreadable):
                pull.errors.append("a Bookings customer could not be read")
            else:
                page.append(customer)
            if len(page) == CUSTOMERS_PER_HANDOVER:
                pull.customers += page
                await upserts.customers_read(pull.business_id, page)
                page = []
        pull.customers += page
        await upserts.customers_read(pull.business_id, page)
        services_read = await services
    except UpstreamError as error:
        services.cancel()
        pull.errors.append(f"customers/services: {error.message if isinstance(error, NoAccessToBusiness) else error}")
        return
    except BaseException:
        services.cancel()
        raise
    for service in services_read:
        if isinstance(service, Unreadable):
            pull.errors.append("a Bookings service could not be read")
        else:
            pull.services.append(service)
    await upserts.services_read(pull.business_id, pull.services)
    pull.directory_complete = True


async def _collect(pages) -> list:
    return [item async for item in pages]


def _overlaps(row: StoredRow | Booking, start: datetime, end: datetime) -> bool:
    if row.start is None or row.end is None:
        return False
    return row.end > start and row.start < end


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


def service_source(service: BookingService, business_id: str) -> ServiceSource:
    return ServiceSource(serviceId=service.id, businessId=business_id,
                         displayName=_clip(service.display_name, 100) or service.id[:100],
                         defaultPrice=max(service.default_price or 0.0, 0.0), defaultPriceType=service.default_price_type)


def _clip(value: str | None, limit: int = SOURCE_TEXT) -> str | None:
    value = (value or "").strip()
    return value[:limit] or None


_known_per_run: dict[tuple[int, str, tuple[str, str]], asyncio.Future] = {}
KNOWN_RUNS_KEPT = 4


def known_hashes_of_run(store: Store, run_id: str, partitions: tuple[str, str] = (CUSTOMER_PARTITION, ITEM_PARTITION)
                        ) -> asyncio.Future:
    """`known_hashes` of one company's link rows (`partitions`: customers', items'), read once
    per run and process: the businesses of a company an instance syncs in one run share one read
    of the link rows (each would otherwise read all of them). What the directory records
    meanwhile only makes a record look changed, and its upsert then finds it up to date."""
    key = (id(store), run_id, partitions)
    known = _known_per_run.get(key)
    if known is None or (known.done() and (known.cancelled() or known.exception() is not None)):
        known = _known_per_run[key] = asyncio.ensure_future(known_hashes(store, partitions))
        for old in list(_known_per_run)[:-KNOWN_RUNS_KEPT]:
            del _known_per_run[old]
    return known


async def known_hashes(store: Store, partitions: tuple[str, str] = (CUSTOMER_PARTITION, ITEM_PARTITION)
                       ) -> tuple[dict[str, str], dict[str, str]]:
    """What the last successful upserts recorded on a company's customer and item link rows."""
    customers, items = await asyncio.gather(*(store.partition(table, partition, select=["RowKey", "SourceHash"])
                                              for table, partition in zip((CUSTOMER_LINKS, ITEM_LINKS), partitions,
                                                                          strict=True)))
    return ({row["RowKey"]: row.get("SourceHash") for row in customers},
            {row["RowKey"]: row.get("SourceHash") for row in items})


def _changed(known: dict[str, str], sources: dict, queued: set[str], businesses: list[str]) -> list[tuple]:
    """(source, hash) of the sources not queued yet in this sync whose hash differs from the link
    row's; marks them queued. A record another business keeps is left to it when that business
    comes first in `BOOKINGS_BUSINESS_IDS` (so two businesses never undo each other's data)."""
    changed = []
    for key, source in sources.items():
        if key in queued:
            continue
        queued.add(key)
        recorded, digest = known.get(encode_key(key)), source_hash(source)
        if not same_source_data(recorded, digest) and not kept_by_an_earlier_business(recorded, digest, businesses):
            changed.append((source, digest))
    return changed


class DirectoryQueue:
    """Queues the customers and services a business's sync finds new or changed for the
    directory upsert: each once, in messages of up to 100 (`pack`), as soon as they are read, so
    Business Central work starts while the calendar is still paging. People known only from
    appointments come last (`appointment_customers`): a customer record, with its address, is
    preferred. A customer several businesses know is created from whichever business's sync
    reaches them first; from then on the first of them in `BOOKINGS_BUSINESS_IDS` order keeps
    them up to date, and the others leave them alone."""

    def __init__(self, rt: Runtime, store: Store, run_id: str, business_id: str | None = None):
        self.rt, self.store = rt, store
        self.businesses = rt.settings.business_ids
        company = rt.settings.company_of(business_id) if business_id else rt.settings.bc_company_id
        partitions = (link_partition(CUSTOMER, company, rt.settings), link_partition(ITEM, company, rt.settings))
        self.known = known_hashes_of_run(store, run_id, partitions)
        self.queued: tuple[set[str], set[str]] = (set(), set())
        self.customers = self.items = 0
        self._sending: list[asyncio.Task] = []

    async def customers_read(self, business_id: str, customers: list[BookingCustomer]) -> None:
        sources: dict[str, CustomerSource] = {}
        for customer in customers:
            source = customer_source(customer, business_id)
            if source and source.email not in sources:
                sources[source.email] = source
        self._send_customers(_changed((await asyncio.shield(self.known))[0], sources, self.queued[0], self.businesses))

    async def services_read(self, business_id: str, services: list[BookingService]) -> None:
        known = (await asyncio.shield(self.known))[1]
        changed = _changed(known, {s.id: service_source(s, business_id) for s in services}, self.queued[1], self.businesses)
        if self.rt.settings.sync_items and changed:
            self.items += len(changed)
            self._send(pack([ItemUpsert(service=source, sourceHash=digest) for source, digest in changed],
                            lambda chunk: ItemBatchUpsert(services=chunk)))

    async def appointment_customers(self, sources: dict[str, CustomerSource]) -> None:
        self._send_customers(_changed((await asyncio.shield(self.known))[0], sources, self.queued[0], self.businesses))

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
        await asyncio.gather(*self._sending, return_exceptions=True)


# -- a run: fanned out per business -------------------------------------------------------------

def _result_blob(business_id: str) -> str:
    return BUSINESS_RESULT.format(business=encode_key(business_id))


async def start_run(rt: Runtime, trigger: str, requested_at: datetime | None = None) -> str:
    """Fan a sync run out: one `BusinessSync` message per business, and one reconciliation with
    BC, which any instance may take. Returns the run id."""
    settings = rt.settings
    settings.require("business_ids")
    store = await rt.store()
    started = datetime.now(timezone.utc)
    run_id = f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    requested = requested_at or started
    record = {"runId": run_id, "trigger": trigger, "startedAt": _iso(started), "requestedAt": _iso(requested),
              "businesses": settings.business_ids}
    await store.write_blob(LAST_RUN, json.dumps(record).encode(), "application/json")
    await store.send_many(SYNC_BUSINESS_QUEUE, [
        *(encode(BusinessSync(runId=run_id, businessId=business, trigger=trigger, requestedAt=requested))
          for business in settings.business_ids),
        encode(InvoiceReconciliation(runId=run_id))])
    log.info("sync run %s started for %d businesses", run_id, len(settings.business_ids),
             extra={"event": "sync_run_started", "run_id": run_id, "trigger": trigger,
                    "businesses": len(settings.business_ids)})
    return run_id


async def sync_business(rt: Runtime, request: BusinessSync, now: datetime | None = None) -> dict | None:
    """One business's part of a run, under the business's lease: its customers and services,
    its calendar slice by slice, then the push from BC. Returns its result (also kept for health
    in `sync/businesses/<id>.json`); the latest result if a sync that started after the request
    covers it; None when another sync of the business holds its lease."""
    store = await rt.store()
    business = request.business_id
    async with rt.gate("business syncs", BUSINESSES_AT_ONCE):
        latest = await business_result(store, business)
        if _covers(latest, request.requested_at):
            log.info("sync of a business already covered by a later one",
                     extra={"event": "sync_request_covered", "business_id": business, "run_id": request.run_id})
            await _finish_run(store)
            return latest
        last_fetched = (latest or {}).get("counts", {}).get("fetched")
        return await _sync_business(rt, store, request, now, last_fetched)


async def _sync_business(rt: Runtime, store: Store, request: BusinessSync, now: datetime | None,
                         last_fetched: int | None) -> dict | None:
    settings, business = rt.settings, request.business_id
    lease = await leases.acquire(store, f"{SYNC_LEASE}/{encode_key(business)}")
    if lease is None:
        log.info("sync of a business skipped: another run is syncing it",
                 extra={"event": "sync_skipped", "business_id": business, "run_id": request.run_id})
        return None
    started = datetime.now(timezone.utc)
    clock = time.monotonic()
    start, end = window(settings, now or started)
    read = CalendarRead(business, start, end, slice_length(start, end, last_fetched))
    pull = BusinessPull(business)
    upserts = DirectoryQueue(rt, store, request.run_id, business)
    outcome, counts, errors = "succeeded", {}, []
    writes = StoreStats()
    writes_of_this_task.set(writes)
    try:
        try:
            await asyncio.gather(pull_directory(rt, pull, upserts), sync_calendar(rt, store, read))
            await upserts.appointment_customers(read.customer_sources())
            await upserts.finish()
        except BaseException:
            await upserts.abandon()
            raise
        pushed = await push_directory(rt, store, [pull])
        push = pushed.get(business)
        counts = read.counts.__dict__ | {"complete": read.complete, "confirmedById": read.confirmed,
                                         "customersQueued": upserts.customers, "itemsQueued": upserts.items,
                                         "bookingWrites": writes.by_table.get(BOOKINGS, 0)}
        if push is not None:
            counts |= {"push": push.counts(), "customersPushed": push.customers.created,
                       "servicesPushed": push.services.created,
                       "pushUpdated": push.customers.updated + push.services.updated,
                       "pushFailed": push.customers.failed + push.services.failed}
        # The same trouble (no access to the business…) met by every slice is said once.
        errors = list(dict.fromkeys([*read.errors, *pull.errors, *(push.errors if push else [])]))[:MAX_ERRORS]
        if not read.complete and not read.counts.fetched:
            outcome = "failed"
        elif errors or not read.complete:
            outcome = "partial"
    except Exception as error:
        outcome = "failed"
        errors.append(f"sync failed: {error}")
        log.exception("sync of a business failed", extra={"event": "sync_run_failed", "run_id": request.run_id,
                                                          "business_id": business})
    finally:
        counts["seconds"] = round(time.monotonic() - clock, 3)
        counts["tableWrites"] = writes.table_writes
        result = {"runId": request.run_id, "trigger": request.trigger, "businessId": business,
                  "startedAt": _iso(started), "at": _iso(datetime.now(timezone.utc)), "outcome": outcome,
                  "counts": counts, "errors": errors}
        try:
            await store.write_blob(_result_blob(business), json.dumps(result).encode(), "application/json")
        finally:
            await leases.release(store, lease)
    flat = {f"count_{k}": v for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log.info("sync of %s %s", business, outcome,
             extra={"event": "sync_business_finished", "run_id": request.run_id, "business_id": business,
                    "outcome": outcome, **flat})
    await _finish_run(store)
    return result


async def reconcile_run(rt: Runtime, request: InvoiceReconciliation) -> dict | None:
    """The run's reconciliation with BC, under its own lease (None: another is running); it also
    takes over a billing run that died."""
    from shared.flows.invoicing.billing import resume_stale_run
    from shared.flows.invoicing.reconcile import reconcile_invoices

    store = await rt.store()
    lease = await leases.acquire(store, RECONCILE_LEASE)
    if lease is None:
        return None
    try:
        counts = await reconcile_invoices(rt, store)
        resumed = await resume_stale_run(rt)
        if resumed is not None:
            counts["billingRunResumed"] = resumed.get("period")
        result = {"runId": request.run_id, "at": _iso(datetime.now(timezone.utc)), "counts": counts}
        await store.write_blob(RECONCILED, json.dumps(result).encode(), "application/json")
    finally:
        await leases.release(store, lease)
    await _finish_run(store)
    return result


async def _finish_run(store: Store) -> None:
    """Whoever completes the latest run's last part logs the run's summary, once
    (`sync_run_finished`)."""
    summary = await last_sync(store)
    if summary is None or summary["pending"]:
        return
    run_id = summary["runId"]
    if not await _claim_finish(store, run_id):
        return
    counts = summary["counts"]
    flat = {f"count_{k}": v for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log.info("sync run %s %s", run_id, summary["outcome"],
             extra={"event": "sync_run_finished", "run_id": run_id, "outcome": summary["outcome"],
                    "trigger": summary["trigger"], **flat})


async def _claim_finish(store: Store, run_id: str) -> bool:
    """Record that `run_id`'s summary is being logged; False if another worker did (ETags)."""
    blob = store.blob(RUN_FINISHED)
    try:
        download = await blob.download_blob()
        if json.loads(await download.readall()).get("runId") == run_id:
            return False
        condition = {"overwrite": True, "etag": download.properties.etag,
                     "match_condition": MatchConditions.IfNotModified}
    except ResourceNotFoundError:
        condition = {"overwrite": False}
    try:
        await blob.upload_blob(json.dumps({"runId": run_id}).encode(), **condition)
    except (ResourceExistsError, ResourceModifiedError):
        return False
    return True


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def _read_json(store: Store, path: str) -> dict | None:
    content = await store.read_blob(path)
    return json.loads(content) if content else None


def _covers(result: dict | None, requested_at: datetime) -> bool:
    """Whether a business's result comes from a sync that started after `requested_at`."""
    return result is not None and datetime.fromisoformat(result["startedAt"]) > requested_at


async def last_run(store: Store) -> dict | None:
    """The latest run's record: id, trigger, start and businesses."""
    return await _read_json(store, LAST_RUN)


async def business_result(store: Store, business_id: str) -> dict | None:
    """A business's latest sync result."""
    return await _read_json(store, _result_blob(business_id))


SUMMED = ("fetched", "created", "updated", "unchanged", "cancelled", "invalid", "confirmedById", "customersQueued",
          "itemsQueued", "bookingWrites", "tableWrites", "customersPushed", "servicesPushed", "pushUpdated", "pushFailed")


async def last_sync(store: Store) -> dict | None:
    """The latest run as `GET /api/status` reports it: every business's latest result, with
    totals, and the run's reconciliation. Businesses not synced since the run began are listed
    in `pending`."""
    run = await last_run(store)
    if run is None:
        return None
    businesses = run.get("businesses") or []
    results = await asyncio.gather(*(business_result(store, b) for b in businesses), _read_json(store, RECONCILED))
    reconciled, results = results[-1], dict(zip(businesses, results[:-1], strict=True))
    totals: dict = dict.fromkeys(SUMMED, 0)
    per_business, errors, outcomes, pending, finished = {}, [], [], [], []
    for business, result in results.items():
        if result is None or datetime.fromisoformat(result["at"]) < datetime.fromisoformat(run["startedAt"]):
            pending.append(business)  # not synced since the run began (a sync that was running then counts)
        if result is None:
            per_business[business] = {"outcome": "pending"}
            continue
        counts = result["counts"]
        per_business[business] = counts | {"outcome": result["outcome"], "at": result["at"], "runId": result["runId"]}
        outcomes.append(result["outcome"])
        finished.append(datetime.fromisoformat(result["at"]))
        for name in SUMMED:
            totals[name] += counts.get(name, 0)
        errors += [{"businessId": business, "message": message} for message in result["errors"]]
    if not outcomes:
        return None
    if all(outcome == "failed" for outcome in outcomes):
        outcome = "failed"
    elif any(outcome != "succeeded" for outcome in outcomes):
        outcome = "partial"
    else:
        outcome = "succeeded"
    if reconciled is not None:
        totals |= reconciled["counts"]
    at = max(finished)
    seconds = (at - datetime.fromisoformat(run["startedAt"])).total_seconds()
    totals |= {"businesses": per_business, "seconds": round(max(seconds, 0.0), 3)}
    return {"runId": run["runId"], "trigger": run["trigger"], "startedAt": run["startedAt"], "at": _iso(at),
            "outcome": outcome, "counts": totals, "errors": errors, "pending": pending}


async def queue_sync(store: Store, reason: str) -> None:
    """Queue a sync run soon (`POST /api/sync`, the setup page's "Sync now")."""
    await store.send(SYNC_QUEUE, encode(SyncRequest(reason=reason, requestedAt=datetime.now(timezone.utc))))
