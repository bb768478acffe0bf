"""`make demo`: the whole product on embedded defaults, end to end.

Starts Azurite and the Entra ID, Graph and Business Central simulators, fills Bookings with a
few hundred appointments, then drives the real functions in process: the sync timer, the queues
until they are empty, and the HTTP API a bookkeeper would use. Prints what happened and stops
everything it started (also on Ctrl-C or failure)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter

from sandbox.data import generate
from sandbox.faults import Knobs
from sandbox.graph import default_plan
from sandbox.host import FunctionHost
from sandbox.stack import SandboxStack
from shared.storage.store import SYNC_BUSINESS_QUEUE

BUSINESSES = ["contoso-salon@contoso.onmicrosoft.com", "contoso-clinic@contoso.onmicrosoft.com"]
LOCATIONS = {BUSINESSES[0]: ("SALON", "Contoso Salon, Oslo"), BUSINESSES[1]: ("CLINIC", "Contoso Clinic, Bergen")}
CLINIC_COMPANY = "Contoso Clinic AS"
"""A chain's set-up: the salon bills into the sandbox's company, the clinic into a company of
its own, and each location's invoices carry the dimension value LOCATION=<its code>."""


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)))


def call(host: FunctionHost, method: str, path: str, **kwargs) -> dict:
    response = host.http(method, path, **kwargs)
    payload = json.loads(response.get_body() or b"null")
    if response.status_code >= 400:
        raise RuntimeError(f"{method} /api/{path} answered {response.status_code}: {payload}")
    return payload


