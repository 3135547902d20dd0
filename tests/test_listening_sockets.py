"""Nothing listens beyond loopback on a local run.

While a real 2-worker DDP `train-policy` trains, and while a `cwpo serve` replica runs, every TCP socket
listening in this test's process tree (pytest, the Ray cluster it started on 127.0.0.1 with every Ray
process and worker under it, the MLflow server of the tests) is on 127.0.0.1 or ::1. Only this tree
counts: other Ray clusters and servers may run on the same machine meanwhile.
"""

from __future__ import annotations

import ipaddress
import os
import threading

import psutil
import pytest

from conftest import free_port
from tiny_models import synthetic_pairs

pytestmark = pytest.mark.skipif(bool(os.environ.get("RAY_ADDRESS")),
                                reason="the tests joined an existing cluster, not one of their own")


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC binds [::ffff:127.0.0.1]
    return (mapped or address).is_loopback


def listening_in_tree() -> dict[tuple[str, int], tuple[int, str]]:
    """(ip, port) -> (pid, command line) of every listening TCP socket of this process and its descendants."""
    me = psutil.Process()
    tree = {me.pid} | {p.pid for p in me.children(recursive=True)}
    found = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            try:
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())[:100]
            except psutil.Error:
                cmdline = "?"
            found[(conn.laddr.ip, conn.laddr.port)] = (conn.pid, cmdline)
    return found


class Poller:
    """Every listening socket seen in the tree, polled on a thread while the body of the `with` runs;
    ``group_seen``: a Ray Train worker listened on more than its Ray port (its process group was up)."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s, self.seen, self.group_seen = interval_s, {}, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(self.interval_s):
            now = listening_in_tree()
            self.seen.update(now)
            per_worker: dict[int, int] = {}
            for pid, cmdline in now.values():
                if "RayTrainWorker" in cmdline:
                    per_worker[pid] = per_worker.get(pid, 0) + 1
            self.group_seen |= any(n >= 2 for n in per_worker.values())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def beyond_loopback(self) -> list[str]:
        return [f"{ip}:{port} pid {pid} {cmd}" for (ip, port), (pid, cmd) in sorted(self.seen.items())
                if not is_loopback(ip)]


def test_a_local_train_policy_listens_on_loopback_only(ray_cluster, mlflow_server, tiny_decoder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import train_policy

    pq.write_table(pa.Table.from_pylist(synthetic_pairs(16, seed=3)), tmp_path / "pairs.parquet")
    flags = dict(data=str(tmp_path / "pairs.parquet"), model=str(tiny_decoder), out=str(tmp_path / "out"),
                 weighting="none", batch_size=2, num_workers=2, cpus_per_worker=0.5, max_length=24,
                 max_prompt_length=8, epochs=2, sft_epochs=0, max_failures=0, progress=False,
                 experiment="test-listening")
    with Poller() as poller:
        assert train_policy.run(load_config(train_policy.Config, flags=flags)) == 0
    assert poller.group_seen, "no poll saw the workers' process group: the listing missed training"
    assert not poller.beyond_loopback(), "\n".join(poller.beyond_loopback())
    print(f"reliability: {len(poller.seen)} listening sockets seen in the tree, all on loopback")


def test_a_local_serve_replica_listens_on_loopback_only(ray_cluster, tiny_encoder, tmp_path):
    from ray import serve

    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import resolve_model
    from cwpo_ray.recipes.serve import Config, start

    annotator = save_annotator(new_annotator(resolve_model(str(tiny_encoder)), max_length=32), tmp_path / "ann")
    port = free_port()
    try:
        start(Config(annotator=str(annotator), port=port, num_cpus=0.25))
        now = listening_in_tree()
    finally:
        serve.shutdown()
    assert any(p == port for _, p in now), f"Serve's HTTP port {port} is not in the listing"
    beyond = [f"{ip}:{p} pid {pid} {cmd}" for (ip, p), (pid, cmd) in sorted(now.items()) if not is_loopback(ip)]
    assert not beyond, "\n".join(beyond)
