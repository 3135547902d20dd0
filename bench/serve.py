"""Serving throughput of the annotator over HTTP, with and without dynamic batching.

Deploys the Serve app (cwpo_ray.serving) on a local Ray cluster on 127.0.0.1 with MiniLM-L6 and a
fresh scalar head (scores are meaningless; the compute is real), then for each max batch size
and each number of concurrent clients runs closed-loop clients on loopback, each sending one pair
per request and waiting for the answer, for at most --duration seconds or --max-requests requests.
Prints a Markdown table: pairs/s, p50 and p99 latency, mean batch size seen by the replica.

  .venv/bin/python bench/serve.py                         # 1, 8, 32, 128 clients; batch 32 and 1
  .venv/bin/python bench/serve.py --clients 32 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a model answer helpful clear kind river music garden story idea because however simple "
         "question explain step first then finally good bad useful wrong honest detail example short").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_pairs(n: int, prompt_words: int = 20, response_words: int = 40, seed: int = 0) -> list[dict]:
    """Synthetic pairs; the default is chat-sized (about 70 tokens per prompt + response)."""
    rng = random.Random(seed)
    return [{"id": f"b{i}", "prompt": sentence(rng, prompt_words), "response_a": sentence(rng, response_words),
             "response_b": sentence(rng, response_words)} for i in range(n)]


def build_minilm_annotator(folder: Path, max_length: int) -> Path:
    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import resolve_model

    return save_annotator(new_annotator(resolve_model("minilm-l6"), max_length=max_length), folder)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def client(session, url: str, pairs: list[dict], state: dict, latencies: list[float]) -> None:
    """A closed-loop client: one pair per request, the next only after the answer."""
    while time.perf_counter() < state["deadline"] and state["sent"] < state["limit"]:
        state["sent"] += 1
        pair = pairs[state["sent"] % len(pairs)]
        start = time.perf_counter()
        async with session.post(url, json=pair) as r:
            await r.read()
            if r.status != 200:
                state["errors"] += 1
                continue
        latencies.append(time.perf_counter() - start)


async def load(url: str, clients: int, pairs: list[dict], duration: float, limit: int) -> dict:
    import aiohttp

    state = {"deadline": time.perf_counter() + duration, "sent": 0, "limit": limit, "errors": 0}
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session, url, pairs, state, latencies) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "errors": state["errors"], "seconds": elapsed,
            "pairs_per_s": len(latencies) / elapsed, "p50_ms": 1000 * percentile(latencies, 0.50),
            "p99_ms": 1000 * percentile(latencies, 0.99), "mean_ms": 1000 * statistics.fmean(latencies or [0])}


def model_only(annotator: Path, pairs: list[dict], batch: int, threads: int) -> float:
    """Pairs/s of label_pairs itself, in this process, no HTTP: the ceiling batching can reach."""
    import torch

    from cwpo_ray.annotator import load_annotator

    torch.set_num_threads(threads)
    model = load_annotator(annotator)
    chunk = pairs[:batch]
    model.label_pairs(*zip(*[(p["prompt"], p["response_a"], p["response_b"]) for p in chunk]))  # warm-up
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < 3.0:
        model.label_pairs(*zip(*[(p["prompt"], p["response_a"], p["response_b"]) for p in chunk]))
        done += len(chunk)
    return done / (time.perf_counter() - start)


def replica_stats(base: str) -> dict:
    import requests

    return requests.get(f"{base}/v1/info", timeout=60).json()["replica_stats"]


def deploy(annotator: Path, batch: int, args) -> None:
    from ray import serve

    from cwpo_ray.serving import ServeSettings, build_application

    # The same max_ongoing_requests for every batch size, so that only batching differs.
    settings = ServeSettings(annotator=str(annotator), max_batch_size=batch, batch_wait_timeout_s=args.wait,
                             max_ongoing_requests=args.ongoing, num_cpus=args.num_cpus,
                             torch_threads=args.torch_threads)
    serve.run(build_application(settings), name="bench", route_prefix="/")


def run_config(base: str, annotator: Path, batch: int, args, pairs: list[dict]) -> list[dict]:
    deploy(annotator, batch, args)
    asyncio.run(load(f"{base}/v1/annotate", 4, pairs, 2.0, 16))  # warm-up: first forward passes are slow
    rows = []
    for clients in args.clients:
        before = replica_stats(base)
        row = asyncio.run(load(f"{base}/v1/annotate", clients, pairs, args.duration, args.max_requests))
        after = replica_stats(base)
        batches = after["batches"] - before["batches"]
        row.update(max_batch=batch, mean_batch=(after["pairs"] - before["pairs"]) / max(batches, 1))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| max batch | clients | requests | pairs/s | p50 ms | p99 ms | mean batch | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['pairs_per_s']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['errors']} |")
    by = {(r["max_batch"], r["clients"]): r["pairs_per_s"] for r in rows}
    speedups = []
    for clients in sorted({r["clients"] for r in rows}):
        big = max(b for b, c in by if c == clients)
        if (1, clients) in by and big != 1:
            speedups.append(f"speed-up of max batch {big} over 1 at {clients} clients: "
                            f"{by[(big, clients)] / by[(1, clients)]:.2f}x")
    if speedups:
        lines += [""] + speedups
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--clients", type=ints, default=[1, 8, 32, 128])
    p.add_argument("--batch-sizes", type=ints, default=[32, 1], help="max batch sizes to compare")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (at most)")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per measurement (at most)")
    p.add_argument("--wait", type=float, default=0.01, help="batch_wait_timeout_s")
    p.add_argument("--ongoing", type=int, default=64, help="max_ongoing_requests per replica")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for the replica")
    p.add_argument("--torch-threads", type=int, default=0, help="0: as Ray sets them from --num-cpus")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--response-words", type=int, default=40)
    p.add_argument("--probe-deadline", type=float, default=0.0,
                   help="RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S for the local cluster (0: Serve's 0.1 s)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_deadline:
        # The proxy asks a replica for its queue length before routing; a CPU-starved replica misses
        # the 0.1 s deadline, the proxy backs off, and requests trickle in too slowly to fill batches.
        os.environ["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"] = str(args.probe_deadline)
    from cwpo_ray.ray_env import init_ray  # before ray: Ray reads its loopback switch at import time
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import free_port

    init_ray(num_cpus=2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    pairs = make_pairs(512, args.prompt_words, args.response_words)
    rows, ceiling = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            annotator = build_minilm_annotator(Path(tmp) / "annotator", args.max_length)
            threads = args.torch_threads or max(1, int(args.num_cpus))
            ceiling = {b: model_only(annotator, pairs, b, threads) for b in args.batch_sizes}
            print(json.dumps({"model_only_pairs_per_s": ceiling, "torch_threads": threads}), file=sys.stderr)
            for batch in args.batch_sizes:
                rows += run_config(base, annotator, batch, args, pairs)
    finally:
        serve.shutdown()
    print(table(rows))
    print("\nmodel alone (label_pairs in one process, no HTTP), pairs/s by batch size: "
          + ", ".join(f"{b}: {v:.1f}" for b, v in ceiling.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
