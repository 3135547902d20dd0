"""Label unlabeled pairs with a trained annotator and a confidence (Ray Data, actor pool).

Reads DATA (a Parquet or JSONL(.gz) file, or a folder of such shards; any size, streamed)
with columns id, prompt, response_a, response_b (and optionally the hidden human_choice).
Each actor of the pool loads the annotator once and scores both responses of every pair
(a batch is sorted by length to cut padding); the higher-scored response becomes chosen,
with confidence C = 2 (sigma((r_chosen - r_rejected) / T) - 0.5), T the annotator's calibration
temperature (confidence_raw: the same with T = 1). Input longer than the
annotator's max_length is cut by its rule: the prompt loses its beginning first.

--precision: fp32 (the default) runs the model as stored; bf16 runs its matmuls under bfloat16
autocast (weights, softmax and layer norms stay fp32), which moves the rewards by a few hundredths:
a pair whose two rewards are nearly tied can change its label, and confidences move by up to a few
hundredths where the margin is steep. auto is bf16 where the actors' device runs bf16 natively (a
CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX-BF16) and fp32 elsewhere, where bf16 matmuls
would be emulated. auto is resolved once per run, before any unit is labeled (CPU actors: on the
driver's CPU; GPU actors: by a one-off task on a GPU); every actor gets the resolved value, and
report.json records it ("precision"; "precision_requested" is what was asked). fp32 stays the
default because bf16 did not meet the bar set for it on the built-in benchmark with a trained
annotator: >= 99.5% same chosen response and every confidence (confidence and confidence_raw)
within 0.01 of fp32's (bench/RESULTS.md, "bf16 annotation with a trained annotator").

Rows that are not JSON objects, miss a field, hold a non-string or empty text, or have two
identical responses go to quarantine with a reason; every input row ends up in exactly one
of the two outputs. A row without an id gets one derived from its text (as `cwpo data` does).

Writes, each a folder of Parquet files (at most --max-rows-per-file rows and about
--max-bytes-per-file bytes each; our own writer: Ray Data's write_parquet takes
max_rows_per_file only as a hint and has no byte ceiling) that replaces the previous one in
one rename:
  OUT/annotated.parquet/   id, prompt, chosen, rejected, reward_chosen, reward_rejected,
                           confidence, annotator, confidence_raw
  OUT/quarantine.parquet/  id, reason, raw
and OUT/report.json (counts, pairs/s, confidence histogram; accuracy against human_choice
overall and by confidence decile when the input has it: the deciles are cut at the edges of
a fixed log-scale histogram, so they are approximate, and the report says so). --export-uncertain
N also writes the N least-confident pairs, unlabeled, to OUT/uncertain.parquet (one file) for
relabeling. report.json is removed before the other outputs are replaced and written after
them: present, it and every output beside it are from one run (the run id it holds); absent
after a killed run, the same command again publishes them. On a multi-node cluster DATA and
OUT must be on storage every node sees. One run per OUT: a second run into it, or into a folder
above or below it (a pipeline's OUT and its stages' folders), is refused while the first is alive
(cwpo_ray/out_lock.py). A run whose OUT's disk has less free than 2x the input's text (a .gz
counted at ~3x its bytes; less what a resumed run has committed) is refused before it starts
(cwpo_ray/disk_space.py).

A killed run resumes: run the same command again. How (and why not Ray Data's checkpoints):
the input is cut into deterministic work units (a Parquet file's row groups, or a byte range
of lines of a JSONL file, about --unit-rows rows each, fewer for an input under 16 x --unit-rows
rows so that it still makes 16 units and every actor gets work; a .gz file: a range of line numbers,
counted by one pass at the start, each unit decompressing from the file's start). An actor
labels a whole unit, writes its annotated / quarantine rows and a small JSON sidecar of its
statistics into OUT/.annotate-work/units/, and the sidecar, renamed into place last, commits
the unit (each file fsynced before its rename, the folder after: a sidecar that survives a
power loss names only complete files). A rerun whose input files (paths, sizes, mtimes),
annotator folder (file sizes, mtimes) and output-changing settings (unit_rows, export_uncertain,
precision) match the fingerprint in OUT/.annotate-work/ skips the committed units; otherwise it
starts over and says so. The fingerprint holds the precision the actors run in (auto resolved),
so a resumed run never mixes fp32 and bf16 units: a run resumed with auto on a machine where it
resolves otherwise starts over.
When every unit is committed the unit files are rewritten into the final files (one Ray task
per output file) and the report is merged from the sidecars, so it covers the killed run's
rows too; then the work folder is removed. Ray Data's CheckpointConfig (Ray 2.60) was not
used: it filters rows by an id column at read time, while JSONL ids are parsed (or derived)
inside the actors; it keeps every checkpointed id, sorted, in the object store and a copy in
each of its filter actors, a memory that grows with the corpus; and it applies only to a plan
that ends in a write (or a streaming split), into one sink, while a unit here makes two tables,
uncertain candidates and statistics. The driver holds only the list of units and fixed-size
statistics: its memory does not grow with the number of rows.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from cwpo_ray.config import option
from cwpo_ray.disk_space import require_space, stage_need
from cwpo_ray.out_lock import hold_out
from cwpo_ray.tables import ANNOTATED_SCHEMA, QUARANTINE_SCHEMA
from cwpo_ray.annotation.units import (WORK, committed, discarding_unfinished, fingerprint, input_files, plan_units,
                                       prepare_work)
from cwpo_ray.annotation.ensemble import CONFIDENCES, fold_folders
from cwpo_ray.annotation.stats import build_report, merge_stats, new_stats, print_report, stats_from_json
from cwpo_ray.annotation.labeling import LabelUnits
from cwpo_ray.annotation.outputs import merge_uncertain, plan_files, publish, write_files

EPILOG = """examples:
  cwpo annotate --data runs/data/hh/unlabeled.parquet --annotator runs/annotator --out runs/annotated
  cwpo annotate --data shards/ --annotator runs/annotator --out runs/annotated --num-actors 8 --cpus-per-actor 2
  cwpo annotate --data u.jsonl --annotator runs/annotator --out runs/a --gpus-per-actor 0.5 --export-uncertain 500
