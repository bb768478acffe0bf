"""`make bench`: the app's sync and invoicing against the fixed cost model, next to the bound
that model allows, the floor a bare client reaches on the same simulators, and a naive
one-request-at-a-time baseline (see bench/README.md).

    python -m bench.run            # full run (about 4 min on 2 cores), writes bench/results/
    python -m bench.run --quick    # small smoke run (1.5-2 min), writes bench/results/quick.tmp/

One sandbox (Azurite and the Entra ID, Graph and Business Central simulators, with the cost
model's latency and limits) lives in this process for the whole run; every measured workload of
the app runs in a fresh subprocess (`bench.worker`), so its peak RSS is its own and the
simulators' work does not share its interpreter. Requests are counted by the simulators."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.machine import machine as measured_on
from bench.report import per_unit, plot, ratio, table, targets


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FLOOR_BOOKINGS = "floorbookings"
WORKLOADS = ("first_sync", "unchanged_sync", "changed_sync", "invoice_all")
APP_SETTINGS_TO_CLEAR = ("CUSTOMER_TEMPLATE", "ITEM_TEMPLATE", "SYNC_CUSTOMERS", "SYNC_ITEMS", "INVOICE_FREE_BOOKINGS",
                         "WRITE_BACK_TO_BOOKINGS", "BOOKINGS_TIME_ZONE", "SYNC_LOOKBACK_DAYS", "SYNC_LOOKAHEAD_DAYS")
DEPENDENCIES = ("azure.functions", "azure.data.tables.aio", "azure.storage.queue.aio", "azure.storage.blob.aio", "msal",
                "httpx", "pydantic", "pydantic_settings", "aiohttp")


@dataclass(frozen=True)
class Plan:
    appointments: int            # (a)–(c)
    scaling: tuple[int, ...]     # first sync sizes for the plot (the largest is (a) itself)
    invoice_bookings: int        # (d)
    invoice_customers: int
    naive_sync: tuple[int, ...]     # baseline sizes (appointments), scaled to `appointments`
    naive_invoice: tuple[int, ...]  # baseline sizes (bookings), scaled to `invoice_bookings`
    import_runs: int
    invoice_runs: int = 3
    """invoice_all and its storage floor take about 2 s each, where the machine's noise is ±5 %:
    both are measured this many times (each from a fresh start) and their medians compared."""


FULL = Plan(10_000, (1_000, 5_000, 10_000), 1_000, 200, (125, 250, 500), (125, 250, 500), 5)
QUICK = Plan(500, (200, 500), 100, 20, (100, 200), (50, 100), 5, invoice_runs=1)


def _time_import(statement: str) -> tuple[float, float]:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    clock = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    return float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - clock


def import_timing(runs: int) -> dict:
    """`import function_app` against importing its runtime dependencies alone, each in a fresh
    interpreter (bytecode already cached), alternating, median of `runs`."""
    _time_import("import function_app")  # warm the bytecode cache and the OS file cache
    app, deps, app_wall, deps_wall = [], [], [], []
    for _ in range(runs):
        seconds, wall = _time_import("import function_app")
        app.append(seconds)
        app_wall.append(wall)
        seconds, wall = _time_import("import " + ", ".join(DEPENDENCIES))
        deps.append(seconds)
        deps_wall.append(wall)
    result = {"app_seconds": round(statistics.median(app), 4), "deps_seconds": round(statistics.median(deps), 4),
              "app_wall_seconds": round(statistics.median(app_wall), 4),
              "deps_wall_seconds": round(statistics.median(deps_wall), 4),
              "runs": runs, "dependencies": list(DEPENDENCIES)}
    result["ratio"] = round(result["app_seconds"] / result["deps_seconds"], 3)
    return result


class Bench:
    def __init__(self, sandbox, workdir: Path, profiles: Path | None = None):
        self.sb = sandbox
        self.workdir = workdir
        self.profiles = profiles
        self.runs = 0

    # scenarios: fresh storage, fresh businesses, fresh BC company

    def wipe_storage(self) -> None:
        self.sb.azurite.wipe()

    def scenario(self, dataset) -> dict[str, str]:
        from sandbox.stack import ENVIRONMENT, TENANT

        self.wipe_storage()
        self.sb.graph.load(dataset)
        company = self.sb.bc.add_company(TENANT, ENVIRONMENT)
        env = dict(os.environ)
        for name in APP_SETTINGS_TO_CLEAR:
            env.pop(name, None)
        env.update(self.sb.env(BOOKINGS_BUSINESS_IDS=",".join(dataset.businesses), BC_COMPANY_ID=company))
        env["PYTHONPATH"] = str(ROOT)
        return env

    def _counters(self) -> dict:
        return {"tokens": sum(self.sb.entra.tokens_issued.values())}

    def _reset(self) -> dict:
        for plan in (self.sb.graph.plan, self.sb.bc.plan, self.sb.entra.plan):
            plan.reset_stats()
        return self._counters()

    def _requests(self, before: dict) -> dict:
        graph, bc, entra = self.sb.graph.plan.stats, self.sb.bc.plan.stats, self.sb.entra.plan.stats
        return {"graph": graph.total_requests, "bc": bc.total_requests,
                "token": self._counters()["tokens"] - before["tokens"],
                "entra_http": entra.total_requests,
                "faults": graph.total_faults + bc.total_faults,
                "graph_by_path": dict(graph.requests), "bc_by_path": dict(bc.requests),
                "graph_max_in_flight": dict(graph.max_in_flight), "bc_max_in_flight": dict(bc.max_in_flight)}

    def app(self, workload: str, env: dict, label: str) -> dict:
        """One app workload in a fresh process."""
        self.runs += 1
        out = self.workdir / f"app-{self.runs:02d}-{label}.json"
        errors = self.workdir / f"app-{self.runs:02d}-{label}.stderr"
        command = [sys.executable, "-m", "bench.worker", workload, "--out", str(out)]
        if self.profiles:
            command += ["--profile", str(self.profiles / f"{label}.prof")]
        before = self._reset()
        clock = time.perf_counter()
        with open(errors, "w") as stderr:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=stderr, stderr=stderr)
        if done.returncode:
            tail = errors.read_text()[-3000:]
            raise RuntimeError(f"the app's {label} run failed ({done.returncode}):\n{tail}")
        result = json.loads(out.read_text())
        result["requests"] = self._requests(before)
        result["process_seconds"] = round(time.perf_counter() - clock, 3)
        log(f"app {label}: {result['seconds']:.2f} s (cpu {result['cpu_seconds']:.1f} s), graph {result['requests']['graph']}, "
            f"bc {result['requests']['bc']}, table writes {result['app']['table_writes']}, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB")
        return result

    def _script(self, module: str, phase: str, env: dict, label: str, extra: tuple[str, ...]) -> dict:
        """Run `python -m <module> <phase> …` (it prints one JSON line) and count its requests."""
        before = self._reset()
        done = subprocess.run([sys.executable, "-m", module, phase, *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the {module.removeprefix('bench.')} {label} run failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["requests"] = self._requests(before)
        return result

    def naive(self, phase: str, env: dict, label: str, *extra: str) -> dict:
        result = self._script("bench.naive", phase, env, label, extra)
        log(f"naive {label}: {result['seconds']:.2f} s, graph {result['requests']['graph']}, "
            f"bc {result['requests']['bc']}, table writes {result['table_writes']}")
        return result

    def floor(self, phase: str, env: dict, label: str, *extra: str) -> dict:
        """The bare client doing only the unavoidable requests (`bench.floor`)."""
        result = self._script("bench.floor", phase, env, label, extra)
        log(f"floor {label}: {result['seconds']:.2f} s, graph {result['requests']['graph']}, "
            f"bc {result['requests']['bc']}")
        return result

    def copy_bookings(self, table_name: str) -> None:
        """Setup of the storage floor (not timed): the app's synced bookings, copied as they are
        into a scratch table the floor claims and records."""
        from azure.data.tables import TableServiceClient

        from shared.storage.store import BOOKINGS

        with TableServiceClient.from_connection_string(self.sb.azurite.connection_string) as service:
            source = service.get_table_client(BOOKINGS)
            target = service.create_table_if_not_exists(table_name)
            by_partition: dict[str, list[dict]] = {}
            for row in source.list_entities():
                by_partition.setdefault(row["PartitionKey"], []).append(row)
            for rows in by_partition.values():
                for start in range(0, len(rows), 100):
                    target.submit_transaction([("upsert", row) for row in rows[start:start + 100]])

    def throwaway_company(self, env: dict) -> dict:
        """The same settings with a BC company of its own (for runs that create records)."""
        from sandbox.stack import ENVIRONMENT, TENANT

        return dict(env, BC_COMPANY_ID=self.sb.bc.add_company(TENANT, ENVIRONMENT))

    def change(self, dataset) -> int:
        from bench.model import changed_ids

        changes = changed_ids(dataset)
        for business_id, appointment_id, fields in changes:
            self.sb.graph.update_appointment(business_id, appointment_id, **fields)
        return len(changes)

    def seed_directory(self, dataset, company: str) -> None:
        """Setup of the naive invoicing only: the BC customers and items exist (made through the
        simulator's data API, no requests), as the naive sync would have left them."""
        from bench.model import distinct_emails

        names = {}
        for business in dataset.businesses.values():
            for service in business.services:
                names.setdefault(service["displayName"], service)
        for email in sorted(distinct_emails(dataset)):
            self.sb.bc.add_customer(company, displayName=email, email=email, type="Person")
        for name, service in names.items():
            self.sb.bc.add_item(company, displayName=name, type="Service", unitPrice=service["defaultPrice"])


def _summary(result: dict, bound, kind: str, floor: dict) -> dict:
    from shared.storage.store import BOOKINGS

    app = result["app"]
    requests = result["requests"]
    return {
        "seconds": result["seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "phases": result["phases"],
        "bound_seconds": round(bound.seconds, 3),
        "floor_seconds": floor["seconds"],
        "naive_seconds": None,
        "table_writes": app["table_writes"],
        "blob_writes": app["blob_writes"],
        "peak_rss_mb": result["peak_rss_mb"],
        "requests": {"graph": requests["graph"], "bc": requests["bc"], "token": requests["token"]},
        "booking_table_writes": app["table_writes_by_table"].get(BOOKINGS, 0),
        "table_writes_by_table": app["table_writes_by_table"],
        "entities_written": app["entities_written"],
        "queue_messages_sent": app["messages_sent"],
        "calendar_view_requests": sum(n for path, n in requests["graph_by_path"].items() if path.endswith("/calendarView")),
        "request_paths": {"graph": requests["graph_by_path"], "bc": requests["bc_by_path"]},
        "max_in_flight": {"graph": requests["graph_max_in_flight"], "bc": requests["bc_max_in_flight"]},
        "retries_or_faults": {"faults": requests["faults"], "host_failed_attempts": result["host_queues"]["failed_attempts"],
                              "poisoned": result["host_queues"]["poisoned"], "clients": {
                                  k: v for k, v in app.items() if k.endswith("_client")}},
        "queue_messages_processed": result["host_queues"]["processed"],
        "limits": app.get("limits"),
        "bound": bound.as_dict(),
        "floor": {k: v for k, v in floor.items() if k != "requests"} | {
            "requests": {k: floor["requests"][k] for k in ("graph", "bc")}},
        "kind": kind,
    }


def run_syncs(bench: Bench, plan: Plan) -> tuple[dict, list[dict]]:
    """(a), (b), (c) at the full size, and the first sync at the smaller scaling sizes."""
    from bench.model import distinct_emails, distinct_service_names, sync_bound, sync_dataset

    workloads: dict = {}
    scaling = []
    for size in sorted(plan.scaling):
        dataset = sync_dataset(size, f"sync{size}")
        env = bench.scenario(dataset)
        customers, items = len(distinct_emails(dataset)), len(distinct_service_names(dataset))
        floor = bench.floor("sync", bench.throwaway_company(env), f"first_sync-{size}", "--create")
        first = bench.app("sync", env, f"first_sync-{size}")
        bound = sync_bound(dataset, customers, items)
        created = first["last_sync"]["counts"]
        scaling.append({"appointments": size, "customers": customers, "seconds": first["seconds"],
                        "bc_requests_per_100_new_customers": _per_100(first["requests"]["bc"], customers),
                        "bound_seconds": round(bound.seconds, 3), "floor_seconds": floor["seconds"], "requests": {
                            "graph": first["requests"]["graph"], "bc": first["requests"]["bc"],
                            "token": first["requests"]["token"]},
                        "table_writes": first["app"]["table_writes"], "peak_rss_mb": first["peak_rss_mb"]})
        if size != plan.appointments:
            continue
        workloads["first_sync"] = _summary(first, bound, "sync", floor) | {
            "appointments": size, "customers": customers, "items": items, "sync_counts": created,
            "bc_requests_per_100_new_customers": _per_100(first["requests"]["bc"], customers)}
        pull = bench.floor("sync", env, "graph-pull")
        unchanged = bench.app("sync", env, "unchanged_sync")
        workloads["unchanged_sync"] = _summary(unchanged, sync_bound(dataset, 0, 0), "sync", pull) | {
            "appointments": size, "sync_counts": unchanged["last_sync"]["counts"]}
        changed = bench.change(dataset)
        result = bench.app("sync", env, "changed_sync")
        workloads["changed_sync"] = _summary(result, sync_bound(dataset, 0, 0), "sync", pull) | {
            "appointments": size, "appointments_changed": changed, "sync_counts": result["last_sync"]["counts"]}
    return workloads, scaling


def _per_100(requests: int, customers: int) -> float | None:
    """BC requests of a first sync per 100 new customers (the lookups and creates of customers and
    service items, the countries read once per process, the health check's company read)."""
    return round(100 * requests / customers, 2) if customers else None


def run_invoicing(bench: Bench, plan: Plan) -> dict:
    """`plan.invoice_runs` runs of invoice_all, each against its floors from a fresh start; the
    run with the median time stands for all, with every run's times kept as `samples`."""
    runs = [_invoice_run(bench, plan) for _ in range(plan.invoice_runs)]
    times = sorted(run["seconds"] for run in runs)
    floors = sorted(run["floor_with_storage_seconds"] for run in runs)
    median = next(run for run in runs if run["seconds"] == times[len(times) // 2])
    storage_floor = floors[len(floors) // 2]
    return median | {"floor_with_storage_seconds": storage_floor,
                     "vs_floor_with_storage": ratio(median["seconds"], storage_floor),
                     "samples": [{"seconds": r["seconds"], "floor_with_storage_seconds": r["floor_with_storage_seconds"]}
                                 for r in runs]}


def _invoice_run(bench: Bench, plan: Plan) -> dict:
    from bench.model import invoice_bound, invoice_dataset, invoice_spec

    dataset = invoice_dataset(plan.invoice_bookings, plan.invoice_customers, "invoice")
    env = bench.scenario(dataset)
    floor_env = bench.throwaway_company(env)
    bench.seed_directory(dataset, floor_env["BC_COMPANY_ID"])
    spec = bench.workdir / "invoice-spec.json"
    spec.write_text(json.dumps(invoice_spec(dataset)))
    floor = bench.floor("invoice", floor_env, "invoice_all", "--spec", str(spec))
    setup = bench.app("sync", env, "invoice_all-setup-sync")
    storage_env = bench.throwaway_company(env)
    bench.seed_directory(dataset, storage_env["BC_COMPANY_ID"])
    bench.copy_bookings(FLOOR_BOOKINGS)
    with_storage = bench.floor("invoice", storage_env, "invoice_all+storage", "--spec", str(spec),
                               "--storage-table", FLOOR_BOOKINGS)
    result = bench.app("invoice", env, "invoice_all")
    job = result["job"]
    if job["bookingCount"] != plan.invoice_bookings or job["invoices"] != plan.invoice_customers:
        raise RuntimeError(f"invoice_all invoiced {job} instead of {plan.invoice_bookings} bookings of "
                           f"{plan.invoice_customers} customers")
    bound = invoice_bound(plan.invoice_customers)
    return _summary(result, bound, "invoice", floor) | {
        "floor_with_storage_seconds": with_storage["seconds"], "floor_with_storage": with_storage,
        "bookings": job["bookingCount"], "invoices": job["invoices"], "job": job,
        "setup_sync_seconds": setup["seconds"]}


def _fit(points: list[tuple[int, float]], target: int) -> dict:
    """Least-squares line `fixed + per_unit * size` through the baseline's sizes, evaluated at
    the target size; with three or more sizes the residuals show whether it is a line."""
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    return {"per_unit": round(slope, 6), "fixed": round(intercept, 4), "at_target": round(intercept + slope * target, 3),
            "sizes": [int(x) for x in xs], "values": ys,
            "max_residual_share": round(max((abs(r) / y for r, y in zip(residuals, ys, strict=True) if y), default=0.0), 4)
            if len(xs) > 2 else None}


def _latency(requests: dict) -> float:
    """What the baseline's requests cost by the cost model alone (it sends them one at a time)."""
    from bench.model import BC_LATENCY_MS, GRAPH_LATENCY_MS

    return round((requests["graph"] * GRAPH_LATENCY_MS + requests["bc"] * BC_LATENCY_MS) / 1000, 3)


def run_naive(bench: Bench, plan: Plan) -> dict:
    """The baseline at several sizes per workload, extrapolated along a fitted line to the
    benchmark's sizes."""
    from bench.model import changed_ids, invoice_dataset, sync_dataset

    measured: dict[str, list[dict]] = {w: [] for w in WORKLOADS}
    for size in plan.naive_sync:
        dataset = sync_dataset(size, f"naive{size}")
        env = bench.scenario(dataset)
        measured["first_sync"].append(bench.naive("sync", env, f"first_sync-{size}") | {"size": size})
        measured["unchanged_sync"].append(bench.naive("sync", env, f"unchanged_sync-{size}") | {"size": size})
        bench.change(dataset)
        measured["changed_sync"].append(bench.naive("sync", env, f"changed_sync-{size}") | {"size": size,
                                        "changed": len(changed_ids(dataset))})
    for size in plan.naive_invoice:
        customers = max(1, round(size * plan.invoice_customers / plan.invoice_bookings))
        dataset = invoice_dataset(size, customers, f"naiveinv{size}")
        env = bench.scenario(dataset)
        bench.seed_directory(dataset, env["BC_COMPANY_ID"])
        bench.naive("sync", env, f"invoice_all-setup-{size}", "--directory", "list")
        result = bench.naive("invoice", env, f"invoice_all-{size}")
        if result["bookings"] != size or result["invoices"] != customers:
            raise RuntimeError(f"the naive invoicing made {result} for {size} bookings of {customers} customers")
        measured["invoice_all"].append(result | {"size": size})
    naive = {}
    for workload, points in measured.items():
        target = plan.invoice_bookings if workload == "invoice_all" else plan.appointments
        seconds = _fit([(p["size"], p["seconds"]) for p in points], target)
        requests = {api: round(_fit([(p["size"], p["requests"][api]) for p in points], target)["at_target"])
                    for api in ("graph", "bc")}
        writes = round(_fit([(p["size"], p["table_writes"]) for p in points], target)["at_target"])
        naive[workload] = {"seconds": round(seconds["at_target"], 2), "target_size": target, "fit": seconds,
                           "requests": requests | {"token": points[-1]["requests"]["token"]},
                           "table_writes": writes,
                           "measured": [{"size": p["size"], "seconds": p["seconds"], "table_writes": p["table_writes"],
                                         "requests": {k: p["requests"][k] for k in ("graph", "bc", "token")},
                                         "latency_seconds": _latency(p["requests"]),
                                         "latency_share": round(_latency(p["requests"]) / p["seconds"], 3)}
                                        for p in points]}
    return naive


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark of bookings-invoicing (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of 1.5-2 minutes")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, or "
                                                 "bench/results/quick.tmp with --quick)")
    parser.add_argument("--no-naive", action="store_true", help="skip the baseline (naive columns stay empty)")
    parser.add_argument("--profile", action="store_true", help="also write a cProfile of every app run to "
                                                               "<out>/profiles.tmp/ (git-ignored; slower; for finding bottlenecks)")
    parser.add_argument("--only", choices=["sync", "invoice"], help="run only these workloads, without the baseline "
                                                                   "(for working on one; writes to bench/results/only.tmp)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or (RESULTS / "quick.tmp" if args.quick else RESULTS / "only.tmp" if args.only else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))

    log(f"import timing ({plan.import_runs} runs each)")
    imports = import_timing(plan.import_runs)

    from bench.model import BC_BATCH_ITEM_MS, GRAPH_PAGE_SIZE, bc_knobs, graph_knobs
    from sandbox.stack import SandboxStack

    results: dict = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                     "quick": args.quick, "plan": plan.__dict__,
                     "machine": measured_on(),
                     "cost_model": {"graph": {"latency_ms": 60, "max_concurrency_per_mailbox": 4, "page_size": 100},
                                    "bc": {"latency_ms": 120, "max_concurrency": 5, "batch_item_ms": 20,
                                           "max_queued": None},
                                    "azurite": "as is (in-memory), not modelled"},
                     "import": imports}
    log("starting the sandbox (Azurite, Entra ID, Graph and BC simulators)")
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch, \
            SandboxStack(graph_knobs=graph_knobs(), bc_knobs=bc_knobs(), page_size=GRAPH_PAGE_SIZE,
                         batch_item_ms=BC_BATCH_ITEM_MS) as sandbox:
        profiles = out / "profiles.tmp" if args.profile else None
        if profiles:
            profiles.mkdir(exist_ok=True)
        bench = Bench(sandbox, Path(scratch), profiles)
        workloads, scaling = run_syncs(bench, plan) if args.only != "invoice" else ({}, [])
        if args.only != "sync":
            workloads["invoice_all"] = run_invoicing(bench, plan)
        naive = {} if args.no_naive or args.only else run_naive(bench, plan)
    for name, r in workloads.items():
        r["bound"]["terms"]["graph_calendar_pages"] = sum(
            b["calendarView_pages"] for b in r["bound"]["terms"].get("graph", {}).values())
        if name in naive:
            r["naive_seconds"] = naive[name]["seconds"]
            r["naive_requests"] = naive[name]["requests"]
            r["naive_table_writes"] = naive[name]["table_writes"]
        r["vs_bound"] = ratio(r["seconds"], r["bound_seconds"])
        r["vs_floor"] = ratio(r["seconds"], r["floor_seconds"])
        r["vs_naive"] = ratio(r["naive_seconds"], r["seconds"])
    results["workloads"] = {name: workloads[name] for name in WORKLOADS if name in workloads}
    results["naive"] = naive
    results["scaling"] = {"first_sync": scaling}
    results["targets"] = targets(results) if naive else []
    results["per_unit"] = per_unit(results)
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if scaling:
        plot(results, out / "scaling.png")
    print()
    print(table(results))
    print()
    for t in results["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['measured']}")
    machine = results["machine"]
    print(f"\nload average (1, 5, 15 min) at the start {machine['load_average_at_start']}, at the end "
          f"{machine['load_average_at_end']} on {machine['cpus']} cores: well above 0 means other work shared them")
    print(f"commit {machine['commit']}")
    print(f"wrote {out / 'latest.json'} and {out / 'scaling.png'} in {results['bench_seconds']:.0f} s")
    if results["bench_seconds"] > 600:
        print("warning: the benchmark took longer than its 10-minute budget")


if __name__ == "__main__":
    main()
