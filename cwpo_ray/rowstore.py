"""Tables that training reads by row index, with memory that does not grow with the table.

- ``permuted``: position -> row of a seeded pseudo-random permutation of ``range(n)``, computed
  for just the positions asked (no index of n entries). Pure numpy.
- ``topk_selection``: which rows the ``k`` largest values of a column are (ties broken by row
  order), from passes over the column with one fixed-size histogram. Pure numpy.
- ``RowWriter`` / ``RowReader``: a Parquet file written in row groups of a known size, streaming,
  and rows read back by index from only the row groups they fall in (a small LRU of groups).
- ``iter_column_batches``: a table's columns streamed in batches (Parquet or JSONL input).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Rows per row group of the tables training reads by index (train_pairs, reference): a read
# decodes one group, so small groups keep a random micro-batch cheap; 1024 short pairs are
# ~100-300 KB of text, and the Parquet footer stays ~1 KB per group.
ROW_GROUP = 1024


# ----------------------------------------------------------------------------- a permutation without an index

_M = 0xFFFFFFFFFFFFFFFF


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64's finalizer of x ^ key: a strong 64-bit mixing function (uint64 wraps)."""
    z = x ^ np.uint64(key & _M)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permuted(positions, n: int, seed: int) -> np.ndarray:
    """Rows at ``positions`` of a seeded pseudo-random permutation of ``range(n)``.

    A 4-round Feistel network on the smallest domain of 2^(2h) >= n values, walking the cycle
    back into ``range(n)`` (a bijection of the domain restricted to ``range(n)`` is one of
    ``range(n)``; the domain is < 4n, so a few steps on average). The same (n, seed) always give
    the same order, and a step's rows cost O(batch), where ``torch.randperm(n)`` holds 8n bytes.
    """
    x = np.asarray(positions, dtype=np.uint64)
    if n < 1 or (x.size and int(x.max()) >= n):
        raise ValueError(f"positions must be in range({n})")
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [int(_mix(np.array([(seed * 4 + r) & _M], dtype=np.uint64), 0x9E3779B97F4A7C15)[0]) for r in range(4)]

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        y = feistel(x)
        out = y >= np.uint64(n)
        while out.any():
            y[out] = feistel(y[out])
            out = y >= np.uint64(n)
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- bounded top-k

def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """float64 -> uint64 with the same order (IEEE-754 sign flip); -0.0 counts as 0.0."""
    bits = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    sign = (bits >> np.uint64(63)).astype(bool)
    return np.where(sign, ~bits, bits | np.uint64(1 << 63))


