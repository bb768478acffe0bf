"""Table Storage rules the app keeps (Azurite is looser than Azure in places), and how the
storage services are reached."""

from __future__ import annotations

import asyncio

from shared.runtime import runtime
from shared.settings import Settings
from shared.store import (BOOKINGS, MAX_STRING_CHARS, TRUNCATION_MARKER, UPSERT, Store, decode_key, encode_key,
                          fit_string)
from tests.helpers import rows


def test_keys_never_contain_characters_table_storage_forbids():
    for value in ["a/b", "c\\d", "e#f", "g?h", "tab\there", "100%", "o'brien@example.com", "AAMk+/=="]:
        key = encode_key(value)
        assert not set(key) & set("/\\#?\t") and decode_key(key) == value


def test_long_text_is_truncated_with_a_visible_marker():
    text = fit_string("x" * (MAX_STRING_CHARS + 10))
    assert len(text) == MAX_STRING_CHARS and text.endswith(TRUNCATION_MARKER)
    assert fit_string("short") == "short"


def test_many_writes_become_transactions_of_at_most_100_per_partition_and_big_integers_survive(world):
    async def write():
        store = await runtime().store()
        before = store.stats.table_writes
        operations = [(UPSERT, {"PartitionKey": f"p{i % 2}", "RowKey": f"r{i:04d}", "Big": 2**40 + i})
                      for i in range(250)]
        transactions = await store.write_batches(BOOKINGS, operations)
        return transactions, store.stats.table_writes - before

    transactions, writes = world.host.run(write())

    assert transactions == writes == 4, "125 per partition → 100 + 25, twice"
    stored = rows(world, BOOKINGS)
    assert len(stored) == 250
    assert max(r["Big"].value for r in stored) == 2**40 + 249, "stored and read back as Int64"


def test_blobs_are_reached_like_tables_and_queues():
    """By connection string, Azurite's shorthand included (which the blob SDK alone does not
    understand), or by the managed identity."""
    async def endpoints(**values: str | None) -> tuple[str, str]:
        store = Store(Settings(**values))
        try:
            return store.blobs.url, store.tables.url
        finally:
            await store.aclose()

    blob, table = asyncio.run(endpoints(AzureWebJobsStorage="UseDevelopmentStorage=true"))
    assert blob.startswith("http://127.0.0.1:10000/devstoreaccount1")
    assert table.startswith("http://127.0.0.1:10002/devstoreaccount1")
    blob, _ = asyncio.run(endpoints(AzureWebJobsStorage=None, AzureWebJobsStorage__accountName="stapp"))
    assert blob.startswith("https://stapp.blob.core.windows.net")


def test_blob_writes_are_counted_apart_from_table_writes(world):
    async def write():
        store = await runtime().store()
        tables, blobs = store.stats.table_writes, store.stats.blob_writes
        await store.write_blob("probe/state.json", b'{"ok":true}', "application/json")
        properties = await store.blob("probe/state.json").get_blob_properties()
        return (store.stats.table_writes - tables, store.stats.blob_writes - blobs, properties.content_settings.content_type,
                await store.read_blob("probe/state.json"), await store.read_blob("probe/never-written.json"))

    table_writes, blob_writes, content_type, content, missing = world.host.run(write())

    assert (table_writes, blob_writes) == (0, 1)
    assert content_type == "application/json" and content == b'{"ok":true}' and missing is None