A killed run resumes where it stopped when the same command is run again.
"""

# cwpo_ray.annotator.PRECISION_CHOICES, spelled out so that parsing the options does not import torch
# (tests/test_annotator.py checks that the two agree)
PRECISION_CHOICES = ("auto", "fp32", "bf16")


@dataclass
class Settings:
    """Every option of the stage except its inputs and output (what a pipeline sets per arm)."""

    batch_size: int = option(512, "pairs per actor batch (sorted by length inside it)")
    model_batch_size: int = option(64, "sequences per forward pass")
    num_actors: int = option(2, "actors in the pool (the most it grows to)")
    min_actors: Optional[int] = option(None, "actors the pool starts with and keeps (default: num_actors)")
    cpus_per_actor: float = option(0.5, "CPUs reserved per actor; fractional, so reads and writes still get a CPU")
    gpus_per_actor: float = option(0.0, "GPUs per actor (fractional shares one GPU); > 0 runs the model on CUDA")
    torch_threads: int = option(0, "torch threads per actor (0: max(1, round(cpus_per_actor)))")
    precision: str = option("fp32", "how the annotator runs: fp32; bf16 autocast (weights stay fp32; faster "
                                    "where the hardware has bf16 units, but labels and confidences differ "
                                    "slightly from fp32's: bench/RESULTS.md); auto: bf16 where the actors' device "
                                    "has fast bf16 (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX-BF16), "
                                    "fp32 elsewhere. report.json records the precision it ran in",
                            choices=PRECISION_CHOICES)
    export_uncertain: int = option(0, "also write the N least-confident pairs to OUT/uncertain.parquet")
    unit_rows: int = option(20_000, "rows per work unit: what one actor call labels and a killed run redoes at most "
                                    "per actor")
    max_rows_per_file: int = option(1_000_000, "most rows per output Parquet file")
    max_bytes_per_file: int = option(128 * 2**20, "about the most bytes per output Parquet file")

    def validate(self) -> None:
        for name in ("batch_size", "model_batch_size", "num_actors", "unit_rows", "max_rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_bytes_per_file < 2**16:
            raise ValueError(f"max_bytes_per_file must be at least 65536, got {self.max_bytes_per_file}")
        if self.min_actors is not None and not 1 <= self.min_actors <= self.num_actors:
            raise ValueError(f"min_actors must be in [1, num_actors={self.num_actors}], got {self.min_actors}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.torch_threads < 0 or self.export_uncertain < 0:
            raise ValueError("cpus_per_actor, gpus_per_actor, torch_threads and export_uncertain must be >= 0")


@dataclass(kw_only=True)
class Config(Settings):
    data: str = option(help="unlabeled pairs: a .parquet / .jsonl(.gz) file or a folder of shards", must_exist=True)
    annotator: str = option(help="annotator folder written by `cwpo train-annotator`, or a one-label HF "
                                 "reward-model folder (docs/ANNOTATOR_FORMAT.md)", must_exist=True)
    out: str = option(help="output folder (annotated.parquet/, quarantine.parquet/, report.json)")
    # Not a Settings option: the pipeline sets it on a stage of its own (annotate-ensemble, for cw_ens).
    confidence: str = option("single", "single: the annotator's own margin; ensemble: the mean margin of the k fold "
                                       "models train-annotator kept (--keep-fold-models), calibrated by the same "
                                       "temperature (fit on their held-out margins); k forward passes per response. "
                                       "report.json then says how often the folds disagree",
                             choices=CONFIDENCES)

    def validate(self) -> None:
        super().validate()
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {', '.join(CONFIDENCES)}, got {self.confidence!r}")
        if not self.out.strip():
            raise ValueError("out: an output folder is required")


def _device_precision(precision: str, device: str) -> str:
    from cwpo_ray.annotator import resolve_precision

    return resolve_precision(precision, device)


def actor_precision(cfg: Settings) -> str:
    """"fp32" or "bf16": what the actors score in, ``cfg.precision`` with auto resolved once for the
    whole run (every actor gets this value, so no unit is labeled in another precision).

    CPU actors: resolved here, on the driver's CPU (on a multi-node cluster of mixed CPUs, give
    fp32 or bf16 explicitly: bf16 runs, only slower, on a CPU without it). GPU actors: by a one-off
    Ray task holding the actors' GPU share, so the driver needs no GPU and does not start CUDA."""
    if cfg.precision != "auto":
        return cfg.precision
    if cfg.gpus_per_actor > 0:
        import ray

        # max_calls=1: the task's worker exits after it, freeing its CUDA context
        probe = ray.remote(num_cpus=0, num_gpus=cfg.gpus_per_actor, max_calls=1)(_device_precision)
        return ray.get(probe.remote("auto", "cuda"))
    return _device_precision("auto", "cpu")