def topk_selection(batches: Callable[[], Iterable[np.ndarray]], k: int) -> tuple[float, int]:
    """The ``k`` largest values of a column streamed by ``batches()``, ties broken by row order,
    as (threshold t, ties): keep every row with value > t and the first ``ties`` rows with value == t.

    Exact, in memory that does not grow with the column: a radix select over the values' 64 bits,
    16 bits a pass, each pass one histogram of 65,536 counts over the rows whose higher bits match
    the prefix found so far (4 passes over the column at most; it stops early when the boundary
    bucket holds one distinct value). A heap of size k would hold k rows, and k can be 30% of them.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    prefix, need = 0, k  # need: rank of t among the rows sharing the prefix, counted from the top
    for shift in (48, 32, 16, 0):
        counts = np.zeros(1 << 16, dtype=np.int64)
        lo, hi = None, None  # the extremes of the prefix's rows, to stop once they are one value
        for values in batches():
            u = _ordered_bits(values)
            if shift < 48:
                u = u[(u >> np.uint64(shift + 16)) == np.uint64(prefix)]
            if not u.size:
                continue
            counts += np.bincount(((u >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64), minlength=1 << 16)
            lo = u.min() if lo is None else min(lo, u.min())
            hi = u.max() if hi is None else max(hi, u.max())
        if lo is None or counts.sum() < need:
            raise ValueError(f"fewer than k={k} values")
        if lo == hi:  # every row left has the same value: it is t
            return _float_of(int(lo)), need
        above = np.cumsum(counts[::-1])  # above[j]: rows in the top j+1 buckets
        j = int(np.searchsorted(above, need))  # the first bucket from the top that reaches need
        bucket = (1 << 16) - 1 - j
        need -= int(above[j - 1]) if j else 0
        prefix = (prefix << 16) | bucket
    return _float_of(prefix), need


def _float_of(u: int) -> float:
    bits = u & ~(1 << 63) if u >> 63 else ~u & _M
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def topk_keep(values: np.ndarray, threshold: float, ties_left: int) -> tuple[np.ndarray, int]:
    """Which rows of one batch (in row order) ``topk_selection``'s answer keeps, and the ties still
    to keep after it."""
    values = np.asarray(values, dtype=np.float64) + 0.0
    keep = values > threshold
    tie = np.flatnonzero(values == threshold)[:max(ties_left, 0)]
    keep[tie] = True
    return keep, ties_left - len(tie)


# ----------------------------------------------------------------------------- streaming input

def iter_column_batches(path: str | os.PathLike, columns: list[str], batch_rows: int = 65536) -> Iterator[pa.Table]:
    """``columns`` of a table (file or folder, Parquet or JSONL) in batches of at most ``batch_rows``."""
    from cwpo_ray.tables import iter_rows, table_files

    for f in table_files(path):
        if f.name.endswith(".parquet"):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
                yield pa.Table.from_batches([batch])
        else:
            rows: list[dict] = []
            for row in iter_rows(f, columns=columns):
                rows.append({c: row.get(c) for c in columns})
                if len(rows) == batch_rows:
                    yield pa.Table.from_pylist(rows)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows)


# ----------------------------------------------------------------------------- row groups of known size

class RowWriter:
    """Rows appended in batches to one Parquet file in row groups of exactly ``group_rows`` rows
    (the last may be shorter); published atomically on ``close`` (a failure leaves no file)."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, group_rows: int = ROW_GROUP):
        from cwpo_ray.tables import atomic_path

        self.schema, self.group_rows, self.rows = schema, group_rows, 0
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.group_rows:
            self._flush(final=False)

    def write_group(self, table: pa.Table) -> None:
        """``table`` as one row group of its own (after what is pending): a file whose groups mirror
        another file's, group for group."""
        self._flush(final=True)
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema), row_group_size=table.num_rows)
            self.rows += table.num_rows

    @property
    def count(self) -> int:
        """Rows written so far, pending ones included."""
        return self.rows + self._pending_rows

    def _flush(self, final: bool) -> None:
        buffered = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
        whole = buffered.num_rows if final else buffered.num_rows // self.group_rows * self.group_rows
        if whole:
            self._writer.write_table(buffered.slice(0, whole), row_group_size=self.group_rows)
            self.rows += whole
        rest = buffered.slice(whole)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self, ok: bool = True) -> None:
        if ok:
            self._flush(final=True)
        self._writer.close()
        self._ctx.__exit__(*((None, None, None) if ok else (RuntimeError, RuntimeError("aborted"), None)))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)
        return False


class RowReader:
    """Rows of one Parquet file by row index: only the row groups they fall in are read, and the
    last ``cache_groups`` groups read are kept (a micro-batch's rows, or a sequential pass, often
    share one). Memory: those groups and one offset per group, whatever the file's size.

    Ours rather than Hugging Face ``datasets``' memory-mapped Arrow (``ds[indices]``): a worker's
    resident memory stays flat with the table's size, where the mapped pages a run of random reads
    touches stay resident and grow with it (and the table needs no second copy in Arrow's format);
    the price is a row group decoded per read, a few ms per micro-batch (bench/RESULTS.md)."""

    def __init__(self, path: str | os.PathLike, columns: list[str] | None = None, cache_groups: int = 4):
        self.path = Path(path)
        self.file = pq.ParquetFile(self.path)
        meta = self.file.metadata
        self.num_rows, self.num_groups = meta.num_rows, meta.num_row_groups
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(self.num_groups)])
        self.columns = columns
        self.cache_groups = cache_groups
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()

    def group(self, g: int) -> pa.Table:
        table = self._groups.pop(g, None)
        if table is None:
            table = self.file.read_row_group(g, columns=self.columns)
        self._groups[g] = table
        while len(self._groups) > self.cache_groups:
            self._groups.popitem(last=False)
        return table

    def take(self, rows) -> pa.Table:
        """The rows at these indices, in this order."""
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"row index out of range(0, {self.num_rows}) in {self.path}")
        groups = np.searchsorted(self.starts, idx, side="right") - 1
        order = np.argsort(groups, kind="stable")
        pieces = []
        for g in np.unique(groups):
            local = idx[groups == g] - self.starts[g]
            pieces.append(self.group(int(g)).take(pa.array(local)))
        if not pieces:
            return self.file.schema_arrow.empty_table().select(self.columns or self.file.schema_arrow.names)
        grouped = pa.concat_tables(pieces)  # rows in group order; put them back in the order asked
        return grouped.take(pa.array(np.argsort(order, kind="stable")))
