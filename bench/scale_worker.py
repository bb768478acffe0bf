"""One Functions host process of several sharing one storage account (`bench.scale`).

`python -m bench.scale_worker --control DIR --index I [--trigger] --out result.json`, with the
app settings in the environment. The process imports `function_app`, starts a
`sandbox.host.FunctionHost` and says it is ready (`DIR/ready-I`); when `DIR/go` appears its queue
listeners start, as a scaled-out Function App's instances listen to the same queues. The one
started with `--trigger` also runs the timer (`sync_bookings`) once and then watches storage until
the run is over: the timer has returned, no queue the app listens to holds a message (Azure counts
messages being processed and messages put off for later too) and `lastSync.counts.businesses`
has a finished result for every configured business. It then writes `DIR/done`. Every process
stops listening when `DIR/stop` appears and writes to `--out` what it did: CPU seconds and peak
RSS of its own, the queue messages it handled, its store counters and its API clients' counts.

Whether the timer syncs inline (one process does everything but the queued directory upserts) or
fans out one message per business, the same rules end the run, so the harness measures either."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from bench.worker import _cpu_seconds, record_counters, write_result

POLL_SECONDS = 0.05
GO_POLL_SECONDS = 0.005
"""All processes start within a few ms of the signal (the run is timed from it)."""
WATCH_SECONDS = 0.2
"""How often the triggering process looks at the queues once the timer has returned."""


async def _wait_for(path: Path, timeout: float, every: float = POLL_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear within {timeout:.0f} s")
        await asyncio.sleep(every)


async def _queue_counts(service) -> dict[str, int]:
    """Approximate message count of every queue in the account (invisible messages included)."""
    counts = {}
    async for queue in service.list_queues():
        properties = await service.get_queue_client(queue.name).get_queue_properties()
        counts[queue.name] = properties.approximate_message_count or 0
    return counts


async def _last_sync(host) -> dict | None:
    """What `GET /api/status` reports as `lastSync`, read the way status reads it (status itself
    also runs setup checks that call Graph and BC, which would add to the measured requests)."""
    from shared.runtime import runtime

    try:
        from shared.flows.sync.run import last_sync
    except ImportError:
        last_sync = None
    if last_sync is not None:
        return await last_sync(await runtime().store())
    response = await host.http_async("GET", "status")
    return json.loads(response.get_body()).get("lastSync")


def finished_businesses(last: dict | None) -> dict[str, str]:
    """Business id → outcome of every business with a finished result in `lastSync`."""
    per_business = ((last or {}).get("counts") or {}).get("businesses") or {}
    pending = set((last or {}).get("pending") or ())
    return {business: str(result.get("outcome", (last or {}).get("outcome")))
            for business, result in per_business.items()
            if business not in pending and result.get("outcome") != "pending"}


def _watch_apart(host, businesses: list[str], listened: set[str], timeout: float) -> tuple[dict, float]:
    """`_watch_run` in a thread and event loop of its own, so its CPU (the harness's, not the
    app's: a real instance does not watch the run) can be told apart: what ended the run, and
    the thread's CPU seconds."""
    from azure.storage.queue.aio import QueueServiceClient

    from shared.runtime import runtime

    async def watch() -> dict:
        try:
            async with QueueServiceClient.from_connection_string(host.connection_string,
                                                                 use_env_settings=False) as service:
                return await _watch_run(host, service, businesses, listened, timeout)
        finally:
            await runtime().aclose()

    cpu = time.thread_time()
    ended = asyncio.run(watch())
    return ended, time.thread_time() - cpu


async def _watch_run(host, service, businesses: list[str], listened: set[str], timeout: float) -> dict:
    """Until the run is over (see the module docstring); returns what ended it."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        counts = await _queue_counts(service)
        pending = {q: n for q, n in counts.items() if n and q in listened}
        if not pending:
            last = await _last_sync(host)
            finished = finished_businesses(last)
            if set(businesses) <= set(finished):
                totals = {k: v for k, v in (last.get("counts") or {}).items() if k != "businesses"}
                return {"queues": counts, "outcomes": finished, "polls": polls, "outcome": last.get("outcome"),
                        "totals": totals, "errors": (last.get("errors") or [])[:10]}
        if time.monotonic() > deadline:
            raise TimeoutError(f"run not over after {timeout:.0f} s: queues {pending}")
        await asyncio.sleep(WATCH_SECONDS)


async def _session(host, args, control: Path, result: dict) -> None:
    from shared.runtime import runtime

    await runtime().store()  # the app's own tables and queues exist before anyone is timed
    (control / f"ready-{args.index}").write_text(str(os.getpid()))
    await _wait_for(control / "go", args.timeout, every=GO_POLL_SECONDS)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()  # the host's loop thread
        profiler.enable()
    cpu, clock, started = _cpu_seconds(), time.perf_counter(), time.time()
    stop = asyncio.get_running_loop().create_future()

    async def stop_when_told() -> None:
        await _wait_for(control / "stop", args.timeout)
        stop.set_result(None)

    stopper = asyncio.create_task(stop_when_told())
    listening = asyncio.create_task(host.listen(stop))
    try:
        if args.trigger:
            await host.timer_async("sync_bookings")
            result["trigger_seconds"] = round(time.perf_counter() - clock, 3)
            listened = set(host._queue_triggers())
            ended, result["harness_cpu_seconds"] = await asyncio.to_thread(_watch_apart, host, host_businesses(),
                                                                            listened, args.timeout)
            result["done_at"] = time.time()
            result["seconds"] = round(result["done_at"] - started, 3)
            result["ended"] = ended
            (control / "done").write_text(json.dumps({"at": result["done_at"]}))
        await asyncio.wait({listening, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if listening.done():
            listening.result()  # a listener that failed ends the process with its error
        await listening
    finally:
        stopper.cancel()
        if not listening.done():
            listening.cancel()
    # The app's CPU: the process's, less the harness's watch (its own thread) when this one watched.
    result["cpu_seconds"] = round(_cpu_seconds() - cpu - result.get("harness_cpu_seconds", 0.0), 3)
    result["listened_seconds"] = round(time.perf_counter() - clock, 3)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)


def host_businesses() -> list[str]:
    from shared.runtime import runtime

    return list(runtime().settings.business_ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--control", required=True, type=Path)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--trigger", action="store_true", help="also run the timer once and watch for the end")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--profile", help="write a cProfile of the host's event loop thread here")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from function_app import app
    from sandbox.host import FunctionHost

    host = FunctionHost(app, os.environ["AzureWebJobsStorage"])
    result: dict = {"index": args.index, "role": "trigger" if args.trigger else "listener", "pid": os.getpid()}
    try:
        host.run(_session(host, args, args.control, result), timeout=2 * args.timeout + 60)
        record_counters(host, result)
    finally:
        host.close()
    write_result(result, args.out)


if __name__ == "__main__":
    main()
