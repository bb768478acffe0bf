"""Business Central → Bookings: BC customers and service items appear in every Bookings business.

Opt-in (`PUSH_CUSTOMERS_TO_BOOKINGS`, `PUSH_ITEMS_TO_BOOKINGS`), run by each sync after the
businesses' customer and service lists were read, as BC's own "Booking Customer Sync." and
"Booking Service Sync." did: persons with an e-mail and service items, narrowed by
`BC_CUSTOMER_FILTER` / `BC_ITEM_FILTER`, each run only what BC changed since the last push.

The rules that keep both systems clean:
- **Nothing ping-pongs.** A BC record the app created from Bookings is never pushed back; a
  Bookings record is found by e-mail (customers) or name (services) before anything is created,
  so what the push creates comes back to BC as a link, not a copy.
- **Exactly once.** Sync runs never overlap (the sync lease), and a create is recorded as
  `creating` on the push link row before it is sent and as `linked` after. A create whose answer
  was lost (or a crash) is not repeated in the same run; the next run reads the business's list
  again and finds it by e-mail or name before creating anything. The change watermark does not
  move past a record that is not settled.
- **Fill, never overwrite what is newer, never delete.** A Bookings field is set when it is blank,
  or when BC changed the record after Bookings last did; nothing is ever deleted on either side.
- **Blocked BC records are not pushed.**

Link rows live in the customer and item link tables, one partition per business
(`push:<business>`), keyed by the BC record's id. A business gets the records of the BC company
it bills into (`BUSINESS_COMPANIES`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from shared.flows.bookings import normalise_email, parse_instant
from shared.flows.directory.links import KINDS as DIRECTORY_KINDS
from shared.flows.directory.links import link_partition
from shared.odata_filter import changed_since_filter
from shared.runtime import Runtime
from shared.storage.store import CUSTOMER_LINKS, ITEM_LINKS, Store, encode_key
from shared.upstream.bc_lookups import first_email
from shared.upstream.errors import UpstreamAmbiguous, UpstreamError, UpstreamThrottled
from shared.upstream.graph import UNKNOWN_ERROR, BookingCustomer, BookingService
from shared.upstream.utf16 import cut

log = logging.getLogger(__name__)

WATERMARKS = "push/watermarks/{business}.json"
"""One blob per business: businesses are synced side by side, on any instance."""
OVERLAP = timedelta(minutes=5)
"""Read BC changes from a little before the watermark: clocks and commit order are not exact, and
pushing an unchanged record again changes nothing."""
MAX_ATTEMPTS = 5
UNKNOWN_ERROR_LOOKUPS = 2
"""Runs whose list must lack a record whose create Bookings answered `UnknownError` (500) before it
is taken as refused (one list may miss it: offset paging)."""
DEFAULT_DURATION = "PT1H"
"""A pushed service's duration: BC items have none; staff adjust it in Bookings."""
PRICE_TYPE = "fixedPrice"

# The longest values the app sends Bookings; longer ones are cut. Microsoft documents no limits
# but SMTP's for e-mail; these are the simulator's strict choices (sandbox/FIDELITY.md, "Writing
# customers and services"), so a value that fits here fits in Bookings.
DISPLAY_NAME_CHARS = 100
EMAIL_CHARS = 254
PHONE_CHARS = 30
ADDRESS_CHARS = {"street": 100, "city": 50, "state": 50, "postalCode": 20, "countryOrRegion": 50}


def _partition(business_id: str) -> str:
    return "push:" + encode_key(business_id)


def _cut(value: object, limit: int) -> str | None:
    """At most `limit` UTF-16 code units (how Exchange counts: an emoji is 2), never half a character."""
    return cut(str(value or "").strip(), limit).strip() or None


def _country_name(code: str | None) -> str | None:
    """Bookings keeps the country as free text: BC's code written out in English ("NO" → "Norway"),
    which the other direction maps back to the code."""
    if not code:
        return None
    from babel import Locale  # only the directory worker needs it: keep it out of app start-up

    return Locale("en").territories.get(code.upper(), code)


def _bc_is_newer(bc: dict, current: BookingCustomer | BookingService) -> bool:
    """BC changed the record after Bookings last did (a Bookings record without a time is never older)."""
    changed_in_bc = parse_instant(bc.get("lastModifiedDateTime"))
    changed_in_bookings = parse_instant(current.last_updated_date_time)
    return bool(changed_in_bc and changed_in_bookings and changed_in_bc > changed_in_bookings)


@dataclass
class KindCounts:
    created: int = 0
    updated: int = 0
    linked: int = 0
    unchanged: int = 0
    waiting: int = 0
    failed: int = 0


