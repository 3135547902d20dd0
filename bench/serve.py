"""Serving throughput of the annotator over HTTP, with and without dynamic batching.

Deploys the Serve app (cwpo_ray.serving) on a local Ray cluster on 127.0.0.1 with MiniLM-L6 and a
fresh scalar head (scores are meaningless; the compute is real), then for each max batch size
and each number of concurrent clients runs closed-loop clients on loopback, each sending one pair
per request and waiting for the answer, for at most --duration seconds or --max-requests requests.
Prints a Markdown table: pairs/s, p50 and p99 latency, mean batch size seen by the replica.

  .venv/bin/python bench/serve.py                         # 1, 8, 32, 128 clients; batch 32 and 1
  .venv/bin/python bench/serve.py --clients 32 --duration 5
  .venv/bin/python bench/serve.py --soak --clients 32 --duration 600   # sustained load, see soak()

--soak: the clients for --duration s after a --warmup, with clients that time out or disconnect mixed
in; a row per --interval (pairs/s, p50/p99, errors, RSS of the replica and the proxy); then checks that
no work is stuck (the replica's ongoing requests back to 0, a fresh request as fast as before the load)
and that RSS grew at most --max-growth %; exits 1 otherwise or on any error.
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
    asyncio.run(load_warmup(base, pairs))
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


# ----------------------------------------------------------------------------- soak (sustained load)
# Well-behaved closed-loop clients for a long while, with misbehaving ones mixed in: some give up on
# their request after a short client-side timeout, some close (or reset) the socket before the answer,
# or halfway through sending the body. Afterwards the server must hold no work for them.


def serve_processes(app: str) -> dict[str, int]:
    """pid of this app's replica (the ServeReplica actor), Serve's proxy and its controller, looked for
    among this process's descendants only: other Ray clusters may run on the same machine."""
    import psutil

    found: dict[str, int] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if f"ServeReplica:{app}:" in cmdline:
            found["replica"] = proc.pid
        elif "ProxyActor" in cmdline:
            found["proxy"] = proc.pid
        elif "ServeController" in cmdline:
            found["controller"] = proc.pid
    return found


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            out[name] = float("nan")
    return out


