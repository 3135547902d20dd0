"""The policy's training table: the kept pairs with their weights, written once by the driver, and
which rows each worker trains on at each step, read by row index in bounded memory.

Data path (memory does not grow with the number of pairs, in the driver or a worker): the
driver streams PAIRS into DIR/train_pairs.parquet in row groups of 1024 rows (topk:F by an exact
histogram threshold, no sort of the table); each worker reads, per micro-batch, only the row
groups its rows fall in (``BatchReader``), and the reference log-probs are a table of the same
rows in the same row groups, joined per micro-batch by row index (no gather between workers).
Which rows a worker trains on at a step is ``cwpo_ray.step_plan.StepPlan``: the epoch's seeded
permutation of the rows, so a resumed run, on any worker, reads the same rows. Why not Ray Data (``datasets=`` /
``get_dataset_shard``): its streaming split hands each worker the blocks that come, in an order
that depends on timing, and resuming mid-epoch would mean replaying the stream; training here
needs "rows P..Q of epoch E's order on rank R", deterministic, which is random access by row
index, and Parquet row groups give that with only a footer in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PAIR_SCHEMA_FIELDS = [("id", "string"), ("prompt", "string"), ("chosen", "string"), ("rejected", "string"),
                      ("weight", "float64")]
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")


def arrow_schema(fields):
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(kind)) for name, kind in fields])


def write_train_pairs(cfg, path: Path) -> int:
    """``cfg`` (train-policy's Config)'s kept pairs with their weight column, streamed into row groups of ``ROW_GROUP`` rows;
    returns how many. Memory: one input row group (a batch of 65,536 rows for JSONL) and one output
    row group, whatever the table's size.

    topk:F keeps the ceil(F * n) most confident pairs, ties broken by row order (as
    ``weighting.pair_weights``): ``topk_selection`` finds the threshold confidence and how many
    rows equal to it are kept, with a fixed-size histogram pass per 16 bits of the values (at most
    4 passes over the confidence column), then one pass writes the kept rows in input order.
    """
    import numpy as np
    import pyarrow as pa

    from cwpo_ray.rowstore import ROW_GROUP, RowWriter, iter_column_batches, topk_keep, topk_selection
    from cwpo_ray.tables import LABELED_COLUMNS, require_columns
    from cwpo_ray.weighting import confidence_column, parse_weighting

    names = require_columns(cfg.data, LABELED_COLUMNS)
    column = confidence_column(cfg.weighting)  # confidence, or confidence_raw (the cw_raw arm)
    annotated = "confidence" in names
    if annotated and column not in names:
        raise ValueError(f"weighting {cfg.weighting} needs a {column} column; {cfg.data} has none (annotated "
                         "before calibration existed: annotate it again)")
    kind, fraction = parse_weighting(cfg.weighting)
    if kind == "topk" and not annotated:
        raise ValueError("weighting topk:F needs an annotated table (a confidence column)")

    def confidences():
        for batch in iter_column_batches(cfg.data, [column]):
            c = batch.column(column)
            values = c.to_numpy(zero_copy_only=False).astype(np.float64) if c.null_count == 0 else None
            if values is None or not ((values >= 0) & (values <= 1)).all():  # NaN fails too
                raise ValueError(f"{cfg.data}: {column} must be in [0, 1] on every row")
            yield values

    threshold, ties = None, 0
    if kind == "topk":
        n = sum(len(v) for v in confidences())
        k = max(1, -(-int(round(fraction * n * 1e6)) // 1_000_000))  # weighting.pair_weights's k
        threshold, ties = topk_selection(confidences, k)
    columns = list(LABELED_COLUMNS) + ([column] if annotated else [])
    with RowWriter(path, arrow_schema(PAIR_SCHEMA_FIELDS), ROW_GROUP) as out:
        for batch in iter_column_batches(cfg.data, columns):
            weights = np.ones(batch.num_rows)
            if annotated:
                c = batch.column(column)
                weights = c.to_numpy(zero_copy_only=False).astype(np.float64) if c.null_count == 0 else None
                if weights is None or not ((weights >= 0) & (weights <= 1)).all():
                    raise ValueError(f"{cfg.data}: {column} must be in [0, 1] on every row")
            if kind == "topk":
                keep, ties = topk_keep(weights, threshold, ties)
                batch, weights = batch.filter(pa.array(keep)), np.ones(int(keep.sum()))
            elif kind == "none":
                weights = np.ones(batch.num_rows)
            out.write(batch.select(list(LABELED_COLUMNS)).append_column("weight", pa.array(weights, pa.float64())))
        kept = out.count
        if kept < cfg.batch_size * cfg.grad_accumulation * cfg.num_workers:  # raised inside: no file published
            raise ValueError(f"{kept} pairs is fewer than one global batch ({cfg.batch_size} x "
                             f"{cfg.grad_accumulation} micro-batches x {cfg.num_workers} workers)")
    return kept


class BatchReader:
    """A micro-batch's columns by row index: the pair table's, joined (PO) with the reference's,
    which has the same rows in the same order; reads only the row groups the rows fall in."""

    def __init__(self, pairs: str, reference: Optional[str] = None):
        from cwpo_ray.rowstore import RowReader

        self.pairs = RowReader(pairs)
        self.reference = RowReader(reference) if reference else None
        if self.reference is not None and self.reference.num_rows != self.pairs.num_rows:
            raise ValueError(f"{reference} has {self.reference.num_rows} rows, {pairs} {self.pairs.num_rows}: "
                             "a reference table of other pairs (rerun with --no-resume)")

    def take(self, rows: list[int]) -> dict:
        batch = self.pairs.take(rows).to_pydict()
        if self.reference is not None:
            ref = self.reference.take(rows).to_pydict()
            if ref.pop("id") != batch["id"]:
                raise ValueError(f"{self.reference.path} does not match {self.pairs.path} row for row "
                                 "(a reference table of other pairs: rerun with --no-resume)")
            batch.update(ref)
        return batch
