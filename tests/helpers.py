"""Small readers over the real Azurite tables, for assertions."""

from __future__ import annotations

import json

from azure.data.tables import TableServiceClient, UpdateMode
from azure.storage.queue import QueueClient

from shared.storage.store import BOOKINGS, decode_key


def rows(world, table: str, filter: str | None = None) -> list[dict]:
    service = TableServiceClient.from_connection_string(world.sandbox.azurite.connection_string)
    client = service.get_table_client(table)
    try:
        return list(client.query_entities(filter) if filter else client.list_entities())
    except Exception as error:  # noqa: BLE001 - a table that does not exist yet has no rows
        if "TableNotFound" in str(error) or "not exist" in str(error).lower():
            return []
        raise


def merge_row(world, table: str, entity: dict) -> None:
    """Change a stored row behind the app's back (to plant a fault a checker must notice)."""
    service = TableServiceClient.from_connection_string(world.sandbox.azurite.connection_string)
    service.get_table_client(table).update_entity(entity, mode=UpdateMode.MERGE)


def queue_client(world, name: str) -> QueueClient:
    return QueueClient.from_connection_string(world.sandbox.azurite.connection_string, name)


def peek_raw(world, queue: str) -> list[str]:
    """The waiting messages' content as stored (still encoded); [] when the queue does not exist."""
    client = queue_client(world, queue)
    try:
        return [m.content for m in client.peek_messages(max_messages=32)]
    except Exception as error:
        if "QueueNotFound" in str(error):
            return []
        raise
    finally:
        client.close()


def bookings(world) -> dict[str, dict]:
    """Stored bookings by appointment id."""
    return {decode_key(r["RowKey"]): r for r in rows(world, BOOKINGS)}


def body(response) -> dict:
    return json.loads(response.get_body() or b"null")
