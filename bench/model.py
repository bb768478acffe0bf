"""The fixed cost model, the workload data, and the lower bound the cost model allows.

Nothing here is tuned to make the app look good: the numbers are the ones the benchmark is
specified with, and the bound counts only requests that no implementation can avoid (see
`bench/README.md` for the argument behind each term)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sandbox.data import Dataset, generate, graph_datetime, iso_duration
from sandbox.faults import Knobs

# -- the cost model (do not tune) ----------------------------------------------------------------

GRAPH_LATENCY_MS = 60.0
GRAPH_CONCURRENCY = 4          # per Bookings mailbox; more wait
GRAPH_PAGE_SIZE = 100          # calendarView / customers / services page size
BC_LATENCY_MS = 120.0
BC_CONCURRENCY = 5             # per environment; more wait (no 429)
BC_BATCH_ITEM_MS = 20.0        # a $batch costs BC_LATENCY_MS + this per inner request
BC_BATCH_MAX = 100
BC_LIST_PAGE = 20_000          # the BC simulator's page size for lists


def graph_knobs() -> Knobs:
    return Knobs(latency_ms=GRAPH_LATENCY_MS, max_concurrency=GRAPH_CONCURRENCY)


def bc_knobs() -> Knobs:
    return Knobs(latency_ms=BC_LATENCY_MS, max_concurrency=BC_CONCURRENCY, max_queued=None)


# -- workload data -------------------------------------------------------------------------------

SERVICES = 30
CUSTOMERS_PER_APPOINTMENT = 0.2   # 10,000 appointments ↔ 2,000 customers
PRICED = ("fixedPrice", "startingAt", "hourly", "priceVaries")


def business_pair(tag: str) -> tuple[str, str]:
    """Two Bookings mailboxes unique to one scenario (the simulators keep every scenario's data)."""
    return (f"bench-{tag}-a@contoso.onmicrosoft.com", f"bench-{tag}-b@contoso.onmicrosoft.com")


def customers_for(appointments: int) -> int:
    return max(5, round(appointments * CUSTOMERS_PER_APPOINTMENT))


def sync_dataset(appointments: int, tag: str, now: datetime | None = None) -> Dataset:
    """(a)–(c): `appointments` in two businesses, N/5 customers (the same people in both
    businesses, as `sandbox.data` makes them), 30 services per business."""
    return generate(appointments=appointments, customers=customers_for(appointments), services=SERVICES,
                    business_ids=business_pair(tag), seed=7, now=now)


def distinct_emails(dataset: Dataset) -> set[str]:
    """Distinct normalised e-mails of the Bookings customers (what becomes BC customers)."""
    found = set()
    for business in dataset.businesses.values():
        for customer in business.customers:
            email = (customer.get("emailAddress") or "").strip().lower()
            if "@" in email:
                found.add(email)
    for _, appointment in dataset.appointments():
        people = appointment.get("customers") or [{"emailAddress": appointment.get("customerEmailAddress")}]
        for person in people:
            email = (person.get("emailAddress") or "").strip().lower()
            if "@" in email:
                found.add(email)
    return found


def distinct_service_names(dataset: Dataset) -> set[str]:
    return {s["displayName"].strip().lower() for b in dataset.businesses.values() for s in b.services}


def invoice_dataset(bookings: int, customers: int, tag: str, now: datetime | None = None) -> Dataset:
    """(d): exactly `bookings` ended, priced, single-customer appointments of exactly `customers`
    distinct e-mails (`bookings / customers` each), in two businesses.

    Built from `sandbox.data.generate` (realistic payloads: both customer shapes, every priced
    price type, staff-edited prices, both UTC spellings) and then made billable: group bookings
    become single, unpriced services are swapped for priced ones, appointments that have not
    ended are moved 31 days back (still inside the 60-day window)."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    dataset = generate(appointments=bookings, customers=customers + max(5, customers // 8), services=SERVICES,
                       business_ids=business_pair(tag), seed=11, now=now)
    billable: dict[str, list[dict]] = {}
    priced: dict[str, list[dict]] = {}
    for business_id, business in dataset.businesses.items():
        seen: set[str] = set()
        people = []
        for customer in business.customers:
            email = (customer.get("emailAddress") or "").strip().lower()
            if "@" in email and email not in seen:
                seen.add(email)
                people.append(customer)
        if len(people) < customers:
            raise ValueError("not enough customers with an e-mail")
        billable[business_id] = people[:customers]
        priced[business_id] = [s for s in business.services if s["defaultPriceType"] in PRICED]
    counter = 0
    for business_id, appointment in dataset.appointments():
        person = billable[business_id][counter % customers]
        counter += 1
        phone = person["phones"][0]["number"] if person["phones"] else ""
        appointment.update(customerEmailAddress=person["emailAddress"], customerName=person["displayName"],
                           customerPhone=phone, filledAttendeesCount=1)
        if appointment.get("customers"):
            appointment["customers"] = [dict(appointment["customers"][0], customerId=person["id"],
                                             name=person["displayName"], emailAddress=person["emailAddress"],
                                             phone=phone)]
        if appointment["priceType"] not in PRICED or not appointment.get("price"):
            service = priced[business_id][counter % len(priced[business_id])]
            appointment.update(serviceId=service["id"], serviceName=service["displayName"],
                               priceType=service["defaultPriceType"], price=service["defaultPrice"])
        start = datetime.fromisoformat(appointment["startDateTime"]["dateTime"])
        end = datetime.fromisoformat(appointment["endDateTime"]["dateTime"])
        if end > now - timedelta(minutes=5):
            start, end = start - timedelta(days=31), end - timedelta(days=31)
            z = appointment["startDateTime"]["dateTime"].endswith("Z")
            appointment["startDateTime"] = graph_datetime(start, z)
            appointment["endDateTime"] = graph_datetime(end, z)
            appointment["duration"] = iso_duration(int((end - start).total_seconds() // 60))
    assert counter == bookings
    return dataset


def changed_ids(dataset: Dataset, share: float = 0.05) -> list[tuple[str, str, dict]]:
    """Every 20th appointment (5 %), with the change a Bookings user makes: half get a new price,
    half end 15 minutes later. Customers and services stay as they were."""
    step = max(1, round(1 / share))
    changes = []
    for index, (business_id, appointment) in enumerate(dataset.appointments()):
        if index % step:
            continue
        if (index // step) % 2 == 0:
            change = {"price": round(float(appointment.get("price") or 0) + 5.0, 2)}
        else:
            end = datetime.fromisoformat(appointment["endDateTime"]["dateTime"]) + timedelta(minutes=15)
            change = {"endDateTime": graph_datetime(end, appointment["endDateTime"]["dateTime"].endswith("Z"))}
        changes.append((business_id, appointment["id"], change))
    return changes


# -- the bound -------------------------------------------------------------------------------------

def pages(count: int, size: int = GRAPH_PAGE_SIZE) -> int:
    return max(1, math.ceil(count / size))


def bc_requests_seconds(count: int) -> float:
    """`count` single BC requests at 5 at a time."""
    return math.ceil(count / BC_CONCURRENCY) * BC_LATENCY_MS / 1000 if count else 0.0


def bc_batched_seconds(count: int) -> tuple[float, int]:
    """Lower bound for `count` independent BC requests when `$batch` may be used: k batches of
    ≤ 100 cost 120 ms + 20 ms per request each and hold one of the 5 slots while they run, so
    the time is at least max(total slot time / 5, the longest batch). Minimised over k (and
    against sending them singly). Returns (seconds, batches)."""
    if count == 0:
        return 0.0, 0
    best = (bc_requests_seconds(count), 0)
    for k in range(math.ceil(count / BC_BATCH_MAX), count + 1):
        slot_ms = k * BC_LATENCY_MS + count * BC_BATCH_ITEM_MS
        longest_ms = BC_LATENCY_MS + BC_BATCH_ITEM_MS * math.ceil(count / k)
        seconds = max(slot_ms / BC_CONCURRENCY, longest_ms) / 1000
        if seconds < best[0]:
            best = (seconds, k)
        if slot_ms / BC_CONCURRENCY > longest_ms:
            break  # more batches only add slot time from here on
    return best


@dataclass
class Bound:
    seconds: float
    graph_seconds: float
    bc_seconds: float
    unbatched_seconds: float
    """The same unavoidable requests sent singly (5 at a time): what an app without `$batch` can reach."""
    with_lookups_seconds: float
    """Also counting one BC existence lookup per record (batched), as the app's exactly-once
    design does (the strict bound replaces them by one list of all customers / items)."""
    terms: dict

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "graph_seconds": round(self.graph_seconds, 3),
                "bc_seconds": round(self.bc_seconds, 3), "unbatched_seconds": round(self.unbatched_seconds, 3),
                "with_lookups_seconds": round(self.with_lookups_seconds, 3), "terms": self.terms}


def graph_pull_seconds(dataset: Dataset) -> tuple[float, dict]:
    """Each business: its calendar window, customers and services, within the mailbox's 4 slots;
    the businesses (separate mailboxes, separate limits) in parallel. A window can be cut into
    slices read side by side, so its pages are not one chain: at best its pages fill every slot
    (the bound counts no partial pages at slice edges). The customers and services lists cannot
    be cut: each is a chain."""
    per_business = {}
    for business_id, business in dataset.businesses.items():
        calendar, customers, services = (pages(len(business.appointments)), pages(len(business.customers)),
                                         pages(len(business.services)))
        waves = math.ceil((calendar + customers + services) / GRAPH_CONCURRENCY)
        seconds = max(customers, services, waves) * GRAPH_LATENCY_MS / 1000
        per_business[business_id] = {"calendarView_pages": calendar, "customers_pages": customers,
                                     "services_pages": services, "seconds": seconds}
    return max(b["seconds"] for b in per_business.values()), per_business


def sync_bound(dataset: Dataset, new_customers: int, new_items: int) -> Bound:
    """A sync: the Graph pull, and in BC one list of customers and one of items (which says what
    exists) followed by the creates of what does not (batched). Graph and BC overlap."""
    graph, per_business = graph_pull_seconds(dataset)
    creates = new_customers + new_items
    lists = BC_LATENCY_MS / 1000 if creates else 0.0
    batched, batches = bc_batched_seconds(creates)
    bc = lists + batched
    unbatched = lists + bc_requests_seconds(creates)
    with_lookups = lists + bc_batched_seconds(2 * creates)[0] if creates else 0.0
    return Bound(max(graph, bc), graph, bc, max(graph, unbatched), max(graph, with_lookups), {
        "graph": per_business, "bc_creates": creates, "bc_create_batches": batches,
        "bc_lists": 2 if creates else 0})


def invoice_bound(invoices: int) -> Bound:
    """Invoicing: one BC invoice create (lines by deep insert) per customer; customers and items
    are already linked by the sync. The lookup by externalDocumentNumber is needed only when a
    part may have run before (a retry), so the strict bound leaves it out."""
    batched, batches = bc_batched_seconds(invoices)
    return Bound(batched, 0.0, batched, bc_requests_seconds(invoices), bc_batched_seconds(2 * invoices)[0],
                 {"bc_creates": invoices, "bc_create_batches": batches})


def invoice_spec(dataset: Dataset) -> list[dict]:
    """What (d) must create, for the floor: per customer e-mail, one line per booking."""
    by_email: dict[str, list[dict]] = {}
    for _, appointment in sorted(dataset.appointments(), key=lambda pair: pair[1]["startDateTime"]["dateTime"]):
        people = appointment.get("customers") or [{"emailAddress": appointment.get("customerEmailAddress")}]
        start = datetime.fromisoformat(appointment["startDateTime"]["dateTime"])
        end = datetime.fromisoformat(appointment["endDateTime"]["dateTime"])
        hours = round((end - start).total_seconds() / 3600, 5) if appointment["priceType"] == "hourly" else 1
        for person in people:
            email = (person.get("emailAddress") or "").strip().lower()
            by_email.setdefault(email, []).append({
                "item": appointment["serviceName"], "description": f"{appointment['serviceName']} – {start:%Y-%m-%d %H:%M}",
                "quantity": hours, "unitPrice": round(float(appointment["price"]), 2)})
    return [{"email": email, "lines": lines} for email, lines in sorted(by_email.items())]
