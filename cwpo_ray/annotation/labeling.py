"""One work unit, labeled inside a Ray Data actor (``LabelUnits``): its rows read, checked,
labeled, and written as unit files with a committed sidecar."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cwpo_ray.tables import (ANNOTATED_COLUMNS, ANNOTATED_SCHEMA, HUMAN_CHOICE, QUARANTINE_SCHEMA, UNLABELED_SCHEMA,
                             durable_replace)
from cwpo_ray.annotation.rows import ENSEMBLE_FIELDS, label_rows
from cwpo_ray.annotation.units import iter_unit_rows
from cwpo_ray.annotation.stats import add_fold_stats, add_stats, new_stats, stats_to_json

UNCERTAIN_SCHEMA = pa.schema(list(UNLABELED_SCHEMA) + [("confidence", pa.float64())])


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
    an attempt before it may have renamed in: never written twice.

    Every rename is durable (tables.durable_replace: content fsynced before, folder after), and
    the data files' renames come before the sidecar is even written: after a crash or a power
    loss, a sidecar on disk names only complete files."""
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
        if good.num_rows and not good["fold_disagreement"].null_count:  # confidence ensemble
            add_fold_stats(stats, *(good[c].to_numpy(zero_copy_only=False) for c in ENSEMBLE_FIELDS))
        if keep_uncertain and good.num_rows:  # only this batch's k least confident can be among the k overall
            best = uncertain_rows(smallest(good, keep_uncertain))
            candidates = best if candidates is None else smallest(pa.concat_tables([candidates, best]), keep_uncertain)
    files = {}
    for kind, writer in writers.items():
        writer.close()
        final = units / f"{key}.{kind}.parquet"
        durable_replace(tmp / f"{key}.{tag}.{kind}.parquet", final)
        files[kind] = {"path": final.name, "rows": stats["annotated" if kind == "annotated" else "quarantined"],
                       "bytes": final.stat().st_size}
    if candidates is not None:
        final = units / f"{key}.uncertain.parquet"
        pq.write_table(candidates, tmp / f"{key}.{tag}.uncertain.parquet")
        durable_replace(tmp / f"{key}.{tag}.uncertain.parquet", final)
        files["uncertain"] = {"path": final.name, "rows": candidates.num_rows, "bytes": final.stat().st_size}
    sidecar = {"unit": unit, "files": files, "stats": stats_to_json(stats), "pid": os.getpid(),
               "seconds": round(time.perf_counter() - began, 3), "started": started}
    (tmp / f"{key}.{tag}.json").write_text(json.dumps(sidecar))
    durable_replace(tmp / f"{key}.{tag}.json", units / f"{key}.json")  # the commit
    return {"key": key, "annotated": stats["annotated"], "quarantined": stats["quarantined"]}


class LabelUnits:
    """Ray Data callable class: loads the annotator once per actor (``confidence`` ensemble: its k fold
    models, ``cwpo_ray.annotation.ensemble``), then labels unit after unit."""

    def __init__(self, annotator_dir: str, work: str, batch_size: int, model_batch_size: int, threads: int,
                 use_gpu: bool, keep_uncertain: int, precision: str = "fp32", confidence: str = "single"):
        import torch

        from cwpo_ray.annotator import load_annotator
        from cwpo_ray.annotation.ensemble import ensemble_name, load_ensemble

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu else "cpu"
        if confidence == "ensemble":
            self.annotator = load_ensemble(annotator_dir, device=device, precision=precision)
            self.name = ensemble_name(annotator_dir, len(self.annotator.members))
        else:
            self.annotator = load_annotator(annotator_dir, device=device, precision=precision)
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
