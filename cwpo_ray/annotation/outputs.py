"""The final files of an annotation run: unit files merged into output files of bounded rows and
bytes, the least confident pairs, and the publication of the whole set, report.json last."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cwpo_ray.tables import ANNOTATED_SCHEMA, QUARANTINE_SCHEMA, UNLABELED_SCHEMA, atomic_path, fsync_path, fsync_tree
from cwpo_ray.annotation.labeling import UNCERTAIN_SCHEMA, smallest

TABLES = (("annotated.parquet", ANNOTATED_SCHEMA), ("quarantine.parquet", QUARANTINE_SCHEMA))
UNCERTAIN, REPORT = "uncertain.parquet", "report.json"


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

    Our own writer, not Ray Data's: write_parquet's max_rows_per_file is a hint, "not a strict
    limit", and it has no byte ceiling (min_bytes_per_file is a floor); a whole-dataset repartition
    would keep every block's metadata in the driver; here the unit files are already on disk, counted."""
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


def publish(staging: Path, out: Path) -> None:
    """Put one run's outputs, all staged in ``staging`` (annotated.parquet/, quarantine.parquet/,
    uncertain.parquet if exported, report.json), in place under ``out``.

    They cannot move in one rename and keep their paths (OUT/annotated.parquet, ...), which
    other stages read; so report.json is the run's commit record: it goes first and comes back
    last. The old one is removed before any table is replaced, and the new one renamed in after
    every table (and a stale uncertain.parquet removed), each step on disk before the next
    (fsync). A kill or power loss midway leaves no report.json, never a report beside another
    run's tables: report.json present = every output beside it is from the run it names
    (``published_report``); absent = the same command again republishes from the work folder."""
    for name, schema in TABLES:
        folder = staging / name
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.parquet")):  # readers need at least one file to know the schema
            pq.write_table(schema.empty_table(), folder / "part-empty.parquet")
    fsync_tree(staging)
    if (out / REPORT).exists():
        (out / REPORT).unlink()
        fsync_path(out)
    for name, _ in TABLES:
        with atomic_path(out / name) as tmp:
            os.rename(staging / name, tmp)
    if (staging / UNCERTAIN).exists():
        with atomic_path(out / UNCERTAIN) as tmp:
            os.rename(staging / UNCERTAIN, tmp)
    elif (out / UNCERTAIN).exists():
        (out / UNCERTAIN).unlink()  # a rerun replaces the whole output, a stale export included
        fsync_path(out)
    with atomic_path(out / REPORT) as tmp:
        os.rename(staging / REPORT, tmp)


def published_report(out: Path) -> dict | None:
    """report.json of the run whose outputs are all in ``out``, or None where a publication was cut short."""
    try:
        return json.loads((out / REPORT).read_text())
    except FileNotFoundError:
        return None
