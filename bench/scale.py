"""`make bench-scale`: how the sync's memory and time grow with the size of a calendar and with
the number of host processes (see bench/README.md, "Scale").

    python -m bench.scale            # full run (up to about 20 min on 2 cores), writes bench/results/scale.json
    python -m bench.scale --quick    # small sizes (2-3 min), writes bench/results/quick.tmp/scale.json

One sandbox, started as `bench.run` starts it (Azurite, and the Entra ID, Graph and Business
Central simulators with the cost model's latency and limits), serves three measurements:

1. memory: one business holding N appointments, a first and an unchanged sync, each in a fresh
   `bench.worker` process, whose peak RSS is its own;
2. workers: many businesses synced by P `bench.scale_worker` processes at once, all listening to
   the same queues of the same Azurite as the instances of a scaled-out Function App do; one of
   them runs the timer;
3. per-unit figures for a capacity table, derived from the two.

Storage is wiped and a fresh BC company made before every measured sync that is a first sync;
each unchanged sync runs on what its first sync left. Requests are counted by the simulators."""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.machine import machine as measured_on
from bench.run import APP_SETTINGS_TO_CLEAR, RESULTS, ROOT, Bench, log
from bench.scale_report import cpu_targets, per_unit, plot, table

WINDOW_DAYS = (60, 30)
"""SYNC_LOOKBACK_DAYS and SYNC_LOOKAHEAD_DAYS (the app's defaults), and the window the data is
spread over: every generated appointment falls inside the window the app reads."""
SERVICES = 30
RSS_LIMIT_MB = 300.0
RSS_FLAT_MB = 20.0
"""Peak RSS counts as flat when its largest and smallest value over the sizes differ by at most this."""
MORE_SETTINGS_TO_CLEAR = ("PUSH_CUSTOMERS_TO_BOOKINGS", "PUSH_ITEMS_TO_BOOKINGS", "BC_CUSTOMER_FILTER",
                          "BC_ITEM_FILTER")
READY_TIMEOUT = 300.0
STOP_TIMEOUT = 180.0


@dataclass(frozen=True)
class ScalePlan:
    memory_sizes: tuple[int, ...]
    """Appointments of the one business of the memory measurement."""
    memory_customers: int
    """Bookings customers of that business, the same at every size: only the calendar grows."""
    businesses: int
    appointments: int
    """Appointments of the worker measurement, in total, spread evenly over `businesses`."""
    customers: int
    """Bookings customers per business (the same people in every business, as `sandbox.data` makes them)."""
    processes: tuple[int, ...]
    run_timeout: float


FULL = ScalePlan((1_000, 10_000, 100_000), 1_000, 20, 100_000, 1_000, (1, 2, 4), 1500)
QUICK = ScalePlan((1_000, 5_000), 1_000, 4, 2_000, 100, (1, 2), 600)


