"""Where the app's CPU goes, from the cProfiles `bench.run --profile` and `bench.scale --profile`
write (the functions' event loop thread).

    python -m bench.profile_report PROFILE.prof [--cpu-seconds S] [--appointments N] [more.prof ...]

Prints, per profile, the share of the busy time (the profile's total less the event loop's idle
`epoll`) that went to the parts of a sync: Graph pages (HTTP, JSON, validation), bookings built
from them, the content hash and table entity, the stored rows read, table transactions, the
directory upserts, the shared limits (slots and ledger, with their storage round trips),
logging, and the in-process host's queue polling (the harness: the Functions host does it outside
the worker in Azure). Shares, because a profiler's own cost and a loaded machine inflate its
seconds: with `--cpu-seconds` (the worker's CPU measured without the profiler, `cpu_seconds` in
the bench's JSON) each share is also turned into CPU seconds, and with `--appointments` into CPU
seconds per 1,000 appointments. Inclusive (a part's callees are in it), so parts overlap; a
coroutine counts only while it runs, not while it waits."""

from __future__ import annotations

import argparse
import pstats
from collections.abc import Callable

Key = tuple[str, int, str]

PARTS: list[tuple[str, Callable[[Key], bool], str]] = [
    ("Graph pages: HTTP, JSON, validation", lambda k: k[0].endswith("shared/upstream/graph.py") and k[2] == "_pages", "cum"),
    ("  JSON decoding (json, orjson)", lambda k: "/json/" in k[0] or "orjson" in k[2], "tot"),
    ("  pydantic validation", lambda k: k[0] == "~" and ("validate_json" in k[2] or "validate_python" in k[2]), "tot"),
    ("bookings built", lambda k: k[0].endswith("shared/flows/bookings.py") and k[2] == "from_appointment", "cum"),
    ("content hash and table entity", lambda k: k[0].endswith("shared/flows/bookings.py") and k[2] == "sync_entity", "cum"),
    ("stored rows read", lambda k: k[0].endswith("shared/flows/sync/calendar.py") and k[2] == "stored_slice", "cum"),
    ("table transactions", lambda k: k[0].endswith("shared/storage/store.py") and k[2] == "transact", "cum"),
    ("  of which the SDK's multipart (email package)", lambda k: "/email/" in k[0], "tot"),
    ("directory upserts (BC and link rows)", lambda k: k[0].endswith("shared/flows/directory/resolver.py")
     and k[2] == "upsert_from_message", "cum"),
    ("shared slots: taking, releasing, renewing", lambda k: (k[0].endswith("shared/upstream/limits.py") and k[2] in (
        "_take", "_release", "_watch_turns", "_release_idle")) or (k[0].endswith("shared/storage/leases.py")
                                                                  and k[2] == "_keep_renewed"), "cum"),
    ("rate ledger", lambda k: k[0].endswith(("shared/upstream/limits.py", "shared/upstream/ledger.py")) and k[2] == "acquire", "cum"),
    ("logging", lambda k: "/logging/" in k[0], "tot"),
    ("queue polling of the in-process host (harness)", lambda k: k[0].endswith("sandbox/host.py")
     and k[2] == "_receive", "cum"),
]


def parts(path: str) -> tuple[float, list[tuple[str, float]]]:
    """The profile's busy seconds (total less the idle event loop) and each part's seconds."""
    stats = pstats.Stats(path)
    table = stats.stats  # type: ignore[attr-defined]
    idle = sum(entry[2] for key, entry in table.items() if key[0] == "~" and "poll' of 'select." in key[2])
    found = []
    for label, match, kind in PARTS:
        seconds = sum((entry[3] if kind == "cum" else entry[2]) for key, entry in table.items() if match(key))
        found.append((label, seconds))
    return stats.total_tt - idle, found  # type: ignore[attr-defined]


def report(path: str, cpu_seconds: float | None, appointments: int | None) -> str:
    busy, found = parts(path)
    head = f"{'part':<52} {'share':>6}" + (f" {'CPU s':>7}" if cpu_seconds else "") + (
        f" {'s/1,000':>8}" if cpu_seconds and appointments else "")

    def line(label: str, seconds: float) -> str:
        share = seconds / busy if busy else 0.0
        text = f"{label:<52} {share:6.1%}"
        if cpu_seconds:
            text += f" {share * cpu_seconds:7.3f}"
            if appointments:
                text += f" {1000 * share * cpu_seconds / appointments:8.3f}"
        return text

    lines = [path, head, "-" * len(head), line("busy (the profile's total less the idle event loop)", busy)]
    return "\n".join(lines + [line(label, seconds) for label, seconds in found])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+")
    parser.add_argument("--cpu-seconds", type=float, help="the worker's CPU seconds measured without the profiler")
    parser.add_argument("--appointments", type=int, help="appointments the profiled run synced (for per-1,000 figures)")
    args = parser.parse_args()
    print("\n\n".join(report(path, args.cpu_seconds, args.appointments) for path in args.profiles))


if __name__ == "__main__":
    main()
