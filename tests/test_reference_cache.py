"""The reference log-prob cache (cwpo_ray/policy/reference.py): lookups against a brute-force dict,
compaction (each entry once, bounded memory, safe beside a lookup), and a run's bounded reading."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cwpo_ray.policy.reference_cache import (CACHE_CHUNK_GROUPS, CACHE_READS_PER_KEY, ReferenceCache, lookup_chunk_groups,
                                            merge_ranges)


class SmallGroups(ReferenceCache):
    """Segments of many small row groups: the statistics pruning and range merging are exercised."""

    GROUP_ROWS = 16


def hkey(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).hexdigest()[:32].encode()


def value(k: bytes) -> tuple[float, int]:
    """The one value of an entry (as for a real cache: a key's log-probs do not depend on the run)."""
    h = int(k[:8], 16)
    return -(h % 10_000) / 7.0, h % 97


def add(cache: ReferenceCache, ids) -> None:
    keys = np.array([hkey(i) for i in ids], dtype="S32")
    cache.add_segment(keys, np.array([value(k)[0] for k in keys]), np.array([value(k)[1] for k in keys]))


def random_segments(cache: ReferenceCache, count: int = 20, pool: int = 3000, size: int = 300, seed: int = 0) -> set:
    """``count`` segments of ``size`` random ids of range(pool) (overlapping): the set of their ids."""
    rng, ids = random.Random(seed), set()
    for _ in range(count):
        part = rng.sample(range(pool), size)
        add(cache, part)
        ids.update(part)
    return ids


def check_lookup(cache: ReferenceCache, present: set, asked: list[int]) -> np.ndarray:
    """Asserts ``cache.lookup`` of ``asked`` against a dict of the ids ``present``; the found mask."""
    truth = {hkey(i): value(hkey(i)) for i in present}
    keys = np.array([hkey(i) for i in asked], dtype="S32")
    found, logps, tokens = cache.lookup(keys)
    for k, f, lp, t in zip(keys, found, logps, tokens):
        assert f == (k in truth)
        if f:
            assert (lp, t) == truth[k]
    return found


def test_lookup_equals_a_dict_over_many_segments(tmp_path):
    cache = SmallGroups(str(tmp_path), "m")
    ids = random_segments(cache)
    assert len(cache.segments()) == 20 and len(ids) < 20 * 300  # segments overlap
    rng = random.Random(1)
    asked = rng.choices(range(4000), k=2500)  # present and absent ids, some asked twice
    found = check_lookup(cache, ids, asked)
    assert found.any() and not found.all()
    assert cache.lookups == 1 and cache.rows_read <= cache.num_rows()
    # a few keys read only the row groups whose key range holds one of them
    before = cache.rows_read
    check_lookup(cache, ids, asked[:3])
    assert cache.rows_read - before <= 3 * 20 * SmallGroups.GROUP_ROWS
    assert cache.lookup(np.array([], dtype="S32"))[0].tolist() == []


def test_compaction_keeps_each_entry_once_in_bounded_memory(tmp_path):
    cache = SmallGroups(str(tmp_path), "m")
    ids = random_segments(cache)
    # the single file of earlier versions is merged too
    legacy = [hkey(i) for i in range(5000, 5050)]
    legacy.sort()
    pq.write_table(pa.table({"key": [k.decode() for k in legacy], "logps": [value(k)[0] for k in legacy],
                             "tokens": [value(k)[1] for k in legacy]}), cache.legacy)
    ids |= set(range(5000, 5050))
    rows = cache.num_rows()
    assert rows == 20 * 300 + 50
    assert cache.compact(max_rows=500) == 21
    assert len(cache.segments()) == 1 and not cache.legacy.exists()
    merged = pq.read_table(cache.segments()[0]).to_pydict()
    assert merged["key"] == sorted({hkey(i).decode() for i in ids})  # sorted, each key exactly once
    assert all((lp, t) == value(k.encode()) for k, lp, t in zip(merged["key"], merged["logps"], merged["tokens"]))
    # one key range at a time: the most rows held is about max_rows, not the cache
    assert 500 / 2 < cache.merge_peak_rows <= 1.25 * 500
    assert cache.merge_rows_read >= rows
    check_lookup(cache, ids, list(range(0, 6000, 7)))
    # few segments: nothing to do
    add(cache, [9000, 9001])
    assert cache.compact() == 0 and len(cache.segments()) == 2


def test_merge_ranges_plan_bounds_the_rows_held():
    ranges = merge_ranges(10**9, 1 << 20)
    assert len(ranges) == math.ceil(10**9 / (1 << 20)) == 954
    assert ranges[0][0] == b"00000000" and ranges[-1][1] is None
    assert all(hi == nxt for (_, hi), (nxt, _) in zip(ranges, ranges[1:]))  # contiguous
    assert [lo for lo, _ in ranges] == sorted(lo for lo, _ in ranges)
    assert merge_ranges(0, 100) == [(b"00000000", None)] and len(merge_ranges(100, 100)) == 1
    # hashed keys fall evenly into the ranges: each holds about max_rows of them
    keys = np.array([hkey(i) for i in range(100_000)], dtype="S32")
    ranges = merge_ranges(len(keys), 10_000)
    counts = [int(((keys >= lo) & ((keys < hi) if hi else True)).sum()) for lo, hi in ranges]
    assert len(ranges) == 10 and sum(counts) == len(keys)
    assert max(counts) <= 1.1 * 10_000


class RacingCache(SmallGroups):
    """A cache whose first listing is compacted away (by another run, here another cache object)
    before the lookup opens the segments listed: the race a lookup must survive."""

    raced = False

    def segments(self):
        listed = super().segments()
        if not self.raced:
            self.raced = True
            assert SmallGroups(str(self.folder.parent), "m").compact() == len(listed)
        return listed


def test_lookup_during_and_after_compaction_finds_every_entry(tmp_path):
    ids = random_segments(SmallGroups(str(tmp_path), "m"), count=10)
    asked = list(range(0, 3500, 3))
    racing = RacingCache(str(tmp_path), "m")
    found = check_lookup(racing, ids, asked)  # listed 10 segments, all gone when opened: listed again
    assert racing.raced and len(racing.segments()) == 1
    assert found.sum() == len([i for i in asked if i in ids])  # not even a miss
    # a pinned listing (a run's) made stale by a compaction is renewed on the first loss
    add(racing, [7000])
    pinned = SmallGroups(str(tmp_path), "m")
    pinned.pin()
    later = random_segments(SmallGroups(str(tmp_path), "m"), count=9, seed=5)  # added after the pin
    SmallGroups(str(tmp_path), "m").compact()
    present = ids | later | {7000}  # the new listing's merged segment holds the later ones too
    assert check_lookup(pinned, present, asked + [7000]).sum() == len([i for i in asked if i in present]) + 1
    assert pinned.pinned == pinned.segments()


def test_lookup_chunk_grows_with_the_cache():
    assert lookup_chunk_groups(0, 2048) == CACHE_CHUNK_GROUPS
    assert lookup_chunk_groups(10**6, 2048) == CACHE_CHUNK_GROUPS
    big = lookup_chunk_groups(10**9, 2048)
    assert big * 2048 >= 10**9 / CACHE_READS_PER_KEY > (big - 1) * 2048


def test_reference_pass_reads_the_cache_a_bounded_number_of_times(tiny_decoder, tmp_path):
    """A run of N pairs against a cache of M rows reads O(N + M) cache rows (a counter), takes every
    cached pair from the cache, scores the rest, and compacts the cache's many segments into one."""
    from cwpo_ray import logprobs
    from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer
    from cwpo_ray.policy.reference import ReferenceSpec, ensure_reference
    from cwpo_ray.rowstore import RowWriter

    n, group = 2000, 8
    rows = [{"id": f"r{i}", "prompt": f"question {i % 50}", "chosen": f"yes {i}", "rejected": f"no {i}"}
            for i in range(n)]
    with RowWriter(tmp_path / "pairs.parquet", pa.schema([(c, pa.string()) for c in rows[0]]), group_rows=group) as w:
        w.write(pa.Table.from_pylist(rows))
    cache = ReferenceCache(str(tmp_path / "cache"), "start")
    keyed = {}
    for i, r in enumerate(rows[:-5]):  # all but the last 5 pairs cached, with made-up values
        for side, sign in (("chosen", 1), ("rejected", -1)):
            keyed[ReferenceCache.key(r["prompt"], r[side]).encode()] = (sign * (i + 1) / 8.0, i % 13 + 1)
    filler = {hashlib.sha256(b"filler %d" % i).hexdigest()[:32].encode(): (-1.0, 1) for i in range(40_000)}
    entries = list(keyed.items()) + list(filler.items())
    random.Random(0).shuffle(entries)
    for part in np.array_split(np.arange(len(entries)), 10):  # 10 segments: more than COMPACT_ABOVE
        cache.add_segment(np.array([entries[j][0] for j in part], dtype="S32"),
                          np.array([entries[j][1][0] for j in part]), np.array([entries[j][1][1] for j in part]))
    m = cache.num_rows()

    source = ModelSource(str(tiny_decoder))
    model, tokenizer = load_causal_lm(source), load_tokenizer(source)
    lengths = logprobs.Lengths(8, 24)
    spec = ReferenceSpec(str(tmp_path / "reference.parquet"), lengths, 4, str(tmp_path / "cache"), "start")
    s = ensure_reference(model, tokenizer, str(tmp_path / "pairs.parquet"), spec, 0, 1)

    assert (s["pairs"], s["computed"], s["cache_rows_before"], s["cache_segments_before"]) == (n, 5, m, 10)
    assert s["lookup_rows_read"] <= CACHE_READS_PER_KEY * 2 * n + m  # O(N + M)
    fixed_chunk_reads = math.ceil(n / group / CACHE_CHUNK_GROUPS) * m
    assert s["lookup_rows_read"] < fixed_chunk_reads  # what a fixed chunk of 64 groups read: N x M / chunk
    assert s["lookups"] == math.ceil(n / group / s["chunk_groups"])
    assert (s["cache_segments_merged"], s["cache_segments_after"]) == (11, 1)  # 10 + the run's own
    assert s["cache_rows_after"] == len(keyed) + len(filler) + 10
    table = pq.read_table(spec.table).to_pydict()
    assert table["id"] == [r["id"] for r in rows]
    for i in range(n - 5):
        assert table["ref_chosen_logps"][i] == (i + 1) / 8.0 and table["ref_rejected_logps"][i] == -(i + 1) / 8.0
        assert table["chosen_tokens"][i] == i % 13 + 1
    new = rows[-5:]
    direct = logprobs.reference_logps(model, tokenizer, [r["prompt"] for r in new], [r["chosen"] for r in new],
                                      [r["rejected"] for r in new], lengths)
    assert table["ref_chosen_logps"][-5:] == pytest.approx(list(direct["ref_chosen_logps"]), abs=1e-4)
    # a second run from the same start takes all of it from the compacted cache
    spec = ReferenceSpec(str(tmp_path / "again.parquet"), lengths, 4, str(tmp_path / "cache"), "start")
    again = ensure_reference(model, tokenizer, str(tmp_path / "pairs.parquet"), spec, 0, 1)
    assert (again["computed"], again["cache_segments_before"], again["cache_segments_after"]) == (0, 1, 1)
    assert pq.read_table(tmp_path / "again.parquet").to_pydict() == table