@dataclass
class BusinessPush:
    business_id: str
    customers: KindCounts = field(default_factory=KindCounts)
    services: KindCounts = field(default_factory=KindCounts)
    errors: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        return {"customers": self.customers.__dict__, "services": self.services.__dict__}


# -- what Bookings should hold -------------------------------------------------------------------

def customer_fields(bc: dict) -> dict:
    """A BC customer as a Bookings customer (only what BC has)."""
    street = ", ".join(part for part in (bc.get("addressLine1"), bc.get("addressLine2")) if part)
    values = {"street": street, "city": bc.get("city"), "state": bc.get("state"), "postalCode": bc.get("postalCode"),
              "countryOrRegion": _country_name(bc.get("country"))}
    address = {name: _cut(value, ADDRESS_CHARS[name]) for name, value in values.items()}
    fields: dict = {"displayName": _cut(bc.get("displayName"), DISPLAY_NAME_CHARS),
                    "emailAddress": _cut(first_email(bc.get("email")), EMAIL_CHARS)}
    if any(address.values()):
        fields["addresses"] = [{**{k: v or "" for k, v in address.items()}, "type": "home"}]
    phone = _cut(bc.get("phoneNumber"), PHONE_CHARS)
    if phone:
        fields["phones"] = [{"number": phone, "type": "home"}]
    return {k: v for k, v in fields.items() if v}


def _customer_now(customer: BookingCustomer) -> dict:
    address = customer.addresses[0] if customer.addresses else None
    phone = next((p.number for p in customer.phones if p.number), None)
    return {"displayName": customer.display_name, "emailAddress": normalise_email(customer.email_address),
            "addresses": address, "phones": phone}


def customer_changes(bc: dict, wanted: dict, current: BookingCustomer) -> dict:
    """What to PATCH: fields Bookings has blank, and, when BC changed the record after Bookings
    last did, fields that differ."""
    now = _customer_now(current)
    newer = _bc_is_newer(bc, current)
    changes = {}
    for name, value in wanted.items():
        if name == "emailAddress":
            continue  # the key it was found by
        have = now.get(name)
        if name == "addresses":
            same = have is not None and all((getattr(have, attr) or "") == (value[0].get(key) or "") for key, attr in (
                ("street", "street"), ("city", "city"), ("state", "state"), ("postalCode", "postal_code"),
                ("countryOrRegion", "country_or_region")))
        elif name == "phones":
            same = have == value[0]["number"]
        else:
            same = have == value
        if not same and (not have or newer):
            changes[name] = value
    return changes


def service_fields(bc: dict) -> dict:
    return {"displayName": _cut(bc.get("displayName"), DISPLAY_NAME_CHARS),
            "defaultPrice": float(bc.get("unitPrice") or 0), "defaultPriceType": PRICE_TYPE}


def service_changes(bc: dict, wanted: dict, current: BookingService) -> dict:
    price, wanted_price = current.default_price, wanted["defaultPrice"]
    if price is None or (abs(price - wanted_price) > 1e-9 and _bc_is_newer(bc, current)):
        return {"defaultPrice": wanted_price}
    return {}


# -- one kind in one business --------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Kind:
    name: str               # the Bookings collection: "customers" / "services"
    entity_set: str         # the BC collection: "customers" / "items"
    table: str              # link table; its partition `link_partition` holds the Bookings → BC links
    link_partition: str
    model: type             # a Bookings record as the app reads it
    key_of_bc: Callable[[dict], str | None]     # BC record → lookup key in Bookings (e-mail / name)
    key_of_bookings: Callable[[object], str | None]
    fields: Callable[[dict], dict]
    changes: Callable[[dict, dict, object], dict]
    pushable: Callable[[dict], bool]            # not blocked, of the right type
    on_create: dict         # what a new record gets beside what BC has

    def existing(self, pull) -> list:
        return pull.customers if self is CUSTOMERS else pull.services


def _name_key(name: str | None) -> str | None:
    return (name or "").strip().lower() or None


CUSTOMERS = Kind("customers", "customers", CUSTOMER_LINKS, "customer", BookingCustomer,
                 lambda bc: first_email(bc.get("email")), lambda c: normalise_email(c.email_address),
                 customer_fields, customer_changes,
                 lambda bc: bc.get("type", "Person") == "Person" and bool(first_email(bc.get("email")))
                 and (bc.get("blocked") or " ").strip() in ("", "_x0020_"), {})
SERVICES = Kind("services", "items", ITEM_LINKS, "item", BookingService,
                lambda bc: _name_key(bc.get("displayName")), lambda s: _name_key(s.display_name),
                service_fields, service_changes,
                lambda bc: bc.get("type", "Service") == "Service" and not bc.get("blocked"),
                {"defaultDuration": DEFAULT_DURATION})


