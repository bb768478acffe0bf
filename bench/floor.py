"""The floor: only the unavoidable requests, sent the best way the cost model allows, by a bare
client against the same simulators on the same machine.

The bound (`bench.model`) is arithmetic on the cost model's latencies. The simulators also spend
CPU on every request (JSON, TLS, the Graph calendar scan, BC's record logic) in one Python
process, so no client can reach the bound on this machine. The floor measures how close a
client can get: it is what the app would take if the app itself cost nothing.

    python -m bench.floor sync [--create]       # every Graph page chain of every business;
                                                # --create: plus BC lists and batched creates
    python -m bench.floor invoice --spec FILE    # batched invoice creates (deep insert)
        [--storage-table T]                     # + the exactly-once storage around them: read the
                                                # bookings in T, claim each (ETag-guarded
                                                # transactions), create, record each the same way

Settings from the same environment as the app's. Prints one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import orjson

from bench.model import BC_BATCH_MAX, BC_CONCURRENCY, GRAPH_CONCURRENCY, bc_batched_seconds
from shared.upstream.bc_lookups import query_string


class Floor:
    def __init__(self) -> None:
        env = os.environ
        self.tenant, self.environment = env["AZURE_TENANT_ID"], env["BC_ENVIRONMENT"]
        self.graph = env["GRAPH_BASE_URL"].rstrip("/")
        self.bc_root = f"{env['BC_BASE_URL'].rstrip('/')}/{self.tenant}/{self.environment}/api/v2.0"
        self.company = env["BC_COMPANY_ID"]
        self.bc = f"{self.bc_root}/companies({self.company})"
        self.businesses = [b.strip() for b in env["BOOKINGS_BUSINESS_IDS"].split(",") if b.strip()]
        self.http = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64))
        self.tokens: dict[str, str] = {}
        self.bc_gate = asyncio.Semaphore(BC_CONCURRENCY)
        self.graph_gates = {b: asyncio.Semaphore(GRAPH_CONCURRENCY) for b in self.businesses}

    async def token(self, scope: str) -> str:
        if scope not in self.tokens:
            env = os.environ
            response = await self.http.post(
                f"{env['AZURE_AUTHORITY_HOST'].rstrip('/')}/{self.tenant}/oauth2/v2.0/token",
                data={"grant_type": "client_credentials", "client_id": env["AZURE_CLIENT_ID"],
                      "client_secret": env["AZURE_CLIENT_SECRET"], "scope": scope})
            response.raise_for_status()
            self.tokens[scope] = response.json()["access_token"]
        return self.tokens[scope]

    async def _get(self, url: str, scope: str, params: dict | None = None) -> dict:
        if params:  # spaces as %20, as the app sends them
            url = f"{url}?{query_string(params)}"
        response = await self.http.get(url, headers={"Authorization": f"Bearer {self.tokens[scope]}"})
        response.raise_for_status()
        return orjson.loads(response.content)  # the cheapest parse there is: the floor pays no more than the app

    async def chain(self, business: str, collection: str, params: dict | None = None) -> list[dict]:
        """One collection of one business, page after page (each link is in the page before)."""
        url: str | None = f"{self.graph}/solutions/bookingBusinesses/{business}/{collection}"
        items: list[dict] = []
        while url:
            async with self.graph_gates[business]:
                body = await self._get(url, "https://graph.microsoft.com/.default", params)
            items += body["value"]
            url, params = body.get("@odata.nextLink"), None
        return items

    async def bc_list(self, entity_set: str, select: str) -> list[dict]:
        async with self.bc_gate:
            return (await self._get(f"{self.bc}/{entity_set}", "https://api.businesscentral.dynamics.com/.default",
                                    {"$select": select}))["value"]

    async def batch_create(self, records: list[tuple[str, dict]]) -> list[dict]:
        """(entity set, body) pairs in the number of `$batch`es the bound says is best (a batch
        holds one entity set), 5 batches at a time."""
        if not records:
            return []
        _, batches = bc_batched_seconds(len(records))
        size = -(-len(records) // max(batches, 1))
        size = min(size, BC_BATCH_MAX)
        chunks = []
        for entity_set in dict.fromkeys(s for s, _ in records):
            bodies = [body for s, body in records if s == entity_set]
            chunks += [(entity_set, bodies[i:i + size]) for i in range(0, len(bodies), size)]

        async def one(entity_set: str, chunk: list[dict]) -> list[dict]:
            payload = {"requests": [{"id": str(n), "method": "POST", "url": f"companies({self.company})/{entity_set}",
                                     "headers": {"Content-Type": "application/json"}, "body": record}
                                    for n, record in enumerate(chunk)]}
            async with self.bc_gate:
                response = await self.http.post(f"{self.bc_root}/$batch", json=payload, headers={
                    "Authorization": f"Bearer {self.tokens['https://api.businesscentral.dynamics.com/.default']}",
                    "Prefer": "odata.continue-on-error"})
            response.raise_for_status()
            answers = response.json()["responses"]
            failed = [a for a in answers if int(a["status"]) >= 300]
            if failed:
                raise RuntimeError(f"floor: BC refused a create: {failed[0]}")
            return [a["body"] for a in answers]

        results = await asyncio.gather(*(one(entity_set, chunk) for entity_set, chunk in chunks))
        return [record for chunk in results for record in chunk]

    async def sync(self, create: bool) -> dict:
        await self.token("https://graph.microsoft.com/.default")
        await self.token("https://api.businesscentral.dynamics.com/.default")
        now = datetime.now(timezone.utc)
        start, end = now - timedelta(days=60), now + timedelta(days=30)
        cuts = [start + timedelta(days=7 * week) for week in range((end - start).days // 7 + 1)] + [end]
        slices = [{"start": a.strftime("%Y-%m-%dT%H:%M:%SZ"), "end": b.strftime("%Y-%m-%dT%H:%M:%SZ")}
                  for a, b in zip(cuts, cuts[1:], strict=False) if a < b]
        clock = time.perf_counter()
        marks: dict[str, float] = {}

        async def calendars() -> int:
            # Weekly slices side by side, as the bound allows (4 requests per mailbox at a time).
            counts = await asyncio.gather(*(self.chain(b, "calendarView", part) for b in self.businesses
                                            for part in slices))
            marks["calendar_done"] = time.perf_counter() - clock
            return sum(len(c) for c in counts)

        async def directory() -> int:
            customers_of = asyncio.gather(*(self.chain(b, "customers") for b in self.businesses))
            services_of = asyncio.gather(*(self.chain(b, "services") for b in self.businesses))
            lists = asyncio.gather(self.bc_list("customers", "id,email"),
                                   self.bc_list("items", "id,displayName")) if create else None
            customers, services = await customers_of, await services_of
            if not create:
                return 0
            existing_customers, existing_items = await lists
            known_emails = {(c.get("email") or "").lower() for c in existing_customers}
            known_names = {(i.get("displayName") or "").lower() for i in existing_items}
            new_customers: dict[str, dict] = {}
            for page in customers:
                for c in page:
                    email = (c.get("emailAddress") or "").strip().lower()
                    if "@" in email and email not in known_emails:
                        new_customers.setdefault(email, {"displayName": (c.get("displayName") or email)[:100],
                                                         "email": email, "type": "Person"})
            new_items: dict[str, dict] = {}
            for page in services:
                for s in page:
                    name = (s.get("displayName") or "").strip()
                    if name and name.lower() not in known_names:
                        new_items.setdefault(name.lower(), {"displayName": name[:100], "type": "Service",
                                                            "unitPrice": float(s.get("defaultPrice") or 0)})
            marks["creates_start"] = time.perf_counter() - clock
            records = [("customers", r) for r in new_customers.values()] + [("items", r) for r in new_items.values()]
            await self.batch_create(records)
            marks["creates_done"] = time.perf_counter() - clock
            return len(records)

        appointments, created = await asyncio.gather(calendars(), directory())
        seconds = time.perf_counter() - clock
        return {"seconds": round(seconds, 3), "appointments": appointments, "created": created,
                "marks": {k: round(v, 3) for k, v in marks.items()}}

    async def invoice(self, spec: list[dict], storage_table: str | None = None) -> dict:
        await self.token("https://api.businesscentral.dynamics.com/.default")
        customers = {(c.get("email") or "").lower(): c["id"] for c in await self.bc_list("customers", "id,email")}
        items = {(i.get("displayName") or "").lower(): i["id"] for i in await self.bc_list("items", "id,displayName")}
        today = datetime.now(timezone.utc).date().isoformat()
        bodies = [{"customerId": customers[invoice["email"]], "externalDocumentNumber": f"FLOOR-{n:05d}",
                   "invoiceDate": today,
                   "salesInvoiceLines": [{"lineType": "Item", "itemId": items[line["item"].lower()],
                                          "description": line["description"][:100], "quantity": line["quantity"],
                                          "unitPrice": line["unitPrice"]} for line in invoice["lines"]]}
                  for n, invoice in enumerate(spec)]
        clock = time.perf_counter()
        if storage_table is None:
            created = await self.batch_create([("salesInvoices", body) for body in bodies])
            return {"seconds": round(time.perf_counter() - clock, 3), "created": len(created)}
        from azure.data.tables.aio import TableClient

        from shared.storage.store import transport_settings

        # The storage client as the app makes it (no per-request proxy look-ups), so the floor
        # pays for storage no more than the app must.
        async with TableClient.from_connection_string(os.environ["AzureWebJobsStorage"], storage_table,
                                                      **transport_settings()) as table:
            rows = [row async for row in table.list_entities()]
            marks = {"read": time.perf_counter() - clock}
            etags = await self._mark_all(table, {(r["PartitionKey"], r["RowKey"]): r.metadata["etag"] for r in rows},
                                         "claimed")
            marks["claimed"] = time.perf_counter() - clock
            created = await self.batch_create([("salesInvoices", body) for body in bodies])
            marks["created"] = time.perf_counter() - clock
            await self._mark_all(table, etags, "invoiced")
        seconds = time.perf_counter() - clock
        return {"seconds": round(seconds, 3), "created": len(created), "bookings": len(rows),
                "marks": {k: round(v, 3) for k, v in marks.items()}}

    @staticmethod
    async def _mark_all(table, etags: dict[tuple[str, str], str], state: str) -> dict[tuple[str, str], str]:
        """One ETag-guarded merge per booking, ≤ 100 per transaction and partition, all
        transactions at once; returns the new ETags. Sent as the app sends transactions
        (`shared.storage.table_batch`: the SDK's own `submit_transaction` costs about ten times the CPU)."""
        from azure.core import MatchConditions

        from shared.storage.table_batch import submit

        by_partition: dict[str, list[tuple[str, str]]] = {}
        for key in etags:
            by_partition.setdefault(key[0], []).append(key)
        chunks = [keys[i:i + 100] for keys in by_partition.values() for i in range(0, len(keys), 100)]

        async def one(chunk: list[tuple[str, str]]) -> dict:
            answers = await submit(table, [
                ("update", {"PartitionKey": pk, "RowKey": rk, "FloorState": state},
                 {"mode": "merge", "etag": etags[(pk, rk)], "match_condition": MatchConditions.IfNotModified})
                for pk, rk in chunk])
            return {key: answer["etag"] for key, answer in zip(chunk, answers, strict=True)}

        fresh: dict[tuple[str, str], str] = {}
        for found in await asyncio.gather(*(one(chunk) for chunk in chunks)):
            fresh |= found
        return fresh


async def _main(args) -> dict:
    floor = Floor()
    try:
        if args.phase == "sync":
            return await floor.sync(args.create)
        with open(args.spec) as handle:
            return await floor.invoice(json.load(handle), args.storage_table)
    finally:
        await floor.http.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["sync", "invoice"])
    parser.add_argument("--create", action="store_true")
    parser.add_argument("--spec")
    parser.add_argument("--storage-table")
    args = parser.parse_args()
    json.dump(asyncio.run(_main(args)), sys.stdout)
    print()


if __name__ == "__main__":
    main()
