"""A local ingest server in a subprocess (`taskcodec serve` on a free port): the demo's server, and the base of the
test and benchmark harness in taskcodec.testing.

    with LocalServer(bundle_path, db_path) as srv:
        token = srv.add_camera("cam-1")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable



class ServerError(RuntimeError):
    """The server subprocess did not start or died."""


def spawn(cmd: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, object]:
    """Start a server-like subprocess with stdout+stderr appended to ``log_path`` and one BLAS/OpenMP thread;
    returns (process, open log file) — the caller closes the file when it is done."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def terminate(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM and wait for a graceful exit; SIGKILL after ``timeout``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def wait_for_port(proc: subprocess.Popen, port_file: Path, ready: Callable[[int], bool], timeout: float, name: str,
                  log: Callable[[], str]) -> int:
    """Poll a starting server subprocess until it has written its bound port to ``port_file`` and ``ready(port)``
    holds. Raises ServerError if it exits first or ``timeout`` passes; stopping it then is the caller's choice."""
    deadline = time.monotonic() + timeout
    port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with code {proc.returncode}:\n{log()}")
        if port is None and port_file.is_file() and port_file.read_text().strip():
            port = int(port_file.read_text())
        if port is not None and ready(port):
            return port
        time.sleep(0.05)
    raise ServerError(f"{name} did not come up within {timeout:.0f} s:\n{log()}")


class LocalServer:
    def __init__(self, bundle_path: str | Path | None, db_path: str | Path, *extra_args: str,
                 startup_timeout: float = 60.0, host: str = "127.0.0.1", tls_ca: str | Path | None = None,
                 env: dict[str, str] | None = None):
        """``tls_ca``: the server runs with TLS (pass --tls-cert/--tls-key in ``extra_args``); the harness trusts
        this CA file and uses https://. ``env``: extra environment variables for the server process."""
        import ssl

        self.ssl_context = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
        self.scheme = "https" if tls_ca else "http"
        self.env = dict(env or {})
        self.bundle_path = bundle_path
        self.db_path = Path(db_path)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.host = host
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="taskcodec-server-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.operator_key: str | None = None  # an admin API key this harness creates for its own queries

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("server is not started")
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self) -> "LocalServer":
        if self.operator_key is None:
            from taskcodec.server.storage import StorageError

            try:
                self.operator_key = self.add_operator(f"local-{os.getpid()}-{id(self):x}", "admin")
            except StorageError:
                pass  # a database the server cannot open either: let the server say why
        port_file = Path(self._tmp.name) / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "taskcodec.server", "serve", "--db", str(self.db_path), "--host", self.host,
               "--port", "0", "--port-file", str(port_file), *self.extra_args]
        if self.bundle_path is not None:
            cmd += ["--bundle", str(self.bundle_path)]
        self.proc, self._log = spawn(cmd, self.log_path, self.env)
        try:
            wait_for_port(self.proc, port_file, self._answers_on, self.startup_timeout, "server (port file, /healthz)",
                          self.log)
        except ServerError:
            self.kill()
            raise
        return self

    def _answers_on(self, port: int) -> bool:
        self.port = port
        return self._healthy()

    def _healthy(self) -> bool:
        try:
            return self.health().get("status") == "ok"
        except OSError:
            return False

    def health(self) -> dict:
        """/healthz's JSON (also when it answers 503)."""
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=10, context=self.ssl_context) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return dict(json.loads(body), http_status=exc.code)
            except ValueError:
                raise exc from None

    def request(self, path: str, key: str | None = "default") -> urllib.request.Request:
        """A GET of ``path`` with ``Authorization: Bearer`` (this harness's admin key by default; None: no header)."""
        key = self.operator_key if key == "default" else key
        return urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})

    def get_json(self, path: str, key: str | None = "default"):
        with urllib.request.urlopen(self.request(path, key), timeout=30, context=self.ssl_context) as r:
            return json.loads(r.read())

    def get_text(self, path: str, key: str | None = "default") -> str:
        with urllib.request.urlopen(self.request(path, key), timeout=30, context=self.ssl_context) as r:
            return r.read().decode()

    def add_operator(self, name: str, scope: str) -> str:
        """Create an operator API key in this server's database (directly; the CLI does the same); returns it."""
        if self.env.get("PYTHONPATH"):  # the server runs other code (an A/B of an older tree): so does this step
            out = subprocess.run([sys.executable, "-m", "taskcodec.server", "operators", "add", name, "--scope", scope,
                                  "--db", str(self.db_path)], capture_output=True, text=True, timeout=60,
                                 env=dict(os.environ, PYTHONPATH=self.env["PYTHONPATH"]), cwd=self._tmp.name)
            if out.returncode != 0:
                from taskcodec.server.storage import StorageError

                raise StorageError(f"operators add failed: {out.stderr}")
            return out.stdout.strip()
        from taskcodec.server.auth import add_operator
        from taskcodec.server.storage import SQLiteStorage

        storage = SQLiteStorage(self.db_path)
        try:
            return add_operator(storage, name, scope)
        finally:
            storage.close()

    def add_camera(self, camera_id: str) -> bytes:
        """Register a camera in this server's database with the real CLI; returns its token as bytes."""
        out = subprocess.run([sys.executable, "-m", "taskcodec.server", "cameras", "add", camera_id, "--db", str(self.db_path)],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise ServerError(f"cameras add failed: {out.stderr}")
        return out.stdout.strip().encode()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, exactly like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.port = None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait for a graceful exit (SIGKILL after ``timeout``)."""
        terminate(self.proc, timeout)
        self.port = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if getattr(self, "_log", None):
            self._log.close()
        self._tmp.cleanup()
