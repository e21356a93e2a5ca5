"""A local scale-out cluster for development and tests, started and torn down by one command:
three nats-server nodes with JetStream (R3) on loopback ports, a PostgreSQL instance in a temporary folder (initdb +
pg_ctl, as an unprivileged user when run as root), N gateways and M workers as subprocesses.

    with LocalCluster(bundle_path, gateways=1, workers=2) as c:
        token = c.add_camera("cam-1")
        ... stream to c.gateway_url(0) ...
        c.kill_nats(1); c.start_nats(1)        # SIGKILL one JetStream node and bring it back
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from taskcodec.server.auth import add_camera as _add_camera, check_camera_id
from taskcodec.server.cluster.pgstore import PgStore, migrate
from taskcodec.server.process import ServerError, spawn, terminate, wait_for_port


class ClusterError(RuntimeError):
    """A cluster component could not be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    raise ClusterError(f"{name} not found: install the Debian package postgresql")


class LocalCluster:
    def __init__(self, bundle_paths: list[str | Path], gateways: int = 1, workers: int = 1, nats_nodes: int = 3,
                 folder: str | Path | None = None):
        self.bundle_paths = [str(p) for p in bundle_paths]
        self.n_gateways, self.n_workers, self.n_nats = gateways, workers, nats_nodes
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="taskcodec-cluster-")
        self.dir = Path(folder or self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nats_ports = [free_port() for _ in range(nats_nodes)]
        self.route_ports = [free_port() for _ in range(nats_nodes)]
        self.mqtt_ports = [free_port() for _ in range(nats_nodes)]  # nats-server's own MQTT listener, one per node
        self.pg_port = free_port()
        self.nats: list[subprocess.Popen | None] = [None] * nats_nodes
        self.gateways: list[tuple[subprocess.Popen, int] | None] = [None] * gateways
        self.workers: list[subprocess.Popen | None] = [None] * workers
        self._logs: list = []

    # NATS -----------------------------------------------------------------------------------------------------------
    @property
    def nats_urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.nats_ports]

    def mqtt_url(self, i: int = 0) -> str:
        """Where MQTT cameras connect (node ``i``): see taskcodec.server.cluster.mqtt."""
        return f"mqtt://127.0.0.1:{self.mqtt_ports[i]}"

    def _nats_config(self, i: int) -> Path:
        routes = ", ".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
        conf = self.dir / f"nats-{i}.conf"
        conf.write_text(f"""server_name: n{i}
listen: 127.0.0.1:{self.nats_ports[i]}
jetstream {{ store_dir: "{self.dir / f'js-{i}'}", max_memory_store: 64MB, max_file_store: 2GB }}
cluster {{ name: taskcodec, listen: 127.0.0.1:{self.route_ports[i]}, routes: [{routes}] }}
mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[i]}, stream_replicas: {min(3, self.n_nats)} }}
""")
        return conf

    def start_nats(self, i: int) -> None:
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(exe).exists():
            raise ClusterError("nats-server not found: install the Debian package nats-server")
        proc, log = spawn([exe, "-c", str(self._nats_config(i))], self.dir / f"nats-{i}.log")
        self._logs.append(log)
        self.nats[i] = proc
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"nats-server {i} exited: {(self.dir / f'nats-{i}.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.nats_ports[i]), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise ClusterError(f"nats-server {i} did not listen within 30 s")

    def kill_nats(self, i: int) -> None:
        _kill(self.nats[i])

    # PostgreSQL -----------------------------------------------------------------------------------------------------
    @property
    def pg_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.pg_port} user=taskcodec dbname=taskcodec connect_timeout=5"

    def _as_pg_user(self, cmd: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return cmd
        return ["runuser", "-u", "nobody", "--", *cmd]  # PostgreSQL refuses to run as root

    def start_pg(self) -> None:
        data = self.dir / "pg"
        if not data.exists():
            data.mkdir()
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.chown(data, nobody.pw_uid, nobody.pw_gid)
                os.chmod(self.dir, 0o755)
            out = subprocess.run(self._as_pg_user([_pg_bin("initdb"), "-D", str(data), "-U", "taskcodec",
                                                   "--auth=trust", "-E", "UTF8"]),
                                 capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise ClusterError(f"initdb failed: {out.stderr[-2000:]}")
        opts = f"-p {self.pg_port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on"
        out = subprocess.run(self._as_pg_user([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w",
                                               "-t", "60", "-o", opts, "start"]),
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise ClusterError(f"pg_ctl start failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
        with psycopg.connect(self.pg_dsn.replace("dbname=taskcodec", "dbname=postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'taskcodec'").fetchone():
                conn.execute("CREATE DATABASE taskcodec")
        migrate(self.pg_dsn)

    def stop_pg(self, mode: str = "fast") -> None:
        subprocess.run(self._as_pg_user([_pg_bin("pg_ctl"), "-D", str(self.dir / "pg"), "-m", mode, "-w", "stop"]),
                       capture_output=True, timeout=120)

    # gateways and workers ---------------------------------------------------------------------------------------------
    def _common(self) -> list[str]:
        args = [f"--nats={','.join(self.nats_urls)}", f"--pg={self.pg_dsn}"]
        return args + [f"--bundle={b}" for b in self.bundle_paths]

    def start_gateway(self, i: int) -> int:
        """Start gateway ``i`` (again on its previous port after a kill, as a restarted service would)."""
        port = self.gateways[i][1] if self.gateways[i] else 0
        port_file = self.dir / f"gateway-{i}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.dir / f"gateway-{i}.log"
        proc, log = spawn([sys.executable, "-m", "taskcodec.server.cluster", "gateway", *self._common(),
                           "--port", str(port), "--port-file", str(port_file)], log_path)
        self._logs.append(log)
        port = wait_for_port(proc, port_file, lambda p: True, 60, f"gateway {i}",
                             lambda: log_path.read_text(errors="replace")[-3000:])
        self.gateways[i] = (proc, port)
        return port

    def gateway_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.gateways[i][1]}"

    def kill_gateway(self, i: int) -> None:
        _kill(self.gateways[i][0])

    def start_worker(self, i: int) -> None:
        ready = self.dir / f"worker-{i}.ready"
        ready.unlink(missing_ok=True)
        log_path = self.dir / f"worker-{i}.log"
        proc, log = spawn([sys.executable, "-m", "taskcodec.server.cluster", "worker", *self._common(),
                           "--ready-file", str(ready)], log_path)
        self._logs.append(log)
        self.workers[i] = proc
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"worker {i} did not start: {log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def kill_worker(self, i: int) -> None:
        _kill(self.workers[i])

    def add_camera(self, camera_id: str) -> bytes:
        check_camera_id(camera_id)
        store = PgStore(self.pg_dsn)
        try:
            return _add_camera(store, camera_id).encode()
        finally:
            store.close()

    # whole cluster ----------------------------------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        try:
            for i in range(self.n_nats):
                self.start_nats(i)
            self.start_pg()
            for i in range(self.n_workers):
                self.start_worker(i)
            for i in range(self.n_gateways):
                self.start_gateway(i)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for g in self.gateways:
            if g:
                terminate(g[0], 10)
        for w in self.workers:
            terminate(w, 10)
        for n in self.nats:
            terminate(n, 10)
        if (self.dir / "pg" / "postmaster.pid").exists():
            self.stop_pg("immediate")
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
