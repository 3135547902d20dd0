"""Label unlabeled pairs with a trained annotator and a confidence (Ray Data, actor pool).

Reads DATA (a Parquet or JSONL(.gz) file, or a folder of such shards; any size, streamed)
with columns id, prompt, response_a, response_b (and optionally the hidden human_choice).
Each actor of the pool loads the annotator once and scores both responses of every pair
(a batch is sorted by length to cut padding); the higher-scored response becomes chosen,
with confidence C = 2 (sigma(r_chosen - r_rejected) - 0.5). Input longer than the
annotator's max_length is cut by its rule: the prompt loses its beginning first.

Rows that are not JSON objects, miss a field, hold a non-string or empty text, or have two
identical responses go to quarantine with a reason; every input row ends up in exactly one
of the two outputs. A row without an id gets one derived from its text (as `cwpo data` does).

Writes, each a folder of Parquet shards that replaces the previous one in one rename:
  OUT/annotated.parquet/   id, prompt, chosen, rejected, reward_chosen, reward_rejected,
                           confidence, annotator
  OUT/quarantine.parquet/  id, reason, raw
and OUT/report.json (counts, pairs/s, confidence histogram; accuracy against human_choice
overall and by confidence decile when the input has it). --export-uncertain N also writes
the N least-confident pairs, unlabeled, to OUT/uncertain.parquet (one file) for relabeling.
On a multi-node cluster OUT must be on storage every node sees.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from cwpo_ray import calibration
from cwpo_ray.config import ConfigError, option
from cwpo_ray.sources import pair_id, quarantine_id, raw_json
from cwpo_ray.tables import (ANNOTATED_COLUMNS, ANNOTATED_SCHEMA, HUMAN_CHOICE, QUARANTINE_SCHEMA,
                             UNLABELED_SCHEMA, atomic_path, table_files, write_table)

EPILOG = """examples:
  cwpo annotate --data runs/data/hh/unlabeled.parquet --annotator runs/annotator --out runs/annotated
  cwpo annotate --data shards/ --annotator runs/annotator --out runs/annotated --num-actors 8 --cpus-per-actor 2
  cwpo annotate --data u.jsonl --annotator runs/annotator --out runs/a --gpus-per-actor 0.5 --export-uncertain 500
