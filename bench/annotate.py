"""Annotation throughput: naive per-pair loop vs one batched process vs `cwpo annotate` on Ray.

The annotator is MiniLM-L6 (all-MiniLM-L6-v2, a 22.7M-parameter BERT) with a fresh scalar
head; the texts are synthetic, 30-60 tokens per prompt + response. For each size it prints
pairs/s, pairs/s per core and the driver's peak RSS:

  (a) naive     one label_pairs call per pair, in this process (only at the sizes in --naive-sizes)
  (b) batched   one process, 512-pair chunks streamed from the Parquet input, all cores' torch threads
  (c) ray       `cwpo annotate` in a fresh driver process on a local Ray cluster, an actor pool

Usage: .venv/bin/python bench/annotate.py --sizes 1000,10000 --naive-sizes 1000 [--actors 2]
Timings of (c) are taken from its report.json: from the start of the Ray Data job (actor start-up
and model loading included) to the last shard written; `ray.init` is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cwpo_ray.tables import iter_rows, write_table  # noqa: E402

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find garden river music bread train helpful kind clear honest useful").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_pairs(n: int, seed: int = 0, prompt_words=(8, 16), response_words=(20, 40)) -> list[dict]:
    """By default prompt 8-16 words, responses 20-40 words: 30-60 MiniLM tokens per prompt + response."""
    rng = random.Random(seed)
    return [{"id": f"b{i}", "prompt": sentence(rng, *prompt_words), "response_a": sentence(rng, *response_words),
             "response_b": sentence(rng, *response_words)} for i in range(n)]


def word_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


class PeakRSS:
    """Samples a process's resident memory every 50 ms; ``peak`` in MiB."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def naive(annotator, path: Path) -> int:
    n = 0
    for row in iter_rows(path):
        annotator.label_pairs([row["prompt"]], [row["response_a"]], [row["response_b"]])
        n += 1
    return n


def batched(annotator, path: Path, chunk: int = 512) -> int:
    n, rows = 0, []
    for row in iter_rows(path, batch_size=chunk):
        rows.append(row)
        if len(rows) == chunk:
            n += len(annotator.label_pairs(*zip(*[(r["prompt"], r["response_a"], r["response_b"]) for r in rows]))
                     ["confidence"])
            rows = []
    if rows:
        n += len(annotator.label_pairs(*zip(*[(r["prompt"], r["response_a"], r["response_b"]) for r in rows]))
                 ["confidence"])
    return n


def ray_annotate(data: Path, annotator_dir: Path, out: Path, actors: int, cpus: float) -> tuple[float, float, int]:
    """(seconds, driver peak MiB, pairs) of `cwpo annotate` in a fresh driver process."""
    cmd = [sys.executable, "-m", "cwpo_ray", "annotate", "--data", str(data), "--annotator", str(annotator_dir),
           "--out", str(out), "--num-actors", str(actors), "--cpus-per-actor", str(cpus)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with PeakRSS(proc.pid) as rss:
            rc = proc.wait()
    if rc:
        raise RuntimeError(f"cwpo annotate failed ({rc}); see {out.parent / (out.name + '.log')}")
    report = json.loads((out / "report.json").read_text())
    return report["seconds"], rss.mib, report["annotated"]


def timed(fn, *args) -> tuple[float, float, int]:
    with PeakRSS(os.getpid()) as rss:
        start = time.perf_counter()
        n = fn(*args)
        seconds = time.perf_counter() - start
    return seconds, rss.mib, n


def main() -> None:
    import torch

    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated pair counts for (b) and (c)")
    ap.add_argument("--naive-sizes", default="1000", help="pair counts for the naive loop ('' to skip)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--prompt-words", type=word_range, default=(8, 16), help="LO-HI words per prompt")
    ap.add_argument("--response-words", type=word_range, default=(20, 40), help="LO-HI words per response")
    args = ap.parse_args()
    cores = psutil.cpu_count(logical=True)
    torch.set_num_threads(cores)

    work = Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    torch.manual_seed(0)
    annotator = new_annotator(resolve_model("minilm-l6"), max_length=args.max_length)
    save_annotator(annotator, work / "annotator")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    naive_sizes = [int(s) for s in args.naive_sizes.split(",") if s]
    results = []
    for n in sorted(set(sizes + naive_sizes)):
        data = work / f"pairs-{n}.parquet"
        write_table(pa.Table.from_pylist(make_pairs(n, 0, args.prompt_words, args.response_words)), data)
        if n in naive_sizes:
            results.append(("(a) naive loop", n, *timed(naive, annotator, data), cores))
            print(results[-1], flush=True)
        if n in sizes:
            results.append(("(b) batched, 1 process", n, *timed(batched, annotator, data), cores))
            print(results[-1], flush=True)
            sec, mib, done = ray_annotate(data, work / "annotator", work / f"out-{n}", args.actors,
                                          args.cpus_per_actor)
            results.append((f"(c) cwpo annotate, {args.actors} actors", n, sec, mib, done, cores))
            print(results[-1], flush=True)

    print(f"\nMiniLM-L6 annotator, max_length {args.max_length}, prompts {args.prompt_words} words, responses "
          f"{args.response_words} words, {cores} cores, torch {torch.__version__}")
    print("| mode | pairs | seconds | pairs/s | pairs/s/core | driver peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, n, sec, mib, done, c in results:
        assert done == n, (mode, n, done)
        print(f"| {mode} | {n:,} | {sec:.1f} | {n / sec:.1f} | {n / sec / c:.1f} | {mib:.0f} |")
    print(f"\n(work folder: {work})")


if __name__ == "__main__":
    main()
