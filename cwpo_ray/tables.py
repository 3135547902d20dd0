"""Table contracts and table I/O shared by every stage.

Tables are Parquet (JSONL accepted on input). A table path may be a file or a folder of
shards. Writes are atomic: a table appears under its final name only when complete,
so a stage killed midway never leaves a half-written table a later stage would trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

LABELED_COLUMNS = ("id", "prompt", "chosen", "rejected")
UNLABELED_COLUMNS = ("id", "prompt", "response_a", "response_b")
# confidence: calibrated with the annotator's temperature; confidence_raw: the same call at T = 1.
ANNOTATED_COLUMNS = ("id", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "confidence", "annotator",
                     "confidence_raw")
QUARANTINE_COLUMNS = ("id", "reason", "raw")
# The hidden human choice of an unlabeled pair ("a" or "b"): kept beside the pair so the
# Human baseline and annotator accuracy can be computed, never read by the annotator.
HUMAN_CHOICE = "human_choice"

LABELED_SCHEMA = pa.schema([(c, pa.string()) for c in LABELED_COLUMNS])
UNLABELED_SCHEMA = pa.schema([(c, pa.string()) for c in UNLABELED_COLUMNS] + [(HUMAN_CHOICE, pa.string())])
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("raw", pa.string())])
ANNOTATED_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("id", "prompt", "chosen", "rejected")]
    + [("reward_chosen", pa.float64()), ("reward_rejected", pa.float64()), ("confidence", pa.float64()),
       ("annotator", pa.string()), ("confidence_raw", pa.float64())]
)

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")


def table_files(path: str | os.PathLike) -> list[Path]:
    """The data files of a table: the file itself, or a folder's shards in name order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TABLE_SUFFIXES)
                       and not f.name.startswith((".", "_")))
        if not files:
            raise FileNotFoundError(f"no .parquet or .jsonl files in {p}")
        return files
    raise FileNotFoundError(f"table not found: {p}")


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, parsed object or None if not a JSON object, raw line) for each non-blank line."""
    opener = __import__("gzip").open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            yield n, obj if isinstance(obj, dict) else None, line.rstrip("\n")


def iter_rows(path: str | os.PathLike, batch_size: int = 4096, columns: list[str] | None = None) -> Iterator[dict]:
    """Stream the rows of a table (memory bounded by ``batch_size``).

    A JSONL line that is not a JSON object is yielded as ``{"__invalid_json__": raw}`` so
    the caller can quarantine it instead of crashing.
    """
    for f in table_files(path):
        if f.name.endswith(".parquet"):
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                yield from batch.to_pylist()
        else:
            for _, obj, raw in iter_json_lines(f):
                yield obj if obj is not None else {"__invalid_json__": raw}


def count_rows(path: str | os.PathLike) -> int:
    total = 0
    for f in table_files(path):
        if f.name.endswith(".parquet"):
            total += pq.ParquetFile(f).metadata.num_rows
        else:
            total += sum(1 for _ in iter_json_lines(f))
    return total


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read a whole (small) table into memory."""
    files = table_files(path)
    if all(f.name.endswith(".parquet") for f in files):
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in files], promote_options="default")
    rows = list(iter_rows(path))
    table = pa.Table.from_pylist(rows)
    return table.select(columns) if columns else table


def require_columns(path, needed: tuple[str, ...]) -> list[str]:
    """Column names of a table; raises ValueError naming what is missing."""
    f = table_files(path)[0]
    if f.name.endswith(".parquet"):
        names = pq.ParquetFile(f).schema_arrow.names
    else:
        first = next((obj for _, obj, _ in iter_json_lines(f) if obj is not None), {})
        names = list(first)
    missing = [c for c in needed if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(names)}")
    return names


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entries to the disk (fsync is per inode: any descriptor will do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # some file systems (and platforms) refuse fsync on a folder; its entries then go when they go
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or a folder's files and folders, before a rename makes them visible."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        for child in p.iterdir():
            fsync_tree(child)
    if not p.is_symlink():
        fsync_path(p)


def durable_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` that survives a power loss in order: ``src``'s content is on disk before the
    rename, and the rename is on disk (its folder flushed) before this returns."""
    fsync_tree(src)
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary sibling path; on success it replaces ``final`` in one rename.

    A crash leaves only the temporary (hidden, ignored by readers), never a partial
    ``final``. An existing ``final`` is replaced, never appended to. The content is fsynced
    before the rename and the folder after it: after a power loss ``final`` is the old
    content or the whole new one, never a name pointing at unwritten blocks.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        fsync_tree(tmp)
        if final.is_dir() and not final.is_symlink():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            fsync_path(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


class ParquetSink:
    """Append record batches to one Parquet file, atomically published on close."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, buffer_rows: int = 8192):
        self.path, self.schema, self.buffer_rows = Path(path), schema, buffer_rows
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema)
        self._buffer: list[dict] = []
        self.rows = 0

    def write(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self.rows += len(self._buffer)
            self._buffer = []

    def close(self, ok: bool = True) -> None:
        if ok:
            self.flush()
        self._writer.close()
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)
        return False


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a whole table atomically to one Parquet file."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
