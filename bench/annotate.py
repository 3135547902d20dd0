"""Annotation throughput: `cwpo annotate` against this machine's compute bound (and the older modes).

The annotator is MiniLM-L6 (all-MiniLM-L6-v2, a 22.7M-parameter BERT) with a fresh scalar
head; the texts are synthetic, 30-60 tokens per prompt + response.

Main figure (``--repeats``, default 3): `cwpo annotate` end to end on ``--bound-pairs`` pairs
(default 10k) with ``--actors`` actors, in a fresh driver process on a local Ray cluster, once per
precision in ``--precisions``, against the compute bound measured in the same run:

  FLOPs  = sum over the scored sequences (two per pair) of the matmul FLOPs at its real, unpadded
           length L:  layers * (2 * L * (4 d^2 + 2 d f) + 2 * 2 * L^2 * d)
           (Q, K, V, O projections and the two FFN matmuls: 2 FLOPs per multiply-add per token;
           attention scores Q K^T and the weighted sum A V: 2 L^2 d each); MiniLM-L6: 6 layers,
           d = 384, f = 1536. Embeddings, layer norms, softmax, GELU and the head are left out
           (under 2% of the total at these lengths), so the bound is, if anything, too high.
  rate   = this machine's GEMM throughput in the dtype used, all cores (torch threads = cores),
           measured here at the model's own shapes: (M x d) @ (d x d), (M x d) @ (d x f),
           (M x f) @ (f x d) with M = tokens of one forward pass (model batch x mean length);
           FLOP-weighted over the three shapes as one layer uses them. fp32: sgemm; bf16: torch's
           bf16 matmul (oneDNN, AMX where the CPU has it).
  bound  = rate / FLOPs per pair (pairs/s); the run's fraction = its pairs/s / bound.

Each repeat reports pairs/s over the whole job (from the start of the Ray Data job, actor start-up
and model loading included, `ray.init` excluded, to the last output file published) and without
start-up (its report.json's startup_seconds, the time until the first work unit began labeling,
subtracted). The median of the repeats is the figure. With bf16 in ``--precisions`` the labels
are compared by id with the first fp32 repeat's: share of pairs with the same chosen response,
largest |confidence difference|.

Older modes, for the table in bench/RESULTS.md (``--sizes``, off unless given):
  (a) naive     one label_pairs call per pair, in this process (only at the sizes in --naive-sizes)
  (b) batched   one process, 512-pair chunks streamed from the Parquet input, all cores' torch threads
  (c) ray       `cwpo annotate` in a fresh driver process, an actor pool

Usage: .venv/bin/python bench/annotate.py --repeats 3 --precisions fp32,bf16
       .venv/bin/python bench/annotate.py --repeats 0 --sizes 1000,10000 --naive-sizes 1000
``--work DIR`` keeps the outputs (a later run with the same DIR compares bf16 with its fp32 output).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cwpo_ray.tables import iter_rows, write_table  # noqa: E402
from scale import Sampler  # noqa: E402  (bench/ is the script's own folder on sys.path)

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


class PeakRSS(Sampler):
    """Samples a process's resident memory every 50 ms; ``peak`` in MiB."""

    def __init__(self, pid: int):
        self.proc, self.peak = psutil.Process(pid), 0
        super().__init__()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

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


# MiniLM-L6's shape
LAYERS, HIDDEN, FFN = 6, 384, 1536


def sequence_flops(length: int, layers: int = LAYERS, d: int = HIDDEN, f: int = FFN) -> int:
    """Matmul FLOPs of one encoder forward over ``length`` real tokens (formula in the docstring)."""
    return layers * (2 * length * (4 * d * d + 2 * d * f) + 4 * length * length * d)


def gemm_rate(dtype, tokens: int, d: int = HIDDEN, f: int = FFN, seconds: float = 3.0) -> float:
    """FLOP/s of one layer's matmuls at the model's shapes (4 x (M,d)@(d,d), (M,d)@(d,f), (M,f)@(f,d)),
    timed together for about ``seconds`` after a warm-up; the best of three such timings."""
    import torch

    shapes = [(tokens, d, d)] * 4 + [(tokens, d, f), (tokens, f, d)]
    mats = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def once():
        for a, b in mats:
            a @ b

    for _ in range(3):
        once()
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        once()
        reps += 1
    per = (time.perf_counter() - start) / reps
    n = max(1, int(seconds / 3 / per))
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            once()
        best = max(best, flops * n / (time.perf_counter() - start))
    return best


def ray_annotate(data: Path, annotator_dir: Path, out: Path, actors: int, cpus: float,
                 extra: tuple[str, ...] = ()) -> tuple[float, float, int]:
    """(seconds, driver peak MiB, pairs) of `cwpo annotate` in a fresh driver process."""
    cmd = [sys.executable, "-m", "cwpo_ray", "annotate", "--data", str(data), "--annotator", str(annotator_dir),
           "--out", str(out), "--num-actors", str(actors), "--cpus-per-actor", str(cpus), *extra]
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


def agreement(reference: Path, other: Path) -> dict:
    """Pairs labeled the same way (same chosen response) and the largest |confidence difference|, by id."""
    from cwpo_ray.tables import read_table

    ref, got = (read_table(o / "annotated.parquet").to_pydict() for o in (reference, other))
    by_id = {i: (c, conf) for i, c, conf in zip(ref["id"], ref["chosen"], ref["confidence"])}
    same, worst = 0, 0.0
    for i, c, conf in zip(got["id"], got["chosen"], got["confidence"]):
        rc, rconf = by_id[i]
        same += c == rc
        worst = max(worst, abs(conf - rconf))
    assert len(got["id"]) == len(by_id)
    return {"pairs": len(by_id), "same_label": same / len(by_id), "max_conf_diff": worst}


