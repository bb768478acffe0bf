"""One workload of the real app, in a process of its own (so its peak RSS is its own).

`python -m bench.worker sync|invoice --out result.json`, with the app settings in the
environment (`bench.run` starts it against the sandbox it holds). The app runs exactly as in the
tests: `function_app.app` under `sandbox.host.FunctionHost`, the timer or HTTP trigger with the
queue listeners running alongside it (as the Functions host runs them), until the trigger has
finished and the queues are empty. Written to `--out`: wall seconds of the workload, the app's own
store counters, the host's queue counters, and this process's peak RSS."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def _peak_rss_mb() -> float:
    """This process's own peak RSS: `VmHWM` of its address space. (`ru_maxrss` would not do: Linux
    keeps it across `fork` + `exec`, so a worker would report the parent's size if larger.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _switch(profiler, on: bool) -> None:
    """cProfile follows one thread: switch it on and off from the host's event loop thread."""
    if on:
        profiler.enable()
    else:
        profiler.disable()


async def _app_counters() -> dict:
    """The app's per-loop runtime: its store's write counters and its API clients' counts."""
    from shared.runtime import runtime

    rt = runtime()
    store = await rt.store()
    stats = store.stats
    counters = {"table_writes": stats.table_writes, "blob_writes": stats.blob_writes, "entities_written": stats.entities_written,
                "messages_sent": stats.messages_sent, "table_writes_by_table": dict(stats.by_table)}
    for name, api in (("graph", getattr(rt._graph, "api", None)), ("bc", rt._bc_api)):
        if api is not None:
            counters[f"{name}_client"] = {"requests_sent": api.requests_sent, "retries": api.retries}
    counters["limits"] = limit_counters(rt)
    return counters


def limit_counters(rt) -> dict:
    """What the limits shared through storage cost this process: storage round trips of the
    request slots (lease takes, releases, renewals, waiting marks and looks) and of the rate
    ledger (reads, writes), against the requests they served, per API."""
    from dataclasses import asdict

    apis: dict = {}
    for name, pool in getattr(rt, "_slots", {}).items():
        api = apis.setdefault(name.split("/", 1)[0], {"pools": 0, "served": 0, "slot_round_trips": 0,
                                                      "waited_seconds": 0.0, "storage_wait_seconds": 0.0, "turns": 0})
        stats = pool.stats
        renewing = sum(getattr(slot.lease, "renewals", 0) for slot in getattr(pool, "_held", {}).values())
        api["pools"] += 1
        api["served"] += stats.served
        api["slot_round_trips"] += getattr(stats, "round_trips", stats.attempts + stats.released) + renewing
        api["waited_seconds"] = round(api["waited_seconds"] + getattr(stats, "waited_seconds", 0.0), 3)
        api["turns"] += getattr(stats, "turns", 0)
        api["storage_wait_seconds"] = round(api["storage_wait_seconds"] + getattr(stats, "probe_seconds", 0.0), 3)
        api.setdefault("detail", {})[name] = asdict(stats) | {"renewals_of_held": renewing}
    budget = getattr(getattr(getattr(rt, "_bc", None), "api", None), "budget", None)
    if budget is not None and "bc" in apis:
        apis["bc"]["ledger_round_trips"] = getattr(budget.stats, "round_trips", budget.stats.reads + budget.stats.writes)
        apis["bc"]["ledger"] = asdict(budget.stats)
        apis["bc"]["storage_wait_seconds"] = round(apis["bc"]["storage_wait_seconds"]
                                                   + getattr(budget.stats, "claim_seconds", 0.0), 3)
    for api in apis.values():
        trips = api["slot_round_trips"] + api.get("ledger_round_trips", 0)
        api["storage_round_trips"] = trips
        api["round_trips_per_request"] = round(trips / api["served"], 3) if api["served"] else None
    return apis


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["sync", "invoice"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--profile", help="write a cProfile of the functions' event loop thread here")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = time.perf_counter()
    from function_app import app
    from sandbox.host import FunctionHost

    import_seconds = time.perf_counter() - started
    host = FunctionHost(app, os.environ["AzureWebJobsStorage"])
    result: dict = {"workload": args.workload, "import_seconds": round(import_seconds, 3)}
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        host.run(_switch(profiler, True))
    try:
        cpu = _cpu_seconds()
        clock = time.perf_counter()
        if args.workload == "sync":
            trigger = host.timer_async("sync_bookings")
        else:
            trigger = host.http_async("POST", "invoices", body={"all": True})
        # As the Functions host: queue functions run on what the trigger enqueues while it runs.
        response, trigger_seconds = host.run_listening(trigger, timeout=args.timeout)
        finished = time.perf_counter()
        if args.workload == "invoice":
            accepted = json.loads(response.get_body() or b"null")
            if response.status_code != 202:
                raise RuntimeError(f"POST /api/invoices answered {response.status_code}: {accepted}")
        result["seconds"] = round(finished - clock, 3)
        result["phases"] = {"trigger_seconds": round(trigger_seconds, 3),
                            "after_trigger_seconds": round(finished - clock - trigger_seconds, 3)}
        result["cpu_seconds"] = round(_cpu_seconds() - cpu, 3)
        if profiler is not None:
            host.run(_switch(profiler, False))
            profiler.dump_stats(args.profile)
        if args.workload == "invoice":
            status = host.http("GET", f"invoices/jobs/{accepted['jobId']}")
            job = json.loads(status.get_body())
            result["job"] = {"status": job["status"], "bookingCount": job["bookingCount"],
                             "invoices": len(job["invoices"]), "errors": len(job["errors"]),
                             "lines": sum(len(i["bookingIds"]) for i in job["invoices"])}
        health = json.loads(host.http("GET", "status").get_body())
        result["last_sync"] = health.get("lastSync")
        result["directory"] = health.get("directory")
        record_counters(host, result)
    finally:
        host.close()
    write_result(result, args.out)


def record_counters(host, result: dict) -> None:
    """The app's store and client counters and the host's queue counters, into `result`."""
    result["app"] = host.run(_app_counters(), timeout=60)
    result["host_queues"] = {"processed": host.stats.processed, "failed_attempts": host.stats.failed_attempts,
                             "poisoned": host.stats.poisoned, "by_queue": host.stats.by_queue}


def write_result(result: dict, out: str) -> None:
    """`result` with this process's peak RSS, as JSON to `out`."""
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    with open(out, "w") as handle:
        json.dump(result, handle, default=str)


if __name__ == "__main__":
    main()
