"""The README's *Expected* capacity table, computed from `make bench-scale`'s per-unit figures.

`python -m bench.capacity [scale.json]` prints the Markdown table and the executions line; `make
bench-scale` prints it too, after its measurements. The model (README, *Capacity*): a sync every
15 minutes with nothing changed, instances of 2,048 MB, Flex Consumption's on-demand list prices.

- A business's unchanged sync costs the fixed CPU per business plus the marginal CPU per 1,000
  appointments, both fitted over one business of 1,000, 10,000 and 100,000 appointments in a fresh
  process (`unchanged_sync_1_business`); where the scale run measured the very scenario (its
  businesses and appointments), its measured CPU is used instead.
- A business alone on its instance is billed for its run time (it waits on Graph longer than it
  computes): measured where a calendar of that size was measured, else fitted like the CPU (the
  seconds a business takes whatever its size, plus those per 1,000 appointments). Several
  businesses are billed for their CPU, spread over the instances; the run takes the longer of the
  slowest business and the CPU per instance.
- Graph requests: the fitted requests per business (its customers' pages included, 1,000
  customers in the fit) plus those per 1,000 appointments.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.json"

RUNS_PER_MONTH = 30 * 24 * 4
"""A sync every 15 minutes."""
INSTANCE_GB = 2
"""An instance of 2,048 MB, billed as 2 GB."""
PRICE_PER_GB_SECOND = 0.000026
PRICE_PER_MILLION_EXECUTIONS = 0.40
FREE_GB_SECONDS = 100_000
FREE_EXECUTIONS = 250_000
"""Flex Consumption on-demand, list prices at the time of writing, and the monthly free grant per subscription."""
EXECUTIONS_PER_RUN_BESIDES_BUSINESSES = 2
"""The timer and the reconciliation; one `sync-businesses` message per business comes on top."""

SCENARIOS: tuple[tuple[int, int, int], ...] = (
    (1, 10_000, 1), (1, 100_000, 1), (1, 1_000_000, 1),
    (20, 10_000, 5), (20, 100_000, 5), (20, 1_000_000, 5),
    (200, 10_000, 40), (200, 100_000, 40), (200, 1_000_000, 40),
)
"""(businesses, appointments in the window, instances)."""


@dataclass(frozen=True)
class Estimate:
    businesses: int
    appointments: int
    instances: int
    run_seconds: float
    cpu_seconds: float
    cpu_measured: bool
    graph_requests: int
    gb_seconds_a_month: float
    billed_for: str  # "run time" or "CPU"

    @property
    def per_business(self) -> int:
        return self.appointments // self.businesses

    @property
    def dollars_a_month(self) -> float:
        return max(0.0, self.gb_seconds_a_month - FREE_GB_SECONDS) * PRICE_PER_GB_SECOND


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares: (intercept, slope)."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def estimates(scale: dict) -> list[Estimate]:
    unit = scale["per_unit"]["unchanged_sync_1_business"]
    fixed, marginal = unit["app_cpu_seconds_fixed_per_business"], unit["app_cpu_seconds_marginal_per_1000_appointments"]
    points = scale["memory"]["points"]
    measured_seconds = {p["appointments"]: p["unchanged_sync"]["seconds"] for p in points}
    seconds_fixed, seconds_marginal = _fit([(p["appointments"] / 1000, p["unchanged_sync"]["seconds"]) for p in points])
    graph_fixed, graph_marginal = _fit([(p["appointments"] / 1000, p["unchanged_sync"]["requests"]["graph"])
                                        for p in points])
    workers = scale["workers"]
    measured_cpu = {(workers["businesses"], workers["appointments"]): next(
        r["cpu_seconds"]["app"] for r in workers["runs"] if r["kind"] == "unchanged_sync" and r["processes"] == 1)}

    def business_seconds(appointments: int) -> float:
        return measured_seconds.get(appointments, max(0.0, seconds_fixed) + seconds_marginal * appointments / 1000)

    found = []
    for businesses, appointments, instances in SCENARIOS:
        each = appointments // businesses
        cpu = measured_cpu.get((businesses, appointments))
        measured = cpu is not None
        if cpu is None:
            cpu = businesses * fixed + marginal * appointments / 1000
        alone = businesses == 1
        run = business_seconds(each) if alone else max(business_seconds(each), cpu / instances)
        billed = run if alone else cpu
        found.append(Estimate(businesses, appointments, instances, run, cpu, measured,
                              round(businesses * graph_fixed + graph_marginal * appointments / 1000),
                              billed * INSTANCE_GB * RUNS_PER_MONTH, "run time" if alone else "CPU"))
    return found


def executions_line(businesses: int) -> str:
    executions = (businesses + EXECUTIONS_PER_RUN_BESIDES_BUSINESSES) * RUNS_PER_MONTH
    dollars = max(0, executions - FREE_EXECUTIONS) * PRICE_PER_MILLION_EXECUTIONS / 1e6
    return f"{businesses} businesses: {executions:,} executions a month, ${dollars:.2f}"


def function_timeout_seconds() -> float:
    """host.json's `functionTimeout` (hh:mm:ss): one business's sync must finish within it."""
    hours, minutes, seconds = json.loads((ROOT / "host.json").read_text())["functionTimeout"].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _duration(seconds: float, limit: float) -> str:
    text = f"~{seconds:.0f} s" if seconds < 120 else f"~{seconds / 60:.0f} min"
    if seconds > limit:
        text += f": over the {limit / 60:.0f}-minute `functionTimeout` (raise it; Flex allows it)"
    elif seconds > 0.7 * limit:
        text += f": near the {limit / 60:.0f}-minute `functionTimeout`"
    return text


def _rounded(value: float) -> str:
    return f"{round(value, -3):,.0f}" if value >= 10_000 else f"{value:,.0f}"


def markdown(scale: dict) -> str:
    lines = ["| businesses | appointments in the window | per business | instances | unchanged run | "
             "Graph requests a run | app CPU a run | GB-s a month | about a month |",
             "|---|---|---|---|---|---|---|---|---|"]
    limit = function_timeout_seconds()
    for e in estimates(scale):
        cpu = f"{e.cpu_seconds:.1f} s" + (" (measured)" if e.cpu_measured else "")
        lines.append(f"| {e.businesses} | {e.appointments:,} | {e.per_business:,} | {e.instances} | "
                     f"{_duration(e.run_seconds, limit)} | {e.graph_requests:,} | {cpu} | "
                     f"{_rounded(e.gb_seconds_a_month)} ({e.billed_for}) | ${e.dollars_a_month:.0f} |")
    lines += ["", "Executions: " + "; ".join(executions_line(n) for n in (20, 80, 200)) + "."]
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    scale = json.loads(path.read_text())
    print(f"Expected capacity from {path} ({scale['generated_at']}, commit "
          f"{scale['machine'].get('commit', 'not recorded')}):\n")
    print(markdown(scale))


if __name__ == "__main__":
    main()