async def _push_kind(rt: Runtime, store: Store, kind: Kind, business_id: str, records: list[dict],
                     existing: list, counts: KindCounts, errors: list[str] | None = None) -> bool:
    """Push `records` into one business. True when every record is settled (created, linked,
    updated or refused for good), so the watermark may move. What Bookings refuses in this run is
    added to `errors` (the sync's, shown by the status).

    A record the business's list did not show but whose link row holds its Bookings id is read by
    that id before anything is created: Graph may page by offsets, and a list walk during which
    another record is deleted skips one (it is created only if Bookings no longer has it)."""
    errors = [] if errors is None else errors
    partition = _partition(business_id)
    rows = {row["RowKey"]: row for row in await store.partition(kind.table, partition)}
    by_key = {}
    for item in existing:
        key = kind.key_of_bookings(item)
        if key and key not in by_key:
            by_key[key] = item
    settled = True
    for bc in records:
        key = kind.key_of_bc(bc)
        if not key:
            continue
        wanted = kind.fields(bc)
        row = rows.get(bc["id"]) or {}
        link = {"PartitionKey": partition, "RowKey": bc["id"], "BcId": bc["id"], "Key": key,
                "UpdatedAt": datetime.now(timezone.utc)}
        found = by_key.get(key)
        try:
            if found is None and row.get("Status") == "linked" and row.get("BookingsId"):
                found = await rt.graph.get_item(business_id, kind.name, row["BookingsId"])
                if found is not None:
                    by_key.setdefault(key, found)
            if found is not None:
                changes = kind.changes(bc, wanted, found)
                if changes:
                    await rt.graph.update(business_id, kind.name, found.id, changes)
                    counts.updated += 1
                elif row.get("Status") == "linked" and row.get("BookingsId") == found.id:
                    counts.unchanged += 1
                else:
                    counts.linked += 1
                await store.upsert(kind.table, {**link, "Status": "linked", "BookingsId": found.id, "Attempts": 0,
                                                "LastError": ""})
                continue
            attempts = int(row.get("Attempts") or 0)
            if row.get("Status") == "failed" and row.get("SourceModified") == bc.get("lastModifiedDateTime"):
                counts.failed += 1
                continue
            if row.get("Status") == "creating" and row.get("LastCode") == UNKNOWN_ERROR:
                # Bookings answered the create UnknownError (500): refused without a reason, or made
                # after all. Not sent again: it is looked for in two runs' lists, then taken as refused.
                missing = int(row.get("MissingRuns") or 0) + 1
                if missing < UNKNOWN_ERROR_LOOKUPS:
                    await store.upsert(kind.table, {**link, "Status": "creating", "MissingRuns": missing})
                    settled = False
                    counts.waiting += 1
                    continue
                reason = (f"Bookings refused it without giving a reason ({UNKNOWN_ERROR}) and does not have it; check "
                          "its values in Business Central (a change there sends it again)")
                await store.upsert(kind.table, {**link, "Status": "failed", "SourceModified":
                                                bc.get("lastModifiedDateTime") or "", "LastError": reason,
                                                "LastCode": "", "MissingRuns": 0})
                counts.failed += 1
                errors.append(f"push of {kind.name[:-1]} {key} to {business_id}: {reason}")
                continue
            if attempts >= MAX_ATTEMPTS:
                await store.upsert(kind.table, {**link, "Status": "failed", "SourceModified":
                                                bc.get("lastModifiedDateTime") or "",
                                                "LastError": f"no answer from Bookings after {attempts} attempts"})
                counts.failed += 1
                continue
            # Recorded before it is sent: a crash or a lost answer leaves "creating", and the next
            # run looks the record up by its key before it creates anything.
            await store.upsert(kind.table, {**link, "Status": "creating", "BookingsId": "", "Attempts": attempts + 1,
                                            "LastCode": "", "MissingRuns": 0})
            created = await rt.graph.create(business_id, kind.name, {**wanted, **kind.on_create})
            await store.upsert(kind.table, {**link, "Status": "linked", "BookingsId": created["id"], "Attempts": 0,
                                            "LastError": ""})
            by_key[key] = kind.model.model_validate(created)
            counts.created += 1
        except (UpstreamAmbiguous, UpstreamThrottled) as error:
            settled = False
            counts.waiting += 1
            if isinstance(error, UpstreamAmbiguous) and error.code == UNKNOWN_ERROR:
                await store.upsert(kind.table, {**link, "LastCode": UNKNOWN_ERROR})
            log.warning("push of %s to %s waits: %s", kind.name, business_id, error,
                        extra={"event": "push_waiting", "business_id": business_id, "kind": kind.name})
        except UpstreamError as error:
            if error.retryable:  # still failing after the client's retries: try again next run
                settled = False
                counts.waiting += 1
                continue
            counts.failed += 1
            await store.upsert(kind.table, {**link, "Status": "failed", "SourceModified":
                                            bc.get("lastModifiedDateTime") or "", "LastError": str(error)[:2000]})
            errors.append(f"push of {kind.name[:-1]} {key} to {business_id}: {error}"[:500])
            log.warning("Bookings refused a pushed %s: %s", kind.name[:-1], error,
                        extra={"event": "push_refused", "business_id": business_id, "kind": kind.name})
    return settled


