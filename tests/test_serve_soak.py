"""Load with misbehaving clients against a real local Serve app: clients that give up on their request
(a client-side timeout) or close the socket before the answer (or halfway through the body) leave no
work stuck in the replica, and well-behaved clients beside them all get valid answers.

The short version of `bench/serve.py --soak` (its load generator and checks, imported from there);
the 10-minute run with RSS is in bench/RESULTS.md, serve latency and batching. The app of
test_serve.py is module-scoped there (and needs a token), so this one deploys its own, small.
"""

from __future__ import annotations

import asyncio
import math

from conftest import bench_module, free_port
from tiny_models import synthetic_pairs

APP = "soak"


def bench_serve():
    return bench_module("serve")


def test_clients_that_time_out_or_disconnect_leave_no_stuck_work(ray_cluster, tiny_encoder, tmp_path):
    from ray import serve

    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import resolve_model
    from cwpo_ray.serving import ServeSettings, build_application

    bench = bench_serve()
    annotator = save_annotator(new_annotator(resolve_model(str(tiny_encoder)), max_length=32), tmp_path / "ann")
    pairs = [{"id": r["id"], "prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"]}
             for r in synthetic_pairs(32, seed=5)]
    # 8 clients and batches of up to 16: batches hardly ever fill, so a request waits out the 50 ms batch
    # timeout in the replica, and a 20 ms client timeout gives up on it in flight.
    settings = ServeSettings(annotator=str(annotator), num_cpus=0.25, max_batch_size=16, batch_wait_timeout_s=0.05)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_application(settings), name=APP, route_prefix="/")
        load = bench.Soak(base, pairs, clients=4, timeout_clients=2, disconnect_clients=2, client_timeout=0.02,
                          disconnect_after=0.1, pause=0.1, request_timeout=60)
        asyncio.run(load.run(10.0))
        left, waited = bench.wait_until_idle(APP, timeout_s=60)
        fresh = asyncio.run(bench.timed_requests(base, pairs, 3))
        left_after, _ = bench.wait_until_idle(APP, timeout_s=60)
        logs = bench.serve_log_counts(APP)
    finally:
        serve.shutdown()

    t = load.total
    # Every request of a well-behaved client answered 200 with a valid body (id echoed, labels in range).
    assert t["errors"] == 0, load.error_samples
    assert t["ok"] == t["sent_by_well_behaved"] > 0, t
    # The misbehaviour happened: requests abandoned in flight, sockets closed before the answer and mid-body.
    assert t["timed_out"] > 0 and t["disconnected_mid_body"] > 0, t
    assert t["disconnected"] + t["answered_before_disconnect"] > 0, t
    # Nothing stuck: the replica holds no request (running or queued for a batch), a fresh one is answered.
    assert left == 0, f"{left} requests still ongoing in the replica {waited:.0f} s after the load"
    # A client gone mid-body is booked 499 (client closed), never as a server error.
    outcomes = logs.get("replica_annotate_outcomes", {})
    assert not [o for o in outcomes if o.startswith("5")], outcomes
    assert all(math.isfinite(x) for x in fresh), fresh
    assert left_after == 0
    abandoned = t["timed_out"] + t["disconnected"] + t["disconnected_mid_body"]
    print(f"reliability: serve under load with misbehaving clients, 10 s: {t['ok']} well-behaved requests, all 200 "
          f"with a valid body; {t['timed_out']} timed out client-side ({t['answered_before_timeout']} answered "
          f"first), {t['disconnected']} disconnected after sending and {t['disconnected_mid_body']} mid-body "
          f"({t['answered_before_disconnect']} answered first); {abandoned} abandoned in all; Serve's logs: "
          f"{logs}; replica ongoing requests 0 after {waited:.1f} s; 3 fresh requests "
          f"{', '.join(f'{1000 * x:.0f}' for x in fresh)} ms")
