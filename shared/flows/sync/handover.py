"""The customers and services a business's sync reads, handed to the directory upsert.

New or changed customers and services are queued for the directory upsert (up to 100 per
message) as soon as they are read, so Business Central work overlaps the calendar pull; a record
is new or changed when its content hash differs from what its link row recorded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shared.flows.bookings import normalise_email
from shared.flows.directory.links import CUSTOMER, ITEM, link_partition
from shared.flows.messages import (
    CustomerBatchUpsert,
    CustomerSource,
    CustomerUpsert,
    ItemBatchUpsert,
    ItemUpsert,
    ServiceSource,
    kept_by_an_earlier_business,
    pack,
    same_source_data,
    source_hash,
)
from shared.flows.sync.calendar import clip
from shared.runtime import Runtime
from shared.storage.store import CUSTOMER_LINKS, DIRECTORY_QUEUE, ITEM_LINKS, Store, encode_key
from shared.upstream.errors import UpstreamError
from shared.upstream.graph import BookingCustomer, BookingService, NoAccessToBusiness, Unreadable

CUSTOMER_PARTITION = "customer"
CUSTOMERS_PER_HANDOVER = 100
"""Customers handed to the directory queue at a time while their list is read (a Graph page)."""
ITEM_PARTITION = "item"


@dataclass
class BusinessPull:
    """What a business's sync read of its customers and services, and what went wrong."""
    business_id: str
    customers: list[BookingCustomer] = field(default_factory=list)
    services: list[BookingService] = field(default_factory=list)
    directory_complete: bool = False
    errors: list[str] = field(default_factory=list)


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


def customer_source(customer: BookingCustomer, business_id: str) -> CustomerSource | None:
    """What the directory upsert needs of a Bookings customer record (it has the address)."""
    email = normalise_email(customer.email_address)
    if not email:
        return None
    address = customer.addresses[0] if customer.addresses else None
    phone = next((p.number for p in customer.phones if p.number), None)
    return CustomerSource(
        email=email, displayName=clip(customer.display_name), phone=clip(phone),
        addressLine1=clip(address and address.street), city=clip(address and address.city),
        state=clip(address and address.state), country=clip(address and address.country_or_region),
        postalCode=clip(address and address.postal_code), businessId=business_id)


def service_source(service: BookingService, business_id: str) -> ServiceSource:
    return ServiceSource(serviceId=service.id, businessId=business_id,
                         displayName=clip(service.display_name, 100) or service.id[:100],
                         defaultPrice=max(service.default_price or 0.0, 0.0), defaultPriceType=service.default_price_type)


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
