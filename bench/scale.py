"""Scale bench: `cwpo annotate` on 100k / 1M / 3M synthetic pairs with a tiny annotator.

The annotator is a 1-layer, 32-wide BERT with a fresh head (tests/tiny_models.py's tokenizer),
so Ray, reading and writing set the cost, not the model. For each size N it makes N short
pairs (with a human_choice) in Parquet files of 100k rows, runs `cwpo annotate` as a fresh
driver process with its own local Ray, and prints:

  pairs/s (from report.json, and wall-clock with Ray start-up), the marginal pairs/s between
  consecutive sizes (linearity), the driver's peak RSS and the largest actor's peak RSS
  (psutil, sampled every 0.2 s over the driver's process tree), output file count and sizes,
  and (at --kill-size) the time of a rerun after the whole job was SIGKILLed at ~50%.

Usage: .venv/bin/python bench/scale.py --sizes 100000,1000000,3000000 --kill-size 1000000

With --cluster (inside `ray job submit`, or with RAY_ADDRESS set to a GCS address) every
`cwpo annotate` joins that cluster instead of starting its own Ray: the kill SIGKILLs only the
`cwpo annotate` driver's process group (the cluster stays up; Ray ends the driver's actors), and
actor RSS is read from the cluster's MapWorker processes on this machine (every node of
cluster/local.sh is here):

  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
      python bench/scale.py --cluster --sizes 100000 --kill-size 100000 --work /tmp/bench-scale

With --lose-node I (on cluster/local.sh, whose nodes are all on this machine) the fault at
--kill-size is a lost node, not a killed driver: worker node I's processes are SIGKILLed at ~50%
(`local.sh kill-node I`, which finds the cluster through CWPO_LOCAL_CLUSTER_DIR as it was when the
cluster came up) and the same run must finish on the nodes left:

  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
      python bench/scale.py --cluster --sizes 1000000 --kill-size 1000000 --lose-node 1 --work /tmp/bench-2node

Every run checks that each input id is in annotated + quarantine exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

WORDS = ("the a of to and in is it you that was for on are with as they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "garden river music bread train helpful kind clear honest useful").split()
ROWS_PER_FILE = 100_000


def tiny_annotator(folder: Path) -> Path:
    """A 1-layer, 32-wide BERT annotator (random weights) saved as `cwpo train-annotator` would."""
    import torch
    from transformers import BertConfig, BertModel

    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import ModelSource
    from tiny_models import build_encoder_tokenizer

    backbone = folder / "backbone"
    tok = build_encoder_tokenizer(backbone)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
              ).save_pretrained(backbone)
    return save_annotator(new_annotator(ModelSource(str(backbone)), max_length=32), folder / "annotator")


def make_pairs(n: int, folder: Path, seed: int = 0) -> Path:
    """``n`` short pairs (prompt 6 words, responses 5-8 words) with ids s0..s{n-1}, 100k rows a file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for f, lo in enumerate(range(0, n, ROWS_PER_FILE)):
        ids = range(lo, min(n, lo + ROWS_PER_FILE))
        rows = {"id": [f"s{i}" for i in ids],
                "prompt": [" ".join(rng.choices(WORDS, k=6)) for _ in ids],
                "response_a": [" ".join(rng.choices(WORDS, k=rng.randint(5, 8))) for _ in ids],
                "response_b": [" ".join(rng.choices(WORDS, k=rng.randint(5, 8))) + f" {i}" for i in ids],
                "human_choice": [rng.choice("ab") for _ in ids]}
        pq.write_table(pa.table(rows), folder / f"part-{f:04d}.parquet")
    return folder


def cluster_raylets(gcs_address: str) -> list[psutil.Process]:
    """The raylets on this machine of the cluster whose GCS is ``gcs_address`` (its own flag on
    their command line), so actors of other Ray clusters on the machine are never counted."""
    flag = f"--gcs-address={gcs_address}"
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("raylet") and flag in cmd:
            found.append(p)
    if not found:
        raise RuntimeError(f"no raylet of the cluster at {gcs_address} on this machine")
    return found


