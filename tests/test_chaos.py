"""Chaos: seeded runs of the whole pipeline with faults everywhere, then the exactly-once invariants.

Each run builds a small world of its own (two Bookings businesses sharing people and services,
group bookings, customers without e-mail, every price type) and drives the real functions:
sync → directory upserts → list uninvoiced → invoice selections and `all` at once → delete and
post drafts in BC → sync (reconciliation) → invoice the rest. Meanwhile every Graph, BC and
Entra ID call may fail (429 with Retry-After 0 or none, 500, 503, reset, malformed, lost POST
answers, BC finishing a request after answering 408/504 or after the client timed out, sometimes
timeouts), workers crash between steps, queue messages arrive twice and sync runs
overlap. Two instances of the app (two hosts with their own clients) share the storage account:
requests and triggers land on either, and both drain the queues at once. Then the faults stop, everything settles, and the invariants are checked:

- every invoiceable ended booking is on exactly one BC invoice line per customer, and every BC
  invoice line belongs to a booking that records that invoice (no duplicates, nothing lost);
- no BC customer (by e-mail) or service item (by name) exists twice;
- no booking stays claimed, every job ends, every failure is visible (job errors, poison
  reasons, sync runs in health), nothing is cancelled that still exists in Bookings.

`--chaos-runs N` sets the number of runs (3 in `make test`, 30 in `make test-long`, 200 in `make chaos`); a failing run
names its seed and its steps, and `--chaos-seed S` replays it alone (thread timing varies, so a
replay is close to, not always exactly, the original run).

What the runs rely on in the app (keep these names, or change them here too): crashes are
injected at `shared.storage.store.Store` writes (`insert`, `upsert`, `update`, `delete`, `transact`,
`send`) and after `shared.upstream.http.ApiClient.request` writes; the windows after which the app takes
over a dead process's work are shortened from minutes to seconds through
`shared.flows.directory.claims.CLAIM_STALE_AFTER`/`resolver.WAIT_FOR_OTHER_SECONDS`, `shared.flows.invoicing.reconcile.STALE_CLAIMING`/
`STALE_PART`, `shared.flows.invoicing.parts.RUNNING_STALE_AFTER` and `shared.web.blueprints.sync.RETRY_WHEN_BUSY_SECONDS`; `shared.upstream.auth._providers` is
emptied per run so tokens are requested under faults; the `shared` loggers log at INFO, as the
Functions host does with this host.json."""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, urlsplit

import pytest

from sandbox.data import generate, graph_datetime
from shared.upstream.bc_lookups import email_addresses
from shared.flows.bookings import Booking, normalise_email
from shared.flows.invoicing.jobs import line_description
from shared.storage.store import BOOKINGS, CUSTOMER_LINKS, ITEM_LINKS, JOBS
from sandbox.host import FunctionHost
from tests.conftest import make_world
from tests.helpers import body, merge_row, peek_raw, rows
from tests.plugins.chaos import TALLY, chaos_runs

BASE_SEED = 20_240_000
QUEUES = ("directory-upserts", "invoice-jobs", "sync-requests", "sync-businesses")
FAULTS = ("429", "500", "503", "reset", "malformed")


def pytest_generate_tests(metafunc):
    if "chaos_seed" in metafunc.fixturenames:
        replay = metafunc.config.getoption("chaos_seed", None)
        seeds = [replay] if replay is not None else [BASE_SEED + i for i in range(chaos_runs(metafunc.config))]
        metafunc.parametrize("chaos_seed", seeds, ids=[f"seed{s}" for s in seeds])


# -- the world of one run -------------------------------------------------------------------------

@pytest.fixture
def chaos_world(sandbox, monkeypatch):
    """A fresh world of two businesses; the simulators' knobs are put back afterwards."""
    plans = (sandbox.graph.plan, sandbox.bc.plan, sandbox.entra.plan)
    saved = [asdict(plan.knobs) for plan in plans]
    made = make_world(sandbox, monkeypatch, businesses=2)
    # Deferred webhook syncs come back after 30 s in production; a second is enough here.
    monkeypatch.setattr("shared.web.blueprints.sync.RETRY_WHEN_BUSY_SECONDS", 1)
    # Work an API kept throttling without saying how long waits a minute in production; a second here.
    monkeypatch.setattr("shared.flows.messages.THROTTLED_DEFER_SECONDS", 1.0)
    # A fresh token provider per run, so token requests meet Entra ID's faults too.
    monkeypatch.setattr("shared.upstream.auth._providers", {})
    # The Functions host logs at Information (host.json): every app log record is built.
    app_log = logging.getLogger("shared")
    level = app_log.level
    app_log.setLevel(logging.INFO)
    # A second instance of the app on the same storage account: its own event loop, clients and
    # function key, as a scaled-out Function App has.
    from function_app import app

    made.other_host = FunctionHost(app, sandbox.azurite.connection_string, retry_delay=0)
    yield made
    app_log.setLevel(level)
    for plan, knobs in zip(plans, saved, strict=True):
        plan.clear()
        plan.configure(**knobs)
    made.other_host.close()
    made.host.close()


class Crash(RuntimeError):
    """An injected crash: the process running a function dies between two of its I/O steps."""


STORE_WRITES = ("insert", "upsert", "update", "delete", "transact", "send")
"""Blob writes (leases, the sync run's summary) are spared: a sync that dies holds its lease until
the lease runs out (a minute, by design), and its summary is its last act: crashing those would
only stop syncs for the rest of a run."""


@dataclass
class Crashes:
    """Crash points of one run, at the seams every function shares: the Nth storage write
    (before or after it happens) and the Nth write to Graph or BC (after it took effect, so
    its answer dies with the process). Which function is hit is up to the seed."""
    store_points: dict[int, str] = field(default_factory=dict)
    upstream_points: set[int] = field(default_factory=set)
    store_writes: int = 0
    upstream_writes: int = 0
    fired: list[str] = field(default_factory=list)
    armed: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store_write(self, what: str, target: str) -> str | None:
        if target.endswith("-poison"):
            return None
        with self.lock:
            if not self.armed:
                return None
            self.store_writes += 1
            mode = self.store_points.pop(self.store_writes, None)
            if mode:
                self.fired.append(f"{mode} {what} {target}")
            return mode

    def upstream_write(self, method: str, url: str) -> bool:
        with self.lock:
            if not self.armed:
                return False
            self.upstream_writes += 1
            if self.upstream_writes in self.upstream_points:
                self.upstream_points.discard(self.upstream_writes)
                self.fired.append(f"after {method} {url.split('?')[0].rsplit('/', 1)[-1]}")
                return True
            return False

    def disarm(self) -> None:
        with self.lock:
            self.armed = False


