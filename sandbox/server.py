"""Run an ASGI app with uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from sandbox.tls import TlsFiles


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietInjectedResets(logging.Filter):
    """An injected connection reset is the point of the exercise, not an error to print."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, ConnectionResetError) and "injected" in str(error))


logging.getLogger("uvicorn.error").addFilter(_QuietInjectedResets())


class ServerThread:
    """Serve `app` on https://127.0.0.1:<port> until `stop()`; usable as a context manager."""

    def __init__(self, app, tls: TlsFiles | None, port: int | None = None, name: str = "sim"):
        self.port = port or free_port()
        self.tls = tls
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            limit_concurrency=None,
            ssl_certfile=str(tls.server_cert_chain) if tls else None,
            ssl_keyfile=str(tls.server_key) if tls else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"simulator on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop_soon(self) -> None:
        """Tell the server to stop, without waiting (several servers stop side by side). Without a
        graceful wait: closing an idle keep-alive TLS connection waits for the client's
        close_notify, which pooled clients (requests, httpx) never send, so a graceful shutdown
        would hang until the TLS shutdown timeout."""
        self._server.should_exit = True
        self._server.force_exit = True

    def stop(self) -> None:
        self.stop_soon()
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