class Sampler:
    """A thread that runs ``self._run`` (sampling until ``self._stop`` is set) inside a ``with`` block
    (also bench/annotate.py's)."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class TreeRSS(Sampler):
    """Peak RSS of a driver process and of each Ray actor under it (sampled every 0.2 s).

    With ``raylets`` (a cluster the driver joined), actors are the MapWorker processes under those
    raylets that were not there at the start (a killed run's actors may still be ending)."""

    def __init__(self, pid: int, raylets: list[psutil.Process] | None = None):
        self.root, self.driver, self.actors, self.pids = psutil.Process(pid), 0, {}, set()
        self.raylets = raylets
        self.before = {p.pid for p in self._cluster_workers()} if raylets else set()
        super().__init__()

    def _cluster_workers(self) -> list[psutil.Process]:
        out = []
        for r in self.raylets:
            try:
                out += r.children(recursive=True)
            except psutil.Error:
                pass
        return out

    def _run(self):
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.root.memory_info().rss)
                kids = self.root.children(recursive=True)
            except psutil.Error:
                return
            if self.raylets:
                kids = [p for p in self._cluster_workers() if p.pid not in self.before]
            for p in kids:
                self.pids.add(p.pid)
                try:
                    if "MapWorker" in " ".join(p.cmdline()):
                        self.actors[p.pid] = max(self.actors.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)



def annotate_cmd(data: Path, annotator: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "cwpo_ray", "annotate", "--data", str(data), "--annotator", str(annotator),
            "--out", str(out), "--num-actors", "2", "--cpus-per-actor", "0.5", *extra]


def run_annotate(cmd: list[str], log: Path, kill_at: float | None = None, units: int = 0,
                 cluster: bool = False, lose_node: str = "") -> dict:
    """`run_once`, again when Ray itself failed to start (seen here on a machine loaded by others)."""
    for attempt in range(3):
        result = run_once(cmd, log, kill_at, units, cluster, lose_node)
        if result is not None:
            return result
        print(f"(Ray did not start, attempt {attempt + 1}; again)", flush=True)
    raise RuntimeError(f"Ray did not start three times; see {log}")


