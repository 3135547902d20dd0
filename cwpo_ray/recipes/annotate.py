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
--max-bytes-per-file bytes each) that replaces the previous one in one rename:
  OUT/annotated.parquet/   id, prompt, chosen, rejected, reward_chosen, reward_rejected,
                           confidence, annotator, confidence_raw
  OUT/quarantine.parquet/  id, reason, raw
and OUT/report.json (counts, pairs/s, confidence histogram; accuracy against human_choice
overall and by confidence decile when the input has it: the deciles are cut at the edges of
a fixed log-scale histogram, so they are approximate, and the report says so). --export-uncertain
N also writes the N least-confident pairs, unlabeled, to OUT/uncertain.parquet (one file) for
relabeling. On a multi-node cluster DATA and OUT must be on storage every node sees.

A killed run resumes: run the same command again. How (and why not Ray Data's checkpoints):
the input is cut into deterministic work units (a Parquet file's row groups, or a byte range
of lines of a JSONL file, about --unit-rows rows each, fewer for an input under 16 x --unit-rows
rows so that it still makes 16 units and every actor gets work; a .gz file is one unit). An actor
labels a whole unit, writes its annotated / quarantine rows and a small JSON sidecar of its
statistics into OUT/.annotate-work/units/, and the sidecar, renamed into place last, commits
the unit. A rerun whose input files (paths, sizes, mtimes), annotator folder (file sizes,
mtimes) and output-changing settings (unit_rows, export_uncertain, precision) match the fingerprint
in OUT/.annotate-work/ skips the committed units; otherwise it starts over and says so. The
fingerprint holds the precision the actors run in (auto resolved), so a resumed run never mixes
fp32 and bf16 units: a run resumed with auto on a machine where it resolves otherwise starts over.
When every unit is committed the unit files are rewritten into the final files (one Ray task
per output file) and the report is merged from the sidecars, so it covers the killed run's
rows too; then the work folder is removed. Ray Data's CheckpointConfig was not used: it
keeps every checkpointed id in memory (the driver would grow with the corpus) and needs
the id column at read time, while JSONL ids are parsed and derived inside the actors.
The driver holds only the list of units and fixed-size statistics: its memory does not
grow with the number of rows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cwpo_ray.config import ConfigError, option
from cwpo_ray.sources import pair_id, quarantine_id, raw_json
from cwpo_ray.tables import (ANNOTATED_COLUMNS, ANNOTATED_SCHEMA, HUMAN_CHOICE, QUARANTINE_SCHEMA,
                             UNLABELED_SCHEMA, atomic_path, table_files, write_table)

EPILOG = """examples:
  cwpo annotate --data runs/data/hh/unlabeled.parquet --annotator runs/annotator --out runs/annotated
  cwpo annotate --data shards/ --annotator runs/annotator --out runs/annotated --num-actors 8 --cpus-per-actor 2
  cwpo annotate --data u.jsonl --annotator runs/annotator --out runs/a --gpus-per-actor 0.5 --export-uncertain 500
A killed run resumes where it stopped when the same command is run again.
"""

TEXT_FIELDS = ("prompt", "response_a", "response_b")
# What labeling a batch gives: the annotated columns plus what is needed to split, report
# and export (dropped before anything is written).
BATCH_SCHEMA = pa.schema(list(ANNOTATED_SCHEMA) + [
    ("reason", pa.string()), ("raw", pa.string()), ("preferred", pa.string()), (HUMAN_CHOICE, pa.string())])
UNCERTAIN_SCHEMA = pa.schema(list(UNLABELED_SCHEMA) + [("confidence", pa.float64())])
HIST_BINS = 20
# Agreement with human_choice by confidence: a fixed histogram, log-spaced from 1e-6 to 1
# (a relative width of ~1.4% per bin), so memory does not grow with the pairs; the deciles
# are cut at its bin edges.
AGREE_BINS, AGREE_LOG_MIN = 1024, -6.0
WORK = ".annotate-work"
# cwpo_ray.annotator.PRECISION_CHOICES, spelled out so that parsing the options does not import torch
# (tests/test_annotator.py checks that the two agree)
PRECISION_CHOICES = ("auto", "fp32", "bf16")
FINAL_NAMES = ("annotated.parquet", "quarantine.parquet", "uncertain.parquet", "report.json")


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

    def validate(self) -> None:
        super().validate()
        if not self.out.strip():
            raise ValueError("out: an output folder is required")


# ----------------------------------------------------------------------------- rows

def check_pair(row: Any) -> tuple[str, str, str, str, str | None] | str:
    """``(id, prompt, response_a, response_b, human_choice)`` of a good row, else the reason it is bad.
    The field and id checks are `cwpo data`'s own (sources.py), so both stages refuse the same rows."""
    from cwpo_ray.sources import BadRow, source_id, text_field

    if isinstance(row, InvalidJSON):
        return "invalid JSON"
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    try:
        prompt, a, b = (text_field(row, name) for name in TEXT_FIELDS)
        rid = source_id(row)
    except BadRow as e:
        return str(e)
    if a == b:
        return "identical responses"
    choice = row.get(HUMAN_CHOICE)
    choice = choice.strip().lower() if isinstance(choice, str) else None
    return rid or pair_id(prompt, a, b), prompt, a, b, choice if choice in ("a", "b") else None


class InvalidJSON(str):
    """A JSONL line that does not parse (kept verbatim for the quarantine)."""


def parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return InvalidJSON(line)


def label_rows(annotator, name: str, rows: list, model_batch_size: int) -> pa.Table:
    """One batch of input rows (dicts, or InvalidJSON lines) as a BATCH_SCHEMA table, in input order."""
    checked = [check_pair(r) for r in rows]
    good = [i for i, c in enumerate(checked) if not isinstance(c, str)]
    labels = annotator.label_pairs([checked[i][1] for i in good], [checked[i][2] for i in good],
                                   [checked[i][3] for i in good], batch_size=model_batch_size) if good else {}
    out = {col: [None] * len(rows) for col in BATCH_SCHEMA.names}
    for j, i in enumerate(good):
        rid, prompt, a, b, human = checked[i]
        first = labels["preferred"][j] == "a"
        ra, rb = labels["reward_a"][j], labels["reward_b"][j]
        values = dict(id=rid, prompt=prompt, chosen=a if first else b, rejected=b if first else a,
                      reward_chosen=ra if first else rb, reward_rejected=rb if first else ra,
                      confidence=labels["confidence"][j], confidence_raw=labels["confidence_raw"][j], annotator=name,
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


# ----------------------------------------------------------------------------- work units

def parquet_ranges(row_group_rows: list[int], unit_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) of a Parquet file: whole row groups merged up to ``unit_rows``,
    a row group larger than that cut into near-equal pieces (each piece decodes its group again)."""
    ranges, start, cur = [], 0, 0
    pos = 0
    for n in row_group_rows:
        if n > unit_rows:
            if cur:
                ranges.append((start, pos))
            pieces = -(-n // unit_rows)
            cuts = [pos + (n * k) // pieces for k in range(pieces + 1)]
            ranges += list(zip(cuts[:-1], cuts[1:]))
            start, cur = pos + n, 0
        elif cur + n > unit_rows:
            ranges.append((start, pos))
            start, cur = pos, n
        else:
            cur += n
        pos += n
    if cur:
        ranges.append((start, pos))
    return [r for r in ranges if r[1] > r[0]]


def byte_ranges(size: int, sample: bytes, unit_rows: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of a JSONL file of ``size`` bytes, sized for about ``unit_rows``
    lines from the mean line length of ``sample`` (its first bytes); a line belongs to the range
    its first byte is in."""
    if size <= 0:
        return []
    line_bytes = len(sample) / max(1, sample.count(b"\n")) if sample else 1.0
    step = max(1, int(unit_rows * line_bytes))
    return [(s, min(s + step, size)) for s in range(0, size, step)]


# A small input is still cut into at least MIN_UNITS units (of at least MIN_UNIT_ROWS rows), so that
# every actor of a pool gets work: a 10k-pair file under the default unit_rows was one unit, which
# one actor labeled while the others idled. 16 divides evenly over 1, 2, 4, 8 and 16 actors.
MIN_UNITS, MIN_UNIT_ROWS = 16, 256


def balanced_unit_rows(total_rows: int, unit_rows: int, min_units: int = MIN_UNITS,
                       min_unit_rows: int = MIN_UNIT_ROWS) -> int:
    """Rows per unit: ``unit_rows``, lowered for a small input to about total / min_units
    (never below ``min_unit_rows``, never above ``unit_rows``). Depends on the input only, not on
    the actor count, so a rerun with other resources plans the same units and resumes."""
    return max(1, min(unit_rows, max(min_unit_rows, -(-total_rows // min_units))))


def plan_units(files: list[Path], unit_rows: int) -> list[dict]:
    """The deterministic work units of the input files (same files and unit_rows, same units)."""
    # first pass: rows per file (Parquet metadata; JSONL estimated from its first MiB)
    layout, total = [], 0
    for f in files:
        if f.name.endswith(".parquet"):
            meta = pq.ParquetFile(f).metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            layout.append(("parquet", groups))
            total += sum(groups)
        elif f.name.endswith(".gz"):
            layout.append(("jsonl.gz", None))  # gzip cannot seek: one unit
        else:
            with open(f, "rb") as fh:
                sample = fh.read(2**20)
            size = f.stat().st_size
            layout.append(("jsonl", (size, sample)))
            total += int(size / (len(sample) / max(1, sample.count(b"\n")))) if sample else 0
    rows = balanced_unit_rows(total, unit_rows)
    units = []
    for k, (f, (kind, info)) in enumerate(zip(files, layout)):
        if kind == "parquet":
            spans = parquet_ranges(info, rows)
        elif kind == "jsonl.gz":
            spans = [(0, -1)]
        else:
            spans = byte_ranges(info[0], info[1], rows)
        for start, end in spans:
            units.append({"key": f"f{k:05d}-{max(start, 0):014d}", "path": str(f), "kind": kind,
                          "start": start, "end": end})
    return units


def iter_unit_rows(unit: dict, batch_size: int) -> Iterator[list]:
    """The rows of a unit in batches: dicts for Parquet, parsed lines (or InvalidJSON) for JSONL."""
    if unit["kind"] == "parquet":
        pf = pq.ParquetFile(unit["path"])
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.cumsum([0] + sizes)
        groups = [g for g, n in enumerate(sizes) if starts[g] < unit["end"] and starts[g] + n > unit["start"]]
        if not groups:
            return
        # row positions relative to the first row group read
        start, end, pos = unit["start"] - starts[groups[0]], unit["end"] - starts[groups[0]], 0
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups):
            lo, hi = max(start - pos, 0), min(end - pos, batch.num_rows)
            pos += batch.num_rows
            if hi > lo:
                yield batch.slice(lo, hi - lo).to_pylist()
            if pos >= end:
                return
        return
    lines = []
    for line in _unit_lines(unit):
        if line.strip():  # blank lines are not rows (as `cwpo data` reads JSONL)
            lines.append(parse_line(line))
            if len(lines) >= batch_size:
                yield lines
                lines = []
    if lines:
        yield lines


def _unit_lines(unit: dict) -> Iterator[str]:
    if unit["kind"] == "jsonl.gz":
        with gzip.open(unit["path"], "rb") as fh:
            for raw in fh:
                yield raw.decode("utf-8", errors="replace").rstrip("\r\n")
        return
    start, end = unit["start"], unit["end"]
    with open(unit["path"], "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line under way belongs to the previous range
        while fh.tell() < end:
            raw = fh.readline()
            if not raw:
                break
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


# ----------------------------------------------------------------------------- statistics (pure)

def new_stats() -> dict:
    return {"annotated": 0, "quarantined": 0, "reasons": Counter(), "confidence_sum": 0.0,
            "histogram": np.zeros(HIST_BINS, dtype=np.int64),
            "agree_n": np.zeros(AGREE_BINS, dtype=np.int64), "agree_right": np.zeros(AGREE_BINS, dtype=np.int64),
            "agree_sum": np.zeros(AGREE_BINS), "agree_right_conf": np.zeros(AGREE_BINS),
            "agree_min": np.full(AGREE_BINS, np.inf), "agree_max": np.full(AGREE_BINS, -np.inf)}


def agree_bin(conf: np.ndarray) -> np.ndarray:
    """Bin of each confidence in the log-spaced agreement histogram (below 1e-6: bin 0)."""
    with np.errstate(divide="ignore"):
        logs = np.log10(np.maximum(conf, 1e-300))
    idx = np.floor((logs - AGREE_LOG_MIN) / -AGREE_LOG_MIN * AGREE_BINS).astype(np.int64)
    return np.clip(idx, 0, AGREE_BINS - 1)


def add_stats(stats: dict, conf: np.ndarray, reasons: list[str], right: np.ndarray, judged_conf: np.ndarray) -> None:
    """Fold one batch in: confidences of its annotated pairs, reasons of its quarantined rows, and
    for the pairs with a human_choice their confidence and whether the annotator agreed (1/0)."""
    stats["annotated"] += len(conf)
    stats["quarantined"] += len(reasons)
    stats["reasons"].update(reasons)
    stats["confidence_sum"] += float(conf.sum())
    stats["histogram"] += np.histogram(conf, bins=HIST_BINS, range=(0.0, 1.0))[0]
    if len(judged_conf):
        idx = agree_bin(judged_conf)
        np.add.at(stats["agree_n"], idx, 1)
        np.add.at(stats["agree_right"], idx, right.astype(np.int64))
        np.add.at(stats["agree_sum"], idx, judged_conf)
        np.add.at(stats["agree_right_conf"], idx, judged_conf * right)
        np.minimum.at(stats["agree_min"], idx, judged_conf)
        np.maximum.at(stats["agree_max"], idx, judged_conf)


def merge_stats(total: dict, part: dict) -> None:
    for key in ("annotated", "quarantined", "confidence_sum"):
        total[key] += part[key]
    total["reasons"].update(part["reasons"])
    for key in ("histogram", "agree_n", "agree_right", "agree_sum", "agree_right_conf"):
        total[key] += part[key]
    total["agree_min"] = np.minimum(total["agree_min"], part["agree_min"])
    total["agree_max"] = np.maximum(total["agree_max"], part["agree_max"])


def stats_to_json(stats: dict) -> dict:
    """A sidecar's statistics: the agreement histogram stored sparse (its non-empty bins only)."""
    nz = np.flatnonzero(stats["agree_n"])
    return {"annotated": stats["annotated"], "quarantined": stats["quarantined"],
            "reasons": dict(stats["reasons"]), "confidence_sum": stats["confidence_sum"],
            "histogram": stats["histogram"].tolist(),
            "agreement": {"bin": nz.tolist(), **{k: stats[f"agree_{k}"][nz].tolist()
                                                 for k in ("n", "right", "sum", "right_conf", "min", "max")}}}


def stats_from_json(d: dict) -> dict:
    stats = new_stats()
    stats.update(annotated=d["annotated"], quarantined=d["quarantined"], confidence_sum=d["confidence_sum"],
                 reasons=Counter(d["reasons"]), histogram=np.array(d["histogram"], dtype=np.int64))
    nz = np.array(d["agreement"]["bin"], dtype=np.int64)
    for k in ("n", "right", "sum", "right_conf", "min", "max"):
        stats[f"agree_{k}"][nz] = d["agreement"][k]
    return stats


def deciles_from_histogram(n: np.ndarray, right: np.ndarray, conf_sum: np.ndarray, cmin: np.ndarray,
                           cmax: np.ndarray, groups: int = 10) -> list[dict]:
    """Approximate confidence deciles: whole bins, in confidence order, assigned to the group their
    middle pair falls in; counts, accuracy, mean and range are exact for the groups so cut."""
    total = int(n.sum())
    if not total:
        return []
    nz = np.flatnonzero(n)
    before = np.cumsum(n[nz]) - n[nz]
    group = np.minimum(((before + n[nz] / 2) * groups // total).astype(np.int64), groups - 1)
    out = []
    for g in range(groups):
        bins = nz[group == g]
        if not bins.size:
            continue
        count = int(n[bins].sum())
        out.append({"decile": g + 1, "count": count, "conf_min": float(cmin[bins].min()),
                    "conf_max": float(cmax[bins].max()), "mean_confidence": float(conf_sum[bins].sum() / count),
                    "accuracy": float(right[bins].sum() / count)})
    return out


# ----------------------------------------------------------------------------- one unit (inside an actor)

def smallest(table: pa.Table, k: int) -> pa.Table:
    """The ``k`` least confident rows (ties by id), as heapq.nsmallest on (confidence, id) would pick."""
    if table.num_rows <= k:
        return table
    return table.sort_by([("confidence", "ascending"), ("id", "ascending")]).slice(0, k)


def uncertain_rows(good: pa.Table) -> pa.Table:
    """Annotated rows back as unlabeled pairs (responses in their input order) with their confidence."""
    first = pc.equal(good["preferred"], "a")
    return pa.table({"id": good["id"], "prompt": good["prompt"],
                     "response_a": pc.if_else(first, good["chosen"], good["rejected"]),
                     "response_b": pc.if_else(first, good["rejected"], good["chosen"]),
                     HUMAN_CHOICE: good[HUMAN_CHOICE], "confidence": good["confidence"]}, schema=UNCERTAIN_SCHEMA)


def annotate_unit(unit: dict, work: Path, label: Callable[[list], pa.Table], batch_size: int,
                  keep_uncertain: int) -> dict:
    """Label one unit into temporary files, rename them into ``work/units/`` and commit the unit
    by renaming its sidecar in last. Names are the unit's own, so a retried unit replaces what
    an attempt before it may have renamed in: never written twice."""
    units, tmp = work / "units", work / "tmp"
    units.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    key, tag, began, started = unit["key"], uuid.uuid4().hex[:8], time.perf_counter(), time.time()
    writers: dict[str, pq.ParquetWriter] = {}
    stats, candidates = new_stats(), None
    for rows in iter_unit_rows(unit, batch_size):
        table = label(rows)
        bad = pc.is_valid(table["reason"])
        good, quarantined = table.filter(pc.invert(bad)), table.filter(bad)
        for kind, part, schema in (("annotated", good.select(ANNOTATED_COLUMNS), ANNOTATED_SCHEMA),
                                   ("quarantine", quarantined.select(QUARANTINE_SCHEMA.names), QUARANTINE_SCHEMA)):
            if part.num_rows:
                if kind not in writers:
                    writers[kind] = pq.ParquetWriter(tmp / f"{key}.{tag}.{kind}.parquet", schema)
                writers[kind].write_table(part.cast(schema))
        conf = good["confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
        human = good[HUMAN_CHOICE]
        judged = pc.is_valid(human).to_numpy(zero_copy_only=False)
        right = (pc.fill_null(pc.equal(good["preferred"], human), False).to_numpy(zero_copy_only=False)
                 [judged].astype(np.int64))
        add_stats(stats, conf, quarantined["reason"].to_pylist(), right, conf[judged])
        if keep_uncertain and good.num_rows:  # only this batch's k least confident can be among the k overall
            best = uncertain_rows(smallest(good, keep_uncertain))
            candidates = best if candidates is None else smallest(pa.concat_tables([candidates, best]), keep_uncertain)
    files = {}
    for kind, writer in writers.items():
        writer.close()
        final = units / f"{key}.{kind}.parquet"
        os.replace(tmp / f"{key}.{tag}.{kind}.parquet", final)
        files[kind] = {"path": final.name, "rows": stats["annotated" if kind == "annotated" else "quarantined"],
                       "bytes": final.stat().st_size}
    if candidates is not None:
        final = units / f"{key}.uncertain.parquet"
        pq.write_table(candidates, tmp / f"{key}.{tag}.uncertain.parquet")
        os.replace(tmp / f"{key}.{tag}.uncertain.parquet", final)
        files["uncertain"] = {"path": final.name, "rows": candidates.num_rows, "bytes": final.stat().st_size}
    sidecar = {"unit": unit, "files": files, "stats": stats_to_json(stats), "pid": os.getpid(),
               "seconds": round(time.perf_counter() - began, 3), "started": started}
    (tmp / f"{key}.{tag}.json").write_text(json.dumps(sidecar))
    os.replace(tmp / f"{key}.{tag}.json", units / f"{key}.json")
    return {"key": key, "annotated": stats["annotated"], "quarantined": stats["quarantined"]}


class LabelUnits:
    """Ray Data callable class: loads the annotator once per actor, then labels unit after unit."""

    def __init__(self, annotator_dir: str, work: str, batch_size: int, model_batch_size: int, threads: int,
                 use_gpu: bool, keep_uncertain: int, precision: str = "fp32"):
        import torch

        from cwpo_ray.annotator import load_annotator

        torch.set_num_threads(threads)
        self.annotator = load_annotator(annotator_dir, device="cuda" if use_gpu else "cpu", precision=precision)
        self.name = str(Path(annotator_dir).resolve())
        self.work, self.batch_size, self.model_batch_size = Path(work), batch_size, model_batch_size
        self.keep_uncertain = keep_uncertain

    def label(self, rows: list) -> pa.Table:
        return label_rows(self.annotator, self.name, rows, self.model_batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = [annotate_unit(json.loads(u), self.work, self.label, self.batch_size, self.keep_uncertain)
                for u in batch["unit"].to_pylist()]
        return pa.Table.from_pylist(done, schema=pa.schema([("key", pa.string()), ("annotated", pa.int64()),
                                                            ("quarantined", pa.int64())]))


# ----------------------------------------------------------------------------- output files

def plan_files(sizes: list[tuple[int, int]], max_rows: int, max_bytes: int) -> list[list[int]]:
    """Unit files (rows, bytes) packed in order into groups of at most ``max_rows`` rows and
    ``max_bytes`` bytes; a unit file over a limit is a group of its own (its task splits it)."""
    groups, rows, size = [], 0, 0
    for i, (r, b) in enumerate(sizes):
        if groups and groups[-1] and rows + r <= max_rows and size + b <= max_bytes:
            groups[-1].append(i)
            rows, size = rows + r, size + b
        else:
            groups.append([i])
            rows, size = r, b
    return groups


def write_files(sources: list[str], folder: str, prefix: str, schema: pa.Schema, max_rows: int,
                max_bytes: int) -> list[int]:
    """Stream ``sources`` (Parquet files) into ``folder/prefix-NNN.parquet`` files of at most
    ``max_rows`` rows and about ``max_bytes`` bytes (a file is closed before the next row group
    would take it past the limit, judged by the bytes per row written so far). Returns rows per file.

    Our own writer, not Ray Data's: write_parquet's min_rows_per_file / Datasink min_rows_per_write
    only set a floor on rows (no ceiling on rows or bytes), and a whole-dataset repartition would
    keep every block's metadata in the driver; here the unit files are already on disk, counted."""
    counts: list[int] = []
    state = {"writer": None, "sink": None, "rows": 0}
    chunk_rows, row_bytes = min(65_536, max_rows), None

    def close():
        if state["writer"] is not None:
            state["writer"].close()
            state["sink"].close()
            counts.append(state["rows"])
            state.update(writer=None, sink=None, rows=0)

    def write(table: pa.Table):
        nonlocal row_bytes, chunk_rows
        while table.num_rows:
            if state["writer"] is not None and (
                    state["rows"] >= max_rows or (row_bytes is not None and state["sink"].tell()
                                                  + row_bytes * min(table.num_rows, chunk_rows) > max_bytes)):
                close()
            if state["writer"] is None:
                state["sink"] = pa.OSFile(str(Path(folder) / f"{prefix}-{len(counts):03d}.parquet"), "wb")
                state["writer"] = pq.ParquetWriter(state["sink"], schema)
            take = min(table.num_rows, max_rows - state["rows"], chunk_rows)
            before = state["sink"].tell()
            state["writer"].write_table(table.slice(0, take), row_group_size=take)
            state["rows"] += take
            row_bytes = (state["sink"].tell() - before) / take  # the last row group's, so the estimate follows the data
            chunk_rows = max(1, min(chunk_rows, int(max_bytes / 4 / row_bytes)))
            table = table.slice(take)

    pending: list[pa.Table] = []
    pending_rows = 0
    for src in sources:
        for batch in pq.ParquetFile(src).iter_batches(batch_size=8192):
            if row_bytes is None and batch.num_rows:  # until a row group is written: its size in memory
                chunk_rows = max(1, min(chunk_rows, int(max_bytes / 4 / (batch.nbytes / batch.num_rows))))
            pending.append(pa.Table.from_batches([batch]).cast(schema))
            pending_rows += batch.num_rows
            if pending_rows >= chunk_rows:
                write(pa.concat_tables(pending).combine_chunks())
                pending, pending_rows = [], 0
    if pending:
        write(pa.concat_tables(pending).combine_chunks())
    close()
    return counts


def merge_uncertain(sources: list[str], k: int) -> pa.Table:
    """The ``k`` least-confident pairs of all units' candidates (memory: about 2k rows)."""
    best = UNCERTAIN_SCHEMA.empty_table()
    for src in sources:
        best = smallest(pa.concat_tables([best, pq.read_table(src).cast(UNCERTAIN_SCHEMA)]), k)
    return best.select(UNLABELED_SCHEMA.names).cast(UNLABELED_SCHEMA)


# ----------------------------------------------------------------------------- resume

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


def fingerprint(cfg: Config, files: list[Path]) -> dict:
    """What the committed units depend on: input files, annotator files, output-changing settings
    (the precision as the actors run it: auto resolved).

    Batch sizes, actor counts, the device and the output file limits are left out: they change
    how the work is done (batch sizes and device the last float digits), not which rows a unit holds."""
    precision = actor_precision(cfg)
    annotator = Path(cfg.annotator).resolve()
    ann = sorted((str(p.relative_to(annotator)), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in annotator.rglob("*") if p.is_file())
    return {"input": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            "annotator": [str(annotator)] + [list(a) for a in ann],
            # precision only when not fp32: a work folder of a run before the setting existed (fp32) still resumes
            "settings": {"unit_rows": cfg.unit_rows, "export_uncertain": cfg.export_uncertain,
                         **({"precision": precision} if precision != "fp32" else {})}}


def digest(part: Any) -> str:
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=list).encode()).hexdigest()[:16]


def prepare_work(out: Path, fp: dict) -> tuple[Path, str]:
    """The work folder for this fingerprint: kept (resume) when it matches, else cleared.
    Also removes what a killed run leaves behind (staging, temporaries)."""
    for pattern in [".annotate-staging-*"] + [f".{n}.tmp-*" for n in FINAL_NAMES] + [f".{n}.old-*" for n in FINAL_NAMES]:
        for p in out.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    work = out / WORK
    want = {k: digest(v) for k, v in fp.items()}
    marker = work / "fingerprint.json"
    note = "fresh"
    if marker.exists():
        try:
            had = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            had = {}
        if had == want:
            note = "resume"
        else:
            changed = [k for k in want if had.get(k) != want[k]] or ["fingerprint"]
            note = f"starting over: the unfinished run in {work} was for another {' / '.join(changed)}"
            shutil.rmtree(work)
    elif work.exists():
        shutil.rmtree(work)
    for p in (work / "tmp", *work.glob("publish-*")):
        shutil.rmtree(p, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "units").mkdir(exist_ok=True)
    if note != "resume":
        marker.write_text(json.dumps(want))
    return work, note


def committed(work: Path) -> Iterator[dict]:
    """The sidecars of the committed units, in unit order."""
    for p in sorted((work / "units").glob("*.json")):
        yield json.loads(p.read_text())


# ----------------------------------------------------------------------------- reading the input

def input_files(path: str) -> list[Path]:
    files = table_files(path)
    parquet = [f for f in files if f.name.endswith(".parquet")]
    if parquet and len(parquet) != len(files):
        raise ConfigError(f"data: {path} mixes Parquet and JSONL shards; convert them to one format")
    return files


# ----------------------------------------------------------------------------- the recipe

def build_report(stats: dict, seconds: float, annotator: str, run_info: dict) -> dict:
    n = stats["annotated"]
    this_run = run_info["annotated_this_run"]
    report = {
        "annotator": annotator,
        "input_rows": n + stats["quarantined"],
        "annotated": n,
        "quarantined": stats["quarantined"],
        "quarantine_reasons": dict(stats["reasons"].most_common()),
        "seconds": round(seconds, 3),
        # over the pairs this run labeled (a resumed run labels only what the killed one had not committed)
        "pairs_per_second": round(this_run / seconds, 2) if seconds > 0 else None,
        "mean_confidence": stats["confidence_sum"] / n if n else None,
        "confidence_histogram": {"edges": np.linspace(0, 1, HIST_BINS + 1).round(3).tolist(),
                                 "counts": stats["histogram"].tolist()},
        **run_info,
    }
    judged = int(stats["agree_n"].sum())
    if judged:
        csum = float(stats["agree_sum"].sum())
        report["human_agreement"] = {
            "pairs": judged, "accuracy": float(stats["agree_right"].sum() / judged),
            "confidence_weighted_accuracy": float(stats["agree_right_conf"].sum() / csum) if csum > 0 else None,
            "by_confidence_decile": deciles_from_histogram(stats["agree_n"], stats["agree_right"],
                                                           stats["agree_sum"], stats["agree_min"], stats["agree_max"]),
            "deciles_approximate": True,
            "deciles_note": (f"groups are whole bins of a {AGREE_BINS}-bin log-spaced confidence histogram "
                             f"(1e-6 to 1), so their sizes are only near-equal; count, accuracy, mean and "
                             f"range of each group are exact")}
    return report


def print_report(report: dict, out: Path) -> None:
    print(f"annotated {report['annotated']} pairs, quarantined {report['quarantined']} "
          f"(of {report['input_rows']} rows) in {report['seconds']:.1f}s: {report['pairs_per_second']} pairs/s"
          + (f", {report['precision']}" if report.get("precision") else "")
          + (f" ({report['annotated_this_run']} labeled by this run, {report['resumed_units']} units resumed)"
             if report.get("resumed_units") else ""))
    for reason, count in report["quarantine_reasons"].items():
        print(f"  quarantine: {count:>8}  {reason}")
    human = report.get("human_agreement")
    if human:
        print(f"agreement with human_choice: {human['accuracy']:.3f} on {human['pairs']} pairs "
              f"(confidence-weighted {human['confidence_weighted_accuracy']})")
        print("  decile  pairs   confidence      accuracy   (approximate deciles: whole histogram bins)")
        for d in human["by_confidence_decile"]:
            print(f"  {d['decile']:>6} {d['count']:>6}   {d['conf_min']:.3f}-{d['conf_max']:.3f}   {d['accuracy']:.3f}")
    files = report.get("output_files", {})
    print(f"wrote {out}/annotated.parquet/ ({files.get('annotated', '?')} files), {out}/quarantine.parquet/ "
          f"({files.get('quarantine', '?')} files), {out}/report.json")


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
                                   keep_uncertain=cfg.export_uncertain, precision=cfg.precision),
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


def publish_outputs(cfg: Config, work: Path, out: Path) -> tuple[dict, dict, int]:
    """Merge the sidecars, rewrite the unit files into the final tables and publish them.
    Returns (merged statistics, files per table, units)."""
    import ray

    stats, parts = new_stats(), {"annotated": [], "quarantine": [], "uncertain": []}
    n_units = 0
    for side in committed(work):
        n_units += 1
        merge_stats(stats, stats_from_json(side["stats"]))
        for kind, f in side["files"].items():
            parts[kind].append((str(work / "units" / f["path"]), f["rows"], f["bytes"]))
    staging = work / f"publish-{uuid.uuid4().hex[:8]}"
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
    publish(staging, out)
    if uncertain is not None:
        write_table(ray.get(uncertain), out / "uncertain.parquet")
    elif (out / "uncertain.parquet").exists():
        (out / "uncertain.parquet").unlink()  # a rerun replaces the whole output, a stale export included
    return stats, files, n_units


def publish(staging: Path, out: Path) -> None:
    """Each staged folder (made complete with an empty shard if nothing was written) replaces its final name."""
    for name, schema in (("annotated.parquet", ANNOTATED_SCHEMA), ("quarantine.parquet", QUARANTINE_SCHEMA)):
        folder = staging / name
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.parquet")):  # readers need at least one file to know the schema
            pq.write_table(schema.empty_table(), folder / "part-empty.parquet")
        with atomic_path(out / name) as tmp:
            os.rename(folder, tmp)


def run(cfg: Config) -> int:
    from cwpo_ray.ray_env import init_ray

    init_ray()
    # auto resolved once: the fingerprint, the actors and report.json's settings all get fp32 or bf16
    requested, cfg = cfg.precision, replace(cfg, precision=actor_precision(cfg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = input_files(cfg.data)
    work, note = prepare_work(out, fingerprint(cfg, files))
    units = plan_units(files, cfg.unit_rows)
    done = {side["unit"]["key"] for side in committed(work)}
    todo = [u for u in units if u["key"] not in done]
    if note == "resume":
        print(f"annotate: resuming: {len(done)} of {len(units)} units already committed in {work}", flush=True)
    elif note != "fresh":
        print(f"annotate: {note}", flush=True)
    start, start_wall = time.perf_counter(), time.time()
    annotated_now = label_units(cfg, todo, work) if todo else 0
    labeled_at = time.perf_counter()
    # start-up: from the job's start to the first unit this run began labeling (Ray Data's plan,
    # actors importing torch and loading the annotator); wall clock, as the actors' sidecars record it
    began = [side["started"] for side in committed(work) if side.get("started", 0) >= start_wall]
    stats, out_files, n_units = publish_outputs(cfg, work, out)
    seconds = time.perf_counter() - start
    if n_units != len(units):
        raise RuntimeError(f"{n_units} units committed of {len(units)}; rerun to finish")
    report = build_report(stats, seconds, str(Path(cfg.annotator).resolve()), {
        "annotated_this_run": annotated_now, "units": len(units), "resumed_units": len(done),
        "label_seconds": round(labeled_at - start, 3), "write_seconds": round(seconds - (labeled_at - start), 3),
        "startup_seconds": round(min(began) - start_wall, 3) if began else None,
        "precision": cfg.precision, "precision_requested": requested,
        "output_files": out_files, "settings": asdict(Settings(**{k: getattr(cfg, k) for k in
                                                                 Settings.__dataclass_fields__}))})
    with atomic_path(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print_report(report, out)
    return 0
