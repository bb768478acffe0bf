"""Small readers over the real Azurite tables, for assertions."""

from __future__ import annotations

import json

from azure.data.tables import TableServiceClient

from shared.store import BOOKINGS, decode_key


def rows(world, table: str, filter: str | None = None) -> list[dict]:
    service = TableServiceClient.from_connection_string(world.sandbox.azurite.connection_string)
    client = service.get_table_client(table)
    try:
        return list(client.query_entities(filter) if filter else client.list_entities())
    except Exception as error:  # noqa: BLE001 - a table that does not exist yet has no rows
        if "TableNotFound" in str(error) or "not exist" in str(error).lower():
            return []
        raise


def bookings(world) -> dict[str, dict]:
    """Stored bookings by appointment id."""
    return {decode_key(r["RowKey"]): r for r in rows(world, BOOKINGS)}


def body(response) -> dict:
    return json.loads(response.get_body() or b"null")
