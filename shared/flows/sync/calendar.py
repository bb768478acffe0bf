"""A business's calendar window, read from Graph into the `bookings` table.

The window is read slice by slice (`SUB_WINDOW`, shorter for a dense calendar), page by page,
against the stored rows of the same slice, so memory does not grow with the calendar.

Only rows whose content changed are written (a content hash per row), in transactions of at
most 100 (`SliceWriter`). An appointment that vanished from a *complete* read of its slice is
confirmed gone by id and marked cancelled, never deleted; after a failed or partial read nothing
is cancelled."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from azure.core.exceptions import ResourceExistsError, ServiceRequestError, ServiceResponseError
from azure.data.tables import TableTransactionError

from shared.flows.bookings import Booking
from shared.flows.messages import SOURCE_TEXT, CustomerSource
from shared.runtime import Runtime
from shared.storage.store import BOOKINGS, CREATE, MAX_BATCH, UPDATE, UPSERT, Store, decode_key, encode_key
from shared.upstream.errors import UpstreamError, UpstreamNotFound
from shared.upstream.graph import NoAccessToBusiness, Unreadable

log = logging.getLogger(__name__)

CANCELLED_HASH = "cancelled"

SUB_WINDOW = timedelta(days=7)
"""Each business's window is read as slices of this length, `SLICES_AT_ONCE` side by side."""
SLICE_APPOINTMENTS = 2_000
"""A business whose last sync read more than this many appointments a week gets shorter slices,
so a slice holds about this many stored rows, whatever the calendar's size."""
SHORTEST_SLICE = timedelta(hours=6)
WRITE_ATTEMPTS = 4
SLICES_AT_ONCE = 4


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
                    email=customer.email, displayName=clip(customer.name), phone=clip(customer.phone),
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


def _overlaps(row: StoredRow | Booking, start: datetime, end: datetime) -> bool:
    if row.start is None or row.end is None:
        return False
    return row.end > start and row.start < end


def clip(value: str | None, limit: int = SOURCE_TEXT) -> str | None:
    value = (value or "").strip()
    return value[:limit] or None
