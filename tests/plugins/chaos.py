"""Options and the closing summary for the chaos and property suites.

`--chaos-runs N` sets how many seeded chaos runs `tests/test_chaos.py` makes (3 inside
`make test`, 200 under `make chaos`); `--chaos-seed S` replays one run. The suites add what they
did to `TALLY`, and the terminal summary prints it as one line each, so a run's real counts
(faults injected, inputs tried, duplicates and losses found) are visible without `-s`."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

DEFAULT_CHAOS_RUNS = 3


@dataclass
class Tally:
    runs: int = 0
    faults: int = 0
    faults_by_kind: Counter = field(default_factory=Counter)
    crashes: int = 0
    duplicate_deliveries: int = 0
    duplicates: int = 0
    """BC invoice lines beyond one per booking and customer, and BC customers/items that exist twice."""
    lost: int = 0
    """Invoiceable (booking, customer) pairs on no invoice at the end, or left claimed."""
    inputs: Counter = field(default_factory=Counter)
    """Property-test inputs tried, by route or queue."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def tried(self, target: str, n: int = 1) -> None:
        with self._lock:
            self.inputs[target] += n


TALLY = Tally()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("chaos", "seeded chaos runs of the whole pipeline")
    group.addoption("--chaos-runs", type=int, default=DEFAULT_CHAOS_RUNS,
                    help=f"how many seeded chaos runs to make (default {DEFAULT_CHAOS_RUNS})")
    group.addoption("--chaos-seed", type=int, default=None,
                    help="replay the chaos run with this seed (only it)")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if TALLY.runs:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(TALLY.faults_by_kind.items()))
        terminalreporter.write_line(
            f"chaos: {TALLY.runs} runs, {TALLY.faults} faults injected, {TALLY.duplicates} duplicates, "
            f"{TALLY.lost} lost")
        terminalreporter.write_line(
            f"chaos detail: faults by kind ({kinds or 'none'}); {TALLY.crashes} worker crashes, "
            f"{TALLY.duplicate_deliveries} duplicate deliveries")
    if TALLY.inputs:
        parts = ", ".join(f"{target} {n}" for target, n in sorted(TALLY.inputs.items()))
        terminalreporter.write_line(f"properties: {sum(TALLY.inputs.values())} inputs tried ({parts})")
