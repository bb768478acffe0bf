"""Table Storage rules the app keeps (Azurite is looser than Azure in places)."""

from __future__ import annotations

from shared.runtime import runtime
from shared.store import (BOOKINGS, MAX_STRING_CHARS, TRUNCATION_MARKER, UPSERT, decode_key, encode_key, fit_string)
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