def run_once(cmd: list[str], log: Path, kill_at: float | None = None, units: int = 0,
             cluster: bool = False, lose_node: str = "") -> dict | None:
    """Run `cwpo annotate` in its own session; with ``kill_at``, SIGKILL its whole process tree once
    that fraction of its ``units`` is committed. Returns wall seconds and peak RSS figures.
    With ``cluster``, it joins RAY_ADDRESS's cluster and the kill takes only its own process group;
    with ``lose_node`` (a cluster/local.sh worker node's number) the kill is that node's instead
    (`local.sh kill-node`), and the run goes on to its end."""
    env = {k: v for k, v in os.environ.items() if cluster or k != "RAY_ADDRESS"}
    raylets = cluster_raylets(env["RAY_ADDRESS"]) if cluster else None
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               RAY_DATA_DISABLE_PROGRESS_BARS="1")
    out = Path(cmd[cmd.index("--out") + 1])
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        with TreeRSS(proc.pid, raylets) as rss:
            killed = False
            while proc.poll() is None:
                if (kill_at is not None and not killed
                        and len(list((out / ".annotate-work" / "units").glob("*.json"))) >= kill_at * units):
                    if lose_node:
                        said = subprocess.run(["bash", str(REPO / "cluster" / "local.sh"), "kill-node", lose_node],
                                              capture_output=True, text=True, check=True).stdout.strip()
                        print(f"({said})", flush=True)
                        killed = True
                        continue
                    pids = rss.pids | {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
                    if cluster:  # the cluster's actors are not the driver's to kill: Ray ends them
                        pids = set()
                    os.killpg(proc.pid, signal.SIGKILL)
                    for pid in pids:  # Ray processes that left the group go too
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    killed = True
                    proc.wait()
                    break
                time.sleep(0.2)
            rc = proc.wait()
    seconds = time.perf_counter() - start
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its own Ray is left in its group
    except ProcessLookupError:
        pass
    if rc and not killed and "timed out during startup" in log.read_text():
        return None
    if rc and not (killed and not lose_node):
        raise RuntimeError(f"cwpo annotate failed ({rc}); see {log}")
    return {"wall": seconds, "driver_mib": rss.driver / 2**20,
            "actor_mib": max(rss.actors.values(), default=0) / 2**20, "actors": len(rss.actors), "killed": killed}


def check_exactly_once(out: Path, n: int) -> None:
    ids = pa.concat_arrays([pq.read_table(out / t, columns=["id"])["id"].combine_chunks()
                            for t in ("annotated.parquet", "quarantine.parquet")])
    unique = len(pa.compute.unique(ids))
    assert len(ids) == unique == n, f"{out}: {len(ids)} ids, {unique} distinct, input {n}"


def output_files(out: Path) -> tuple[int, list[float]]:
    files = sorted((out / "annotated.parquet").glob("*.parquet"))
    return len(files), [f.stat().st_size / 2**20 for f in files]


def bench_annotate(args, work: Path) -> list[str]:
    from cwpo_ray.recipes.annotate import plan_units
    from cwpo_ray.tables import table_files

    annotator = tiny_annotator(work / "model")
    rows, lines, previous = [], [], None
    for n in sorted(int(s) for s in args.sizes.split(",") if s):
        data = make_pairs(n, work / f"pairs-{n}")
        out = work / f"out-{n}"
        r = run_annotate(annotate_cmd(data, annotator, out, args.extra), work / f"annotate-{n}.log",
                         cluster=args.cluster)
        report = json.loads((out / "report.json").read_text())
        check_exactly_once(out, n)
        count, sizes = output_files(out)
        marginal = (n - previous[0]) / (report["seconds"] - previous[1]) if previous else None
        previous = (n, report["seconds"])
        rows.append(f"| {n:,} | {report['seconds']:.1f} | {report['pairs_per_second']:,.0f} | {n / r['wall']:,.0f} | "
                    f"{'' if marginal is None else f'{marginal:,.0f}'} | {r['driver_mib']:.0f} | {r['actor_mib']:.0f} | "
                    f"{count} | {', '.join(f'{s:.1f}' for s in sizes)} |")
        print(rows[-1], flush=True)
        if n == args.kill_size:
            units = len(plan_units(table_files(data), 20_000 if "--unit-rows" not in args.extra
                                   else int(args.extra[args.extra.index("--unit-rows") + 1])))
            again = work / f"kill-{n}"
            cmd = annotate_cmd(data, annotator, again, args.extra)
            if args.lose_node:  # a worker node lost at ~50%: the same run goes on to its end
                lost = run_annotate(cmd, work / f"lose-node-{n}.log", kill_at=0.5, units=units, cluster=True,
                                    lose_node=args.lose_node)
                assert lost["killed"], "the run finished before the node could be lost"
                rep = json.loads((again / "report.json").read_text())
                check_exactly_once(again, n)
                lines.append(f"- worker node {args.lose_node} lost at ~50% of {n:,} pairs ({units} units): the same run "
                             f"finished in {lost['wall']:.0f} s wall (a full run: {r['wall']:.0f} s); every id exactly "
                             f"once in annotated + quarantine; report.json covers {rep['input_rows']:,} rows")
                print(lines[-1], flush=True)
                continue
            first = run_annotate(cmd, work / f"kill-{n}-first.log", kill_at=0.5, units=units, cluster=args.cluster)
            assert first["killed"], "the run finished before it could be killed"
            rerun = run_annotate(cmd, work / f"kill-{n}-rerun.log", cluster=args.cluster)
            rep = json.loads((again / "report.json").read_text())
            check_exactly_once(again, n)
            lines.append(f"- kill at ~50% of {n:,} pairs ({units} units): killed after {first['wall']:.0f} s; the rerun "
                         f"took {rerun['wall']:.0f} s wall (a full run: {r['wall']:.0f} s), labeled "
                         f"{rep['annotated_this_run']:,} pairs, resumed {rep['resumed_units']} of {rep['units']} units; "
                         f"every id exactly once in annotated + quarantine; report.json covers {rep['input_rows']:,} rows")
            print(lines[-1], flush=True)
    head = ["| pairs | seconds (report) | pairs/s | pairs/s (wall, with Ray start) | marginal pairs/s | "
            "driver peak RSS (MiB) | largest actor peak RSS (MiB) | annotated files | file sizes (MiB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    return head + rows + [""] + lines


# ----------------------------------------------------------------------------- train-policy at scale
# `python bench/scale.py policy --sizes 10000,1000000`: `cwpo train-policy --sft-epochs 0 --max-steps 20`
# with a tiny Llama policy (tests/tiny_models.py, saved with save_pretrained) on N synthetic
# annotated pairs, the reference pass over all N pairs included (into a fresh --reference-cache, as
# the pipeline runs it); prints each worker's and the driver's peak RSS (the kernel's VmHWM, read
# every 0.2 s from /proc while the process lives, and the largest sampled RSS), the reference
# pass's seconds and the wall time. Then (unless --no-rerun) the same run again from the same start
# into a new --out with the same cache, which takes every pair from it; for both runs a second table
# gives the cache (rows, MiB and segments on disk after the run, segments before -> after) and the
# lookups' cost (from the pass's summary line: rows read, rows read per pair and per lookup, seconds).

POLICY_FLAGS = ["--sft-epochs", "0", "--max-steps", "20", "--num-workers", "2", "--cpus-per-worker", "1",
                "--batch-size", "8", "--max-length", "64", "--max-prompt-length", "32", "--ref-batch-size", "64",
                "--checkpoint-every", "1000", "--no-progress", "--experiment", "bench-scale-policy"]


def make_policy_pairs(n: int, folder: Path, seed: int = 0) -> Path:
    """``n`` annotated pairs (prompt 6 words, responses 5-8 words, a confidence), 100k rows a file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for f, lo in enumerate(range(0, n, ROWS_PER_FILE)):
        ids = range(lo, min(n, lo + ROWS_PER_FILE))
        pq.write_table(pa.table({
            "id": [f"s{i}" for i in ids],
            "prompt": [" ".join(rng.choices(WORDS, k=6)) for _ in ids],
            "chosen": [" ".join(rng.choices(WORDS, k=rng.randint(5, 8))) for _ in ids],
            "rejected": [" ".join(rng.choices(WORDS, k=rng.randint(5, 8))) + f" {i}" for i in ids],
            "confidence": [rng.random() for _ in ids]}), folder / f"part-{f:04d}.parquet")
    return folder


class PeakRSS(Sampler):
    """Peak memory of a driver process and of each Ray Train worker under it: the kernel's own peak
    (VmHWM) and the largest RSS sampled, every 0.2 s."""

    def __init__(self, pid: int, worker_tag: str = "RayTrainWorker"):
        self.root, self.tag = psutil.Process(pid), worker_tag
        self.driver = {"hwm": 0, "rss": 0}
        self.workers: dict[int, dict] = {}
        super().__init__()

    @staticmethod
    def _sample(p: psutil.Process, into: dict) -> None:
        into["rss"] = max(into["rss"], p.memory_info().rss)
        with open(f"/proc/{p.pid}/status") as fh:
            hwm = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")), 0)
        into["hwm"] = max(into["hwm"], hwm)

    def _run(self):
        while not self._stop.is_set():
            try:
                self._sample(self.root, self.driver)
                kids = self.root.children(recursive=True)
            except (psutil.Error, OSError):
                return
            for p in kids:
                try:
                    if self.tag in " ".join(p.cmdline()):
                        self._sample(p, self.workers.setdefault(p.pid, {"hwm": 0, "rss": 0}))
                except (psutil.Error, OSError):
                    pass
            time.sleep(0.2)



def run_policy(data: Path, model: Path, out: Path, log: Path, cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               DS_ACCELERATOR="cpu", MLFLOW_TRACKING_URI=f"sqlite:///{out.parent / 'mlflow.db'}")
    cache = cache or Path(f"{out}-cache")
    cmd = [sys.executable, "-m", "cwpo_ray", "train-policy", "--data", str(data), "--model", str(model),
           "--out", str(out), "--reference-cache", str(cache), *POLICY_FLAGS]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        with PeakRSS(proc.pid) as peak:
            rc = proc.wait()
    if rc:
        raise RuntimeError(f"cwpo train-policy failed ({rc}); see {log}")
    mib = lambda v: v / 2**20  # noqa: E731
    return {"cmd": " ".join(cmd[1:]), "wall": time.perf_counter() - start, **reference_summary(log.read_text()),
            "cache_disk": cache_on_disk(cache),
            "driver_hwm": mib(peak.driver["hwm"]), "driver_rss": mib(peak.driver["rss"]),
            "workers_hwm": [mib(w["hwm"]) for w in peak.workers.values()],
            "workers_rss": [mib(w["rss"]) for w in peak.workers.values()]}


# The reference pass's summary line (cwpo_ray/policy/reference.py's _summary_line).
SUMMARY = re.compile(
    r"reference log-probs of (?P<pairs>\d+) pairs \((?P<computed>\d+) computed, \d+ from the cache\) in "
    r"(?P<reference_s>[\d.]+)s -> .*?; cache: (?P<seg_before>\d+) -> (?P<seg_after>\d+) segments, "
    r"(?P<rows_before>\d+) -> (?P<rows_after>\d+) rows \((?P<bytes_after>\d+) bytes\), "
    r"(?P<rows_read>\d+) rows read by (?P<lookups>\d+) lookups of (?P<chunk>\d+) groups in (?P<lookup_s>[\d.]+)s, "
    r"compacted (?P<merged>\d+) segments \((?P<compact_rows_read>\d+) rows read\) in (?P<compact_s>[\d.]+)s")


def reference_summary(text: str) -> dict:
    """The last summary line's figures (reference_s NaN when there is none)."""
    found = list(SUMMARY.finditer(text))
    if not found:
        return {"reference_s": float("nan")}
    return {k: float(v) if "." in v else int(v) for k, v in found[-1].groupdict().items()}


def cache_on_disk(cache: Path) -> dict:
    """Rows (from the footers, duplicates counted), bytes and segment count of a reference cache folder."""
    files = sorted(cache.glob("reference-*/seg-*.parquet")) + sorted(cache.glob("reference-*.parquet"))
    return {"rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files),
            "bytes": sum(f.stat().st_size for f in files), "segments": len(files)}


def cache_row(n: int, label: str, r: dict) -> str:
    disk, lookups = r["cache_disk"], max(r.get("lookups", 0), 1)
    return (f"| {n:,} | {label} | {r['reference_s']:.1f} | {r.get('computed', 0):,} | {disk['rows']:,} | "
            f"{disk['bytes'] / 2**20:.1f} | {r.get('seg_before', 0)} -> {disk['segments']} | "
            f"{r.get('lookups', 0)} x {r.get('chunk', 0)} groups | {r.get('rows_read', 0):,} | "
            f"{r.get('rows_read', 0) / max(n, 1):.1f} | {r.get('rows_read', 0) / lookups:,.0f} | "
            f"{r.get('lookup_s', float('nan')):.2f} | {r.get('compact_s', float('nan')):.2f} |")


def bench_policy(sizes: list[int], work: Path, rerun: bool = True) -> list[str]:
    from tiny_models import build_tiny_decoder

    model = build_tiny_decoder(work / "tiny-policy")
    head = ["| pairs | wall s | reference pass s | pairs/s (reference) | worker peak RSS MiB (VmHWM, each) | "
            "worker max sampled RSS MiB | driver peak RSS MiB (VmHWM) | driver max sampled RSS MiB |",
            "|---:|---:|---:|---:|---|---|---:|---:|"]
    cache_head = ["| pairs | run | reference pass s | computed | cache rows | cache MiB | cache segments (before -> "
                  "after) | lookups | rows read | rows read / pair | rows read / lookup | lookup s | compaction s |",
                  "|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    rows, cache_rows, results = [], [], {}
    for n in sizes:
        t0 = time.perf_counter()
        data = make_policy_pairs(n, work / f"policy-pairs-{n}")
        made = time.perf_counter() - t0
        out = work / f"policy-out-{n}"
        r = results[n] = run_policy(data, model, out, work / f"policy-{n}.log")
        rows.append(f"| {n:,} | {r['wall']:.0f} | {r['reference_s']:.0f} | {n / r['reference_s']:,.0f} | "
                    f"{', '.join(f'{v:.0f}' for v in r['workers_hwm'])} | {', '.join(f'{v:.0f}' for v in r['workers_rss'])} | "
                    f"{r['driver_hwm']:.0f} | {r['driver_rss']:.0f} |")
        print(rows[-1], f"(data made in {made:.0f} s)", flush=True)
        cache_rows.append(cache_row(n, "fresh cache", r))
        print(cache_rows[-1], flush=True)
        if rerun:  # the same start and pairs again: every pair from the cache the first run filled
            again = run_policy(data, model, work / f"policy-out-{n}-rerun", work / f"policy-{n}-rerun.log",
                               cache=Path(f"{out}-cache"))
            cache_rows.append(cache_row(n, f"rerun (wall {again['wall']:.0f} s)", again))
            print(cache_rows[-1], flush=True)
    lines = head + rows
    if len(sizes) > 1:
        lo, hi = results[min(sizes)], results[max(sizes)]
        lines.append("")
        lines.append(f"- ratio {max(sizes):,} / {min(sizes):,} pairs: worker peak RSS (largest VmHWM) "
                     f"{max(hi['workers_hwm']) / max(lo['workers_hwm']):.3f}x, driver peak RSS "
                     f"{hi['driver_hwm'] / lo['driver_hwm']:.3f}x")
    lines.append(f"- command: `python {lo['cmd'] if len(sizes) > 1 else results[sizes[0]]['cmd']}`")
    return lines + ["", "Reference cache (rows read: by all workers' lookups; lookup s: the slowest worker's):", ""] + \
        cache_head + cache_rows


def policy_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench/scale.py policy", description="train-policy memory at scale")
    ap.add_argument("--sizes", default="10000,1000000", help="comma-separated pair counts")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--no-rerun", action="store_true", help="no second run from the same start (the cache hit)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-policy-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = bench_policy([int(s) for s in args.sizes.split(",") if s], work, rerun=not args.no_rerun)
    print(f"\n`cwpo train-policy`, tiny Llama (2 layers, 32 wide), 2 workers x 1 CPU, {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB")
    print("\n".join(lines))
    print(f"\n(work folder: {work})")


def main() -> None:
    if sys.argv[1:2] == ["policy"]:  # the train-policy part, with its own flags
        return policy_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated pair counts")
    ap.add_argument("--kill-size", type=int, default=1_000_000, help="size at which to kill at ~50%% and rerun (0: none)")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--cluster", action="store_true",
                    help="join the cluster in RAY_ADDRESS (a GCS address, as in `ray job submit`) instead of a "
                         "local Ray per run; the kill takes only the `cwpo annotate` driver")
    ap.add_argument("--lose-node", default="", metavar="I",
                    help="with --cluster on cluster/local.sh (CWPO_LOCAL_CLUSTER_DIR set as for local.sh): at "
                         "--kill-size, lose worker node I at ~50%% (`local.sh kill-node I`) instead of killing the "
                         "driver; the run must finish on the nodes left")
    ap.add_argument("extra", nargs="*", help="more `cwpo annotate` flags, after --")
    args = ap.parse_args()
    address = os.environ.get("RAY_ADDRESS", "")
    if args.cluster and (":" not in address or "://" in address):
        ap.error("--cluster needs RAY_ADDRESS=host:port of the cluster's GCS (set by `ray job submit`)")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = bench_annotate(args, work)
    where = f"on the cluster at {os.environ['RAY_ADDRESS']}" if args.cluster else "a local Ray per run"
    print(f"\n`cwpo annotate`, tiny annotator (1-layer 32-wide BERT, max_length 32), 2 actors x 0.5 CPU, {where}, "
          f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    print("\n".join(lines))
    print(f"\n(work folder: {work})")


if __name__ == "__main__":
    main()
