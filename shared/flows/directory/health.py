"""What the directory's link rows say for the status and the pages: customers and items BC
refused, those waiting for BC, and customers created with fields left out."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from shared.flows.directory.links import CUSTOMER, ITEM, Kind, link_partitions, masked
from shared.storage.store import Store


async def _rows_of_companies(store: Store, kind: Kind, settings, condition: str, select: list[str]) -> list[dict]:
    """Link rows of every company's partition that meet `condition` (an OData filter)."""
    partitions = link_partitions(kind, settings) if settings is not None else {kind.partition: None}
    found = await asyncio.gather(*(store.query(kind.table, f"PartitionKey eq @pk and ({condition})",
                                               [*select, "PartitionKey"], {"pk": partition})
                                   for partition in partitions))
    return [row | {"companyId": partitions[row["PartitionKey"]]} for rows in found for row in rows]


async def directory_health(store: Store, settings=None) -> dict:
    """Customers and items BC refused, waiting ones, and customers created with fields left out,
    over every company the businesses bill into."""
    failures = {"customer": 0, "item": 0}
    recent, left_out = [], []
    waiting = 0
    for kind in (CUSTOMER, ITEM):
        rows = await _rows_of_companies(store, kind, settings, "Status eq 'failed' or Status eq 'waiting'",
                                        ["RowKey", "Key", "Status", "LastError", "UpdatedAt"])
        failures[kind.name] = sum(1 for r in rows if r.get("Status") == "failed")
        waiting += sum(1 for r in rows if r.get("Status") == "waiting")
        recent += [{"kind": kind.name, "key": masked(r.get("Key") or r["RowKey"]), "reason": r.get("LastError"),
                    "at": r.get("UpdatedAt")} for r in rows if r.get("Status") == "failed"]
    partial = await _rows_of_companies(store, CUSTOMER, settings, "Status eq 'linked' and LeftOut ne ''",
                                       ["RowKey", "Key", "LeftOut", "UpdatedAt"])
    left_out = [{"kind": "customer", "key": masked(r.get("Key") or r["RowKey"]), "leftOut": r.get("LeftOut"),
                 "at": r.get("UpdatedAt")} for r in partial]
    for entries in (recent, left_out):
        entries.sort(key=lambda r: r["at"] or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
        for item in entries:
            item["at"] = item["at"].isoformat() if item["at"] else None
    return {"customerFailures": failures["customer"], "itemFailures": failures["item"], "recent": recent[:10],
            "waiting": waiting, "customersWithFieldsLeftOut": len(left_out), "leftOut": left_out[:10]}


async def refusals(store: Store, settings=None, limit: int = 200) -> list[dict]:
    """Customers and items BC refused (in any company), newest first, with BC's reason (and the
    fix, where known), for signed-in operators: keys are shown whole, unlike in the anonymous
    health answer."""
    found = []
    for kind in (CUSTOMER, ITEM):
        rows = await _rows_of_companies(store, kind, settings, "Status eq 'failed'",
                                        ["RowKey", "Key", "LastError", "UpdatedAt"])
        found += [{"kind": kind.name, "key": r.get("Key") or r["RowKey"], "reason": r.get("LastError") or "",
                   "at": r.get("UpdatedAt"), "companyId": r["companyId"]} for r in rows]
    found.sort(key=lambda r: r["at"] or datetime.min.replace(tzinfo=timezone.utc), reverse=True)
    return found[:limit]