class ScaleBench(Bench):
    """`bench.run.Bench` with the window settings fixed, throttling counted, and runs of several
    host processes sharing the sandbox."""

    def scenario(self, dataset=None, businesses: tuple[str, ...] | None = None) -> dict[str, str]:
        """Fresh storage and BC company; the dataset loaded into Graph unless None (loaded before)."""
        from sandbox.stack import ENVIRONMENT, TENANT

        self.wipe_storage()
        if dataset is not None:
            self.sb.graph.load(dataset)
            businesses = tuple(dataset.businesses)
        company = self.sb.bc.add_company(TENANT, ENVIRONMENT)
        env = dict(os.environ)
        for name in (*APP_SETTINGS_TO_CLEAR, *MORE_SETTINGS_TO_CLEAR):
            env.pop(name, None)
        env.update(self.sb.env(BOOKINGS_BUSINESS_IDS=",".join(businesses), BC_COMPANY_ID=company,
                               SYNC_LOOKBACK_DAYS=str(WINDOW_DAYS[0]), SYNC_LOOKAHEAD_DAYS=str(WINDOW_DAYS[1])))
        env["PYTHONPATH"] = str(ROOT)
        return env

    def _requests(self, before: dict) -> dict:
        counted = super()._requests(before)
        for api, plan in (("graph", self.sb.graph.plan), ("bc", self.sb.bc.plan)):
            stats = plan.stats
            counted[f"{api}_429"] = stats.faults.get("429", 0)
            peak = getattr(stats, "peak_in_flight", None)  # demand per key, where the simulators count it
            counted[f"{api}_peak_in_flight"] = dict(peak) if peak is not None else None
        return counted

    def hosts(self, env: dict, processes: int, label: str, timeout: float) -> dict:
        """`processes` Functions hosts listening to the same queues; the first also runs the timer
        once. Timed from the moment all are ready and told to go until the run is over (the
        triggering process says when: `bench.scale_worker`)."""
        self.runs += 1
        control = self.workdir / f"hosts-{self.runs:02d}-{label}"
        control.mkdir()
        workers = []
        for index in range(processes):
            command = [sys.executable, "-m", "bench.scale_worker", "--control", str(control), "--index", str(index),
                       "--out", str(control / f"out-{index}.json"), "--timeout", str(timeout)]
            if index == 0:
                command.append("--trigger")
            if self.profiles:
                command += ["--profile", str(self.profiles / f"{label}-process{index}.prof")]
            stderr = open(control / f"stderr-{index}.txt", "w")
            workers.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=stderr, stderr=stderr), stderr))
        try:
            self._wait(control, [f"ready-{i}" for i in range(processes)], workers, READY_TIMEOUT)
            before = self._reset()
            parent_cpu, azurite_cpu = _own_cpu_seconds(), _process_cpu_seconds(self.sb.azurite)
            go_at = time.time()
            (control / "go").write_text(str(go_at))
            self._wait(control, ["done"], workers, timeout + 60)
            noticed = time.time()
            requests = self._requests(before)
            cpu = {"simulators_and_harness": round(_own_cpu_seconds() - parent_cpu, 3),
                   "azurite": _since(azurite_cpu, _process_cpu_seconds(self.sb.azurite))}
            (control / "stop").write_text("")
            for process, _ in workers:
                process.wait(STOP_TIMEOUT)
        finally:
            for process, stderr in workers:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                stderr.close()
        failed = [i for i, (process, _) in enumerate(workers) if process.returncode]
        if failed:
            raise RuntimeError(f"host process {failed[0]} of {label} failed:\n"
                               + (control / f"stderr-{failed[0]}.txt").read_text()[-3000:])
        outs = [json.loads((control / f"out-{i}.json").read_text()) for i in range(processes)]
        trigger = outs[0]
        seconds = round(trigger["done_at"] - go_at, 3)
        result = {"processes": processes, "seconds": seconds, "trigger_seconds": trigger["trigger_seconds"],
                  "noticed_seconds": round(noticed - go_at, 3), "requests": requests,
                  "ended": trigger["ended"], "per_process": [_process_summary(out) for out in outs]}
        cpu["app"] = round(sum(out["cpu_seconds"] for out in outs), 3)
        cpu["total"] = round(sum(v for v in cpu.values() if v is not None), 3)
        cpu["utilisation_of_all_cores"] = round(cpu["total"] / (seconds * (os.cpu_count() or 1)), 3)
        result["cpu_seconds"] = cpu
        result["table_writes"] = sum(out["app"]["table_writes"] for out in outs)
        result["blob_writes"] = sum(out["app"]["blob_writes"] for out in outs)
        result["peak_rss_mb"] = max(out["peak_rss_mb"] for out in outs)
        log(f"hosts {label}: {seconds:.2f} s with {processes} process(es) (timer {trigger['trigger_seconds']:.2f} s), "
            f"graph {requests['graph']} (429: {requests['graph_429']}), bc {requests['bc']} "
            f"(429: {requests['bc_429']}), app cpu {cpu['app']:.1f} s, peak RSS "
            + "/".join(f"{p['peak_rss_mb']:.0f}" for p in result["per_process"]) + " MB")
        return result

    @staticmethod
    def _wait(control: Path, names: list[str], workers: list, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all((control / name).exists() for name in names):
            for index, (process, _) in enumerate(workers):
                if process.poll() is not None:
                    raise RuntimeError(f"host process {index} exited ({process.returncode}) while waiting for "
                                       f"{', '.join(names)}:\n" + (control / f"stderr-{index}.txt").read_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{', '.join(names)} not there after {timeout:.0f} s")
            time.sleep(0.01)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _since(before: float | None, now: float | None) -> float | None:
    return round(now - before, 3) if before is not None and now is not None else None


def _process_cpu_seconds(azurite) -> float | None:
    """User + system CPU of the Azurite (Node) process, from /proc."""
    process = getattr(azurite, "_process", None)
    try:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (AttributeError, OSError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_summary(out: dict) -> dict:
    return {"role": out["role"], "peak_rss_mb": out["peak_rss_mb"], "cpu_seconds": out["cpu_seconds"],
            "messages": out["host_queues"]["by_queue"], "failed_attempts": out["host_queues"]["failed_attempts"],
            "poisoned": out["host_queues"]["poisoned"], "table_writes": out["app"]["table_writes"],
            "clients": {k: v for k, v in out["app"].items() if k.endswith("_client")},
            "harness_cpu_seconds": out.get("harness_cpu_seconds"), "limits": _limits_brief(out["app"].get("limits"))}


def _limits_brief(limits: dict | None) -> dict | None:
    """A process's cost of the shared limits, per API: storage round trips against requests."""
    if not limits:
        return None
    return {api: {k: v.get(k) for k in ("served", "storage_round_trips", "round_trips_per_request", "turns",
                                        "waited_seconds", "storage_wait_seconds")} for api, v in limits.items()}


def _dataset(appointments: int, customers: int, businesses: int):
    from sandbox.data import business_ids, generate

    return generate(appointments=appointments, customers=customers, services=SERVICES,
                    business_ids=business_ids(businesses), seed=7, lookback_days=WINDOW_DAYS[0],
                    lookahead_days=WINDOW_DAYS[1])


def _sync_point(result: dict) -> dict:
    requests = result["requests"]
    counts = (result.get("last_sync") or {}).get("counts") or {}
    return {"seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"], "peak_rss_mb": result["peak_rss_mb"],
            "requests": {k: requests[k] for k in ("graph", "bc", "token", "graph_429", "bc_429")},
            "max_in_flight": {"graph": requests["graph_max_in_flight"], "bc": requests["bc_max_in_flight"]},
            "peak_in_flight": {"graph": requests["graph_peak_in_flight"], "bc": requests["bc_peak_in_flight"]},
            "table_writes": result["app"]["table_writes"], "blob_writes": result["app"]["blob_writes"],
            "request_paths": {"graph": requests["graph_by_path"], "bc": requests["bc_by_path"]},
            "outcome": (result.get("last_sync") or {}).get("outcome"),
            "counts": {k: counts.get(k) for k in ("fetched", "created", "updated", "unchanged", "cancelled")}}


def run_memory(bench: ScaleBench, plan: ScalePlan, problems: list[str]) -> dict:
    """Peak RSS of a first and an unchanged sync of one business, at each calendar size."""
    points = []
    for size in plan.memory_sizes:
        log(f"memory: generating one business with {size:,} appointments")
        dataset = _dataset(size, plan.memory_customers, 1)
        env = bench.scenario(dataset)
        del dataset
        gc.collect()
        first = _sync_point(bench.app("sync", env, f"memory-first-{size}"))
        unchanged = _sync_point(bench.app("sync", env, f"memory-unchanged-{size}"))
        for name, point, created in (("first", first, size), ("unchanged", unchanged, 0)):
            if point["outcome"] != "succeeded" or point["counts"]["fetched"] != size or point["counts"]["created"] != created:
                problems.append(f"memory {name} sync of {size:,}: outcome {point['outcome']}, counts {point['counts']}")
        points.append({"appointments": size, "first_sync": first, "unchanged_sync": unchanged})
    verdict = {}
    for kind in ("first_sync", "unchanged_sync"):
        rss = [p[kind]["peak_rss_mb"] for p in points]
        verdict[kind] = {"min_mb": min(rss), "max_mb": max(rss), "spread_mb": round(max(rss) - min(rss), 1),
                         "flat": max(rss) - min(rss) <= RSS_FLAT_MB, "under_limit": max(rss) < RSS_LIMIT_MB}
    return {"businesses": 1, "customers": plan.memory_customers, "services": SERVICES,
            "window_days": {"lookback": WINDOW_DAYS[0], "lookahead": WINDOW_DAYS[1]},
            "flat_within_mb": RSS_FLAT_MB, "limit_mb": RSS_LIMIT_MB, "points": points, "verdict": verdict}


def _check_hosts(result: dict, businesses: list[str], appointments: int, first: bool, problems: list[str],
                 label: str) -> None:
    ended = result["ended"]
    bad = {b: o for b, o in ended["outcomes"].items() if o != "succeeded"}
    fetched = ended["totals"].get("fetched")
    created = ended["totals"].get("created")
    if bad or set(ended["outcomes"]) != set(businesses) or fetched != appointments \
            or created != (appointments if first else 0):
        problems.append(f"{label}: outcomes not all succeeded ({bad or 'ok'}), fetched {fetched}, created {created} "
                        f"of {appointments:,}")
    poisoned = sum(p["poisoned"] for p in result["per_process"])
    if poisoned:
        problems.append(f"{label}: {poisoned} message(s) moved to poison")


def run_workers(bench: ScaleBench, plan: ScalePlan, problems: list[str]) -> dict:
    """Many businesses, synced by 1, 2, … host processes sharing one Azurite: a first sync on
    fresh storage and then an unchanged sync, each with fresh processes."""
    from bench.model import distinct_emails

    log(f"workers: generating {plan.businesses} businesses with {plan.appointments:,} appointments in total")
    dataset = _dataset(plan.appointments, plan.customers, plan.businesses)
    businesses = tuple(dataset.businesses)
    per_business = sorted(len(b.appointments) for b in dataset.businesses.values())
    new_customers = len(distinct_emails(dataset))
    bench.sb.graph.load(dataset)
    del dataset
    gc.collect()
    runs = []
    for processes in plan.processes:
        env = bench.scenario(None, businesses)
        for kind in ("first_sync", "unchanged_sync"):
            label = f"{kind}-P{processes}"
            result = bench.hosts(env, processes, label, plan.run_timeout)
            _check_hosts(result, list(businesses), plan.appointments, kind == "first_sync", problems, label)
            runs.append({"kind": kind} | result)
    for kind in ("first_sync", "unchanged_sync"):
        base = next(r for r in runs if r["kind"] == kind and r["processes"] == plan.processes[0])
        for run in runs:
            if run["kind"] == kind:
                run["speedup"] = round(base["seconds"] * plan.processes[0] / run["seconds"], 2)
    business_runs = sum(r["messages"].get("sync-businesses", 0) for run in runs for r in run["per_process"])
    return {"businesses": len(businesses), "appointments": plan.appointments,
            "appointments_per_business": {"min": per_business[0], "max": per_business[-1]},
            "customers_per_business": plan.customers, "distinct_customer_emails": new_customers,
            "services_per_business": SERVICES, "window_days": {"lookback": WINDOW_DAYS[0], "lookahead": WINDOW_DAYS[1]},
            "cpus": os.cpu_count(),
            "mode": "fan-out" if business_runs else "inline",
            "mode_means": "the timer queues one sync-businesses message per business" if business_runs else
                          "the timer syncs every business itself; only directory upserts are queued",
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description="Sync at scale: memory vs calendar size, speed-up with host "
                                                 "processes (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="small sizes: 2-3 minutes")
    parser.add_argument("--only", choices=["memory", "workers"], help="run one measurement (no per-unit figures)")
    parser.add_argument("--service-limits", action="store_true",
                        help="the services' own limits instead of the cost model's waiting: Graph answers 429 beyond "
                             "4 requests per mailbox, BC beyond 5 running and 95 waiting or 6,000 per 5 minutes "
                             "(writes scale-service-limits.json)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, or bench/results/quick.tmp "
                                                 "with --quick)")
    parser.add_argument("--profile", action="store_true", help="also write a cProfile of every app process "
                                                               "to <out>/profiles.tmp/ (slower; for finding costs)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or (RESULTS / "quick.tmp" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))

    from bench.model import BC_BATCH_ITEM_MS, GRAPH_PAGE_SIZE, bc_knobs, graph_knobs
    from sandbox.stack import SandboxStack

    graph_limits, bc_limits = graph_knobs(), bc_knobs()
    if args.service_limits:
        from sandbox.bc.app import default_knobs

        graph_limits.max_queued = 0
        bc_limits = default_knobs()
        bc_limits.latency_ms = graph_limits.latency_ms * 2  # the cost model's 120 ms
    name = "scale-service-limits" if args.service_limits else "scale"

    results: dict = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                     "quick": args.quick, "plan": plan.__dict__,
                     "machine": measured_on(),
                     "cost_model": {"graph": {"latency_ms": 60, "max_concurrency_per_mailbox": 4, "page_size": 100},
                                    "bc": {"latency_ms": 120, "max_concurrency": 5, "batch_item_ms": 20,
                                           "max_queued": None},
                                    "azurite": "as is (in-memory), not modelled"},
                     "limits": {"graph": graph_limits.__dict__, "bc": bc_limits.__dict__,
                                "mode": "service (excess is answered 429)" if args.service_limits else
                                        "cost model (excess waits)"}}
    problems: list[str] = []
    log("starting the sandbox (Azurite, Entra ID, Graph and BC simulators)")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch, \
            SandboxStack(graph_knobs=graph_limits, bc_knobs=bc_limits, page_size=GRAPH_PAGE_SIZE,
                         batch_item_ms=BC_BATCH_ITEM_MS) as sandbox:
        profiles = out / "profiles.tmp" if args.profile else None
        if profiles:
            profiles.mkdir(exist_ok=True)
        bench = ScaleBench(sandbox, Path(scratch), profiles)
        if args.only != "workers":
            results["memory"] = run_memory(bench, plan, problems)
        if args.only != "memory":
            results["workers"] = run_workers(bench, plan, problems)
    results["per_unit"] = per_unit(results["memory"], results["workers"]) if not args.only else {}
    results["targets"] = cpu_targets(results["per_unit"])
    results["problems"] = problems
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if not args.only:
        plot(results, out / f"{name}.png")
    print()
    print(table(results))
    for target in results["targets"]:
        print(f"  [{'met' if target['met'] else 'NOT met'}] {target['target']}: {target['measured']}")
    if results["per_unit"]:
        from bench.capacity import markdown

        print("\nExpected capacity (README, Capacity; `python -m bench.capacity` prints it again):\n")
        print(markdown(results))
    machine = results["machine"]
    print(f"  load average at the start {machine['load_average_at_start']}, at the end {machine['load_average_at_end']} "
          f"on {machine['cpus']} cores; commit {machine['commit']}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    written = f"{out / name}.json" + ("" if args.only else f" and {name}.png")
    print(f"\nwrote {written} in {results['bench_seconds']:.0f} s")
    if results["bench_seconds"] > 1200:
        print("warning: longer than the full run's budget of about 20 minutes")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
