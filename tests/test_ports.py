"""cwpo_ray.ports: distinct ports, free, and outside the ranges that other processes draw from on their own."""

import socket
import subprocess
import sys

from cwpo_ray.ports import RAY_MAX_WORKER_PORT, ephemeral_range, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = free_ports(12)
    assert len(set(ports)) == 12
    assert all(RAY_MAX_WORKER_PORT < p < ephemeral_range()[0] for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_never_handed_out():
    taken = []
    try:
        for p in free_ports(200):  # a good share of the quiet range held, then ask again
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            s.listen()
            taken.append(s)
        held = {s.getsockname()[1] for s in taken}
        assert not held & set(free_ports(50))
    finally:
        for s in taken:
            s.close()


def test_the_command_line_prints_them():
    out = subprocess.run([sys.executable, "-m", "cwpo_ray.ports", "4"], capture_output=True, text=True, check=True)
    assert len(set(out.stdout.split())) == 4
