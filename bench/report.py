"""`make bench`'s report: what the measurements mean against the targets of bench/README.md,
the costs per unit of work, the Markdown table and the plot of `bench.run`'s results."""

from __future__ import annotations

import math
from pathlib import Path


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


BC_REQUESTS_PER_100_NEW_CUSTOMERS_BEFORE = 2.68
"""Measured on main before BC lookups were split by OData's node limit (2026-12-06, first sync of
10,000 appointments and 1,939 new customers: 52 BC requests): lookups must stay in `$batch`es so
that the smaller filters cost no more requests."""
RSS_LIMIT_MB = 200
FLOOR_TARGETS = {"first_sync": 1.3, "unchanged_sync": 1.25, "changed_sync": 1.25}
"""Each workload's time at most this many times its floor, measured in the same run (issue #25)."""


def targets(results: dict) -> list[dict]:
    w = results["workloads"]
    checks = []

    def check(name: str, met: bool, measured: str) -> None:
        checks.append({"target": name, "met": bool(met), "measured": measured})

    r = w["first_sync"]
    check("first_sync within 1.5x of the bound", r["seconds"] <= 1.5 * r["bound_seconds"],
          f"{r['seconds']:.2f} s vs bound {r['bound_seconds']:.2f} s = {r['vs_bound']}x")
    for key, limit in FLOOR_TARGETS.items():
        r = w[key]
        check(f"{key} within {limit}x of the floor", r["seconds"] <= limit * r["floor_seconds"],
              f"{r['seconds']:.2f} s vs floor {r['floor_seconds']:.2f} s = {r['vs_floor']}x")
    r = w["invoice_all"]
    check("invoice_all within 1.3x of its storage floor", r["vs_floor_with_storage"] <= 1.3,
          f"median of {len(r['samples'])}: {r['seconds']:.2f} s vs {r['floor_with_storage_seconds']:.2f} s = "
          f"{r['vs_floor_with_storage']}x (runs: "
          + ", ".join(f"{s['seconds']:.2f}/{s['floor_with_storage_seconds']:.2f}" for s in r["samples"]) + ")")
    for key in ("first_sync", "invoice_all"):
        r = w[key]
        check(f"{key} at least 10x faster than naive", (r["vs_naive"] or 0) >= 10,
              f"naive {r['naive_seconds']:.1f} s / {r['seconds']:.2f} s = {r['vs_naive']}x")
    u = w["unchanged_sync"]
    # One pass over the window, read in weekly slices: at most one partly filled page per slice.
    businesses = len(u["bound"]["terms"]["graph"])
    slices = businesses * math.ceil((60 + 30) / 7)
    pages = u["bound"]["terms"]["graph_calendar_pages"]
    passes = u["calendar_view_requests"] <= pages + slices
    check("unchanged_sync makes zero table writes", u["table_writes"] == 0,
          f"{u['table_writes']} table writes ({u['blob_writes']} blob writes: the run's summary for health)")
    check("unchanged_sync reads calendarView once", passes,
          f"{u['calendar_view_requests']} calendarView requests for {pages} pages of one pass in {slices} "
          f"weekly slices (at most {pages + slices})")
    per_100 = w["first_sync"]["bc_requests_per_100_new_customers"]
    check("first_sync: BC requests per 100 new customers no more than before the node limit",
          per_100 <= BC_REQUESTS_PER_100_NEW_CUSTOMERS_BEFORE,
          f"{per_100} now, {BC_REQUESTS_PER_100_NEW_CUSTOMERS_BEFORE} before ({w['first_sync']['requests']['bc']} BC "
          f"requests for {w['first_sync']['customers']} new customers)")
    peak = max(w.values(), key=lambda r: r["peak_rss_mb"])
    check(f"peak RSS under {RSS_LIMIT_MB} MB", peak["peak_rss_mb"] < RSS_LIMIT_MB,
          ", ".join(f"{name} {r['peak_rss_mb']:.0f}" for name, r in w.items()) + " MB")
    i = results["import"]
    check("import function_app <= 1.3x its dependencies", i["ratio"] <= 1.3,
          f"{i['app_seconds']:.3f} s vs {i['deps_seconds']:.3f} s = {i['ratio']}x")
    return checks


def per_unit(results: dict) -> dict:
    """App CPU per 1,000 appointments of each sync (its worker's user + system CPU, the
    in-process host's queue polling included) and what the limits shared through storage cost
    it: storage round trips per request of each API. `make bench-scale` gives the capacity
    figures; these are the same units for the fixed workloads."""
    units = {}
    for name, r in results["workloads"].items():
        unit = {"cpu_seconds": r["cpu_seconds"]}
        if r.get("appointments"):
            unit["app_cpu_seconds_per_1000_appointments"] = round(1000 * r["cpu_seconds"] / r["appointments"], 3)
        if r.get("bookings"):
            unit["app_cpu_seconds_per_1000_bookings"] = round(1000 * r["cpu_seconds"] / r["bookings"], 3)
        unit["limits"] = {api: {k: v.get(k) for k in ("served", "storage_round_trips", "round_trips_per_request",
                                                      "turns", "waited_seconds", "storage_wait_seconds")}
                          for api, v in (r.get("limits") or {}).items()}
        units[name] = unit
    return units


