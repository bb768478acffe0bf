"""Azure Table, Queue and Blob storage: the app's only state.

Tables hold the data (bookings, links, templates, jobs), queues the work. Bookkeeping that is
rewritten on every run whether or not anything changed (the sync lease, the last run's summary)
lives in blobs of one container instead, the way the Functions host keeps its own locks and timer
status: so an unchanged sync writes no table entity at all.

One `Store` per process and event loop owns the service clients. Writes go through here so they
can be counted (the sync proves "nothing changed → nothing written" with these counters) and kept
within Table Storage's rules: a transaction holds at most 100 operations of one partition, keys
may not contain `/ \\ # ?` or control characters, a string property holds at most 32K characters.

Storage is reached with the `AzureWebJobsStorage` connection string (Azurite locally) or, in
Azure, with the Function App's managed identity (`AzureWebJobsStorage__accountName`)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any
from collections.abc import AsyncIterator, Iterable

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import EdmType, EntityProperty, TransactionOperation, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobClient, BlobServiceClient
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from shared.storage import table_batch
from shared.hostconfig import queue_settings
from shared.settings import Settings, SettingsError

log = logging.getLogger(__name__)

BOOKINGS = "bookings"
CUSTOMER_LINKS = "customerlinks"
ITEM_LINKS = "itemlinks"
TEMPLATES = "templates"
JOBS = "invoicejobs"
SESSIONS = "pagesessions"
"""Sessions of the operator pages (`shared/web/sessions.py`)."""
TABLES = (BOOKINGS, CUSTOMER_LINKS, ITEM_LINKS, TEMPLATES, JOBS, SESSIONS)

CONTAINER = "bookings-invoicing"
"""The app's bookkeeping blobs: `locks/<name>` (leases, `shared/storage/leases.py`) and the last sync
run's summary (`shared/flows/sync/run.py`)."""

SYNC_QUEUE = "sync-requests"
SYNC_BUSINESS_QUEUE = "sync-businesses"
"""A sync run's parts: one message per business (and one for the reconciliation with BC)."""
DIRECTORY_QUEUE = "directory-upserts"
INVOICE_QUEUE = "invoice-jobs"
QUEUES = (SYNC_QUEUE, SYNC_BUSINESS_QUEUE, DIRECTORY_QUEUE, INVOICE_QUEUE)

MAX_BATCH = 100
FILTER_KEYS = 14
MAX_STRING_CHARS = 32_000
TRUNCATION_MARKER = "…[truncated]"
_KEY_UNSAFE = re.compile(r"[%/\\#?\x00-\x1f\x7f-\x9f]")

DEVELOPMENT_STORAGE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;")
"""Azurite's published default account, what `UseDevelopmentStorage=true` stands for."""


def connection_string(value: str) -> str:
    """The table and queue SDKs understand `UseDevelopmentStorage=true`, the blob SDK does not:
    spell it out once for all three."""
    return DEVELOPMENT_STORAGE if value.strip().rstrip(";").lower() == "usedevelopmentstorage=true" else value


PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def transport_settings() -> dict:
    """The storage clients read proxy settings from the environment only when a proxy is set:
    aiohttp's `trust_env` costs every request two hops through a thread (a `.netrc` look-up and
    the proxy variables), a fifth of a storage call's CPU."""
    return {"use_env_settings": any(os.environ.get(name) for name in PROXY_VARIABLES)}


def encode_key(value: str) -> str:
    """A reversible, storage-safe PartitionKey/RowKey for any id or e-mail address."""
    return _KEY_UNSAFE.sub(lambda m: f"%{ord(m.group(0)):02X}", value)


