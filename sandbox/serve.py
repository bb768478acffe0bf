"""`make serve`: the operator pages (and the JSON API) in a real HTTP server, on the sandbox.

Starts Azurite and the simulators seeded like the demo, then serves the app's HTTP functions on
http://127.0.0.1:7071 (the port `func start` uses) while the queue functions listen and the sync
timer fires, as the Functions host would: once at start, then every `SYNC_EVERY_SECONDS` (the
default `SYNC_SCHEDULE`). People sign in at the simulated Entra ID as the seeded user. Ctrl-C
stops everything.

`AppServer` is also what the browser tests use."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from urllib.parse import parse_qsl

from sandbox.host import FunctionHost
from sandbox.server import ServerThread, free_port
from shared.web.signin import CALLBACK_PATH

log = logging.getLogger(__name__)

SYNC_EVERY_SECONDS = 15 * 60


class AppServer:
    """The function app's HTTP triggers behind a real HTTP server, plus its queue listeners and
    sync timer on the host's loop. `with AppServer(host, sandbox) as server: server.url`."""

    def __init__(self, host: FunctionHost, sandbox, port: int | None = None, sync_every: float | None = None):
        self.host, self.sandbox = host, sandbox
        self.port = port or free_port()
        self.sync_every = sync_every
        async def asgi(scope, receive, send) -> None:  # a plain function: uvicorn takes it for ASGI 3
            await self._asgi(scope, receive, send)

        self._server = ServerThread(asgi, None, port=self.port, name="app-http")
        self._stop: asyncio.Future | None = None
        self._tasks: list = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _asgi(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if not path.startswith("/api/"):
            await send({"type": "http.response.start", "status": 302, "headers": [(b"location", b"/api/pages")]})
            await send({"type": "http.response.body", "body": b""})
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            joiner = "; " if key == "cookie" else ", "
            headers[key] = f"{headers[key]}{joiner}{text}" if key in headers else text
        params = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        base = f"http://{headers.get('host') or f'127.0.0.1:{self.port}'}"
        call = self.host.http_async(scope["method"], path, body, params, headers, key=None, base_url=base)
        response = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self.host._loop))
        answer_headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                          for k, v in response.headers.items() if k.lower() != "content-length"]
        if not any(k == b"content-type" for k, _ in answer_headers) and response.mimetype:
            answer_headers.append((b"content-type", f"{response.mimetype}; charset={response.charset}".encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": answer_headers})
        await send({"type": "http.response.body", "body": response.get_body() or b""})

    async def _timer(self) -> None:
        while True:
            try:
                await self.host.timer_async("sync_bookings")
            except Exception:  # noqa: BLE001 - a failed run is in the logs and in health; keep the timer
                log.exception("sync run failed")
            if not self.sync_every:
                return
            await asyncio.sleep(self.sync_every)

    def start(self) -> AppServer:
        from sandbox.stack import CLIENT_ID, TENANT

        for uri in (f"{self.url}{CALLBACK_PATH}", f"http://localhost:{self.port}{CALLBACK_PATH}"):
            self.sandbox.entra.register_redirect_uri(TENANT, CLIENT_ID, uri)

        async def begin() -> None:
            self._stop = asyncio.get_running_loop().create_future()
            self._tasks = [asyncio.ensure_future(self.host.listen(self._stop))]
            if self.sync_every is not None:
                self._tasks.append(asyncio.ensure_future(self._timer()))

        self.host.run(begin(), 30)
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

        async def end() -> None:
            if self._stop and not self._stop.done():
                self._stop.set_result(None)
            for task in self._tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self.host.run(end(), 60)

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7071)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from sandbox.demo import DEMO_BC, DEMO_GRAPH, TEMPLATES, seed
    from sandbox.stack import USER_NAME, USER_USERNAME, SandboxStack

    print("Starting Azurite and the Entra ID, Graph and Business Central simulators…", flush=True)
    with SandboxStack(graph_knobs=DEMO_GRAPH, bc_knobs=DEMO_BC) as sandbox:
        seed(sandbox)
        from function_app import app
        logging.getLogger("shared").setLevel(logging.WARNING)  # the app logs INFO for Azure; here only trouble

        with FunctionHost(app, sandbox.azurite.connection_string, retry_delay=1) as host:
            for name, fields in TEMPLATES.items():
                host.http("PUT", f"templates/{name}", body=fields)
            with AppServer(host, sandbox, port=args.port, sync_every=SYNC_EVERY_SECONDS) as server:
                print(f"\nThe operator pages: {server.url}/api/pages/bookings")
                print(f"Sign in: {server.url}/api/pages/signin  (pick {USER_NAME}, {USER_USERNAME}, at the "
                      "simulated Microsoft sign-in page)")
                print(f"JSON API: {server.url}/api/… with header x-functions-key: {host.function_key}")
                print("The first sync runs now; the queues are listening. Ctrl-C stops everything.", flush=True)
                stopped = threading.Event()
                signal.signal(signal.SIGINT, lambda *_: stopped.set())
                signal.signal(signal.SIGTERM, lambda *_: stopped.set())
                stopped.wait()
                print("\nStopping…", flush=True)
    print("Everything stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