def arm_crashes(monkeypatch, crashes: Crashes) -> None:
    """Wrap the app's storage writes and upstream writes with the run's crash points, and
    shorten the windows after which the app takes over what a dead process left behind."""
    from shared.upstream.http import ApiClient
    from shared.storage.store import Store

    for name in STORE_WRITES:
        real = getattr(Store, name)

        async def write(self, target, *args, _real=real, _name=name, **kwargs):
            mode = crashes.store_write(_name, target)
            if mode == "before":
                raise Crash(f"process died before {_name} {target}")
            result = await _real(self, target, *args, **kwargs)
            if mode == "after":
                raise Crash(f"process died after {_name} {target}")
            return result

        monkeypatch.setattr(Store, name, write)

    real_request = ApiClient.request

    async def request(self, method, url, **kwargs):
        response = await real_request(self, method, url, **kwargs)
        if method != "GET" and crashes.upstream_write(method, url):
            raise Crash(f"process died after {method} to {self.service}")
        return response

    monkeypatch.setattr(ApiClient, "request", request)
    shorten_recovery_windows(monkeypatch)


def shorten_recovery_windows(monkeypatch) -> None:
    """Production waits minutes before it decides a holder is dead; seconds here. A directory
    claim's window stays far longer than a live resolution takes in these runs. A job part that
    is still alive may be queued again after its window: that is one more duplicate delivery,
    which the app must bear anyway (queues deliver at least once)."""
    monkeypatch.setattr("shared.flows.directory.claims.CLAIM_STALE_AFTER", timedelta(seconds=10))
    monkeypatch.setattr("shared.flows.directory.resolver.WAIT_FOR_OTHER_SECONDS", 12.0)
    monkeypatch.setattr("shared.flows.invoicing.reconcile.STALE_CLAIMING", timedelta(seconds=2))
    monkeypatch.setattr("shared.flows.invoicing.reconcile.STALE_PART", timedelta(seconds=6))
    # A part left "running" by a process that died, and queued again by the reconciliation, is
    # taken over once its holder cannot still be running (a function's timeout in production).
    monkeypatch.setattr("shared.flows.invoicing.parts.RUNNING_STALE_AFTER", timedelta(seconds=15))


class FailureLog(logging.Handler):
    """The app's warnings and errors during a run: an HTTP 500 must come from an injected crash."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexplained_http_failures(self) -> list[str]:
        found = []
        for record in self.records:
            if getattr(record, "event", None) == "http_failed":
                error = record.exc_info[1] if record.exc_info else None
                if not isinstance(error, Crash):
                    found.append(f"{record.getMessage()}: {type(error).__name__}: {error}")
        return found

    def crashed_requests(self) -> int:
        return sum(1 for r in self.records if getattr(r, "event", None) == "http_failed"
                   and r.exc_info and isinstance(r.exc_info[1], Crash))


@dataclass
class LimitsFaults:
    """BC's limits in the fault model, drawn apart from the run's own random sequence: some runs
    have enough customers that a lookup filter is full (within 10 nodes of BC's 100), names with
    astral characters at and just over BC's lengths, a BC customer whose E-Mail lists a Bookings
    customer's address, push filters near the node limit, and BC's undocumented filter readings."""
    extra_customers: int = 0
    conversions_counted: bool = True
    schema_2_1_honoured: bool = True

    @classmethod
    def draw(cls, seed: int) -> LimitsFaults:
        rng = random.Random(seed * 7919 + 11)
        return cls(extra_customers=rng.choice((0, 0, 8)), conversions_counted=rng.random() < 0.7,
                   schema_2_1_honoured=rng.random() < 0.7)


@dataclass
class Run:
    """One chaos run: its seed, its world, and what it did (for the invariants and the report)."""
    seed: int
    world: object
    rng: random.Random
    crashes: Crashes
    invoice_free: bool = False
    time_zone: str = "UTC"
    problems: list[str] = field(default_factory=list)
    jobs: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    """Appointments deleted in Bookings (cancelled)."""
    omitted_before: int = 0
    capped: bool = False
    repriced: set[str] = field(default_factory=set)
    duplicate_deliveries: int = 0
    internal_errors: int = 0
    steps: list[str] = field(default_factory=list)
    landing: random.Random = field(default_factory=lambda: random.Random(0))
    """Which instance a request or trigger lands on (apart from `rng`: threads draw from it)."""
    push: bool = False
    """BC customers and service items are pushed into Bookings in this run."""
    limits: LimitsFaults = field(default_factory=LimitsFaults)
    pushed_emails: list[str] = field(default_factory=list)
    pushed_services: list[str] = field(default_factory=list)
    customers_before: dict[str, Counter] = field(default_factory=dict)
    """Bookings customers per e-mail in each business before the push (the data has duplicates of its own)."""
    companies: list[str] = field(default_factory=list)
    """The BC companies the businesses bill into (business 1 into a second one in some runs)."""
    dimensions: dict[str, dict[str, str]] = field(default_factory=dict)
    """Company → the dimension values every invoice (and line) in it must carry."""

    @property
    def host(self):
        """One of the two instances, at random: a request or a trigger may land on either."""
        return self.landing.choice(self.hosts)

    @property
    def hosts(self):
        return [self.world.host, self.world.other_host]

    def note(self, step: str) -> None:
        self.steps.append(step)

    # -- HTTP, checked as it goes ------------------------------------------------------------

    def http(self, method: str, path: str, **kwargs):
        response = self.host.http(method, path, **kwargs)
        status = response.status_code
        if status == 500:
            self.internal_errors += 1  # accounted for by the log: only injected crashes may cause it
        elif status >= 500:
            self.problems.append(f"{method} /api/{path} answered {status}: {response.get_body()[:300]!r}")
        if status >= 400:
            problem = body(response)
            if response.mimetype != "application/problem+json" or not {"status", "title", "detail"} <= set(problem):
                self.problems.append(f"{method} /api/{path} answered {status} without problem details")
        return response

    def uninvoiced(self) -> list[dict]:
        """Every page of the uninvoiced list, following nextLink with a random page size."""
        found, params = [], {"top": str(self.rng.randint(3, 40))}
        for _ in range(200):
            response = self.http("GET", "bookings/uninvoiced", params=params)
            if response.status_code != 200:
                return found
            page = body(response)
            found += page["value"]
            if not page["nextLink"]:
                break
            params = dict(parse_qsl(urlsplit(page["nextLink"]).query))
        ids = [row["id"] for row in found]
        if len(ids) != len(set(ids)):
            self.problems.append("the uninvoiced list returned a booking twice across pages")
        return found

    def request_invoices(self, request: dict) -> None:
        response = self.http("POST", "invoices", body=request)
        if response.status_code == 202:
            job = body(response)["jobId"]
            with self.crashes.lock:
                self.jobs.add(job)
        elif response.status_code not in (200, 409, 500):
            self.problems.append(f"POST /api/invoices {request} answered {response.status_code}")

    # -- queues ------------------------------------------------------------------------------

    def duplicate_parts(self, jobs: list[str]) -> None:
        """Deliver some job parts twice, as a queue may (at-least-once delivery)."""
        for job in jobs:
            if self.rng.random() < 0.5:
                continue
            header = [r for r in rows(self.world, JOBS, f"PartitionKey eq '{job}'") if r["RowKey"] == "job"]
            parts = int(header[0].get("PartCount") or 0) if header else 0
            if parts:
                part = self.rng.randrange(parts)
                self.host.send("invoice-jobs", json.dumps({"kind": "invoice", "jobId": job, "part": part}))
                self.duplicate_deliveries += 1

    def duplicate_directory_messages(self) -> None:
        for content in peek_raw(self.world, "directory-upserts"):
            if self.rng.random() < 0.3:
                self.host.send("directory-upserts", content, encode=False)  # already encoded
                self.duplicate_deliveries += 1

    def duplicate_sync_requests(self) -> None:
        if self.rng.random() < 0.5:
            for _ in range(2):
                self.host.send("sync-requests", json.dumps({"kind": "sync", "reason": "duplicate delivery"}))
                self.duplicate_deliveries += 1

    # -- concurrency -------------------------------------------------------------------------

    def together(self, *actions) -> None:
        """Run the actions in threads at once (overlapping requests, syncs and workers)."""
        errors: list[BaseException] = []

        def guarded(action):
            try:
                action()
            except BaseException as error:  # surfaced below, with the run's seed
                errors.append(error)

        threads = [threading.Thread(target=guarded, args=(a,)) for a in actions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        if errors:
            raise errors[0]

    def sync(self) -> None:
        try:
            self.host.timer("sync_bookings")
        except Crash:
            pass  # the host logs a failed timer run; the next one fans the run out again

    def drain(self) -> None:
        """Both instances take messages from the queues at once until every queue is empty."""
        self.together(*(lambda host=host: host.drain(timeout=300) for host in self.hosts))


# -- the pipeline ---------------------------------------------------------------------------------

def build_world(run: Run) -> None:
    world, rng = run.world, run.rng
    dataset = generate(appointments=rng.randint(28, 40), customers=rng.randint(6, 10) + run.limits.extra_customers,
                       services=8, business_ids=world.business_ids, seed=run.seed)
    astral_names(run, dataset)
    world.graph.load(dataset)
    emails = sorted({c["emailAddress"] for b in dataset.businesses.values() for c in b.customers
                     if c["emailAddress"]})
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    for index in range(rng.randint(2, 4)):
        # More group bookings than the generator's 5 %: some with a customer twice in other case.
        business = world.business_ids[index % 2]
        service = rng.choice(dataset.businesses[business].services)
        people = rng.sample(emails, k=min(len(emails), rng.randint(2, 3)))
        if rng.random() < 0.3:
            people.append(people[0].upper())
        start = now - timedelta(hours=rng.randint(3, 400))
        world.graph.put_appointment(business, {
            "id": f"AAMkChaosGroup{run.seed}x{index}=", "startDateTime": graph_datetime(start),
            "endDateTime": graph_datetime(start + timedelta(minutes=60)), "duration": "PT1H",
            "serviceId": service["id"], "serviceName": service["displayName"],
            "price": rng.choice((20.0, 45.5, 80.0)), "priceType": rng.choice(("fixedPrice", "hourly", "startingAt")),
            "customers": [{"customerId": str(uuid.uuid4()), "name": f"Group {n}", "emailAddress": email}
                          for n, email in enumerate(people)]})


EMOJI = "\N{GRINNING FACE}"  # outside the Basic Multilingual Plane: 2 UTF-16 units in BC and Bookings


def astral_names(run: Run, dataset) -> None:
    """Every third customer's name ends in emoji: exactly BC's 100 UTF-16 units, or 101 (cut);
    one service's name too (BC's item Description is Text[100])."""
    for business in dataset.businesses.values():
        for index, customer in enumerate(business.customers[::3]):
            base = (customer.get("displayName") or "Guest")[:40]
            customer["displayName"] = base + " " * (57 - len(base)) + EMOJI * 21 + ("x" if index % 2 else "")
        if business.services:
            business.services[0]["displayName"] = "Massage " + EMOJI * (46 + run.seed % 2)  # 100 or 102 units


def add_email_list_customer(run: Run) -> None:
    """What an accountant may keep in BC: one customer for two addresses, the second a Bookings
    customer's in capitals. The app must link that Bookings customer to it, never make another."""
    world = run.world
    known = sorted({(c.get("emailAddress") or "").lower() for b in world.business_ids
                    for c in world.graph.customers(b)} - {""})
    if len(known) > 1:
        world.bc.add_customer(world.company_id, type="Person", displayName="Front desk and accounts",
                              email=f"front-{run.seed}@example.com;{known[-1].upper()}", city="Oslo")
        run.note(f"BC customer listing front-{run.seed}@example.com;{known[-1].upper()}")


