"""Link rows: which BC customer or item each Bookings customer (by e-mail) and service (by id)
is, one partition per BC company, and the failures recorded on them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from shared.storage.store import CUSTOMER_LINKS, ITEM_LINKS, Store, encode_key

CUSTOMER_PARTITION = "customer"
ITEM_PARTITION = "item"


@dataclass(frozen=True)
class Link:
    key: str
    bc_id: str
    bc_number: str | None
    origin: str
    """`created` (from a template by this service) or `linked` (an existing BC record)."""


@dataclass(frozen=True)
class Kind:
    name: str
    table: str
    partition: str
    entity_set: str
    setting: str


CUSTOMER = Kind("customer", CUSTOMER_LINKS, CUSTOMER_PARTITION, "customers", "CUSTOMER_TEMPLATE")
ITEM = Kind("item", ITEM_LINKS, ITEM_PARTITION, "items", "ITEM_TEMPLATE")
KINDS = {"customer": CUSTOMER, "item": ITEM}


def link_partition(kind: Kind, company_id: str | None, settings) -> str:
    """Link rows are per BC company: a customer of two businesses that bill into two companies
    is one BC customer in each. `BC_COMPANY_ID`'s rows keep the kind's own partition (so links
    made before businesses had companies of their own stay valid); another company's are
    `<kind>@<company id>`."""
    if not company_id or company_id == settings.bc_company_id:
        return kind.partition
    return f"{kind.partition}@{company_id}"


def link_partitions(kind: Kind, settings) -> dict[str, str]:
    """Partition → company, for every company the businesses bill into."""
    companies = settings.companies or [settings.bc_company_id]
    return {link_partition(kind, company, settings): company for company in companies}


def company_scoped(name: str, company_id: str | None, settings) -> str:
    """A lease or blob name of the directory, one per company (BC_COMPANY_ID's keeps its name)."""
    return name if not company_id or company_id == settings.bc_company_id else f"{name}@{company_id}"


def stored_time(value) -> datetime | None:
    """A stored ISO time (or a datetime), None when blank."""
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def link_of(row: dict) -> Link:
    return Link(row.get("Key") or row["RowKey"], row["BcId"], row.get("BcNumber") or None,
                row.get("Origin") or "linked")


def masked(key: str) -> str:
    """E-mail addresses are personal data: log only enough to recognise one."""
    if "@" not in key:
        return key
    local, _, domain = key.partition("@")
    return f"{local[:2]}…@{domain}"


async def record_failure(store: Store, kind_name: str, key: str, reason: str, partition: str | None = None) -> None:
    """Make a failure visible on the link row (health, invoice reasons) without a claim.
    `partition`: the company's (`link_partition`); BC_COMPANY_ID's when not given."""
    kind = KINDS[kind_name]
    partition = partition or kind.partition
    row_key = encode_key(key)
    row = await store.get(kind.table, partition, row_key)
    if row and row.get("Status") == "linked":
        await store.update(kind.table, {"PartitionKey": partition, "RowKey": row_key,
                                        "LastError": reason[:2000]}, etag=None)
        return
    await store.upsert(kind.table, {"PartitionKey": partition, "RowKey": row_key, "Key": key,
                                    "Status": "failed", "Owner": "", "LastError": reason[:2000],
                                    "UpdatedAt": datetime.now(timezone.utc)})