def ongoing_requests(app: str) -> int:
    """Requests the app's replicas hold now: running, or waiting in the replica (its @serve.batch queue
    included), as Serve counts them against max_ongoing_requests. Read from each ServeReplica actor's
    own get_num_ongoing_requests, the call Serve's router makes (on a control thread of the replica,
    not blocked by user code); Ray 2.60 has no public API for it without the metrics stack."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#")]
    handles = [ray.get_actor(name, namespace="serve") for name in names]
    if not handles:
        raise RuntimeError(f"no replica of app {app!r} found")
    return sum(ray.get([h.get_num_ongoing_requests.remote() for h in handles], timeout=60))


def serve_log_counts(app: str) -> dict:
    """What Serve's own logs of this local cluster say about the requests: the proxy's "client
    disconnected, cancelling request" lines, and the replica's access-log lines by outcome (200,
    CANCELLED, ...). Empty when the logs are not local (a cluster joined through RAY_ADDRESS)."""
    import re

    import ray

    try:
        logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    except AttributeError:
        return {}
    proxy = "".join(f.read_text(errors="replace") for f in logs.glob("proxy_*.log"))
    replica = "".join(f.read_text(errors="replace") for f in logs.glob(f"replica_{app}_*.log"))
    outcomes: dict[str, int] = {}
    for outcome in re.findall(r"POST /v1/annotate (\S+)", replica):
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {"proxy_client_disconnected": proxy.count("disconnected, cancelling request"),
            "replica_annotate_outcomes": outcomes}


def valid_answer(body: bytes, pair: dict) -> bool:
    try:
        (result,) = json.loads(body)["results"]
    except (ValueError, KeyError, TypeError):
        return False
    return (result.get("id") == pair["id"] and result.get("preferred") in ("a", "b")
            and 0 <= result.get("confidence", -1) < 1
            and all(isinstance(result.get(k), float) and abs(result[k]) < 1e6 for k in ("reward_a", "reward_b")))


class Soak:
    """The load: ``clients`` closed-loop clients that check every answer, ``timeout_clients`` that give
    up after ``client_timeout`` s, ``disconnect_clients`` that close the socket (FIN, or RST every other
    time) ``0..disconnect_after`` s after sending a request, one in four of them halfway through the body.
    Misbehaving clients pause ``pause`` s (0.5x-1.5x) between requests. Counters: ``total`` over the
    whole run, ``window`` since the last ``take_window()``; a 5xx, a reset or a hang (``request_timeout``)
    seen by any client, and a wrong body, are errors."""

    COUNTERS = ("sent_by_well_behaved", "ok", "errors", "timed_out", "answered_before_timeout", "disconnected", "disconnected_mid_body",
                "answered_before_disconnect")

    def __init__(self, base: str, pairs: list[dict], clients: int, timeout_clients: int = 0,
                 disconnect_clients: int = 0, client_timeout: float = 0.5, disconnect_after: float = 2.0,
                 pause: float = 1.0, request_timeout: float = 120.0, seed: int = 0):
        self.base, self.pairs = base, pairs
        self.clients, self.timeout_clients, self.disconnect_clients = clients, timeout_clients, disconnect_clients
        self.client_timeout, self.disconnect_after, self.pause = client_timeout, disconnect_after, pause
        self.request_timeout, self.rng = request_timeout, random.Random(seed)
        self.total = dict.fromkeys(self.COUNTERS, 0)
        self.error_samples: list[str] = []
        self.take_window()
        self.deadline = 0.0
        self._sent = 0

    def take_window(self) -> dict:
        """The counters and latencies since the last call (``seconds`` long), and a fresh window."""
        now = time.perf_counter()
        old = getattr(self, "window", None)
        self.window = {**dict.fromkeys(self.COUNTERS, 0), "latencies": [], "start": now}
        if old is not None:
            old["seconds"] = now - old.pop("start")
        return old

    def _count(self, key: str, detail: str = "") -> None:
        self.total[key] += 1
        self.window[key] += 1
        if key == "errors" and len(self.error_samples) < 20:
            self.error_samples.append(detail[:300])

    def _next_pair(self) -> dict:
        self._sent += 1
        pair = self.pairs[self._sent % len(self.pairs)]
        return {**pair, "id": f"{pair['id']}-{self._sent}"}

    def _running(self) -> bool:
        return time.perf_counter() < self.deadline

    async def _good(self, session) -> None:
        import aiohttp

        while self._running():
            pair = self._next_pair()
            self._count("sent_by_well_behaved")
            start = time.perf_counter()
            try:
                async with session.post(f"{self.base}/v1/annotate", json=pair) as r:
                    body = await r.read()
                    ok = r.status == 200 and valid_answer(body, pair)
                    detail = f"{r.status} {body[:200]!r}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                ok, detail = False, repr(e)
            if ok:
                self.window["latencies"].append(time.perf_counter() - start)
                self._count("ok")
            else:
                self._count("errors", f"well-behaved client: {detail}")

    async def _pause(self) -> None:
        await asyncio.sleep(self.pause * self.rng.uniform(0.5, 1.5))

    async def _timing_out(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.client_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:  # its own: an abandoned request closes its socket
            while self._running():
                pair = self._next_pair()
                try:
                    async with session.post(f"{self.base}/v1/annotate", json=pair) as r:
                        body = await r.read()
                    if r.status == 200 and valid_answer(body, pair):
                        self._count("answered_before_timeout")
                    else:
                        self._count("errors", f"timing-out client: {r.status} {body[:200]!r}")
                except asyncio.TimeoutError:
                    self._count("timed_out")
                except (aiohttp.ClientError, OSError) as e:
                    self._count("errors", f"timing-out client: {e!r}")
                await self._pause()

    async def _disconnecting(self) -> None:
        import socket
        import struct
        from urllib.parse import urlsplit

        url = urlsplit(self.base)
        n = 0
        while self._running():
            n += 1
            body = json.dumps(self._next_pair()).encode()
            head = (f"POST {url.path}/v1/annotate HTTP/1.1\r\nHost: {url.netloc}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            try:
                reader, writer = await asyncio.open_connection(url.hostname, url.port)
            except OSError as e:
                self._count("errors", f"disconnecting client, connect: {e!r}")
                await self._pause()
                continue
            try:
                if n % 4 == 0:  # halfway through the body: the app is reading it (read_body)
                    writer.write(head + body[:len(body) // 2])
                    await writer.drain()
                    await asyncio.sleep(self.rng.uniform(0, 0.2))
                    self._count("disconnected_mid_body")
                else:
                    writer.write(head + body)
                    await writer.drain()
                    try:
                        status_line = await asyncio.wait_for(reader.readline(),
                                                             self.rng.uniform(0, self.disconnect_after))
                    except asyncio.TimeoutError:
                        self._count("disconnected")
                    else:
                        parts = status_line.split()
                        if len(parts) >= 2 and parts[1] == b"200":
                            self._count("answered_before_disconnect")
                        else:
                            self._count("errors", f"disconnecting client: {status_line[:200]!r}")
                if n % 2:  # RST instead of FIN: linger on, timeout 0
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError as e:
                self._count("errors", f"disconnecting client: {e!r}")
            finally:
                writer.close()
            await self._pause()

    async def run(self, seconds: float) -> None:
        """Run the load for ``seconds``; returns once every client is done (answers in flight awaited)."""
        import aiohttp

        self.deadline = time.perf_counter() + seconds
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.clients),
                                        timeout=aiohttp.ClientTimeout(total=self.request_timeout))
        async with session:
            await asyncio.gather(*[self._good(session) for _ in range(self.clients)],
                                 *[self._timing_out() for _ in range(self.timeout_clients)],
                                 *[self._disconnecting() for _ in range(self.disconnect_clients)])


async def timed_requests(base: str, pairs: list[dict], n: int) -> list[float]:
    """``n`` single-pair requests one after another; latencies in s (inf for an error or a wrong body)."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(n):
            pair = {**pairs[i % len(pairs)], "id": f"probe-{i}"}
            start = time.perf_counter()
            try:
                async with session.post(f"{base}/v1/annotate", json=pair) as r:
                    ok = r.status == 200 and valid_answer(await r.read(), pair)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            out.append(time.perf_counter() - start if ok else float("inf"))
    return out