def bound_benchmark(args, work: Path, annotator, cores: int) -> None:
    """`cwpo annotate` end to end against the compute bound (the main figure; see the docstring)."""
    import statistics

    import torch

    n = args.bound_pairs
    data = work / f"pairs-{n}.parquet"
    pairs = make_pairs(n, 0, args.prompt_words, args.response_words)
    if not data.exists():
        write_table(pa.Table.from_pylist(pairs), data)
    seqs, _ = annotator.encode([r["prompt"] for r in pairs] * 2,
                               [r["response_a"] for r in pairs] + [r["response_b"] for r in pairs])
    lengths = [len(q) for q in seqs]
    flops = sum(sequence_flops(length) for length in lengths)
    per_pair = flops / n
    tokens = round(args.model_batch_size * sum(lengths) / len(lengths))
    torch.set_num_threads(cores)
    rates = {"fp32": gemm_rate(torch.float32, tokens), "bf16": gemm_rate(torch.bfloat16, tokens)}
    bounds = {k: r / per_pair for k, r in rates.items()}
    print(f"{n:,} pairs, {len(lengths):,} sequences of {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.1f}); {per_pair / 1e9:.3f} GFLOP per pair", flush=True)
    for k in rates:
        print(f"GEMM {k}, {cores} threads, M={tokens}: {rates[k] / 1e9:.0f} GFLOP/s -> bound "
              f"{bounds[k]:.0f} pairs/s", flush=True)

    rows, outs = [], {}
    for precision in args.precisions.split(","):
        for r in range(args.repeats):
            out = work / f"out-{precision}-r{r}"
            sec, mib, done = ray_annotate(data, work / "annotator", out, args.actors, args.cpus_per_actor,
                                          ("--precision", precision, *args.annotate_args.split()))
            assert done == n, (precision, r, done)
            report = json.loads((out / "report.json").read_text())
            startup = report.get("startup_seconds") or 0.0
            rows.append((precision, r, sec, startup, n / sec, n / (sec - startup), mib))
            outs.setdefault(precision, out)
            print(f"{precision} repeat {r}: {sec:.1f} s, start-up {startup:.1f} s, {n / sec:.1f} pairs/s, "
                  f"{n / (sec - startup):.1f} without start-up, driver {mib:.0f} MiB", flush=True)
    print(f"\n`cwpo annotate`, {args.actors} actors x {args.cpus_per_actor} CPU, {n:,} pairs, torch "
          f"{torch.__version__}, {cores} cores")
    print("| precision | repeat | seconds | start-up s | pairs/s | pairs/s w/o start-up | x bound | "
          "x bound w/o start-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for precision, r, sec, startup, rate, rate_warm, _ in rows:
        b = bounds[precision]
        print(f"| {precision} | {r + 1} | {sec:.1f} | {startup:.1f} | {rate:.1f} | {rate_warm:.1f} | "
              f"{rate / b:.2f} | {rate_warm / b:.2f} |")
    for precision in outs:
        mine = [row for row in rows if row[0] == precision]
        rate, warm = statistics.median(x[4] for x in mine), statistics.median(x[5] for x in mine)
        print(f"| {precision} | median of {len(mine)} | | | {rate:.1f} | {warm:.1f} | "
              f"{rate / bounds[precision]:.2f} | {warm / bounds[precision]:.2f} |")
    reference = outs.get("fp32") or (work / "out-fp32-r0" if (work / "out-fp32-r0" / "report.json").exists() else None)
    if "bf16" in outs and reference is not None:
        agree = agreement(reference, outs["bf16"])
        print(f"\nbf16 vs fp32 on {agree['pairs']:,} pairs: same label {agree['same_label']:.4%}, "
              f"largest |confidence difference| {agree['max_conf_diff']:.4f} "
              f"(bar: >= 99.5%, <= 0.01: {'pass' if agree['same_label'] >= 0.995 and agree['max_conf_diff'] <= 0.01 else 'FAIL'})")


def main() -> None:
    import torch

    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the main figure (0: skip it)")
    ap.add_argument("--bound-pairs", type=int, default=10_000, help="pairs of the main figure")
    ap.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    ap.add_argument("--model-batch-size", type=int, default=64, help="sequences per forward (GEMM shape)")
    ap.add_argument("--annotate-args", default="", help="more `cwpo annotate` options for the main figure")
    ap.add_argument("--work", default="", help="work folder (kept); default: a new temporary folder")
    ap.add_argument("--sizes", default="", help="comma-separated pair counts for the older modes (b) and (c)")
    ap.add_argument("--naive-sizes", default="", help="pair counts for the naive loop ('' to skip)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--prompt-words", type=word_range, default=(8, 16), help="LO-HI words per prompt")
    ap.add_argument("--response-words", type=word_range, default=(20, 40), help="LO-HI words per response")
    args = ap.parse_args()
    cores = psutil.cpu_count(logical=True)
    torch.set_num_threads(cores)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    annotator = new_annotator(resolve_model("minilm-l6"), max_length=args.max_length)
    if not (work / "annotator").exists():  # kept: a later run with the same --work scores with the same head
        save_annotator(annotator, work / "annotator")
    if args.repeats:
        bound_benchmark(args, work, annotator, cores)
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
            # fp32 as mode (b) runs (annotate's default, auto, is bf16 on a CPU with bf16 units)
            sec, mib, done = ray_annotate(data, work / "annotator", work / f"out-{n}", args.actors,
                                          args.cpus_per_actor, ("--precision", "fp32"))
            results.append((f"(c) cwpo annotate, {args.actors} actors", n, sec, mib, done, cores))
            print(results[-1], flush=True)
    if results:
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
