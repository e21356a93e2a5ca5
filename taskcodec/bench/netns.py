"""A private network namespace joined to the host by one veth pair, so every byte between the benchmark's cameras
(host side) and its servers (inside the namespace) crosses one interface whose kernel counters we can read.

IP-level bytes are the veth byte counters minus the 14-byte Ethernet header of each packet. ``gso_max_segs 1`` on both
ends makes TCP hand the device MSS-sized packets, so a large upload (a JPEG frame) is counted with one IP+TCP header
per wire-sized segment, as a real NIC would send it, instead of one header per 64 KB GSO super-packet.
Needs root (CAP_NET_ADMIN) and iproute2; :func:`try_namespace` says why when it cannot be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ETH_HEADER = 14


class NetnsError(RuntimeError):
    """The namespace or veth pair cannot be created (not root, no iproute2, no netns support)."""


@dataclass(frozen=True)
class Counters:
    """Kernel counters of the host end: tx = cameras -> servers, rx = servers -> cameras."""

    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int

    def __sub__(self, other: "Counters") -> "Counters":
        return Counters(self.tx_bytes - other.tx_bytes, self.tx_packets - other.tx_packets,
                        self.rx_bytes - other.rx_bytes, self.rx_packets - other.rx_packets)

    @property
    def ip_up(self) -> int:
        return self.tx_bytes - ETH_HEADER * self.tx_packets

    @property
    def ip_down(self) -> int:
        return self.rx_bytes - ETH_HEADER * self.rx_packets

    def to_dict(self) -> dict[str, int]:
        return {"ip_bytes_up": self.ip_up, "ip_bytes_down": self.ip_down, "ip_bytes": self.ip_up + self.ip_down,
                "packets_up": self.tx_packets, "packets_down": self.rx_packets}


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")


class NetNamespace:
    """``with NetNamespace() as ns``: servers run under ``ns.exec_prefix`` and listen on ``ns.ns_ip``."""

    def __init__(self, tag: str | None = None):
        tag = tag or str(os.getpid())
        self.name = f"tcfleet{tag}"
        self.host_if, self.ns_if = f"tcfh{tag}"[:15], f"tcfn{tag}"[:15]
        k = int(tag) % 250 + 1 if tag.isdigit() else 1
        self.host_ip, self.ns_ip = f"10.201.{k}.1", f"10.201.{k}.2"
        self._up = False

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def __enter__(self) -> "NetNamespace":
        if shutil.which("ip") is None:
            raise NetnsError("iproute2 (`ip`) is not installed")
        if os.geteuid() != 0:
            raise NetnsError("creating a network namespace needs root (CAP_NET_ADMIN)")
        # A namespace of the same name can only be a leftover of a killed run of an earlier process with our pid.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        _ip("netns", "add", self.name)
        self._up = True
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", "dev", self.host_if, "gso_max_segs", "1")
            _ip("link", "set", self.host_if, "up")
            _ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, netns=self.name)
            _ip("link", "set", "dev", self.ns_if, "gso_max_segs", "1", netns=self.name)
            _ip("link", "set", self.ns_if, "up", netns=self.name)
            _ip("link", "set", "lo", "up", netns=self.name)
            self._quiet_ipv6()
            self._static_neighbours()
        except NetnsError:
            self.close()
            raise
        return self

    def _quiet_ipv6(self) -> None:
        """No IPv6 on the link: its router solicitations and MLD reports would be counted as benchmark bytes."""
        try:
            Path(f"/proc/sys/net/ipv6/conf/{self.host_if}/disable_ipv6").write_text("1")
        except OSError:
            pass
        subprocess.run([*self.exec_prefix, "sh", "-c",
                        f"echo 1 > /proc/sys/net/ipv6/conf/{self.ns_if}/disable_ipv6"], capture_output=True)

    def _static_neighbours(self) -> None:
        """Permanent ARP entries both ways: no ARP packets (not IP) appear in the counts mid-run."""
        host_mac = Path(f"/sys/class/net/{self.host_if}/address").read_text().strip()
        out = subprocess.run([*self.exec_prefix, "cat", f"/sys/class/net/{self.ns_if}/address"], capture_output=True,
                             text=True)
        ns_mac = out.stdout.strip()
        if out.returncode == 0 and ns_mac:
            _ip("neigh", "replace", self.ns_ip, "lladdr", ns_mac, "dev", self.host_if, "nud", "permanent")
            _ip("neigh", "replace", self.host_ip, "lladdr", host_mac, "dev", self.ns_if, "nud", "permanent",
                netns=self.name)

    def counters(self) -> Counters:
        stats = Path("/sys/class/net") / self.host_if / "statistics"
        read = lambda n: int((stats / n).read_text())  # noqa: E731
        return Counters(read("tx_bytes"), read("tx_packets"), read("rx_bytes"), read("rx_packets"))

    def close(self) -> None:
        if self._up:
            # Deleting the namespace destroys the ns end of the veth, which takes the host end with it.
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
            self._up = False

    def __exit__(self, *exc) -> None:
        self.close()


def try_namespace(tag: str | None = None) -> tuple[NetNamespace | None, str | None]:
    """A started namespace, or None and the reason it could not be made (the caller falls back to app-level counts)."""
    ns = NetNamespace(tag)
    try:
        return ns.__enter__(), None
    except (NetnsError, OSError) as exc:
        return None, str(exc)
