"""Start Azurite (from the repo's node_modules) on free ports, in memory, and stop it again."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandbox.queuewatch import WATCH
from sandbox.server import free_port

KEEP_ALIVE_SECONDS = 60
"""How long Azurite keeps an idle connection open: longer than the storage clients' pools do."""
ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azurite:
    def __init__(self) -> None:
        self.blob_port, self.queue_port, self.table_port = free_port(), free_port(), free_port()
        self._workspace = tempfile.mkdtemp(prefix="azurite-")
        self._process: subprocess.Popen | None = None

    @property
    def connection_string(self) -> str:
        host = "http://127.0.0.1"
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={host}:{self.blob_port}/{ACCOUNT};"
                f"QueueEndpoint={host}:{self.queue_port}/{ACCOUNT};"
                f"TableEndpoint={host}:{self.table_port}/{ACCOUNT};")

    def start(self) -> Azurite:
        executable = ROOT / "node_modules" / ".bin" / "azurite"
        if not executable.exists():
            raise RuntimeError("Azurite is not installed: run `npm ci` (make does this for you).")
        command = [str(executable), "--silent", "--inMemoryPersistence", "--skipApiVersionCheck",
                   "--disableProductStyleUrl",
                   # Azurite closes an idle keep-alive connection after 5 s, before the storage
                   # SDK's pool (aiohttp: 15 s) lets it go: a write sent on it just as Azurite closes
                   # it fails "Server disconnected", and the SDK resends only GET/PUT/DELETE/HEAD, not
                   # a MERGE or a batch (make chaos met it once in 200 runs: a 500 to POST /api/invoices).
                   # Here the client lets an idle connection go first, as it should against any server.
                   *(option for service in ("blob", "queue", "table")
                     for option in (f"--{service}KeepAliveTimeout", str(KEEP_ALIVE_SECONDS))),
                   "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
                   "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port),
                   "--tableHost", "127.0.0.1", "--tablePort", str(self.table_port)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True, cwd=self._workspace,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + 60
        for port in (self.blob_port, self.queue_port, self.table_port):
            while not _listening(port):
                if self._process.poll() is not None:
                    error = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                    raise RuntimeError(f"Azurite exited early: {error[:2000]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("Azurite did not start within 60 s")
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Azurite waits for idle keep-alive connections to close before it exits, and pooled
        clients never close theirs: it gets a second, then it is killed (it keeps nothing)."""
        if self._process and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
                self._process.wait(timeout=1)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                    self._process.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        shutil.rmtree(self._workspace, ignore_errors=True)

    def wipe(self) -> None:
        """Delete every table, queue and blob container: a clean account for the next test or
        scenario."""
        from azure.core.exceptions import ResourceNotFoundError
        from azure.data.tables import TableServiceClient
        from azure.storage.blob import BlobServiceClient
        from azure.storage.queue import QueueServiceClient

        tables = TableServiceClient.from_connection_string(self.connection_string)
        for table in tables.list_tables():
            tables.delete_table(table.name)
        queues = QueueServiceClient.from_connection_string(self.connection_string)
        for queue in queues.list_queues():
            try:
                queues.delete_queue(queue.name)
            except ResourceNotFoundError:
                pass
        blobs = BlobServiceClient.from_connection_string(self.connection_string)
        for container in blobs.list_containers():
            try:
                blobs.delete_container(container.name)
            except ResourceNotFoundError:
                pass
        WATCH.forget(f"http://127.0.0.1:{self.queue_port}/{ACCOUNT}")

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child, before Azurite starts: the kernel sends it SIGTERM when the process that
    started it dies, however it dies (killed, crashed), so no Azurite outlives its tests or demo."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