def add_bc_records(run: Run) -> None:
    """What an accountant keeps in BC: persons to push (one of them also a Bookings customer, typed
    with other capitals), a company (never pushed) and a service item."""
    world, seed = run.world, run.seed
    run.customers_before = {b: Counter(normalise_email(c.get("emailAddress")) for c in world.graph.customers(b))
                            for b in world.business_ids}
    known = sorted({(c.get("emailAddress") or "") for b in world.business_ids for c in world.graph.customers(b)} - {""})
    run.pushed_emails = [f"bc-only-{seed}@example.com"] + ([known[0].lower()] if known else [])
    run.pushed_services = [f"BC consultation {seed}"]
    for company in run.companies or [world.company_id]:  # each business gets its own company's records
        world.bc.add_customer(company, type="Person", displayName="Only In BC", email=run.pushed_emails[0].upper(),
                              city="Oslo", country="NO", phoneNumber="+47 22 33 44 55")
        if known:
            world.bc.add_customer(company, type="Person", displayName="Also In Bookings", email=known[0].upper(),
                                  city="Oslo")
        world.bc.add_customer(company, type="Company", displayName="A Company", email=f"company-{seed}@example.com")
        world.bc.add_item(company, displayName=run.pushed_services[0], type="Service", unitPrice=75)
    # Push filters near BC's node limit: 15 conditions on one field, 89 nodes and the push's own 7.
    world.configure(BC_CUSTOMER_FILTER=" or ".join([f"city eq 'Town {i}'" for i in range(14)] + ["city eq 'Oslo'"]),
                    BC_ITEM_FILTER=" or ".join([f"displayName eq 'Other {i}'" for i in range(14)]
                                               + [f"displayName eq '{run.pushed_services[0]}'"]))


