"""Table Storage rules the app keeps (Azurite is looser than Azure in places), and how the
storage services are reached."""

from __future__ import annotations

import asyncio

from shared.runtime import runtime
from shared.settings import Settings
from shared.storage.store import (BOOKINGS, CREATE, DELETE, MAX_STRING_CHARS, TRUNCATION_MARKER, UPDATE, UPSERT, Store, decode_key,
                          encode_key, fit_string)
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


def test_a_transaction_writes_what_the_sdk_writes_and_answers_each_operation_with_its_etag(world):
    """The app sends transactions itself (the SDK's multipart path costs 5x the CPU): every type
    it stores reads back as the SDK's own transaction leaves it, keys with quotes and non-ASCII
    characters included, and each operation's answer carries the ETag a read then shows."""
    from datetime import datetime, timezone

    from azure.data.tables import EdmType, EntityProperty

    moment = datetime(2026, 3, 1, 9, 30, 15, 250000, tzinfo=timezone.utc)
    entity = {"Text": "o'brien ü\r\n--changeset_x", "Flag": True, "Small": 7, "Big": EntityProperty(2**40, EdmType.INT64),
              "Price": 25.0, "At": moment, "Empty": "", "Missing": None}

    async def write_both() -> tuple[list[dict], list[dict], list[dict]]:
        store = await runtime().store()
        ours = [(CREATE, {"PartitionKey": "tx'ours ü", "RowKey": f"r'{i} é", **entity}) for i in range(3)]
        sdks = [(CREATE, {"PartitionKey": "tx'sdk ü", "RowKey": f"r'{i} é", **entity}) for i in range(3)]
        answers = await store.transact(BOOKINGS, ours)
        await store.table(BOOKINGS).submit_transaction(sdks)
        read = await store.query(BOOKINGS, "PartitionKey eq @a or PartitionKey eq @b", parameters={
            "a": "tx'ours ü", "b": "tx'sdk ü"})
        return answers, [r for r in read if r["PartitionKey"] == "tx'ours ü"], [r for r in read if r["PartitionKey"] == "tx'sdk ü"]

    answers, ours, sdks = world.host.run(write_both())

    def fields(row):
        return {k: v for k, v in row.items() if k != "PartitionKey"}

    assert [fields(r) for r in ours] == [fields(r) for r in sdks] and len(ours) == 3
    assert ours[0]["At"] == moment and ours[0]["Big"].value == 2**40 and ours[0]["Price"] == 25.0
    assert isinstance(ours[0]["Price"], float) and "Missing" not in ours[0]
    assert [a["etag"] for a in answers] == [r.metadata["etag"] for r in ours]


def test_a_failed_transaction_raises_what_the_sdk_raises_and_writes_nothing(world):
    from azure.core import MatchConditions
    from azure.data.tables import TableTransactionError

    async def scenario() -> list[tuple[str, int, int]]:
        store = await runtime().store()
        first = await store.transact(BOOKINGS, [(CREATE, {"PartitionKey": "txfail", "RowKey": "a", "N": 1})])
        stale = first[0]["etag"]
        await store.transact(BOOKINGS, [(UPSERT, {"PartitionKey": "txfail", "RowKey": "a", "N": 2})])
        outcomes = []
        for operations in (
                [(CREATE, {"PartitionKey": "txfail", "RowKey": "b"}), (CREATE, {"PartitionKey": "txfail", "RowKey": "a"})],
                [(UPDATE, {"PartitionKey": "txfail", "RowKey": "a", "N": 3},
                  {"mode": "merge", "etag": stale, "match_condition": MatchConditions.IfNotModified})],
                [(DELETE, {"PartitionKey": "txfail", "RowKey": "never"})]):
            try:
                await store.transact(BOOKINGS, operations)
            except TableTransactionError as error:
                outcomes.append((error.error_code, error.status_code, error.index))
        rows = await store.partition(BOOKINGS, "txfail")
        outcomes.append(sorted((r["RowKey"], r.get("N")) for r in rows))
        return outcomes

    outcomes = world.host.run(scenario())

    assert outcomes[:3] == [("EntityAlreadyExists", 409, 1), ("UpdateConditionNotSatisfied", 412, 0),
                            ("ResourceNotFound", 404, 0)]
    assert outcomes[3] == [("a", 2)], "all or nothing: b was not created, a kept its second write"
