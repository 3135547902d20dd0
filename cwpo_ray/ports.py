"""Free TCP ports on 127.0.0.1 for servers that must be told their port before they start.

A port the kernel hands out for a bind to port 0 comes from the ephemeral range, the same range every
outgoing connection's local port and every other port-0 listener (Ray's gRPC servers) draws from; in the
moment between our probe and the server's own bind, one of those can take it, and a Ray agent that
fails to bind makes its raylet exit. So the ports come from below the ephemeral range and above Ray's
worker ports (10002-19999 by default), where nothing picks ports on its own.

`python -m cwpo_ray.ports N` prints N distinct ports (cluster/local.sh uses it).
"""

from __future__ import annotations

import random
import socket
import sys

RAY_MAX_WORKER_PORT = 19999


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return s
    except OSError:
        s.close()
        return None


def free_ports(n: int) -> list[int]:
    """n distinct ports free now, from the quiet range above (from the kernel's when that range is full)."""
    low, high = RAY_MAX_WORKER_PORT + 1, ephemeral_range()[0] - 1
    held: list[socket.socket] = []  # all bound at once, so they are distinct
    try:
        candidates = random.sample(range(low, high + 1), min(max(high - low + 1, 0), 4 * n + 64))
        for port in candidates:
            if len(held) == n:
                break
            s = _bindable(port)
            if s is not None:
                held.append(s)
        while len(held) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


if __name__ == "__main__":
    print(" ".join(str(p) for p in free_ports(int(sys.argv[1]))))