def configure_faults(run: Run) -> None:
    world, rng = run.world, run.rng
    timeouts = rng.random() < 0.2
    # Work whose outcome in BC is unknown waits 2 x HTTP_TIMEOUT_SECONDS + BC_EXECUTION_LIMIT_SECONDS,
    # in whole seconds, before BC is asked what became of it: 2 s here (3 s in runs where BC also
    # holds requests past the client's timeout), the simulated BC keeping to the same limit.
    limit = 0.7 if timeouts else 0.5
    world.configure(HTTP_TIMEOUT_SECONDS="0.5", BC_EXECUTION_LIMIT_SECONDS=str(limit))
    extra = ("timeout",) if timeouts else ()
    # A customer or service the push creates may be created although its answer is lost.
    pushing = ("lost",) if run.push else ()
    world.graph.plan.configure(fault_rate=rng.uniform(0.05, 0.2), fault_kinds=FAULTS + extra + pushing, seed=run.seed,
                               retry_after_seconds=0, hang_seconds=1.0)
    # BC finishing a request after the client gave up: answered 408/504 at once, or held past the
    # client's timeout ("late"), and executed all the same, or (the docs' reading) dropped.
    finishes_late = ("408", "504") + (("late",) if timeouts else ())
    world.bc.plan.configure(fault_rate=rng.uniform(0.05, 0.2), fault_kinds=FAULTS + ("lost", "lost") + finishes_late
                            + extra, seed=run.seed + 1, retry_after_seconds=0, hang_seconds=1.0,
                            execution_limit_seconds=limit, late_seconds=limit - 0.1, late_executes=rng.random() < 0.7,
                            retry_after_omitted=rng.choice((0.0, 0.5)))
    # Graph's two readings of "occurs in the date range", a read that silently stops (a capped
    # page) and reads that silently leave an appointment out: none may cancel what still exists.
    world.graph.configure(calendar_view=rng.choice(("starting", "overlapping")),
                          calendar_view_cap=rng.choice((None, None, rng.randint(3, 12))),
                          calendar_view_omit=rng.choice((0.0, 0.0, 0.1)))
    run.omitted_before = world.graph.omitted_reads
    run.capped = world.graph.options.calendar_view_cap is not None
    # Bookings' readings the docs leave open, drawn apart so the other draws of a seed stay as they
    # were: app-only business rules on the write-back, refusals without a reason, offset paging and
    # empty pages (a walk may skip or repeat an item).
    bookings = random.Random(run.seed + 7)
    world.graph.configure(app_only_business_rules=bookings.choice(("strict", "off")),
                          refusal_style=bookings.choice(("precise", "unknown-400", "unknown-500")),
                          paging=bookings.choice(("keyset", "offset")), empty_pages=bookings.choice((0.0, 0.0, 0.2)))
    world.sandbox.entra.plan.configure(fault_rate=0.2, fault_kinds=("429", "500", "503", "reset"), seed=run.seed + 2,
                                       retry_after_seconds=0)
    # BC's readings the docs leave open: conversion nodes in the filter count, $schemaversion=2.1.
    world.bc.configure(filter_counts_conversions=run.limits.conversions_counted,
                       schema_version_2_1_honoured=run.limits.schema_2_1_honoured)
    # Real services answer in tens or hundreds of milliseconds: it widens every race window.
    world.bc.plan.configure(latency_ms=rng.choice((0.0, 0.0, 20.0, 50.0)))
    world.graph.plan.configure(latency_ms=rng.choice((0.0, 0.0, 20.0)))
    options = world.graph.options
    run.note(f"faults: graph {world.graph.plan.knobs.fault_rate:.2f}, bc {world.bc.plan.knobs.fault_rate:.2f}"
             f"{', timeouts' if timeouts else ''}; calendarView {options.calendar_view}, cap "
             f"{options.calendar_view_cap}, omit {options.calendar_view_omit}; business rules "
             f"{options.app_only_business_rules}, refusals {options.refusal_style}, paging {options.paging}, "
             f"empty pages {options.empty_pages}")
    if rng.random() < 0.3:
        # A BC outage on invoice creation long enough to poison some job parts.
        world.bc.plan.script("POST", r"/salesInvoices$", "503", times=rng.randint(4, 24))
        if rng.random() < 0.5:
            world.bc.plan.script("GET", r"/salesInvoices", "503", times=rng.randint(7, 45))
        run.note("BC invoice outage scripted")
    if rng.random() < 0.25:
        world.graph.set_inaccessible(world.business_ids[1])
        run.note("business 1 inaccessible for the first sync")


def choose_settings(run: Run) -> None:
    world, rng = run.world, run.rng
    run.invoice_free = rng.random() < 0.3
    run.time_zone = rng.choice(("UTC", "Europe/Paris", "America/New_York"))
    world.configure(BOOKINGS_TIME_ZONE=run.time_zone, INVOICE_FREE_BOOKINGS=str(run.invoice_free).lower(),
                    WRITE_BACK_TO_BOOKINGS=rng.choice(("true", "false")))
    run.push = rng.random() < 0.5
    if run.push:
        from sandbox.stack import CLIENT_ID, TENANT
        from sandbox.tokens import BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ, BOOKINGS_READ_WRITE, GRAPH_AUDIENCE

        world.sandbox.entra.set_roles(TENANT, CLIENT_ID, GRAPH_AUDIENCE,
                                      [BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ_WRITE])
        world.configure(PUSH_CUSTOMERS_TO_BOOKINGS="true", PUSH_ITEMS_TO_BOOKINGS="true")
        run.note("BC customers and service items pushed into Bookings")
    run.companies = [world.company_id]
    if rng.random() < 0.5:
        # A chain: business 1 bills into a company of its own, each business's invoices carry its
        # location; the directory, invoices, reconciliation and push then run per company.
        from sandbox.stack import ENVIRONMENT, TENANT

        second = world.bc.add_company(TENANT, ENVIRONMENT, name=f"Chaos Sverige {run.seed}")
        run.companies.append(second)
        for index, company in enumerate(run.companies):
            world.bc.add_dimension(company, "LOCATION", "Location")
            world.bc.add_dimension_value(company, "LOCATION", f"SITE{index}", f"Site {index}")
            run.dimensions[company] = {"LOCATION": f"SITE{index}"}
        world.configure(BUSINESS_COMPANIES=f"{world.business_ids[1]}={second}",
                        INVOICE_DIMENSIONS=",".join(f"{business}:LOCATION=SITE{index}"
                                                    for index, business in enumerate(world.business_ids)))
        run.note("two BC companies, a LOCATION dimension per business")
    for _ in range(rng.randint(2, 5)):
        run.crashes.store_points[rng.randint(1, 250)] = rng.choice(("before", "after"))
    run.crashes.upstream_points = set(rng.sample(range(1, 40), k=rng.randint(1, 2)))
    run.note(f"crash points: storage writes {sorted(run.crashes.store_points.items())}, "
             f"upstream writes {sorted(run.crashes.upstream_points)}")


def first_sync(run: Run) -> None:
    run.note("overlapping syncs and a webhook request")
    run.together(run.sync, run.sync, lambda: run.http("POST", "sync"))
    run.world.graph.set_inaccessible(run.world.business_ids[1], False)
    run.duplicate_directory_messages()
    run.duplicate_sync_requests()
    run.drain()


