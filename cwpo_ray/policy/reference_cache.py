"""The reference cache: reference log-probs of (prompt, response) texts under one start model and one
truncation, shared by the PO runs from that start (the pipeline's arms score the same texts), kept
as sorted Parquet segments that runs add and compact; and how many pair-table row groups a run
looks up at once so that its reading stays O(pairs + cache).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

# Row groups of the pair table looked up in the reference cache at once, at least: a lookup reads
# up to the whole cache, so bigger chunks mean fewer reads; a chunk holds 2 x 1024 keys per group
# (~100 B each). ``lookup_chunk_groups`` makes it grow with the cache.
CACHE_CHUNK_GROUPS = 64
# Cache rows a run's lookups may read per key they ask (``lookup_chunk_groups``).
CACHE_READS_PER_KEY = 16


def lookup_chunk_groups(cache_rows: int, keys_per_group: float) -> int:
    """Row groups of the pair table to look up at once in a cache of ``cache_rows`` rows.

    A lookup reads up to the whole cache (hashed keys spread over all of it), so with a fixed chunk
    a run read (N / chunk) x M rows: N x M. A chunk of at least M / CACHE_READS_PER_KEY keys makes
    a worker's lookups read at most CACHE_READS_PER_KEY rows per key asked, plus one cache for the
    last, partial chunk: O(N + M) (the cache is pinned at the start: the run's own segments are not
    re-read). The price is memory for the chunk's keys and values: ~4 B per cache row (60 B a key).
    """
    return max(CACHE_CHUNK_GROUPS, math.ceil(cache_rows / (CACHE_READS_PER_KEY * max(keys_per_group, 1.0))))


def merge_ranges(rows: int, max_rows: int) -> list[tuple[bytes, Optional[bytes]]]:
    """Key ranges [lo, hi) (hi None: to the end) that split ``rows`` cache rows into ranges of at
    most ~``max_rows`` each: a compaction holds one range at a time, whatever the cache's size.

    Keys are SHA-256 hex digests, uniform over their space, so equal slices of the space (on the
    first 8 hex digits, as lower-case hex strings: they sort as the keys do) hold equal shares of
    the rows, within a few sqrt(max_rows); ``rows`` counts duplicates too, so it is an upper bound.
    """
    count = max(1, math.ceil(rows / max(max_rows, 1)))
    bounds = [f"{(i << 32) // count:08x}".encode() for i in range(count)]
    return list(zip(bounds, bounds[1:] + [None]))


class ReferenceCache:
    """Reference log-probs of (prompt, response) texts under one start model and one truncation.

    A folder per (model, tokenization) fingerprint in a shared folder, of Parquet segments:
    key (a hash of the prompt and the response), logps, tokens, each segment sorted by key with
    row-group statistics. A run adds one segment per worker per lookup chunk of responses it
    scored (atomically; segments are never rewritten, so concurrent runs never lose each other's),
    and at its end merges the segments into one once there are more than COMPACT_ABOVE
    (``compact``), so the count of files stays small. ``lookup`` streams the segments' row groups
    (skipping those that hold none of the keys asked) and joins them to a sorted batch of keys:
    memory is one row group and the batch, not the cache. The file of earlier versions,
    reference-KEY.parquet (sorted by key), is read as a segment (and merged away by ``compact``).

    Counters for the run's summary: ``rows_read`` / ``lookups`` / ``lookup_seconds`` (by lookups)
    and ``merge_rows_read`` / ``merge_peak_rows`` (by compaction: rows read, most rows held at once).
    """

    # Rows per row group of a segment. Small enough that a group of a run's segment (which spans a
    # slice of the key space ~group/segment rows wide) overlaps few of compaction's key ranges:
    # compaction reads ~rows x (1 + segments x GROUP_ROWS / MERGE_RANGE_ROWS); ~200 B of footer each.
    GROUP_ROWS = 8192
    COMPACT_ABOVE = 8               # segments a cache may hold before a run's end merges them
    MERGE_RANGE_ROWS = 1 << 18      # rows (before de-duplication) a compaction holds at once, ~30 MB
    LOOKUP_LISTINGS = 3             # listings a lookup tries when segments vanish under it

    def __init__(self, folder: str, model_key: str):
        self.folder = Path(folder) / f"reference-{model_key}"
        self.legacy = Path(folder) / f"reference-{model_key}.parquet"
        self.pinned: Optional[list[Path]] = None
        self.rows_read = self.lookups = self.merge_rows_read = self.merge_peak_rows = 0
        self.lookup_seconds = 0.0

    @staticmethod
    def key(prompt: str, response: str) -> str:
        import hashlib

        return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()[:32]

    def segments(self) -> list[Path]:
        found = sorted(self.folder.glob("seg-*.parquet")) if self.folder.is_dir() else []
        return ([self.legacy] if self.legacy.exists() else []) + found

    def pin(self) -> list[Path]:
        """Lookups read the segments listed now (the listing is renewed only if one vanishes): a run's
        lookups never re-read the segments it adds itself, so each reads at most the cache as it
        was at the start. Hits another run adds meanwhile are missed: a recomputation, no error."""
        self.pinned = self.segments()
        return self.pinned

    def num_rows(self, segments: Optional[list[Path]] = None) -> int:
        """Rows of these segments (default: all now), duplicates counted; from the footers."""
        import pyarrow.parquet as pq

        return sum(self._each(segments, lambda f: pq.ParquetFile(f).metadata.num_rows))

    def num_bytes(self) -> int:
        return sum(self._each(None, lambda f: f.stat().st_size))

    def _each(self, segments: Optional[list[Path]], measure) -> list[int]:
        """``measure`` of each segment that still exists (a compaction may delete one meanwhile)."""
        out = []
        for f in self.segments() if segments is None else segments:
            try:
                out.append(measure(f))
            except FileNotFoundError:
                pass
        return out

    def lookup(self, keys):
        """(found, logps, tokens) for each of ``keys`` (numpy bytes 'S32'), in their order.

        A segment listed but gone when opened was merged by a compaction, which publishes the
        merged segment before it deletes any input: a listing made after the loss was seen holds
        the merged segment (or, if that too was merged since, the same holds one level on), so the
        lookup lists again and reads what it has not read. After LOOKUP_LISTINGS it gives up on
        the rest: a missed hit is only a recomputation, never a wrong value. A segment deleted once
        open stays readable (POSIX keeps an unlinked open file's data)."""
        import numpy as np
        import pyarrow.parquet as pq

        t0 = time.perf_counter()
        order = np.argsort(keys, kind="stable")
        want = keys[order]
        found = np.zeros(len(keys), dtype=bool)
        logps, tokens = np.zeros(len(keys)), np.zeros(len(keys), dtype=np.int64)
        listed, done = (self.pinned if self.pinned is not None else self.segments()), set()
        for _ in range(self.LOOKUP_LISTINGS if len(keys) else 0):
            vanished = False
            for segment in listed:
                if segment in done:
                    continue
                try:
                    f = pq.ParquetFile(segment)
                except FileNotFoundError:
                    vanished = True
                    continue
                done.add(segment)
                self._join(f, want, order, found, logps, tokens)
            if not vanished:
                break
            listed = self.segments()
            if self.pinned is not None:
                self.pinned = listed
        self.lookups += 1
        self.lookup_seconds += time.perf_counter() - t0
        return found, logps, tokens

    def _join(self, f, want, order, found, logps, tokens) -> None:
        """Fills in the keys of ``want`` (sorted; ``order``: their places) that segment ``f`` holds,
        reading only its row groups whose key range holds one of them."""
        import numpy as np

        for g in range(f.metadata.num_row_groups):
            lo, hi = 0, len(want)
            stats = f.metadata.row_group(g).column(0).statistics  # column 0: key
            if stats is not None and stats.has_min_max:
                lo = int(np.searchsorted(want, _as_bytes(stats.min), "left"))
                hi = int(np.searchsorted(want, _as_bytes(stats.max), "right"))
                if lo == hi:
                    continue
            t = f.read_row_group(g, columns=["key", "logps", "tokens"])
            self.rows_read += t.num_rows
            if not t.num_rows:
                continue
            have = t.column("key").to_numpy(zero_copy_only=False).astype("S32")
            part = want[lo:hi]
            at = np.searchsorted(have, part).clip(max=len(have) - 1)
            hit = have[at] == part
            sel = order[lo:hi][hit]
            found[sel] = True
            logps[sel] = t.column("logps").to_numpy()[at[hit]]
            tokens[sel] = t.column("tokens").to_numpy()[at[hit]]

    def add_segment(self, keys, logps, tokens) -> None:
        """A new segment of these entries (numpy arrays; keys 'S32'), sorted by key, duplicates dropped."""
        import numpy as np
        import pyarrow.parquet as pq

        from cwpo_ray.tables import atomic_path

        keys, first = np.unique(keys, return_index=True)
        with atomic_path(self._new_segment()) as tmp:
            pq.write_table(_entries(keys, logps[first], tokens[first]), tmp, row_group_size=self.GROUP_ROWS)

    def _new_segment(self) -> Path:
        import uuid

        return self.folder / f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"

    def compact(self, max_rows: Optional[int] = None) -> int:
        """Merges the segments into one, sorted, each key once, if there are more than COMPACT_ABOVE;
        the count merged (0: none).

        Range by range (``merge_ranges``): each segment's rows in the range (its row groups whose
        statistics overlap it) are read, de-duplicated and appended to the new segment, so memory
        is one range (``max_rows``, default MERGE_RANGE_ROWS), not the cache. Safe beside other runs:
        the inputs are opened first (one already gone was merged by another compaction, which
        keeps its rows) and read through those handles; the new segment is published atomically
        before any input is deleted, and only the inputs read are deleted; segments added
        meanwhile stay. Two compactions at once may leave two copies of the rows; the next one
        merges them. Until the inputs are deleted the cache takes twice its size on disk."""
        import numpy as np
        import pyarrow.parquet as pq

        from cwpo_ray.rowstore import RowWriter

        listed = self.segments()
        if len(listed) <= self.COMPACT_ABOVE:
            return 0
        inputs = {}
        for segment in listed:
            try:
                inputs[segment] = pq.ParquetFile(segment)
            except FileNotFoundError:
                continue
        rows = sum(f.metadata.num_rows for f in inputs.values())
        with RowWriter(self._new_segment(), _entries([], [], []).schema, group_rows=self.GROUP_ROWS) as out:
            for lo, hi in merge_ranges(rows, max_rows or self.MERGE_RANGE_ROWS):
                keys, logps, tokens = self._rows_in_range(inputs.values(), lo, hi)
                self.merge_peak_rows = max(self.merge_peak_rows, len(keys))
                keys, first = np.unique(keys, return_index=True)
                out.write(_entries(keys, logps[first], tokens[first]))
        for segment in inputs:
            try:
                segment.unlink(missing_ok=True)
            except OSError:  # open elsewhere (Windows): left for the next compaction (duplicates collapse)
                pass
        return len(inputs)

    def _rows_in_range(self, files, lo: bytes, hi: Optional[bytes]):
        """(keys, logps, tokens) of the rows of ``files`` with lo <= key < hi (hi None: no bound)."""
        import numpy as np

        keys, logps, tokens = [np.zeros(0, dtype="S32")], [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
        for f in files:
            for g in range(f.metadata.num_row_groups):
                stats = f.metadata.row_group(g).column(0).statistics
                if stats is not None and stats.has_min_max and (
                        _as_bytes(stats.max) < lo or (hi is not None and _as_bytes(stats.min) >= hi)):
                    continue
                t = f.read_row_group(g, columns=["key", "logps", "tokens"])
                self.merge_rows_read += t.num_rows
                k = t.column("key").to_numpy(zero_copy_only=False).astype("S32")
                keep = (k >= lo) & (k < hi) if hi is not None else k >= lo
                keys.append(k[keep])
                logps.append(t.column("logps").to_numpy()[keep])
                tokens.append(t.column("tokens").to_numpy()[keep])
        return np.concatenate(keys), np.concatenate(logps), np.concatenate(tokens)


def _as_bytes(v) -> bytes:
    return v.encode() if isinstance(v, str) else bytes(v)


def _entries(keys, logps, tokens):
    """A segment's table: key (hex string), logps, tokens."""
    import numpy as np
    import pyarrow as pa

    # Keys are 32 hex characters each: the string column is built on their bytes as they are (a numpy
    # str array would take 4 bytes a character, 128 MB a million keys, in a compaction's range).
    keys = np.ascontiguousarray(keys, dtype="S32")
    offsets = np.arange(0, 32 * (len(keys) + 1), 32, dtype=np.int32)
    key = pa.StringArray.from_buffers(len(keys), pa.py_buffer(offsets), pa.py_buffer(keys.tobytes()))
    return pa.table({"key": key,
                     "logps": pa.array(np.asarray(logps, dtype=np.float64), pa.float64()),
                     "tokens": pa.array(np.asarray(tokens, dtype=np.int64), pa.int64())})