# -- the run -------------------------------------------------------------------------------------

async def _watermarks(store: Store, businesses: list[str]) -> dict:
    contents = await asyncio.gather(*(store.read_blob(WATERMARKS.format(business=encode_key(b))) for b in businesses))
    return {business: json.loads(content) for business, content in zip(businesses, contents, strict=True) if content}


async def _save_watermarks(store: Store, marks: dict) -> None:
    await asyncio.gather(*(store.write_blob(WATERMARKS.format(business=encode_key(business)),
                                            json.dumps(kinds).encode(), "application/json")
                           for business, kinds in marks.items()))


def _since(marks: dict, businesses: list[str], kind: str) -> datetime | None:
    seen = [parse_instant((marks.get(b) or {}).get(kind)) for b in businesses]
    if not seen or any(moment is None for moment in seen):
        return None
    return min(seen) - OVERLAP


async def _from_bookings(store: Store, table: str, partition: str) -> set[str]:
    """BC ids of the records the app created from Bookings: those are never pushed back."""
    rows = await store.query(table, "PartitionKey eq @pk and Origin eq 'created'", ["BcId"], {"pk": partition})
    return {row["BcId"] for row in rows if row.get("BcId")}


async def _push_business(rt: Runtime, store: Store, kind: Kind, pull, records: list[dict], result: BusinessPush,
                         marks: dict, started: datetime) -> None:
    counts = getattr(result, kind.name)
    try:
        settled = await _push_kind(rt, store, kind, pull.business_id, records, kind.existing(pull), counts,
                                   result.errors)
    except UpstreamError as error:
        result.errors.append(f"push of {kind.name}: {error}")
        return
    if settled:
        marks.setdefault(pull.business_id, {})[kind.name] = started.isoformat()


async def push_directory(rt: Runtime, store: Store, pulls: list) -> dict[str, BusinessPush]:
    """Push BC's changes into every business whose lists were read completely in this run."""
    settings = rt.settings
    if not (settings.push_customers or settings.push_items):
        return {}
    ready = [p for p in pulls if p.directory_complete]
    results = {p.business_id: BusinessPush(p.business_id) for p in pulls}
    for pull in pulls:
        if not pull.directory_complete:
            results[pull.business_id].errors.append("push skipped: the business's customers and services could "
                                                    "not be read")
    if not ready:
        return results
    marks = await _watermarks(store, [p.business_id for p in ready])
    started = datetime.now(timezone.utc)
    kinds = [kind for kind, wanted in ((CUSTOMERS, settings.push_customers), (SERVICES, settings.push_items)) if wanted]
    filters = {CUSTOMERS: settings.bc_customer_filter, SERVICES: settings.bc_item_filter}
    by_company: dict[str, list] = {}
    for pull in ready:  # a business gets its own company's records
        by_company.setdefault(settings.company_of(pull.business_id), []).append(pull)
    for company, pulls_of_company in by_company.items():
        businesses = [p.business_id for p in pulls_of_company]
        for kind in kinds:
            try:
                records = await rt.bc_for(company).list(
                    kind.entity_set, changed_since_filter(filters[kind], _since(marks, businesses, kind.name)))
                skip = await _from_bookings(store, kind.table,
                                            link_partition(DIRECTORY_KINDS[kind.link_partition], company, settings))
            except UpstreamError as error:
                for business in businesses:
                    results[business].errors.append(f"push of {kind.name}: Business Central: {error}")
                continue
            records = [r for r in records if kind.pushable(r) and r["id"] not in skip]
            await asyncio.gather(*(_push_business(rt, store, kind, pull, records, results[pull.business_id], marks,
                                                  started) for pull in pulls_of_company))
    await _save_watermarks(store, marks)
    for result in results.values():
        log.info("pushed to %s", result.business_id,
                 extra={"event": "push_done", "business_id": result.business_id,
                        **{f"{kind}_{name}": value for kind, counts in result.counts().items()
                           for name, value in counts.items()}})
    return results