def invoice_round(run: Run, final: bool = False) -> None:
    rng = run.rng
    listed = run.uninvoiced()
    ids = [row["id"] for row in listed if row["invoiceable"]]
    emails = sorted({c["email"] for row in listed for c in row["customers"] if c["email"]})
    requests: list[dict] = []
    if ids:
        requests.append({"bookingIds": rng.sample(ids, k=rng.randint(1, min(8, len(ids))))})
        requests.append({"bookingIds": rng.sample(ids, k=rng.randint(1, min(8, len(ids))))})
    requests.append({"all": True, "businessId": rng.choice(run.world.business_ids)})
    if emails:
        requests.append({"all": True, "customerEmail": rng.choice(emails).upper()})
    requests.append({"all": True, "dryRun": True})
    if final or rng.random() < 0.5:
        requests.append({"all": True})
    rng.shuffle(requests)
    run.note(f"{len(requests)} invoicing requests at once over {len(ids)} invoiceable bookings")
    before = set(run.jobs)
    run.together(*(lambda r=r: run.request_invoices(r) for r in requests))
    run.duplicate_parts(sorted(run.jobs - before))
    run.note("two workers draining while a sync reconciles")
    run.together(run.drain, run.drain, run.sync)
    run.drain()


def change_the_outside_world(run: Run) -> None:
    """Users at work: drafts deleted and posted in BC, appointments cancelled and repriced."""
    world, rng = run.world, run.rng
    drafts = [i for i in world.bc.invoices(world.company_id) if i["status"] == "Draft"]
    released = []
    for draft in drafts:
        roll = rng.random()
        if roll < 0.25:
            world.bc.delete_invoice(world.company_id, draft["id"])
        elif roll < 0.5:
            world.bc.post_invoice(world.company_id, draft["id"])
        elif roll < 0.6:  # released: BC's API shows it "Open", as if posted, until it is reopened
            world.bc.release_invoice(world.company_id, draft["id"])
            released.append(draft["id"])
    if released:
        run.sync()
        run.drain()
        for invoice_id in released:  # reopened and deleted: its bookings must be invoiced again
            world.bc.reopen_invoice(world.company_id, invoice_id)
            world.bc.delete_invoice(world.company_id, invoice_id)
    open_rows = [r for r in run.uninvoiced() if r["invoiceable"]]
    for row in rng.sample(open_rows, k=min(2, len(open_rows))):
        world.graph.delete_appointment(row["businessId"], row["id"])
        run.deleted.add(row["id"])
    for row in rng.sample(open_rows, k=min(1, len(open_rows))):
        if row["id"] not in run.deleted:
            world.graph.update_appointment(row["businessId"], row["id"], price=round(row["price"] + 7.5, 2))
            run.repriced.add(row["id"])
    run.note(f"{len(drafts)} drafts: some deleted, some posted, {len(released)} released, reopened and deleted; "
             f"{len(run.deleted)} appointments cancelled")
    run.together(run.sync, run.sync)
    run.drain()


def unsettled(world) -> list[str]:
    """What the app still has to finish: claims, unfinished job parts, parts to check in BC."""
    left = [f"booking {r['AppointmentId']} claimed" for r in rows(world, BOOKINGS) if json.loads(r.get("Claims") or "{}")]
    job_rows = rows(world, JOBS)
    accepted = {r["PartitionKey"] for r in job_rows if r["RowKey"] == "job" and r.get("Status") == "queued"}
    for row in job_rows:
        if row["RowKey"].startswith("part-") and row["PartitionKey"] in accepted and (
                row.get("Status") not in ("succeeded", "failed") or row.get("NeedsCheck")):
            left.append(f"job {row['PartitionKey']} {row['RowKey']} {row.get('Status')}")
    for table in (CUSTOMER_LINKS, ITEM_LINKS):
        # A customer or service whose upsert was poisoned is queued again by the next sync.
        left += [f"{table} {r.get('Key')} {r.get('Status')}" for r in rows(world, table) if r.get("Status") != "linked"]
    last = body(world.host.http("GET", "status")).get("lastSync") or {}
    if last.get("outcome") != "succeeded":
        left.append(f"last sync {last.get('outcome')}: {last.get('errors')}")
    return left


def settle(run: Run) -> datetime:
    """Faults off, crashes disarmed; sync and drain until nothing is left to finish (what dead
    processes left behind is taken over once its stale window has passed), then invoice what is
    left and sync once more."""
    world = run.world
    run.crashes.disarm()
    for plan in (world.graph.plan, world.bc.plan, world.sandbox.entra.plan):
        plan.clear()
    world.graph.configure(calendar_view_cap=None, calendar_view_omit=0.0)
    world.graph.set_inaccessible(world.business_ids[1], False)
    run.note("settling without faults")
    run.drain()
    for attempt in range(20):
        run.sync()
        run.drain()
        left = unsettled(world)
        if not left:
            break
        if attempt == 0:
            run.note(f"waiting for recovery of: {left[:5]}")
        time.sleep(1)
    final = datetime.now(timezone.utc)
    run.request_invoices({"all": True})
    run.drain()
    run.sync()
    run.drain()
    return final


# -- the invariants -------------------------------------------------------------------------------

@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    duplicates: int = 0
    lost: int = 0


def billable(booking: Booking, invoice_free: bool, ended_before: datetime) -> bool:
    """SPEC §4, independently of the app's code: ended, not cancelled, every customer with an
    e-mail, a service, and a price (or a free booking while free ones are invoiced)."""
    if booking.cancelled or booking.end >= ended_before or not booking.customers or booking.missing_email:
        return False
    if not booking.service_id:
        return False
    if booking.price_type == "free":
        return invoice_free
    return bool(booking.price)


def poisoned(world, queue: str) -> list[dict | str]:
    found = []
    for content in peek_raw(world, f"{queue}-poison"):
        try:
            text = base64.b64decode(content, validate=True).decode(errors="replace")
        except ValueError:
            text = content
        try:
            found.append(json.loads(text))
        except ValueError:
            found.append(text)
    return found