def wait_until_idle(app: str, timeout_s: float) -> tuple[int, float]:
    """Poll the replicas' ongoing-request count until it is 0; (last count, seconds waited)."""
    start = time.perf_counter()
    while True:
        count = ongoing_requests(app)
        waited = time.perf_counter() - start
        if count == 0 or waited > timeout_s:
            return count, waited
        time.sleep(0.2)


def soak(base: str, app: str, pairs: list[dict], args) -> int:
    """The soak run against the app deployed as ``app``; prints a per-interval table and a summary,
    returns 1 on an error, RSS growth over --max-growth or work left in the replica, else 0."""
    clients = args.clients[0]
    traffic = Soak(base, pairs, clients, args.timeout_clients, args.disconnect_clients, args.client_timeout,
                args.disconnect_after, args.misbehave_pause)
    asyncio.run(load_warmup(base, pairs))
    before = asyncio.run(timed_requests(base, pairs, 20))
    pids = serve_processes(app)
    print(f"soak: {clients} clients + {args.timeout_clients} timing out after {args.client_timeout} s + "
          f"{args.disconnect_clients} disconnecting, {args.warmup:.0f} s warm-up then {args.duration:.0f} s; "
          f"processes {pids}; one client alone before: p50 {1000 * percentile(before, 0.5):.0f} ms", flush=True)
    rows: list[dict] = []
    rss: dict[str, dict[str, float]] = {}

    async def on_window(window: dict) -> None:
        sample = await asyncio.to_thread(rss_mb, pids)
        ongoing = await asyncio.to_thread(ongoing_requests, app)
        if "start" not in rss:  # the warm-up window: not a row; RSS "at start" is taken after it
            rss["start"] = sample
            print(f"warm-up done: {window['ok']} answered, {window['errors']} errors; RSS MB "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sample.items()), flush=True)
            print("\n| minute | requests | pairs/s | p50 ms | p99 ms | errors | timed out | disconnected | "
                  "replica RSS MB | proxy RSS MB | ongoing | load 1m |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  flush=True)
            return
        lat = window["latencies"]
        row = {"minute": round((len(rows) + 1) * args.interval / 60, 2), "requests": window["ok"],
               "pairs_per_s": window["ok"] / window["seconds"], "p50_ms": 1000 * percentile(lat, 0.5),
               "p99_ms": 1000 * percentile(lat, 0.99), "errors": window["errors"], "timed_out": window["timed_out"],
               "disconnected": window["disconnected"] + window["disconnected_mid_body"],
               "replica_rss_mb": sample.get("replica", float("nan")), "proxy_rss_mb": sample.get("proxy", float("nan")),
               "ongoing": ongoing, "loadavg_1m": os.getloadavg()[0]}
        rows.append(row)
        rss["end"] = sample
        print(f"| {row['minute']:g} | {row['requests']} | {row['pairs_per_s']:.1f} | {row['p50_ms']:.0f} | "
              f"{row['p99_ms']:.0f} | {row['errors']} | {row['timed_out']} | {row['disconnected']} | "
              f"{row['replica_rss_mb']:.0f} | {row['proxy_rss_mb']:.0f} | {ongoing} | {row['loadavg_1m']:.1f} |", flush=True)

    # Windows: the warm-up, then one per --interval; the run ends on a window boundary.
    windows = max(1, round(args.duration / args.interval))
    asyncio.run(run_windows(traffic, args.warmup, args.interval, windows, on_window))
    # No stuck work: the replica empties, a fresh request is answered as fast as before, RSS stays.
    left, drained_s = wait_until_idle(app, args.drain_timeout)
    after = asyncio.run(timed_requests(base, pairs, 20))
    left_after_probe, _ = wait_until_idle(app, args.drain_timeout)
    time.sleep(5)
    rss["after"] = rss_mb(pids)
    growth = {k: 100 * (max(rss["end"][k], rss["after"][k]) / rss["start"][k] - 1) for k in rss["start"]}
    p50_before, p50_after = percentile(before, 0.5), percentile(after, 0.5)
    fresh_ok = all(x < float("inf") for x in after) and p50_after <= 3 * p50_before + 0.25
    checked = [k for k in ("replica", "proxy") if k in growth]
    summary = {
        "clients": clients, "timeout_clients": args.timeout_clients, "disconnect_clients": args.disconnect_clients,
        "seconds": args.duration, "warmup_seconds": args.warmup, "counts_warmup_included": traffic.total,
        "p50_ms_first": rows[0]["p50_ms"], "p99_ms_first": rows[0]["p99_ms"],
        "p50_ms_last": rows[-1]["p50_ms"], "p99_ms_last": rows[-1]["p99_ms"],
        "pairs_per_s": sum(r["requests"] for r in rows) / (windows * args.interval),
        "rss_mb": {k: {"start": round(rss["start"][k]), "end": round(rss["end"][k]),
                       "after_idle": round(rss["after"][k]), "growth_pct": round(growth[k], 1)} for k in rss["start"]},
        "ongoing_after_load": left, "seconds_to_idle": round(drained_s, 2), "ongoing_after_probe": left_after_probe,
        "one_client_p50_ms_before": round(1000 * p50_before), "one_client_p50_ms_after": round(1000 * p50_after),
        "abandoned_by_clients": sum(traffic.total[k] for k in ("timed_out", "disconnected", "disconnected_mid_body")),
        "serve_logs": serve_log_counts(app),
        "error_samples": traffic.error_samples[:5],
    }
    failures = []
    if traffic.total["errors"]:
        failures.append(f"{traffic.total['errors']} errors")
    failures += [f"{k} RSS grew {growth[k]:.1f}% (> {args.max_growth}%)" for k in checked if growth[k] > args.max_growth]
    if left or left_after_probe:
        failures.append(f"stuck work: {left} requests still ongoing {drained_s:.0f} s after the load")
    if not fresh_ok:
        failures.append(f"a fresh request after the load: p50 {1000 * p50_after:.0f} ms vs {1000 * p50_before:.0f} "
                        f"ms before, or failed")
    summary["failures"] = failures
    print("\nsummary: " + json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print("soak " + ("FAILED: " + "; ".join(failures) if failures else "passed"), flush=True)
    return 1 if failures else 0


async def load_warmup(base: str, pairs: list[dict]) -> None:
    await load(f"{base}/v1/annotate", 4, pairs, 2.0, 16)  # first forward passes are slow


async def run_windows(traffic: Soak, warmup: float, interval: float, windows: int, on_window) -> None:
    """One uninterrupted load: the warm-up window, then ``windows`` windows of ``interval`` s, each handed
    to ``on_window`` (async; it may sample the server) at its end."""
    async def boundaries(t0: float) -> None:
        for end in [warmup] + [warmup + i * interval for i in range(1, windows + 1)]:
            await asyncio.sleep(max(0.0, t0 + end - time.perf_counter()))
            await on_window(traffic.take_window())

    t0 = time.perf_counter()
    await asyncio.gather(traffic.run(warmup + windows * interval), boundaries(t0))


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
    soak_ = p.add_argument_group("soak: sustained load against one replica (max batch: the first --batch-sizes)")
    soak_.add_argument("--soak", action="store_true", help="run the soak instead of the table; --clients: its "
                       "first value; --duration: seconds after the warm-up")
    soak_.add_argument("--warmup", type=float, default=30.0, help="seconds of the same load before RSS at start")
    soak_.add_argument("--interval", type=float, default=60.0, help="seconds per row of the table")
    soak_.add_argument("--timeout-clients", type=int, default=2, help="clients that give up after --client-timeout")
    soak_.add_argument("--client-timeout", type=float, default=0.5)
    soak_.add_argument("--disconnect-clients", type=int, default=2,
                       help="clients that close the socket 0..--disconnect-after s after sending (1 in 4 mid-body)")
    soak_.add_argument("--disconnect-after", type=float, default=2.0)
    soak_.add_argument("--misbehave-pause", type=float, default=1.0, help="seconds between a misbehaving client's requests")
    soak_.add_argument("--drain-timeout", type=float, default=60.0, help="longest wait for the replica to empty")
    soak_.add_argument("--max-growth", type=float, default=10.0, help="RSS growth in %% that fails the soak")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of every Ray worker of the local cluster, the replica's included "
                        "(e.g. MALLOC_MMAP_THRESHOLD_=131072); repeatable")
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

    init_ray(num_cpus=2, log_to_driver=False, env_vars=dict(kv.split("=", 1) for kv in args.worker_env))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    pairs = make_pairs(512, args.prompt_words, args.response_words)
    rows, ceiling = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            annotator = build_minilm_annotator(Path(tmp) / "annotator", args.max_length)
            if args.soak:
                deploy(annotator, args.batch_sizes[0], args)
                return soak(base, "bench", pairs, args)
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