# ----------------------------------------------------------------------------- the recipe

def label_units(cfg: Config, todo: list[dict], work: Path) -> int:
    """Run the actor pool over the units not yet committed; returns the pairs it annotated."""
    import ray.data

    actors = min(cfg.num_actors, len(todo))
    threads = cfg.torch_threads or max(1, round(cfg.cpus_per_actor))
    # One row per unit, one block per row: each actor call labels one whole unit.
    units = ray.data.from_items([{"unit": json.dumps(u)} for u in todo], override_num_blocks=len(todo))
    done = units.map_batches(
        LabelUnits, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs=dict(annotator_dir=str(Path(cfg.annotator).resolve()), work=str(work),
                                   batch_size=cfg.batch_size, model_batch_size=cfg.model_batch_size,
                                   threads=threads, use_gpu=cfg.gpus_per_actor > 0,
                                   keep_uncertain=cfg.export_uncertain, precision=cfg.precision,
                                   confidence=cfg.confidence),
        # one unit in flight per actor: a unit is long, and a queue behind a busy actor idles the others
        compute=ray.data.ActorPoolStrategy(min_size=min(cfg.min_actors or actors, actors), max_size=actors,
                                           max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None)
    annotated, finished, step = 0, 0, max(1, len(todo) // 10)
    for row in done.iter_rows():
        annotated += row["annotated"]
        finished += 1
        if finished % step == 0 or finished == len(todo):
            print(f"annotate: {finished}/{len(todo)} units committed", flush=True)
    return annotated


def stage_outputs(cfg: Config, work: Path, staging: Path) -> tuple[dict, dict, int]:
    """Merge the sidecars and rewrite the unit files into the final tables under ``staging`` (published
    later, with report.json, by outputs.publish). Returns (merged statistics, files per table, units)."""
    import ray

    stats, parts = new_stats(), {"annotated": [], "quarantine": [], "uncertain": []}
    n_units = 0
    for side in committed(work):
        n_units += 1
        merge_stats(stats, stats_from_json(side["stats"]))
        for kind, f in side["files"].items():
            parts[kind].append((str(work / "units" / f["path"]), f["rows"], f["bytes"]))
    task = ray.remote(num_cpus=1)(write_files)
    jobs = {}
    for kind, schema in (("annotated", ANNOTATED_SCHEMA), ("quarantine", QUARANTINE_SCHEMA)):
        folder = staging / f"{kind}.parquet"
        folder.mkdir(parents=True)
        groups = plan_files([(r, b) for _, r, b in parts[kind]], cfg.max_rows_per_file, cfg.max_bytes_per_file)
        jobs[kind] = [task.remote([parts[kind][i][0] for i in g], str(folder), f"part-{j:05d}", schema,
                                  cfg.max_rows_per_file, cfg.max_bytes_per_file) for j, g in enumerate(groups)]
    uncertain = None
    if cfg.export_uncertain:
        uncertain = ray.remote(num_cpus=1)(merge_uncertain).remote([p for p, _, _ in parts["uncertain"]],
                                                                   cfg.export_uncertain)
    files = {kind: sum(len(c) for c in ray.get(refs)) for kind, refs in jobs.items()}
    if uncertain is not None:
        pq.write_table(ray.get(uncertain), staging / "uncertain.parquet")
    return stats, files, n_units


def run_fingerprint(cfg: Config, files: list[Path]) -> dict:
    """units.fingerprint and, when not single, the confidence: an ensemble run never resumes a single
    one's units (nor the other way); a work folder from before the option still resumes."""
    fp = fingerprint(cfg, files)
    if cfg.confidence != "single":
        fp["settings"]["confidence"] = cfg.confidence
    return fp


def run(cfg: Config) -> int:
    from cwpo_ray.ray_env import init_ray

    if cfg.confidence == "ensemble":
        fold_folders(cfg.annotator)  # an annotator without its fold models: refused in one line, before Ray
    out = Path(cfg.out)
    # One run per OUT, held until its outputs are published: a second one is refused (cwpo_ray/out_lock.py).
    with hold_out(out, "annotate"):
        # A disk that cannot hold the run is refused before Ray starts: 2x the input (the unit files and the
        # final files coexist), less what the work folder holds (a resumed run's committed units; the rest of
        # it, from another fingerprint or unfinished, is removed before anything is written).
        require_space(out, stage_need("annotate", cfg), "annotate", held=out / WORK)
        init_ray()
        # auto resolved once: the fingerprint, the actors and report.json's settings all get fp32 or bf16
        requested, cfg = cfg.precision, replace(cfg, precision=actor_precision(cfg))
        files = input_files(cfg.data)
        work, note = prepare_work(out, run_fingerprint(cfg, files))
        units = plan_units(files, cfg.unit_rows)
        done = {side["unit"]["key"] for side in committed(work)}
        todo = [u for u in units if u["key"] not in done]
        if note == "resume":
            print(f"annotate: resuming: {len(done)} of {len(units)} units already committed in {work}", flush=True)
        elif note != "fresh":
            print(f"annotate: {note}", flush=True)
        start, start_wall = time.perf_counter(), time.time()
        annotated_now = discarding_unfinished(work, lambda: label_units(cfg, todo, work)) if todo else 0
        labeled_at = time.perf_counter()
        # start-up: from the job's start to the first unit this run began labeling (Ray Data's plan,
        # actors importing torch and loading the annotator); wall clock, as the actors' sidecars record it
        began = [side["started"] for side in committed(work) if side.get("started", 0) >= start_wall]
        run_id = uuid.uuid4().hex[:12]
        staging = work / f"publish-{run_id}"
        stats, out_files, n_units = discarding_unfinished(work, lambda: stage_outputs(cfg, work, staging))
        seconds = time.perf_counter() - start
        if n_units != len(units):
            raise RuntimeError(f"{n_units} units committed of {len(units)}; rerun to finish")
        report = build_report(stats, seconds, str(Path(cfg.annotator).resolve()), {
            "annotated_this_run": annotated_now, "units": len(units), "resumed_units": len(done),
            "label_seconds": round(labeled_at - start, 3), "write_seconds": round(seconds - (labeled_at - start), 3),
            "startup_seconds": round(min(began) - start_wall, 3) if began else None,
            "precision": cfg.precision, "precision_requested": requested, "run": run_id,
            "confidence": cfg.confidence,
            "output_files": out_files, "settings": asdict(Settings(**{k: getattr(cfg, k) for k in
                                                                     Settings.__dataclass_fields__}))})
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        publish(staging, out)  # report.json last: present, it vouches for the outputs beside it
        shutil.rmtree(work, ignore_errors=True)
    print_report(report, out)
    return 0