def check_invariants(world, *, invoice_free: bool, ended_before: datetime, time_zone: str,
                     jobs: set[str] = frozenset(), deleted: set[str] = frozenset(),
                     repriced: set[str] = frozenset(), companies: list[str] | None = None,
                     dimensions: dict[str, dict[str, str]] | None = None) -> Findings:
    """Everything that must hold once the pipeline has settled, in every company; collects every
    violation."""
    found = Findings()
    problems = found.problems
    bookings = {r["AppointmentId"]: Booking.from_entity(r) for r in rows(world, BOOKINGS)}
    companies = companies or [world.company_id]
    invoices, company_of_invoice = {}, {}
    for company in companies:
        for invoice in world.bc.invoices(company):
            invoices[invoice["id"]] = invoice
            company_of_invoice[invoice["id"]] = company
    # The customer links of each company (BC_COMPANY_ID's partition is `customer`).
    partition = {company: "customer" if company == world.company_id else f"customer@{company}" for company in companies}
    links = {(r["PartitionKey"], r["Key"]): r for r in rows(world, CUSTOMER_LINKS) if r.get("Key")}
    for company in companies:
        _check_directory(world, company, found)
    for invoice_id, invoice in invoices.items():
        wanted = (dimensions or {}).get(company_of_invoice[invoice_id], {})
        if invoice.get("dimensions", {}) != wanted or any(line.get("dimensions", {}) != wanted
                                                          for line in invoice["salesInvoiceLines"]):
            problems.append(f"BC invoice {invoice.get('number')} (or a line) carries {invoice.get('dimensions')}, "
                            f"not {wanted}")
        if not invoice["salesInvoiceLines"]:
            problems.append(f"BC invoice {invoice.get('number')} was left without lines")
    numbers = Counter(i.get("externalDocumentNumber") for i in invoices.values())
    for number, n in sorted(numbers.items()):
        if n > 1:
            problems.append(f"BC has {n} invoices with externalDocumentNumber {number}")
    _check_lines(world, bookings, invoices, company_of_invoice, partition, links, found, time_zone, repriced)
    _check_bookings_and_jobs(world, bookings, found, invoice_free, ended_before, jobs, deleted)
    return found


def _check_directory(world, company: str, found: Findings) -> None:
    """No BC customer or item twice in one company."""
    problems = found.problems
    customers = world.bc.customers(company)
    items = world.bc.items(company)
    by_email = Counter(address for c in customers for address in email_addresses(c.get("email")))
    by_name = Counter((i.get("displayName") or "").strip().lower() for i in items if i.get("type") == "Service")
    for email, n in sorted(by_email.items()):
        if n > 1:
            found.duplicates += n - 1
            problems.append(f"BC has {n} customers with e-mail {email}")
    for name, n in sorted(by_name.items()):
        if n > 1:
            found.duplicates += n - 1
            problems.append(f"BC has {n} service items named {name!r}")


def _check_lines(world, bookings, invoices, company_of_invoice, partition, links, found: Findings, time_zone: str,
                 repriced) -> None:
    """Every BC invoice line is one that a booking records, once; nothing recorded is missing."""
    problems = found.problems
    expected: Counter = Counter()
    for booking in bookings.values():
        for email, link in booking.invoices.items():
            expected[(link.get("invoiceId"), line_description(booking, time_zone))] += 1
            invoice = invoices.get(link.get("invoiceId"))
            if invoice is None:
                continue
            customer = links.get((partition[company_of_invoice[invoice["id"]]], email))
            if customer and invoice.get("customerId") != customer.get("BcId"):
                problems.append(f"booking {booking.id} of {email} is recorded on invoice {invoice.get('number')} "
                                "of another customer")
            if booking.id not in repriced:
                for line in invoice["salesInvoiceLines"]:
                    if line["description"] == line_description(booking, time_zone) and (
                            abs(line["quantity"] - float(booking.quantity())) > 1e-6
                            or abs(line["unitPrice"] - float(booking.unit_price())) > 0.005):
                        problems.append(f"booking {booking.id} billed {line['quantity']} × {line['unitPrice']}, "
                                        f"expected {booking.quantity()} × {booking.unit_price()}")
    actual: Counter = Counter()
    for invoice in invoices.values():
        for line in invoice["salesInvoiceLines"]:
            actual[(invoice["id"], line["description"])] += 1
    for (invoice_id, description), n in sorted((actual - expected).items()):
        found.duplicates += n
        problems.append(f"{n} line(s) {description!r} on BC invoice {invoices[invoice_id].get('number')} "
                        f"({invoices[invoice_id].get('externalDocumentNumber')}) that no booking records")
    for (invoice_id, description), n in sorted((expected - actual).items(), key=str):
        found.lost += n
        problems.append(f"{n} booking line(s) {description!r} recorded on invoice {invoice_id} that BC does not have")


def _check_bookings_and_jobs(world, bookings, found: Findings, invoice_free: bool, ended_before: datetime, jobs,
                             deleted) -> None:
    """Every invoiceable ended booking is billed to each of its customers, nothing stays claimed,
    every job ended (and said why when it did not succeed), every failure is visible."""
    problems = found.problems
    for booking in bookings.values():
        if booking.claims:
            found.lost += len(booking.claims)
            problems.append(f"booking {booking.id} is still claimed: {booking.claims}")
        if billable(booking, invoice_free, ended_before):
            for email in booking.emails():
                if email not in booking.invoices and email not in booking.claims:
                    found.lost += 1
                    problems.append(f"booking {booking.id} ({booking.price_type}, {booking.price}) was never "
                                    f"invoiced to {email}")
        if booking.invoices and booking.missing_email:
            problems.append(f"booking {booking.id} without a customer e-mail was invoiced")
        if booking.cancelled and booking.id not in deleted:
            problems.append(f"booking {booking.id} is marked cancelled but still exists in Bookings")
    for ident in deleted:
        if ident in bookings and not bookings[ident].cancelled:
            problems.append(f"booking {ident} was deleted in Bookings but is not marked cancelled")

    # Every job ended, and said why when it did not succeed.
    for job in sorted(jobs):
        status = body(world.host.http("GET", f"invoices/jobs/{job}"))
        if status.get("status") not in ("succeeded", "partial", "failed"):
            problems.append(f"job {job} is still {status.get('status')}")
        elif status["status"] != "succeeded" and not status["errors"]:
            problems.append(f"job {job} is {status['status']} without errors")
    job_rows = rows(world, JOBS)
    accepted = {r["PartitionKey"] for r in job_rows if r["RowKey"] == "job" and r.get("Status") == "queued"}
    for row in job_rows:
        # A job whose request died while claiming was never accepted: it must hold no claims
        # (checked above); its rows are left as they were.
        if row["RowKey"].startswith("part-") and row["PartitionKey"] in accepted and (
                row.get("Status") not in ("succeeded", "failed")):
            problems.append(f"job {row['PartitionKey']} {row['RowKey']} is still {row.get('Status')}")
        if row["RowKey"].startswith("part-") and row.get("NeedsCheck"):
            problems.append(f"job {row['PartitionKey']} {row['RowKey']} still needs a check against BC")

    # Failures are visible: poison reasons, directory errors, sync runs in health.
    for queue in QUEUES:
        for message in poisoned(world, queue):
            if not isinstance(message, dict) or not str(message.get("reason") or "").strip():
                problems.append(f"a {queue}-poison message has no readable reason: {str(message)[:200]}")
    for table in (CUSTOMER_LINKS, ITEM_LINKS):
        for row in rows(world, table):
            if row.get("Status") != "linked":
                problems.append(f"{table} {row.get('Key')} ended {row.get('Status')}: {row.get('LastError')}")
    health = body(world.host.http("GET", "status"))
    if not health.get("lastSync"):
        problems.append("health shows no sync run")
    elif health["lastSync"]["outcome"] != "succeeded":
        problems.append(f"the last sync without faults was {health['lastSync']['outcome']}: "
                        f"{health['lastSync']['errors']}")