def table(results: dict) -> str:
    head = (f"{'workload':<15} {'seconds':>8} {'bound':>7} {'x bound':>8} {'floor':>6} {'naive':>8} {'x faster':>9} "
            f"{'tbl writes':>10} {'RSS MB':>7} {'graph':>6} {'bc':>6} {'token':>5}")
    lines = [head, "-" * len(head)]
    for name, r in results["workloads"].items():
        naive = f"{r['naive_seconds']:.1f}" if r["naive_seconds"] is not None else "-"
        lines.append(f"{name:<15} {r['seconds']:>8.2f} {r['bound_seconds']:>7.2f} {r['vs_bound'] or 0:>8.2f} "
                     f"{r['floor_seconds']:>6.2f} "
                     f"{naive:>8} {r['vs_naive'] or 0:>9.1f} {r['table_writes']:>10} {r['peak_rss_mb']:>7.0f} "
                     f"{r['requests']['graph']:>6} {r['requests']['bc']:>6} {r['requests']['token']:>5}")
    scaling = results.get("scaling", {}).get("first_sync", [])
    if scaling:
        lines.append("BC requests per 100 new customers (first sync): " + ", ".join(
            f"{p['appointments']:,} appointments / {p['customers']:,} customers: {p['bc_requests_per_100_new_customers']}"
            for p in scaling) + f" (before the node limit: {BC_REQUESTS_PER_100_NEW_CUSTOMERS_BEFORE} at 10,000)")
    i = results["import"]
    lines.append(f"import: function_app {i['app_seconds']:.3f} s, dependencies alone {i['deps_seconds']:.3f} s "
                 f"({i['ratio']}x), median of {i['runs']} fresh interpreters")
    for name, unit in (results.get("per_unit") or {}).items():
        per = unit.get("app_cpu_seconds_per_1000_appointments") or unit.get("app_cpu_seconds_per_1000_bookings")
        what = "appointments" if unit.get("app_cpu_seconds_per_1000_appointments") else "bookings"
        limits = "; ".join(f"{api} {v['storage_round_trips']} storage round trips ({v['storage_wait_seconds']:.2f} s "
                           f"on requests' path) for {v['served']} requests" for api, v in unit["limits"].items())
        lines.append(f"{name}: app CPU {unit['cpu_seconds']:.2f} s = {per:.3f} s per 1,000 {what}"
                     + (f"; shared limits: {limits}" if limits else ""))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["scaling"]["first_sync"]
    sizes = [p["appointments"] for p in points]
    fig, (left, right, memory) = plt.subplots(1, 3, figsize=(16, 4.2))
    left.plot(sizes, [p["seconds"] for p in points], "o-", label="app (measured)")
    left.plot(sizes, [p["bound_seconds"] for p in points], "s--", label="bound (cost model)")
    left.plot(sizes, [p["floor_seconds"] for p in points], "d-.", label="floor (bare client, same simulators)")
    naive = results["naive"].get("first_sync")
    if naive:
        fit = naive["fit"]
        low, high = min(sizes + [m["size"] for m in naive["measured"]]), max(sizes)
        span = [low * (high / low) ** (i / 60) for i in range(61)]
        left.plot(span, [fit["fixed"] + fit["per_unit"] * x for x in span], ":", color="grey",
                  label="naive (fitted line fixed + per_unit·N)")
        left.plot([m["size"] for m in naive["measured"]], [m["seconds"] for m in naive["measured"]], "x",
                  color="grey", label="naive (measured)")
    left.set_xlabel("appointments, log (customers = N/5, 30 services, 2 businesses)")
    left.set_ylabel("seconds, log")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_title("First sync: time to empty queues")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    for api, marker in (("graph", "o-"), ("bc", "s-"), ("token", "^-")):
        right.plot(sizes, [max(p["requests"][api], 0.5) / p["appointments"] for p in points], marker,
                   label=f"app: {api}")
    if naive:
        for api, color in (("graph", "C0"), ("bc", "C1")):
            measured = naive["measured"]
            right.plot([m["size"] for m in measured], [m["requests"][api] / m["size"] for m in measured], "x:",
                       color=color, label=f"naive: {api} (measured)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("appointments, log")
    right.set_ylabel("requests per appointment, log")
    right.set_title("First sync: requests per booking")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    memory.plot(sizes, [p["peak_rss_mb"] for p in points], "o-", label="app: peak RSS of the worker process")
    memory.axhline(300, color="grey", linestyle=":", label="target: under 300 MB")
    memory.set_xscale("log")
    memory.set_ylim(bottom=0)
    memory.set_xlabel("appointments, log")
    memory.set_ylabel("peak RSS (VmHWM), MB")
    memory.set_title("First sync: memory")
    memory.grid(True, which="both", alpha=0.3)
    memory.legend(fontsize=8)
    fig.suptitle(f"bookings-invoicing first sync, cost model: Graph 60 ms x4, BC 120 ms x5 ($batch +20 ms/req) "
                 f"— {results['generated_at'][:16]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
