"""The benchmark's network and server processes: a counted veth link to a namespace when one can be made (else
loopback, said so in the results), the real ingest server (``python -m taskcodec.server serve``) and the baselines' minimal
receiver, each started under the namespace's ``ip netns exec`` so all their traffic crosses the counted link."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from taskcodec.bench.netns import Counters, NetNamespace, try_namespace
from taskcodec.server.process import ServerError, spawn, terminate, wait_for_port

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


ServiceError = ServerError  # a benchmark server subprocess did not start or died


class Network:
    """Where servers listen and how bytes are counted: ``ip`` mode (veth counters) or ``app`` mode (loopback)."""

    def __init__(self, use_netns: bool = True):
        self.ns: NetNamespace | None = None
        self.note: str | None = None
        if use_netns:
            self.ns, self.note = try_namespace()
        else:
            self.note = "network namespace disabled by --no-netns"

    @property
    def mode(self) -> str:
        return "ip" if self.ns is not None else "app"

    @property
    def server_host(self) -> str:
        return self.ns.ns_ip if self.ns is not None else "127.0.0.1"

    @property
    def prefix(self) -> list[str]:
        return self.ns.exec_prefix if self.ns is not None else []

    def counters(self) -> Counters | None:
        return self.ns.counters() if self.ns is not None else None

    def describe(self) -> dict:
        if self.ns is not None:
            return {"mode": "ip", "how": f"veth {self.ns.host_if} <-> netns {self.ns.name}; IP bytes = kernel "
                                         "byte counters minus 14 B Ethernet header per packet; gso_max_segs 1"}
        return {"mode": "app", "how": "no network namespace: IP-level bytes NOT measured, only application bytes",
                "reason": self.note}

    def close(self) -> None:
        if self.ns is not None:
            self.ns.close()
            self.ns = None


class Service:
    """A server subprocess that writes its bound port to a file; ``ready(url)`` says when it answers."""

    def __init__(self, cmd: list[str], network: Network, name: str, ready=None, startup_timeout: float = 90.0):
        self.network, self.name = network, name
        self._tmp = tempfile.TemporaryDirectory(prefix=f"taskcodec-{name}-")
        self.port_file = Path(self._tmp.name) / "port"
        self.log_path = Path(self._tmp.name) / "log"
        self.cmd = network.prefix + cmd + ["--port-file", str(self.port_file)]
        self.ready = ready
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def host(self) -> str:
        return self.network.server_host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Service":
        self.proc, self._log = spawn(self.cmd, self.log_path)
        try:
            wait_for_port(self.proc, self.port_file, self._answers_on, self.startup_timeout, self.name, self.log)
        except ServerError:
            self.stop()
            raise
        return self

    def _answers_on(self, port: int) -> bool:
        self.port = port
        return self.ready is None or self.ready(self)

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process (``ip netns exec`` execs it, so the pid is the server)."""
        import psutil

        try:
            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return float("nan")

    def rss_mb(self) -> float:
        import psutil

        try:
            return psutil.Process(self.proc.pid).memory_info().rss / (1 << 20)
        except psutil.Error:
            return float("nan")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        terminate(self.proc, timeout)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def http_get(url: str, timeout: float = 30.0, key: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with _NO_PROXY.open(request, timeout=timeout) as r:
        return r.read()


def _healthy(service: Service) -> bool:
    try:
        return json.loads(http_get(service.url + "/healthz", 5)).get("status") == "ok"
    except (OSError, ValueError):
        return False


def ingest_server(network: Network, bundle_path: Path, db: Path) -> Service:
    cmd = [sys.executable, "-m", "taskcodec.server", "serve", "--bundle", str(bundle_path), "--db", str(db),
           "--host", network.server_host, "--port", "0"]
    service = Service(cmd, network, "server", ready=_healthy)
    service.metrics_key = _scrape_key(db)  # /metrics needs an operator key (scope "metrics")
    return service


def _scrape_key(db: Path) -> str:
    import secrets

    from taskcodec.server.auth import add_operator
    from taskcodec.server.storage import SQLiteStorage

    storage = SQLiteStorage(db)
    try:
        return add_operator(storage, f"fleet-bench-{secrets.token_hex(4)}", "metrics")
    finally:
        storage.close()


def baseline_receiver(network: Network) -> Service:
    cmd = [sys.executable, "-m", "taskcodec.bench.fleet_receiver", "--host", network.server_host]
    return Service(cmd, network, "receiver")


def server_bytes_received(service: Service) -> float | None:
    """Application (WebSocket message) bytes the ingest server has received, from its Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = http_get(service.url + "/metrics", key=getattr(service, "metrics_key", None)).decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "taskcodec_server_bytes_received":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    return sample.value
    return None