def check_push(run: Run, findings: Findings) -> None:
    """Each pushed BC customer and service is in every business (once, unless Bookings already had
    it more often); the push made no Bookings customer twice."""
    world = run.world
    for business in world.business_ids:
        before = run.customers_before.get(business, Counter())
        emails = Counter(normalise_email(c.get("emailAddress")) for c in world.graph.customers(business))
        names = Counter((s.get("displayName") or "").strip().lower() for s in world.graph.services(business))
        for email, n in emails.items():
            if email and n > max(before[email], 1):
                findings.duplicates += n - max(before[email], 1)
                findings.problems.append(f"Bookings business {business} has {n} customers with e-mail {email} "
                                         f"(had {before[email]})")
        for email in run.pushed_emails:
            if emails[email] != max(before[email], 1):
                findings.problems.append(f"pushed customer {email} is in {business} {emails[email]} times")
        for name in run.pushed_services:
            if names[name.lower()] != 1:
                findings.problems.append(f"pushed service {name!r} is in {business} {names[name.lower()]} times")


def check_write_back(run: Run) -> None:
    """Never the same invoice marker twice in an appointment's notes."""
    world = run.world
    for business in world.business_ids:
        for appointment in world.graph.appointments(business):
            lines = (appointment.get("serviceNotes") or "").splitlines()
            markers = Counter(line for line in lines if line.startswith("Invoiced: Business Central"))
            for line, n in markers.items():
                if n > 1:
                    run.problems.append(f"appointment {appointment['id']} notes have {line!r} {n} times")


def record(run: Run, findings: Findings) -> None:
    world = run.world
    faults = Counter()
    for plan in (world.graph.plan, world.bc.plan, world.sandbox.entra.plan):
        faults.update(plan.stats.faults)
    faults["calendar read leaving appointments out"] += world.graph.omitted_reads - run.omitted_before
    faults["run with capped calendar reads"] += int(run.capped)
    TALLY.add(runs=1, faults=sum(faults.values()), crashes=len(run.crashes.fired),
              duplicate_deliveries=run.duplicate_deliveries, duplicates=findings.duplicates, lost=findings.lost)
    TALLY.faults_by_kind.update(faults)


def report(run: Run, findings: Findings) -> str:
    return (f"chaos run seed {run.seed} (replay: pytest tests/test_chaos.py --chaos-seed {run.seed}) broke "
            f"{len(findings.problems)} invariant(s):\n  " + "\n  ".join(findings.problems[:40])
            + "\nsteps:\n  " + "\n  ".join(run.steps)
            + f"\ncrashes fired: {run.crashes.fired}; duplicate deliveries: {run.duplicate_deliveries}")


def test_a_seeded_chaos_run_bills_every_booking_exactly_once(chaos_world, chaos_seed, monkeypatch):
    run = Run(chaos_seed, chaos_world, random.Random(chaos_seed), Crashes(), limits=LimitsFaults.draw(chaos_seed))
    build_world(run)
    choose_settings(run)
    add_email_list_customer(run)
    if run.push:
        add_bc_records(run)
    arm_crashes(monkeypatch, run.crashes)
    configure_faults(run)
    findings = Findings()
    failures = FailureLog()
    stopped: Exception | None = None
    logging.getLogger("shared").addHandler(failures)
    try:
        first_sync(run)
        invoice_round(run)
        change_the_outside_world(run)
        invoice_round(run)
        ended_before = settle(run)
        check_write_back(run)
        findings = check_invariants(chaos_world, invoice_free=run.invoice_free, ended_before=ended_before,
                                    time_zone=run.time_zone, jobs=run.jobs, deleted=run.deleted,
                                    repriced=run.repriced, companies=run.companies, dimensions=run.dimensions)
        if run.push:
            check_push(run, findings)
    except Exception as error:  # a function the host would have run raised: reported with the seed
        stopped = error
        findings.problems.append(f"the run stopped: {type(error).__name__}: {error}")
    finally:
        logging.getLogger("shared").removeHandler(failures)
    findings.problems[:0] = run.problems
    for failure in failures.unexplained_http_failures():
        findings.problems.insert(0, f"HTTP 500 not caused by an injected crash: {failure}")
    if run.internal_errors > failures.crashed_requests():
        findings.problems.insert(0, f"{run.internal_errors} HTTP 500 answers, "
                                    f"{failures.crashed_requests()} of them from injected crashes")
    record(run, findings)
    if findings.problems:
        raise AssertionError(report(run, findings)) from stopped


# -- minimal reproductions of what the runs found, and a check of the checker ---------------------

def _appointment(world, hours_ago: float, email: str = "alice@example.com", service=("svc-cut", "Haircut"),
                 business: int = 0) -> str:
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours_ago)
    return world.graph.put_appointment(world.business_ids[business], {
        "id": f"AAMk{uuid.uuid4().hex}=", "startDateTime": graph_datetime(start),
        "endDateTime": graph_datetime(start + timedelta(hours=1)), "duration": "PT1H",
        "serviceId": service[0], "serviceName": service[1], "price": 50.0, "priceType": "fixedPrice",
        "customers": [], "customerEmailAddress": email, "customerName": "Alice"})


def _settled(world, jobs: set[str] = frozenset()) -> Findings:
    """Drain, sync, invoice whatever is left, and check the invariants."""
    world.host.drain()
    world.sync()
    ended_before = datetime.now(timezone.utc)
    response = world.host.http("POST", "invoices", body={"all": True})
    if response.status_code == 202:
        jobs = {*jobs, body(response)["jobId"]}
    world.host.drain()
    world.sync()
    return check_invariants(world, invoice_free=False, ended_before=ended_before, time_zone="UTC", jobs=jobs)


def test_the_checker_notices_a_second_invoice_and_a_booking_left_claimed(world):
    ids = [_appointment(world, hours_ago=30 + i) for i in range(2)]
    world.sync()
    response = world.host.http("POST", "invoices", body={"bookingIds": ids[:1]})
    job = body(response)["jobId"]
    world.host.drain()
    [invoice] = world.bc.invoices(world.company_id)

    async def second_invoice():
        from shared.runtime import runtime

        return await runtime().bc.create("salesInvoices", {
            "customerId": invoice["customerId"], "externalDocumentNumber": "CHAOS-CHECK",
            "salesInvoiceLines": [{k: line[k] for k in ("lineType", "itemId", "description", "quantity", "unitPrice")}
                                  for line in invoice["salesInvoiceLines"]]})

    world.host.run(second_invoice())
    [left] = [r for r in rows(world, BOOKINGS) if r["AppointmentId"] == ids[1]]
    merge_row(world, BOOKINGS, {"PartitionKey": left["PartitionKey"], "RowKey": left["RowKey"],
                                "Claims": json.dumps({"alice@example.com": "f" * 32})})

    findings = check_invariants(world, invoice_free=False, ended_before=datetime.now(timezone.utc),
                                time_zone="UTC", jobs={job})

    assert findings.duplicates == 1 and findings.lost == 1, findings.problems
    assert any("no booking records" in p for p in findings.problems)
    assert any("still claimed" in p for p in findings.problems)


