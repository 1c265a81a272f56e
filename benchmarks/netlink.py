"""A shaped link for the benchmarks: a network namespace behind a veth pair, tbf on its side.

    with ShapedLink() as link:              # root only: ip netns, ip link, tc
        link.shape("100mbit")                # server -> client (downloads) at 100 Mbit/s
        server = SeaweedServer(work, ip=link.server_ip, prefix=link.prefix).start()

The server runs inside the namespace at `server_ip`; the client stays outside and reaches it
through the veth pair, whose namespace end carries `tc ... tbf` (this kernel has tbf and htb
but no netem, so the latency is the veth's own, a few tens of microseconds).
"""

from __future__ import annotations

import os
import subprocess
import time

NAME = "cxbench"


def can_shape() -> str | None:
    """Why a shaped link cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, ip link and tc change the network)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"needs `{tool}` (apt-get install iproute2)"
    return None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class ShapedLink:
    def __init__(self, name: str = NAME, subnet: int = 7) -> None:
        """`name` and `subnet` (10.231.SUBNET.0/30) tell two links on one machine apart."""
        self.name = name
        self.host_dev, self.ns_dev = f"{name}0", f"{name}1"
        self.host_ip, self.server_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        self.prefix = ["ip", "netns", "exec", name]
        self.rate: str | None = None

    def __enter__(self) -> "ShapedLink":
        why = can_shape()
        if why:
            raise SystemExit(f"a shaped link {why}")
        self.close()  # what a killed earlier run left
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        _run("ip", "link", "set", self.ns_dev, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        _run("ip", "link", "set", self.host_dev, "up")
        _run(*self.prefix, "ip", "addr", "add", f"{self.server_ip}/30", "dev", self.ns_dev)
        _run(*self.prefix, "ip", "link", "set", self.ns_dev, "up")
        _run(*self.prefix, "ip", "link", "set", "lo", "up")
        return self

    def shape(self, rate: str | None, burst: str = "1mb", latency: str = "50ms") -> None:
        """tbf at `rate` (tc syntax: 100mbit) on the server's side; None: unshaped."""
        subprocess.run([*self.prefix, "tc", "qdisc", "del", "dev", self.ns_dev, "root"],
                       capture_output=True)
        if rate:
            _run(*self.prefix, "tc", "qdisc", "add", "dev", self.ns_dev, "root", "tbf",
                 "rate", rate, "burst", burst, "latency", latency)
        self.rate = rate
        time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
