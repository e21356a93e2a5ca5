"""Test and benchmark support (tests/ and taskcodec.bench may import it; product code never does): a real server
subprocess with crash and inspection helpers, and an in-memory protocol-speaking ingest server.

    with ServerProcess(bundle_path, db_path) as srv:
        token = srv.add_camera("cam-1")
        with srv.stream() as c: ...
        srv.kill()          # SIGKILL, like a power cut of the process
"""

from __future__ import annotations

import os
import time

from taskcodec.server.client import HttpIngestClient, StreamClient, read_replies  # noqa: F401  (re-exported)
from taskcodec.server.process import LocalServer, ServerError, spawn, terminate, wait_for_port  # noqa: F401


class ServerProcess(LocalServer):
    """A LocalServer with the protocol clients tests use."""

    def stream(self, timeout: float = 30.0) -> StreamClient:
        return StreamClient(self.url, timeout, ssl_context=self.ssl_context)

    def http(self, timeout: float = 30.0) -> HttpIngestClient:
        return HttpIngestClient(self.url, timeout, ssl_context=self.ssl_context)


def wait_for(condition, timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> None:
    """Poll ``condition()`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def fill_filesystem(path) -> int:
    """Fill the filesystem holding ``path`` to the last byte (a file written in ever smaller blocks until even one
    byte no longer fits); returns the bytes written. For disk-full tests on a small tmpfs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    written += os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return written