def test_duplicate_deliveries_of_one_job_part_make_one_bc_invoice(world, monkeypatch):
    """Queue delivery is at least once: the same part may be handled twice at the same time."""
    world.graph.put_service(world.business_ids[0], {"id": "svc-cut", "displayName": "Haircut",
                                                    "defaultPrice": 50.0, "defaultPriceType": "fixedPrice"})
    ids = [_appointment(world, hours_ago=30 + i) for i in range(2)]
    world.sync()  # customer and item are linked before the job runs
    monkeypatch.setattr(world.bc.plan.knobs, "latency_ms", 100.0)  # BC answers in 100 ms, as it does
    job = body(world.host.http("POST", "invoices", body={"bookingIds": ids}))["jobId"]
    for _ in range(3):
        world.host.send("invoice-jobs", json.dumps({"kind": "invoice", "jobId": job, "part": 0}))

    findings = _settled(world, jobs={job})

    assert len(world.bc.invoices(world.company_id)) == 1, findings.problems
    assert not findings.problems


def test_two_businesses_offering_a_service_of_the_same_name_share_one_bc_item(world2, monkeypatch):
    """Service A (business 0) is upserted by the directory worker while an invoice worker resolves
    service B (business 1, same name) for a booking: both look the name up, find nothing, create."""
    world = world2
    _appointment(world, hours_ago=40, service=("svc-c", "Other"), business=1)
    world.sync()  # the customer is linked already
    world.graph.put_service(world.business_ids[0], {"id": "svc-a", "displayName": "Massage",
                                                    "defaultPrice": 60.0, "defaultPriceType": "fixedPrice"})
    booking = _appointment(world, hours_ago=30, service=("svc-b", "Massage"), business=1)
    monkeypatch.setattr(world.bc.plan.knobs, "latency_ms", 100.0)  # BC answers in 100 ms, as it does
    world.sync_calendars()  # queues the upsert of svc-a; nothing is drained yet
    accepted = world.host.http("POST", "invoices", body={"bookingIds": [booking]})
    assert accepted.status_code == 202

    world.host.drain()  # the upsert and the job part run side by side

    assert [i["displayName"] for i in world.bc.items(world.company_id)] == ["Massage"]


def crash_at(monkeypatch, write: str, target: str) -> list[str]:
    """Kill the process at the first `write` to `target` (a table or queue), before it happens."""
    from shared.storage.store import Store

    fired: list[str] = []

    real = getattr(Store, write)

    async def once(self, name, *args, **kwargs):
        if name == target and not fired:
            fired.append(f"{write} {name}")
            raise Crash(f"process died before {write} {name}")
        return await real(self, name, *args, **kwargs)

    monkeypatch.setattr(Store, write, once)
    shorten_recovery_windows(monkeypatch)
    return fired


def sync_until(world, done, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.5)
        world.sync()


def test_a_job_whose_process_died_while_claiming_gives_its_bookings_back(world, monkeypatch):
    """The HTTP function dies after claiming the bookings, before it wrote the job's parts (an
    instance recycled mid-request): after the stale window the bookings are uninvoiced again."""
    ids = [_appointment(world, hours_ago=30 + i) for i in range(2)]
    world.sync()
    fired = crash_at(monkeypatch, "transact", JOBS)

    response = world.host.http("POST", "invoices", body={"bookingIds": ids})
    assert response.status_code == 500 and fired

    def listed():
        return sorted(r["id"] for r in body(world.host.http("GET", "bookings/uninvoiced"))["value"])

    sync_until(world, lambda: listed() == sorted(ids))
    assert listed() == sorted(ids), "the bookings stay reserved by a job that never ran"
    assert not _settled(world).problems


def test_a_job_whose_message_was_never_sent_is_queued_again_and_bills_once(world, monkeypatch):
    """The HTTP function dies after writing the job, before queueing its message."""
    ids = [_appointment(world, hours_ago=30 + i) for i in range(2)]
    world.sync()
    fired = crash_at(monkeypatch, "send", "invoice-jobs")

    response = world.host.http("POST", "invoices", body={"bookingIds": ids})
    assert response.status_code == 500 and fired

    sync_until(world, lambda: len(world.bc.invoices(world.company_id)) == 1)
    findings = _settled(world)
    assert len(world.bc.invoices(world.company_id)) == 1 and not findings.problems, findings.problems


@pytest.mark.parametrize("fault", ["500", "reset"])
def test_a_transient_entra_id_failure_is_retried_like_any_upstream_fault(world, monkeypatch, fault):
    """A token request that meets one 500 (or a dropped connection) must not fail the sync: the
    spec retries every 5xx/429/timeout with backoff, and Entra ID is an upstream like the others."""
    monkeypatch.setattr("shared.upstream.auth._providers", {})  # no cached token: the sync must ask Entra ID
    _appointment(world, hours_ago=30)
    world.sandbox.entra.plan.script("POST", r"/oauth2/v2.0/token$", fault, times=1)

    world.sync_calendars()

    assert world.sandbox.entra.plan.stats.faults[fault] == 1
    last = body(world.host.http("GET", "status"))["lastSync"]
    assert last["outcome"] == "succeeded", last["errors"]


def test_a_part_given_up_while_bc_is_unreachable_keeps_its_bookings_though_the_process_dies_mid_way(world, monkeypatch):
    """Found by seed 20240029: a part's create may have worked (its answer was lost), every
    attempt to ask BC failed, and the process died right after writing the part's outcome. The
    bookings must stay reserved until BC is asked (it has the invoice), never be billed again."""
    ids = [_appointment(world, hours_ago=30)]
    world.sync()
    world.bc.plan.configure(retry_after_seconds=0)
    world.bc.plan.script("POST", r"/salesInvoices$", "lost", times=1)
    world.bc.plan.script("GET", r"/salesInvoices", "503", times=100_000)
    from shared.storage.store import Store

    fired: list[str] = []
    real = Store.update

    async def dies_after_writing_a_failed_part(self, name, entity, *args, **kwargs):
        written = await real(self, name, entity, *args, **kwargs)
        if name == JOBS and entity.get("Status") == "failed" and not fired:
            fired.append(entity["RowKey"])
            raise Crash(f"process died after update {name}")
        return written

    monkeypatch.setattr(Store, "update", dies_after_writing_a_failed_part)
    shorten_recovery_windows(monkeypatch)
    response = world.host.http("POST", "invoices", body={"bookingIds": ids})
    world.host.drain()
    world.bc.plan.clear()

    assert response.status_code == 202 and fired
    findings = _settled(world, {body(response)["jobId"]})
    assert len(world.bc.invoices(world.company_id)) == 1, "billed once"
    assert not findings.problems, findings.problems
