"""Budgets and the closing summary of the chaos and property suites.

`make test` is the gate people run before every commit: a few seeded chaos runs and property
budgets sized for it. `make test-long` (`--long`) gives the same tests long budgets:
`LONG_CHAOS_RUNS` chaos runs and `LONG_FACTOR` times the property inputs. `--chaos-runs N` sets
the number of chaos runs outright (200 under `make chaos`); `--chaos-seed S` replays one run.

The suites add what they did to `TALLY`, and the terminal summary prints it as one line each, so
a run's real counts (faults injected, inputs tried, duplicates and losses found) are visible
without `-s`. Under pytest-xdist each worker sends its tally to the controller, which adds them
up before it prints."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field, fields

import pytest

DEFAULT_CHAOS_RUNS = 3
LONG_CHAOS_RUNS = 30
LONG_FACTOR = 10
"""`--long` multiplies every property test's number of inputs by this."""


@dataclass
class Budget:
    long: bool = False

    def examples(self, gate: int) -> int:
        """A property test's number of inputs: `gate` in `make test`, `LONG_FACTOR` times more
        under `--long`."""
        return gate * LONG_FACTOR if self.long else gate


BUDGET = Budget()
"""Set from the command line before the test modules are collected (their decorators read it)."""


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

    def as_dict(self) -> dict:
        """Plain values, as pytest-xdist carries them from a worker to the controller."""
        with self._lock:
            return {f.name: dict(value) if isinstance(value := getattr(self, f.name), Counter) else value
                    for f in fields(self) if not f.name.startswith("_")}

    def merge(self, other: dict) -> None:
        with self._lock:
            for name, value in other.items():
                mine = getattr(self, name)
                if isinstance(mine, Counter):
                    mine.update(value)
                else:
                    setattr(self, name, mine + value)


TALLY = Tally()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("chaos", "seeded chaos runs of the whole pipeline, and property budgets")
    group.addoption("--long", action="store_true", default=False,
                    help=f"long budgets: {LONG_CHAOS_RUNS} chaos runs, {LONG_FACTOR}x the property inputs (make test-long)")
    group.addoption("--chaos-runs", type=int, default=None,
                    help=f"how many seeded chaos runs to make (default {DEFAULT_CHAOS_RUNS}, {LONG_CHAOS_RUNS} with --long)")
    group.addoption("--chaos-seed", type=int, default=None,
                    help="replay the chaos run with this seed (only it)")


def pytest_configure(config) -> None:
    BUDGET.long = config.getoption("long")


def chaos_runs(config) -> int:
    runs = config.getoption("chaos_runs")
    if runs is not None:
        return runs
    return LONG_CHAOS_RUNS if config.getoption("long") else DEFAULT_CHAOS_RUNS


def pytest_sessionfinish(session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints the summary
        workeroutput["tally"] = TALLY.as_dict()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """An xdist worker finished: add its tally to the controller's."""
    tally = getattr(node, "workeroutput", {}).get("tally")
    if tally:
        TALLY.merge(tally)


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
