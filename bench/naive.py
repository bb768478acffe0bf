"""The naive baseline: the same work as the app, one request at a time.

A plain single-threaded script, as someone would first write it: `httpx` (sync) against the same
simulators, `azure.data.tables` (sync) against the same Azurite, no batching of any kind (no
Graph or BC `$batch`, no table transactions: every row is written on its own), no concurrency.
It is not made deliberately slow: it pages with nextLink, reads the stored rows of a business
with one paged query (not row by row), keeps tokens for the run, and writes only rows that
changed, exactly like the app.

    python -m bench.naive sync [--directory lookup|list]   # (a) (b) (c): one sync run
    python -m bench.naive invoice                           # (d): invoice every uninvoiced booking

Settings come from the same environment variables as the app's. Prints one JSON line: seconds
and the requests it sent per API."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import httpx
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableServiceClient, UpdateMode

from shared.upstream.bc_lookups import query_string

BOOKINGS = "naivebookings"
LINKS = "naivelinks"
JOBS = "naivejobs"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
BC_SCOPE = "https://api.businesscentral.dynamics.com/.default"
UNBILLABLE = ("free",)


def _key(value: str) -> str:
    return "".join(c if c not in "/\\#?%" and ord(c) >= 32 else f"%{ord(c):02X}" for c in value)


def _odata(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _utc(value: dict) -> datetime:
    moment = datetime.fromisoformat(value["dateTime"])
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Naive:
    def __init__(self) -> None:
        env = os.environ
        self.tenant = env["AZURE_TENANT_ID"]
        self.client_id, self.secret = env["AZURE_CLIENT_ID"], env["AZURE_CLIENT_SECRET"]
        self.authority = env["AZURE_AUTHORITY_HOST"].rstrip("/")
        self.graph = env["GRAPH_BASE_URL"].rstrip("/")
        self.bc = (f"{env['BC_BASE_URL'].rstrip('/')}/{self.tenant}/{env['BC_ENVIRONMENT']}"
                   f"/api/v2.0/companies({env['BC_COMPANY_ID']})")
        self.businesses = [b.strip() for b in env["BOOKINGS_BUSINESS_IDS"].split(",") if b.strip()]
        self.http = httpx.Client(timeout=120)
        self.tables = TableServiceClient.from_connection_string(env["AzureWebJobsStorage"])
        for name in (BOOKINGS, LINKS, JOBS):
            try:
                self.tables.create_table(name)
            except ResourceExistsError:
                pass
        self.requests: Counter = Counter()
        self.writes = 0
        self._tokens: dict[str, str] = {}

    # -- HTTP, one request at a time -------------------------------------------------------------

    def _token(self, scope: str) -> str:
        if scope not in self._tokens:
            self.requests["token"] += 1
            response = self.http.post(f"{self.authority}/{self.tenant}/oauth2/v2.0/token", data={
                "grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.secret, "scope": scope})
            response.raise_for_status()
            self._tokens[scope] = response.json()["access_token"]
        return self._tokens[scope]

    def call(self, api: str, method: str, url: str, **kwargs) -> httpx.Response:
        scope = GRAPH_SCOPE if api == "graph" else BC_SCOPE
        headers = {"Authorization": f"Bearer {self._token(scope)}", **kwargs.pop("headers", {})}
        self.requests[api] += 1
        params = kwargs.pop("params", None)
        if params:  # spaces as %20: BC does not document reading + in a query string as a space
            url = f"{url}?{query_string(params)}"
        response = self.http.request(method, url, headers=headers, **kwargs)
        response.raise_for_status()
        return response

    def pages(self, api: str, url: str, params: dict | None = None):
        while url:
            body = self.call(api, "GET", url, params=params).json()
            yield from body["value"]
            url, params = body.get("@odata.nextLink"), None

    # -- tables, one row at a time ---------------------------------------------------------------

    def table(self, name: str):
        return self.tables.get_table_client(name)

    def upsert(self, name: str, entity: dict) -> None:
        self.writes += 1
        self.table(name).upsert_entity(entity, mode=UpdateMode.MERGE)

    def update(self, name: str, entity: dict, etag: str) -> None:
        self.writes += 1
        self.table(name).update_entity(entity, mode=UpdateMode.MERGE, etag=etag,
                                       match_condition=MatchConditions.IfNotModified)

    # -- sync --------------------------------------------------------------------------------------

    def sync(self, directory: str = "lookup") -> None:
        now = datetime.now(timezone.utc)
        start, end = now - timedelta(days=60), now + timedelta(days=30)
        customers: dict[str, dict] = {}
        services: dict[str, dict] = {}
        for business in self.businesses:
            base = f"{self.graph}/solutions/bookingBusinesses/{business}"
            partition = _key(business)
            existing = {row["RowKey"]: row for row in self.table(BOOKINGS).query_entities(
                "PartitionKey eq @pk", parameters={"pk": partition}, select=["RowKey", "Hash", "Cancelled"])}
            seen = set()
            window = {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "end": end.strftime("%Y-%m-%dT%H:%M:%SZ")}
            for appointment in self.pages("graph", f"{base}/calendarView", window):
                people = appointment.get("customers") or [{
                    "emailAddress": appointment.get("customerEmailAddress"), "name": appointment.get("customerName"),
                    "phone": appointment.get("customerPhone")}]
                billed = [{"email": (p.get("emailAddress") or "").strip().lower() or None, "name": p.get("name"),
                           "phone": p.get("phone")} for p in people]
                row = {"PartitionKey": partition, "RowKey": _key(appointment["id"]), "AppointmentId": appointment["id"],
                       "BusinessId": business, "ServiceId": appointment.get("serviceId") or "",
                       "ServiceName": appointment.get("serviceName") or "", "PriceType": appointment.get("priceType") or "",
                       "Price": float(appointment.get("price") or 0), "StartUtc": _utc(appointment["startDateTime"]),
                       "EndUtc": _utc(appointment["endDateTime"]), "Customers": json.dumps(billed),
                       "Cancelled": False}
                row["Hash"] = _hash(row)
                seen.add(row["RowKey"])
                old = existing.get(row["RowKey"])
                if old is None:
                    row["Invoiced"] = False
                if old is None or old.get("Hash") != row["Hash"]:
                    self.upsert(BOOKINGS, row)
                for person in billed:
                    if person["email"] and "@" in person["email"]:
                        customers.setdefault(person["email"], {"displayName": person["name"] or person["email"],
                                                               "email": person["email"], "phoneNumber": person["phone"]})
            for row_key, old in existing.items():
                if row_key not in seen and not old.get("Cancelled"):
                    self.upsert(BOOKINGS, {"PartitionKey": partition, "RowKey": row_key, "Cancelled": True, "Hash": ""})
            for customer in self.pages("graph", f"{base}/customers"):
                email = (customer.get("emailAddress") or "").strip().lower()
                if "@" in email:
                    address = (customer.get("addresses") or [{}])[0]
                    phone = next((p.get("number") for p in customer.get("phones") or [] if p.get("number")), None)
                    customers[email] = {"displayName": customer.get("displayName") or email, "email": email,
                                        "phoneNumber": phone, "addressLine1": address.get("street"),
                                        "city": address.get("city"), "state": address.get("state"),
                                        "country": self.country_code(address.get("countryOrRegion")),
                                        "postalCode": address.get("postalCode")}
            for service in self.pages("graph", f"{base}/services"):
                services.setdefault(service["id"], {"displayName": service.get("displayName") or service["id"],
                                                    "unitPrice": max(float(service.get("defaultPrice") or 0), 0.0)})
        self._directory("customer", customers, directory)
        self._directory("item", services, directory)

    def country_code(self, name: str | None) -> str | None:
        """BC takes only its own country codes: the naive way, by the English name in BC's table."""
        if not hasattr(self, "_countries"):
            self._countries = {(c.get("displayName") or "").lower(): c["code"]
                               for c in self.pages("bc", f"{self.bc}/countriesRegions")}
        return self._countries.get((name or "").strip().lower())

    def _directory(self, kind: str, sources: dict[str, dict], mode: str) -> None:
        """Each customer/service: skip it if its link row says nothing changed; else find it in
        BC (customers by e-mail, items by name), create it if missing, and write the link row."""
        links = {row["RowKey"]: row.get("Hash") for row in self.table(LINKS).query_entities(
            "PartitionKey eq @pk", parameters={"pk": kind}, select=["RowKey", "Hash"])}
        entity_set = "customers" if kind == "customer" else "items"
        listed: dict[str, dict] = {}
        if mode == "list":  # setup only: one list instead of a lookup per record
            field = "email" if kind == "customer" else "displayName"
            listed = {(r.get(field) or "").strip().lower(): r for r in self.pages("bc", f"{self.bc}/{entity_set}")}
        for key, source in sources.items():
            fields = {k: v for k, v in source.items() if v}
            digest = _hash(fields)
            if links.get(_key(key)) == digest:
                continue
            match = (fields["email"] if kind == "customer" else fields["displayName"]).strip().lower()
            if mode == "list":
                found = [listed[match]] if match in listed else []
            else:
                # BC compares Text case-sensitively: tolower() on the field, a lower-case literal.
                column = "email" if kind == "customer" else "displayName"
                found = self.call("bc", "GET", f"{self.bc}/{entity_set}",
                                  params={"$filter": f"tolower({column}) eq {_odata(match)}"}).json()["value"]
            if found:
                record = found[0]
            else:
                record = self.call("bc", "POST", f"{self.bc}/{entity_set}",
                                   json={**fields, "type": "Person" if kind == "customer" else "Service"}).json()
                if mode == "list":
                    listed[match] = record
            self.upsert(LINKS, {"PartitionKey": kind, "RowKey": _key(key), "BcId": record["id"], "Hash": digest})

    # -- invoicing ---------------------------------------------------------------------------------

    def invoice(self) -> dict:
        now = datetime.now(timezone.utc)
        rows = list(self.table(BOOKINGS).query_entities(
            "Invoiced eq false and Cancelled eq false and EndUtc lt @now", parameters={"now": now}))
        job = uuid.uuid4().hex
        groups: dict[str, list[dict]] = {}
        for row in sorted(rows, key=lambda r: (r["StartUtc"], r["RowKey"])):
            billed = json.loads(row["Customers"])
            if (row["PriceType"] in UNBILLABLE or not row["Price"] or not row["ServiceId"]
                    or not billed or any(not c["email"] for c in billed) or row.get("ClaimedBy")):
                continue
            self.update(BOOKINGS, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"], "ClaimedBy": job},
                        row.metadata["etag"])
            for person in {c["email"] for c in billed}:
                groups.setdefault(person, []).append(row)
        invoices = lines = 0
        for part, (email, bookings) in enumerate(sorted(groups.items())):
            customer = self.table(LINKS).get_entity("customer", _key(email))["BcId"]
            items = {}
            for row in bookings:
                if row["ServiceId"] not in items:
                    items[row["ServiceId"]] = self.table(LINKS).get_entity("item", _key(row["ServiceId"]))["BcId"]
            number = f"NV-{job[:22]}-{part:05d}".upper()  # a Code field: BC stores it upper-case
            found = self.call("bc", "GET", f"{self.bc}/salesInvoices",
                              params={"$filter": f"externalDocumentNumber eq {_odata(number)}"}).json()["value"]
            if found:
                invoice = found[0]
            else:
                invoice_lines = []
                for row in bookings:
                    hours = (row["EndUtc"] - row["StartUtc"]).total_seconds() / 3600
                    quantity = round(hours, 5) if row["PriceType"] == "hourly" else 1
                    invoice_lines.append({"lineType": "Item", "itemId": items[row["ServiceId"]],
                                          "description": f"{row['ServiceName']} – {row['StartUtc']:%Y-%m-%d %H:%M}"[:100],
                                          "quantity": quantity, "unitPrice": round(row["Price"], 2)})
                invoice = self.call("bc", "POST", f"{self.bc}/salesInvoices", json={
                    "customerId": customer, "externalDocumentNumber": number,
                    "invoiceDate": now.date().isoformat(), "salesInvoiceLines": invoice_lines}).json()
            for row in bookings:
                self.upsert(BOOKINGS, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"], "Invoiced": True,
                                       "InvoiceId": invoice["id"]})
            self.upsert(JOBS, {"PartitionKey": job, "RowKey": f"part-{part:05d}", "CustomerEmail": email,
                               "InvoiceId": invoice["id"], "InvoiceNumber": invoice.get("number") or ""})
            invoices += 1
            lines += len(bookings)
        return {"invoices": invoices, "lines": lines, "bookings": len({r["RowKey"] for b in groups.values() for r in b})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["sync", "invoice"])
    parser.add_argument("--directory", choices=["lookup", "list"], default="lookup",
                        help="lookup: per record, as the app does (measured); list: one list (setup only)")
    args = parser.parse_args()
    naive = Naive()
    clock = time.perf_counter()
    extra = naive.invoice() if args.phase == "invoice" else (naive.sync(args.directory) or {})
    seconds = time.perf_counter() - clock
    json.dump({"phase": args.phase, "seconds": round(seconds, 3), "requests": dict(naive.requests),
               "table_writes": naive.writes, **extra}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