def decode_key(value: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def fit_string(value: str, limit: int = MAX_STRING_CHARS) -> str:
    """Truncate a long text with a visible marker so the entity stays within the size limit."""
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


INT32 = range(-(2**31), 2**31)


def storable(entity: dict) -> dict:
    """Integers beyond 32 bits must be typed Int64 explicitly, or the SDK refuses them."""
    return {name: EntityProperty(value, EdmType.INT64)
            if isinstance(value, int) and not isinstance(value, bool) and value not in INT32 else value
            for name, value in entity.items()}


def quote(value: str) -> str:
    """An OData string literal for table filters (`'` doubled)."""
    return "'" + value.replace("'", "''") + "'"


@dataclass
class StoreStats:
    """What this process wrote: single writes and transactions count one each. Blob uploads are
    counted apart (`blob_writes`): they are the bookkeeping an unchanged sync still does."""
    table_writes: int = 0
    entities_written: int = 0
    messages_sent: int = 0
    blob_writes: int = 0
    by_table: dict[str, int] = field(default_factory=dict)

    def count(self, table: str, entities: int) -> None:
        self.table_writes += 1
        self.entities_written += entities
        self.by_table[table] = self.by_table.get(table, 0) + 1
        attributed = writes_of_this_task.get()
        if attributed is not self and attributed is not None:
            attributed.count(table, entities)


writes_of_this_task: contextvars.ContextVar[StoreStats | None] = contextvars.ContextVar("writes_of_this_task",
                                                                                       default=None)
"""Set to a fresh `StoreStats` to count the writes of one piece of work (a business's sync) and
of the tasks it starts, while other work runs side by side in the same process."""


class Store:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stats = StoreStats()
        self._credential = None
        queue_config = queue_settings()
        if queue_config.message_encoding == "base64":
            encode, decode = TextBase64EncodePolicy(), TextBase64DecodePolicy()
        else:
            encode = decode = None
        self._queue_policies = {"message_encode_policy": encode, "message_decode_policy": decode}
        transport = transport_settings()
        if settings.storage_connection:
            connection = connection_string(settings.storage_connection)
            self.tables = TableServiceClient.from_connection_string(connection, **transport)
            self.queues = QueueServiceClient.from_connection_string(connection, **self._queue_policies, **transport)
            self.blobs = BlobServiceClient.from_connection_string(connection, **transport)
        elif settings.storage_account_name:
            from azure.identity.aio import ManagedIdentityCredential

            # The managed identity, never the app registration: only the identity has storage roles.
            account = settings.storage_account_name
            self._credential = ManagedIdentityCredential(client_id=settings.storage_client_id)
            self.tables = TableServiceClient(f"https://{account}.table.core.windows.net", credential=self._credential,
                                             **transport)
            self.queues = QueueServiceClient(f"https://{account}.queue.core.windows.net",
                                             credential=self._credential, **self._queue_policies, **transport)
            self.blobs = BlobServiceClient(f"https://{account}.blob.core.windows.net", credential=self._credential,
                                           **transport)
        else:
            raise SettingsError("Setting AzureWebJobsStorage is required but not set "
                                "(or set AzureWebJobsStorage__accountName to use the managed identity).")
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._table_clients: dict[str, TableClient] = {}
        self._queue_clients: dict[str, QueueClient] = {}
        self._blob_clients: dict[str, BlobClient] = {}

    async def aclose(self) -> None:
        for client in [*self._table_clients.values(), *self._queue_clients.values(), *self._blob_clients.values()]:
            await client.close()
        await self.tables.close()
        await self.queues.close()
        await self.blobs.close()
        if self._credential:
            await self._credential.close()

    async def ensure_ready(self) -> None:
        """Create tables, queues and the container once per process (cheap to repeat, but not free)."""
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            names = [*QUEUES, *(f"{name}-poison" for name in QUEUES)]
            await asyncio.gather(*(self._create_table(name) for name in TABLES),
                                 *(self._create_queue(name) for name in names), self._create_container())
            self._ready = True

    async def _create_table(self, name: str) -> None:
        try:
            await self.tables.create_table(name)
        except ResourceExistsError:
            pass

    async def _create_queue(self, name: str) -> None:
        try:
            await self.queues.create_queue(name)
        except ResourceExistsError:
            pass

    async def _create_container(self) -> None:
        try:
            await self.blobs.create_container(CONTAINER)
        except ResourceExistsError:
            pass

    def table(self, name: str) -> TableClient:
        client = self._table_clients.get(name)
        if client is None:
            client = self._table_clients[name] = self.tables.get_table_client(name)
        return client

    def queue(self, name: str) -> QueueClient:
        client = self._queue_clients.get(name)
        if client is None:
            client = self._queue_clients[name] = self.queues.get_queue_client(name, **self._queue_policies)
        return client

    def blob(self, path: str) -> BlobClient:
        """A blob of the app's container (`locks/sync`, …)."""
        client = self._blob_clients.get(path)
        if client is None:
            client = self._blob_clients[path] = self.blobs.get_blob_client(CONTAINER, path)
        return client

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, table: str, partition: str, row: str) -> dict | None:
        try:
            return await self.table(table).get_entity(partition, row)
        except ResourceNotFoundError:
            return None

    async def query(self, table: str, filter: str | None = None, select: list[str] | None = None,
                    parameters: dict | None = None) -> list[dict]:
        return [entity async for entity in self.iterate(table, filter, select, parameters)]

    async def iterate(self, table: str, filter: str | None = None, select: list[str] | None = None,
                      parameters: dict | None = None) -> AsyncIterator[dict]:
        client = self.table(table)
        if filter:
            pages = client.query_entities(filter, select=select, parameters=parameters)
        else:
            pages = client.list_entities(select=select)
        async for entity in pages:
            yield entity

    async def partition(self, table: str, partition: str, select: list[str] | None = None) -> list[dict]:
        return await self.query(table, "PartitionKey eq @pk", select, {"pk": partition})

    async def get_many(self, table: str, partition: str, row_keys: list[str]) -> dict[str, dict]:
        """Rows of one partition by key, a few queries for many rows (Table Storage allows at
        most 15 comparisons in one filter)."""
        keys = list(dict.fromkeys(row_keys))
        chunks = [keys[i:i + FILTER_KEYS] for i in range(0, len(keys), FILTER_KEYS)]

        async def one(chunk: list[str]) -> list[dict]:
            clause = " or ".join(f"RowKey eq @k{index}" for index in range(len(chunk)))
            parameters = {"pk": partition, **{f"k{index}": key for index, key in enumerate(chunk)}}
            # Spaces around the parentheses: the SDK finds @parameters between blanks.
            return await self.query(table, f"PartitionKey eq @pk and ( {clause} )", parameters=parameters)

        found: dict[str, dict] = {}
        for rows in await asyncio.gather(*(one(chunk) for chunk in chunks)):
            found |= {row["RowKey"]: row for row in rows}
        return found

    async def get_range(self, table: str, partition: str, low: str, high: str) -> dict[str, dict]:
        """Rows of one partition with `low` ≤ RowKey ≤ `high`, in one query."""
        rows = await self.query(table, "PartitionKey eq @pk and RowKey ge @low and RowKey le @high",
                                parameters={"pk": partition, "low": low, "high": high})
        return {row["RowKey"]: row for row in rows}

    async def read_blob(self, path: str) -> bytes | None:
        """The blob's content, or None if it was never written."""
        try:
            download = await self.blob(path).download_blob()
        except ResourceNotFoundError:
            return None
        return await download.readall()

    # -- writes --------------------------------------------------------------------------------

    async def insert(self, table: str, entity: dict) -> dict:
        """Create; raises `ResourceExistsError` if the row exists (used to claim a name)."""
        self.stats.count(table, 1)
        return await self.table(table).create_entity(storable(entity))

    async def upsert(self, table: str, entity: dict, merge: bool = True) -> dict:
        self.stats.count(table, 1)
        return await self.table(table).upsert_entity(storable(entity),
                                                     mode=UpdateMode.MERGE if merge else UpdateMode.REPLACE)

    async def update(self, table: str, entity: dict, etag: str | None, merge: bool = True) -> dict:
        """Update guarded by `etag` (raises `ResourceModifiedError` on a concurrent change)."""
        self.stats.count(table, 1)
        kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        return await self.table(table).update_entity(
            storable(entity), mode=UpdateMode.MERGE if merge else UpdateMode.REPLACE, **kwargs)

    async def delete(self, table: str, partition: str, row: str, etag: str | None = None) -> None:
        self.stats.count(table, 1)
        kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        await self.table(table).delete_entity(partition, row, **kwargs)

    async def transact(self, table: str, operations: list[tuple]) -> list[dict]:
        """One all-or-nothing transaction (≤ 100 operations, one partition); returns each
        operation's answer (with its new `etag`)."""
        if not operations:
            return []
        if len(operations) > MAX_BATCH:
            raise ValueError("a table transaction holds at most 100 operations")
        self.stats.count(table, len(operations))
        return await table_batch.submit(self.table(table), [(op[0], storable(op[1]), *op[2:]) for op in operations])

    async def write_batches(self, table: str, operations: Iterable[tuple], concurrency: int = 8) -> int:
        """Apply many operations as transactions of ≤ 100 per partition, a few at a time.

        Not atomic as a whole: each transaction is. Returns the number of transactions."""
        by_partition: dict[str, list[tuple]] = {}
        for operation in operations:
            by_partition.setdefault(operation[1]["PartitionKey"], []).append(operation)
        chunks = [ops[i:i + MAX_BATCH] for ops in by_partition.values() for i in range(0, len(ops), MAX_BATCH)]
        gate = asyncio.Semaphore(concurrency)

        async def submit(chunk: list[tuple]) -> None:
            async with gate:
                await self.transact(table, chunk)

        await asyncio.gather(*(submit(chunk) for chunk in chunks))
        return len(chunks)

    async def write_blob(self, path: str, data: bytes, content_type: str, overwrite: bool = True) -> None:
        """Upload a whole blob; with `overwrite=False` raises `ResourceExistsError` if it exists."""
        self.stats.blob_writes += 1
        await self.blob(path).upload_blob(data, overwrite=overwrite,
                                          content_settings=ContentSettings(content_type=content_type))

    async def peek(self, queue: str, count: int = 32) -> list[str]:
        """Up to 32 messages at the front of a queue, decoded, without taking them ([] if no queue)."""
        try:
            messages = await self.queue(queue).peek_messages(max_messages=min(count, 32))
        except ResourceNotFoundError:
            return []
        return [m.content if isinstance(m.content, str) else m.content.decode(errors="replace") for m in messages]

    async def send(self, queue: str, message: str, visibility_timeout: int | None = None) -> None:
        self.stats.messages_sent += 1
        await self.queue(queue).send_message(message, visibility_timeout=visibility_timeout)

    async def send_many(self, queue: str, messages: list[str], concurrency: int = 16) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(message: str) -> None:
            async with gate:
                await self.send(queue, message)

        await asyncio.gather(*(one(message) for message in messages))


UPSERT = TransactionOperation.UPSERT
UPDATE = TransactionOperation.UPDATE
CREATE = TransactionOperation.CREATE
DELETE = TransactionOperation.DELETE