def table(rows: list[list], headers: list[str]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


DEMO_GRAPH = dataclasses.replace(default_plan().knobs, latency_ms=15)
"""Graph's limits (4 at once per mailbox, the fifth refused with 429; query strings up to 2,048
characters) with a little latency."""
DEMO_BC = Knobs(latency_ms=25, max_concurrency=5)


def seed(sandbox, appointments: int = 300):
    """Bookings and BC as the demo (and `make serve`) start: a few hundred appointments in two
    businesses, some details BC refuses as they are, an existing BC customer; settings applied."""
    dataset = generate(appointments=appointments, customers=40, services=8, business_ids=BUSINESSES, seed=2026)
    # Ordinary Bookings details BC refuses as they are: a country written in Norwegian, and a
    # phone number with an extension ("ext." has letters).
    odd = next(c for c in dataset.businesses[BUSINESSES[0]].customers[1:] if c.get("emailAddress"))
    odd["addresses"] = [{"street": "Karl Johans gate 22", "city": "Oslo", "state": "", "countryOrRegion": "Norge",
                         "postalCode": "0162"}]
    odd["phones"] = [{"number": "+47 22 12 34 56 ext. 7", "type": "business"}]
    sandbox.graph.load(dataset)
    sandbox.business_ids = BUSINESSES
    # An accountant's existing BC customer, typed with other capitals than in Bookings.
    first_customer = next(c for c in dataset.businesses[BUSINESSES[0]].customers if c.get("emailAddress"))
    sandbox.bc.add_customer(sandbox.company_id, displayName=f"{first_customer['displayName']} (existing)",
                            email=first_customer["emailAddress"].upper())
    # The app registration holds what the push into Bookings needs too (customers and services).
    from sandbox.stack import CLIENT_ID, TENANT
    from sandbox.tokens import BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ, BOOKINGS_READ_WRITE, GRAPH_AUDIENCE

    sandbox.entra.set_roles(TENANT, CLIENT_ID, GRAPH_AUDIENCE,
                            [BOOKINGS_READ, BOOKINGS_APPOINTMENT_READ_WRITE, BOOKINGS_READ_WRITE])
    # A chain: the clinic bills into a company of its own; both companies have set up the LOCATION
    # dimension (Dimensions page in BC), and each location's invoices carry its value.
    from sandbox.stack import ENVIRONMENT

    clinic = sandbox.bc.add_company(TENANT, ENVIRONMENT, name=CLINIC_COMPANY)
    for company in (sandbox.company_id, clinic):
        sandbox.bc.add_dimension(company, "LOCATION", "Location")
        for code, name in LOCATIONS.values():
            sandbox.bc.add_dimension_value(company, "LOCATION", code, name)
    sandbox.apply_env(CUSTOMER_TEMPLATE="BOOKINGS", ITEM_TEMPLATE="SERVICES", BOOKINGS_TIME_ZONE="Europe/Paris",
                      BUSINESS_COMPANIES=f"{BUSINESSES[1]}={clinic}",
                      INVOICE_DIMENSIONS=",".join(f"{b}:LOCATION={code}" for b, (code, _) in LOCATIONS.items()),
                      BILLING_PERIOD="month", **sandbox.trust_managed_identity())
    # As `azd up` deploys it: no secret, the app registration trusts the app's managed identity.
    os.environ.pop("AZURE_CLIENT_SECRET", None)
    return dataset


TEMPLATES = {"customer/BOOKINGS": {"currencyCode": "EUR", "taxLiable": True, "country": "FR"},
             "item/SERVICES": {"baseUnitOfMeasureCode": "HOUR", "generalProductPostingGroupCode": "SERVICES"}}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    print("Starting Azurite and the Entra ID, Graph and Business Central simulators…")
    with SandboxStack(graph_knobs=DEMO_GRAPH, bc_knobs=DEMO_BC) as sandbox:
        dataset = seed(sandbox)
        from function_app import app
        logging.getLogger("shared").setLevel(logging.WARNING)  # the app logs INFO for Azure; here only trouble

        with FunctionHost(app, sandbox.azurite.connection_string, retry_delay=1) as host:
            run(host, sandbox, dataset)
    print(f"\nEverything stopped. Demo took {time.monotonic() - started:.1f} s.")
    return 0


def run(host: FunctionHost, sandbox, dataset) -> None:
    heading("Templates (PUT /api/templates/{kind}/{code})")
    for name, fields in TEMPLATES.items():
        call(host, "PUT", f"templates/{name}", body=fields)
    for template in call(host, "GET", "templates")["value"]:
        print(f"  {template['kind']:<8} {template['code']:<10} {template['fields']}")

    heading("Sync (timer sync_bookings)")
    host.timer("sync_bookings")  # fans out: one message per business, run by the queue workers
    host.drain(queues=[SYNC_BUSINESS_QUEUE])
    last = call(host, "GET", "status")["lastSync"]
    counts = last["counts"]
    print(f"  outcome {last['outcome']}: {counts['fetched']} appointments read from "
          f"{len(counts['businesses'])} businesses, {counts['created']} new, {counts['cancelled']} cancelled, "
          f"{counts['bookingWrites']} table transactions")
    print(f"  queued {counts['customersQueued']} customer and {counts['itemsQueued']} item upserts")

    heading("Customers and items in Business Central (queue upsert_directory)")
    stats = host.drain()
    print(f"  {stats.processed} queue messages processed")
    links = _links(host)
    for kind, origins in links.items():
        print(f"  {kind:<9} created from template: {origins['created']:>3}   linked to existing: {origins['linked']:>3}")
    customers = sandbox.bc.customers(sandbox.company_id)
    print(f"  BC now has {len(customers)} customers and {len(sandbox.bc.items(sandbox.company_id))} items")
    countries = Counter(c["country"] for c in customers if c["country"])
    print(f"  countries as BC's codes (Bookings writes names, e.g. 'United States', 'Norge'): "
          f"{', '.join(f'{code} {n}' for code, n in sorted(countries.items()))}")
    for entry in call(host, "GET", "status")["directory"]["leftOut"]:
        print(f"  created without what BC refuses: {entry['key']}: {entry['leftOut']}")

    heading("Re-sync with nothing changed")
    host.timer("sync_bookings")
    host.drain(queues=[SYNC_BUSINESS_QUEUE])
    counts = call(host, "GET", "status")["lastSync"]["counts"]
    print(f"  {counts['unchanged']} unchanged, {counts['bookingWrites']} booking writes, "
          f"{counts['customersQueued']} upserts queued")

    heading("BC → Bookings: a customer and a service item made in BC (PUSH_*_TO_BOOKINGS=true)")
    nora = sandbox.bc.add_customer(sandbox.company_id, type="Person", displayName="Nora Nordmann",
                                   email="nora.nordmann@example.no", phoneNumber="+47 22 00 00 00", city="Oslo",
                                   country="NO")
    sandbox.bc.add_item(sandbox.company_id, displayName="Colour consultation", type="Service", unitPrice=80)
    os.environ.update(PUSH_CUSTOMERS_TO_BOOKINGS="true", PUSH_ITEMS_TO_BOOKINGS="true")
    host.timer("sync_bookings")
    host.drain()
    counts = call(host, "GET", "status")["lastSync"]["counts"]
    print(f"  pushed: {counts['customersPushed']} customers and {counts['servicesPushed']} services created in "
          f"Bookings (customers that came from Bookings are not pushed back)")
    salon, clinic = sandbox.business_ids
    found = [c for c in sandbox.graph.customers(salon) if c.get("emailAddress") == "nora.nordmann@example.no"]
    services = [s for s in sandbox.graph.services(salon) if s["displayName"] == "Colour consultation"]
    print(f"  {salon}: Nora {len(found)}× ({found[0]['addresses'][0]['city']}), "
          f"'Colour consultation' {len(services)}× at {services[0]['defaultPrice']:.2f}")
    elsewhere = [c for c in sandbox.graph.customers(clinic) if c.get("emailAddress") == "nora.nordmann@example.no"]
    print(f"  {clinic} bills into {CLINIC_COMPANY}: it gets that company's customers, so Nora {len(elsewhere)}×")
    sandbox.bc.update(sandbox.company_id, "customers", nora["id"], city="Bergen")
    host.timer("sync_bookings")
    host.drain()
    cities = [next(c for c in sandbox.graph.customers(salon) if c.get("emailAddress") == "nora.nordmann@example.no")
              ["addresses"][0]["city"]]
    bc_noras = [c for c in sandbox.bc.customers(sandbox.company_id) if c["email"] == "nora.nordmann@example.no"]
    print(f"  Nora moved to Bergen in BC → Bookings says {', '.join(cities)}; BC still has {len(bc_noras)} Nora")

    heading("Uninvoiced bookings (GET /api/bookings/uninvoiced)")
    page = call(host, "GET", "bookings/uninvoiced", params={"top": "1000"})
    rows = page["value"]
    invoiceable = [r for r in rows if r["invoiceable"]]
    table([[r["start"][:16], r["serviceName"][:22], r["priceType"], ", ".join(c["email"] or "-" for c in
            r["customers"])[:34], f"{r['amount']:.2f}", "yes" if r["invoiceable"] else r["reason"][:28]]
           for r in rows[:12]], ["start (UTC)", "service", "price type", "customers", "amount", "invoiceable"])
    reasons = Counter(r["reason"] for r in rows if not r["invoiceable"])
    print(f"  … {len(rows)} uninvoiced, {len(invoiceable)} invoiceable, worth "
          f"{sum(r['amount'] for r in invoiceable):.2f}; not invoiceable: {dict(reasons)}")

    heading("Invoice a selection (POST /api/invoices {bookingIds})")
    selection = [r["id"] for r in invoiceable[:3]]
    accepted = call(host, "POST", "invoices", body={"bookingIds": selection})
    print(f"  202 job {accepted['jobId']} for {accepted['bookingCount']} bookings → {accepted['statusUrl']}")
    host.drain()
    _print_job(call(host, "GET", f"invoices/jobs/{accepted['jobId']}"))

    heading("Billing run (timer billing_run, BILLING_PERIOD=month)")
    from shared.flows.invoicing.billing import last_closed_period
    from datetime import datetime, timezone

    period = last_closed_period("month", "Europe/Paris", datetime.now(timezone.utc))
    host.timer("billing_run")
    host.timer("billing_run")  # a duplicated timer: the month is billed once
    host.drain()
    runs = [j for j in _jobs(host) if j["request"].get("source") == "billing"]
    for job in runs:
        print(f"  {job['request']['label']}: job {job['jobId']}, {job['bookingCount']} bookings, "
              f"{len(job['invoices'])} drafts dated {period.last_day.isoformat()} (the timer fired twice: one run)")

    heading("Invoice all the rest (POST /api/invoices {all: true})")
    accepted = call(host, "POST", "invoices", body={"all": True})
    print(f"  202 job {accepted['jobId']} for {accepted['bookingCount']} bookings")
    host.drain()
    job = call(host, "GET", f"invoices/jobs/{accepted['jobId']}")
    _print_job(job)

    heading("Draft sales invoices in Business Central, per company, with the location dimension")
    companies = {sandbox.company_id: "CRONUS (the salon)", os.environ["BUSINESS_COMPANIES"].split("=")[1]: CLINIC_COMPANY}
    every = []
    for company, name in companies.items():
        customers = {c["id"]: c for c in sandbox.bc.customers(company)}
        drafts = sandbox.bc.invoices(company)
        every += drafts
        print(f"  {name}: {len(drafts)} drafts, {len(customers)} customers")
        table([[d["number"], d["invoiceDate"], customers[d["customerId"]]["displayName"][:24], len(d["salesInvoiceLines"]),
                f"{d['totalAmountIncludingTax']:.2f}", ",".join(f"{k}={v}" for k, v in d["dimensions"].items()),
                d["salesInvoiceLines"][0]["description"][:30]]
               for d in drafts[:5]], ["number", "date", "customer", "lines", "total", "dimensions", "first line"])
    drafts = sandbox.bc.invoices(sandbox.company_id)
    print(f"  … {len(every)} drafts, {sum(len(d['salesInvoiceLines']) for d in every)} lines, "
          f"total {sum(d['totalAmountIncludingTax'] for d in every):.2f}; every line carries its invoice's location: "
          f"{all(line['dimensions'] == d['dimensions'] for d in every for line in d['salesInvoiceLines'])}")
    again = call(host, "POST", "invoices", body={"all": True})
    print(f"  invoicing all again: jobId={again['jobId']}, bookingCount={again['bookingCount']} (nothing twice)")

    heading("Reconciliation: a draft deleted in BC, another posted")
    deleted, posted = drafts[0], drafts[1]
    sandbox.bc.delete_invoice(sandbox.company_id, deleted["id"])
    sandbox.bc.post_invoice(sandbox.company_id, posted["id"])
    host.timer("sync_bookings")
    host.drain(queues=[SYNC_BUSINESS_QUEUE])
    counts = call(host, "GET", "status")["lastSync"]["counts"]
    print(f"  deleted {deleted['number']} → {counts['bookingsReleased']} bookings uninvoiced again; "
          f"posted {posted['number']} → {counts['bookingsPosted']} bookings marked posted")

    heading("Health (GET /api/health, anonymous) and status (GET /api/status, function key)")
    health = call(host, "GET", "health", key=False)
    print(f"  anyone sees: status {health['status']}, last sync {health['lastSync']['outcome']} at "
          f"{health['lastSync']['at']}, failed checks {health['failedChecks'] or 'none'}")
    status = call(host, "GET", "status")
    print(f"  with the key: {len(status['checks'])} setup checks, {status['directory']['customerFailures']} customers "
          f"and {status['directory']['itemFailures']} items BC refused, per-business results of the last run")
    print(f"  requests: Graph {sandbox.graph.plan.stats.total_requests}, BC {sandbox.bc.plan.stats.total_requests}")
    print("\nThe same, the way a bookkeeper does it: `make serve`, then sign in to the operator pages.")


def _links(host: FunctionHost) -> dict:
    from azure.data.tables import TableServiceClient

    service = TableServiceClient.from_connection_string(os.environ["AzureWebJobsStorage"])
    found = {}
    for kind, name in (("customers", "customerlinks"), ("items", "itemlinks")):
        found[kind] = Counter(row.get("Origin") for row in service.get_table_client(name).list_entities())
    return found


def _jobs(host: FunctionHost) -> list[dict]:
    """The latest jobs as the jobs page lists them."""
    from shared.flows.invoicing.job_status import recent_jobs
    from shared.runtime import runtime

    async def read() -> list[dict]:
        return await recent_jobs(await runtime().store())

    return host.run(read())


def _print_job(job: dict) -> None:
    print(f"  job {job['jobId']}: {job['status']}, {job['bookingCount']} bookings, "
          f"{len(job['invoices'])} invoices, {len(job['errors'])} errors")
    for invoice in job["invoices"][:5]:
        print(f"    {invoice['invoiceNumber']}  {invoice['customerEmail']:<32} {invoice['amount']:>9.2f}  "
              f"{len(invoice['bookingIds'])} booking(s)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\nInterrupted; everything started was stopped.")
        sys.exit(130)