"""

TEXT_FIELDS = ("prompt", "response_a", "response_b")
# What an actor hands to the sink: the annotated columns plus what the sink needs to split,
# report and export (dropped before anything is written).
BATCH_SCHEMA = pa.schema(list(ANNOTATED_SCHEMA) + [
    ("reason", pa.string()), ("raw", pa.string()), ("preferred", pa.string()), (HUMAN_CHOICE, pa.string())])
HIST_BINS = 20


@dataclass
class Config:
    data: str = option(help="unlabeled pairs: a .parquet / .jsonl(.gz) file or a folder of shards", must_exist=True)
    annotator: str = option(help="annotator folder written by `cwpo train-annotator`", must_exist=True)
    out: str = option(help="output folder (annotated.parquet/, quarantine.parquet/, report.json)")
    batch_size: int = option(512, "pairs per actor batch (sorted by length inside it)")
    model_batch_size: int = option(64, "sequences per forward pass")
    num_actors: int = option(2, "actors in the pool (the most it grows to)")
    min_actors: Optional[int] = option(None, "actors the pool starts with and keeps (default: num_actors)")
    cpus_per_actor: float = option(0.5, "CPUs reserved per actor; fractional, so reads and writes still get a CPU")
    gpus_per_actor: float = option(0.0, "GPUs per actor (fractional shares one GPU); > 0 runs the model on CUDA")
    torch_threads: int = option(0, "torch threads per actor (0: max(1, round(cpus_per_actor)))")
    export_uncertain: int = option(0, "also write the N least-confident pairs to OUT/uncertain.parquet")

    def validate(self) -> None:
        for name in ("batch_size", "model_batch_size", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_actors is not None and not 1 <= self.min_actors <= self.num_actors:
            raise ValueError(f"min_actors must be in [1, num_actors={self.num_actors}], got {self.min_actors}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0 or self.torch_threads < 0 or self.export_uncertain < 0:
            raise ValueError("cpus_per_actor, gpus_per_actor, torch_threads and export_uncertain must be >= 0")
        if not self.out.strip():
            raise ValueError("out: an output folder is required")


# ----------------------------------------------------------------------------- rows

def check_pair(row: Any) -> tuple[str, str, str, str, str | None] | str:
    """``(id, prompt, response_a, response_b, human_choice)`` of a good row, else the reason it is bad."""
    if isinstance(row, InvalidJSON):
        return "invalid JSON"
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    texts = []
    for name in TEXT_FIELDS:
        value = row.get(name)
        if value is None:
            return f"missing field: {name}"
        if not isinstance(value, str):
            return f"not a string: {name} ({type(value).__name__})"
        if not value.strip():
            return f"empty field: {name}"
        texts.append(value)
    prompt, a, b = texts
    if a == b:
        return "identical responses"
    rid = row.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = pair_id(prompt, a, b)
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return f"bad id ({type(rid).__name__})"
    choice = row.get(HUMAN_CHOICE)
    choice = choice.strip().lower() if isinstance(choice, str) else None
    return str(rid).strip(), prompt, a, b, choice if choice in ("a", "b") else None


class InvalidJSON(str):
    """A JSONL line that does not parse (kept verbatim for the quarantine)."""


def parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return InvalidJSON(line)


class LabelBatch:
    """Ray Data callable class: loads the annotator once per actor, then labels batch after batch."""

    def __init__(self, annotator_dir: str, jsonl: bool, model_batch_size: int, threads: int, use_gpu: bool):
        import torch

        from cwpo_ray.annotator import load_annotator

        torch.set_num_threads(threads)
        self.annotator = load_annotator(annotator_dir, device="cuda" if use_gpu else "cpu")
        self.name = str(Path(annotator_dir).resolve())
        self.jsonl, self.model_batch_size = jsonl, model_batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if self.jsonl:  # read_text rows: {"text": line}; a line that is not JSON is quarantined, not fatal
            rows = [parse_line(r["text"]) for r in rows]
        checked = [check_pair(r) for r in rows]
        good = [i for i, c in enumerate(checked) if not isinstance(c, str)]
        labels = self.annotator.label_pairs([checked[i][1] for i in good], [checked[i][2] for i in good],
                                            [checked[i][3] for i in good], batch_size=self.model_batch_size
                                            ) if good else {}
        out = {name: [None] * len(rows) for name in BATCH_SCHEMA.names}
        for j, i in enumerate(good):
            rid, prompt, a, b, human = checked[i]
            first = labels["preferred"][j] == "a"
            ra, rb = labels["reward_a"][j], labels["reward_b"][j]
            values = dict(id=rid, prompt=prompt, chosen=a if first else b, rejected=b if first else a,
                          reward_chosen=ra if first else rb, reward_rejected=rb if first else ra,
                          confidence=labels["confidence"][j], annotator=self.name,
                          preferred=labels["preferred"][j], **{HUMAN_CHOICE: human})
            for k, v in values.items():
                out[k][i] = v
        for i, c in enumerate(checked):
            if isinstance(c, str):
                row = rows[i]
                raw = raw_json({"__invalid_json__": str(row)}) if isinstance(row, InvalidJSON) else raw_json(row)
                out["id"][i] = quarantine_id(row, raw)
                out["reason"][i], out["raw"][i] = c, raw
        return pa.Table.from_pydict(out, schema=BATCH_SCHEMA)


# ----------------------------------------------------------------------------- writing

class SplitSink(Datasink):
    """Writes annotated rows and quarantined rows to their own shard folders in one pass.

    Each write task returns small statistics (counts, a confidence histogram, the human
    agreement of each labeled pair, its least-confident pairs); the driver merges them,
    so nothing is read twice and the driver never holds the data.
    """

    def __init__(self, staging: str, keep_uncertain: int):
        self.staging, self.keep_uncertain = staging, keep_uncertain
        self.result: dict | None = None

    def write(self, blocks, ctx) -> dict:
        stats = new_stats()
        writers: dict[str, pq.ParquetWriter] = {}
        part = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            bad = pc.is_valid(table["reason"])
            good_rows, bad_rows = table.filter(pc.invert(bad)), table.filter(bad)
            self._append(writers, "annotated.parquet", part, good_rows.select(ANNOTATED_COLUMNS), ANNOTATED_SCHEMA)
            self._append(writers, "quarantine.parquet", part, bad_rows.select(QUARANTINE_SCHEMA.names),
                         QUARANTINE_SCHEMA)
            add_stats(stats, good_rows, bad_rows, self.keep_uncertain)
        for w in writers.values():
            w.close()
        return stats

    def _append(self, writers, name, part, table, schema):
        if not table.num_rows:
            return
        if name not in writers:
            folder = Path(self.staging) / name
            folder.mkdir(parents=True, exist_ok=True)
            writers[name] = pq.ParquetWriter(folder / part, schema)
        writers[name].write_table(table.cast(schema))

    def on_write_complete(self, write_result) -> None:
        self.result = merge_stats(write_result.write_returns, self.keep_uncertain)

    def get_name(self) -> str:
        return "AnnotatedAndQuarantine"


def new_stats() -> dict:
    return {"annotated": 0, "quarantined": 0, "reasons": Counter(), "confidence_sum": 0.0,
            "histogram": np.zeros(HIST_BINS, dtype=np.int64), "human_conf": [], "human_right": [], "uncertain": []}


def add_stats(stats: dict, good: pa.Table, bad: pa.Table, keep_uncertain: int) -> None:
    conf = good["confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
    stats["annotated"] += good.num_rows
    stats["quarantined"] += bad.num_rows
    stats["reasons"].update(bad["reason"].to_pylist())
    stats["confidence_sum"] += float(conf.sum())
    stats["histogram"] += np.histogram(conf, bins=HIST_BINS, range=(0.0, 1.0))[0]
    human = good[HUMAN_CHOICE].to_pylist()
    preferred = good["preferred"].to_pylist()
    judged = [i for i, h in enumerate(human) if h is not None]
    stats["human_conf"].append(conf[judged].astype(np.float32))
    stats["human_right"].append(np.array([preferred[i] == human[i] for i in judged], dtype=np.int8))
    if keep_uncertain:  # only this block's k least confident can be among the k least confident overall
        rows = good.take(np.argsort(conf, kind="stable")[:keep_uncertain]).to_pylist()
        candidates = stats["uncertain"] + [(r["confidence"], r["id"], r) for r in rows]
        stats["uncertain"] = heapq.nsmallest(keep_uncertain, candidates, key=lambda t: t[:2])


def merge_stats(parts: list[dict], keep_uncertain: int) -> dict:
    total = new_stats()
    for p in parts:
        for key in ("annotated", "quarantined", "confidence_sum"):
            total[key] += p[key]
        total["reasons"].update(p["reasons"])
        total["histogram"] += p["histogram"]
        total["human_conf"] += p["human_conf"]
        total["human_right"] += p["human_right"]
        total["uncertain"] += p["uncertain"]
    total["uncertain"] = heapq.nsmallest(keep_uncertain, total["uncertain"], key=lambda t: t[:2])
    total["human_conf"] = np.concatenate(total["human_conf"]) if total["human_conf"] else np.zeros(0)
    total["human_right"] = np.concatenate(total["human_right"]) if total["human_right"] else np.zeros(0)
    return total


def publish(staging: Path, out: Path) -> None:
    """Each staged folder (made complete with an empty shard if nothing was written) replaces its final name."""
    for name, schema in (("annotated.parquet", ANNOTATED_SCHEMA), ("quarantine.parquet", QUARANTINE_SCHEMA)):
        folder = staging / name
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.parquet")):  # readers need at least one file to know the schema
            pq.write_table(schema.empty_table(), folder / "part-empty.parquet")
        with atomic_path(out / name) as tmp:
            os.rename(folder, tmp)


def uncertain_table(rows: list[dict]) -> pa.Table:
    """The least-confident pairs as an unlabeled table, responses back in their input order."""
    out = []
    for r in rows:
        a, b = (r["chosen"], r["rejected"]) if r["preferred"] == "a" else (r["rejected"], r["chosen"])
        out.append({"id": r["id"], "prompt": r["prompt"], "response_a": a, "response_b": b,
                    HUMAN_CHOICE: r[HUMAN_CHOICE]})
    return pa.Table.from_pylist(out, schema=UNLABELED_SCHEMA)


# ----------------------------------------------------------------------------- reading

def read_input(path: str):
    """A Ray Dataset of the input: Parquet rows, or JSONL lines (parsed by the actors)."""
    import ray.data

    files = [str(f) for f in table_files(path)]
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet and len(parquet) != len(files):
        raise ConfigError(f"data: {path} mixes Parquet and JSONL shards; convert them to one format")
    if parquet:
        return ray.data.read_parquet(parquet), False
    gz = [f for f in files if f.endswith(".gz")]
    plain = [f for f in files if not f.endswith(".gz")]
    parts = ([ray.data.read_text(plain, drop_empty_lines=True)] if plain else []) + (
        [ray.data.read_text(gz, drop_empty_lines=True, arrow_open_stream_args={"compression": "gzip"})] if gz else [])
    return (parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])), True


# ----------------------------------------------------------------------------- the recipe

def build_report(stats: dict, seconds: float, annotator: str) -> dict:
    n = stats["annotated"]
    report = {
        "annotator": annotator,
        "input_rows": n + stats["quarantined"],
        "annotated": n,
        "quarantined": stats["quarantined"],
        "quarantine_reasons": dict(stats["reasons"].most_common()),
        "seconds": round(seconds, 3),
        "pairs_per_second": round(n / seconds, 2) if seconds > 0 else None,
        "mean_confidence": stats["confidence_sum"] / n if n else None,
        "confidence_histogram": {"edges": np.linspace(0, 1, HIST_BINS + 1).round(3).tolist(),
                                 "counts": stats["histogram"].tolist()},
    }
    conf, right = stats["human_conf"], stats["human_right"]
    if len(conf):
        weighted = float((conf * right).sum() / conf.sum()) if conf.sum() > 0 else None
        report["human_agreement"] = {
            "pairs": int(len(conf)), "accuracy": float(right.mean()), "confidence_weighted_accuracy": weighted,
            "by_confidence_decile": calibration.accuracy_by_decile(conf, right)}
    return report


def print_report(report: dict, out: Path) -> None:
    print(f"annotated {report['annotated']} pairs, quarantined {report['quarantined']} "
          f"(of {report['input_rows']} rows) in {report['seconds']:.1f}s: {report['pairs_per_second']} pairs/s")
    for reason, count in report["quarantine_reasons"].items():
        print(f"  quarantine: {count:>8}  {reason}")
    human = report.get("human_agreement")
    if human:
        print(f"agreement with human_choice: {human['accuracy']:.3f} on {human['pairs']} pairs "
              f"(confidence-weighted {human['confidence_weighted_accuracy']})")
        print("  decile  pairs   confidence      accuracy")
        for d in human["by_confidence_decile"]:
            print(f"  {d['decile']:>6} {d['count']:>6}   {d['conf_min']:.3f}-{d['conf_max']:.3f}   {d['accuracy']:.3f}")
    print(f"wrote {out}/annotated.parquet/, {out}/quarantine.parquet/, {out}/report.json")


def run(cfg: Config) -> int:
    import ray.data

    from cwpo_ray.ray_env import init_ray

    init_ray()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".annotate-staging-{uuid.uuid4().hex[:8]}"
    dataset, jsonl = read_input(cfg.data)
    threads = cfg.torch_threads or max(1, round(cfg.cpus_per_actor))
    # Blocks of one batch each, streamed: a Parquet file with one row group is one block, and one
    # block goes to one actor, so without this a single big file kept every other actor idle.
    dataset = dataset.repartition(target_num_rows_per_block=cfg.batch_size)
    labeled = dataset.map_batches(
        LabelBatch, batch_size=cfg.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs=dict(annotator_dir=str(Path(cfg.annotator).resolve()), jsonl=jsonl,
                                   model_batch_size=cfg.model_batch_size, threads=threads,
                                   use_gpu=cfg.gpus_per_actor > 0),
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors or cfg.num_actors, max_size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None)
    sink = SplitSink(str(staging), cfg.export_uncertain)
    start = time.perf_counter()
    try:
        labeled.write_datasink(sink)
        seconds = time.perf_counter() - start
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    stats = sink.result
    if cfg.export_uncertain:
        write_table(uncertain_table([row for _, _, row in stats["uncertain"]]), out / "uncertain.parquet")
    elif (out / "uncertain.parquet").exists():
        (out / "uncertain.parquet").unlink()  # a rerun replaces the whole output, a stale export included
    report = build_report(stats, seconds, str(Path(cfg.annotator).resolve()))
    with atomic_path(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    print_report(report, out)
    return 0
