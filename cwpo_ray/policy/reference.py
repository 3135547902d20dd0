"""The reference log-probs of a PO run: computed once, before the first step, by the training
workers themselves (the start model IS the reference), kept as a table of the training table's
rows, and shared across runs from the same start through a cache of (prompt, response) scores
(`reference_cache.py`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cwpo_ray.policy.reference_cache import CACHE_CHUNK_GROUPS, ReferenceCache, lookup_chunk_groups
from cwpo_ray.policy.train_table import arrow_schema

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens")


@dataclass
class ReferenceSpec:
    """Where and how the reference log-probs of a PO run are computed and kept."""

    table: str            # DIR/reference.parquet
    lengths: "object"     # logprobs.Lengths: how pairs are tokenized
    batch_size: int
    cache_dir: str        # shared across runs from the same start ("" : none)
    cache_key: str        # the start model and tokenization (reference_key)
    packing: str = "shared_prefix"  # logprobs.pair_batch's packing


def ensure_reference(engine, tokenizer, pairs: str, spec: ReferenceSpec, rank: int, world_size: int) -> Optional[dict]:
    """Writes ``spec.table``: per row of the pair table ``pairs`` (in its order, in the same row
    groups) its id, ref_chosen_logps / ref_rejected_logps and token counts, computed once.

    Computed here, by the training workers themselves, before the first PO step: they
    already hold the start model, which IS the reference, so the pass costs no second
    model and no extra processes, and it runs under the same placement (ZeRO-3 sharding,
    GPUs) as training, so a reference too big for one device still fits.

    Streaming, in rounds: in round j worker r scores row group j * world_size + r of ``pairs``
    (rows still to score, in batches of similar length: less padding), and appends the group's
    values to its own part, DIR/reference/part-RANK.parquet (published atomically). Every worker
    runs the same number of forwards each round (ZeRO-3 forwards are collective): one with fewer
    repeats a row and throws the result away. After a barrier rank 0 copies the parts' groups, in
    row order, into ``spec.table``; training then reads the rows of each micro-batch by index.
    Nothing is gathered between workers but per-round batch counts.

    With --reference-cache, responses another run already scored from the same start model
    at the same lengths are taken from the cache (the pipeline's human / ws / cw arms score
    the same texts): looked up ``lookup_chunk_groups`` row groups at a time (``ReferenceCache``),
    and rank 0 compacts the cache at the end (``ReferenceCache.compact``). Returns the pass's figures
    (pairs computed, the cache's segments and rows before / after, rows read by lookups and their
    seconds; None when the table was there already); rank 0 prints them (``_summary_line``).
    """
    import numpy as np
    import pyarrow as pa

    from cwpo_ray.distributed import barrier, max_over_workers, sum_over_workers
    from cwpo_ray.rowstore import RowReader, RowWriter

    path = Path(spec.table)
    if path.exists():
        return None
    t0 = time.perf_counter()
    device = engine.device  # collectives on it (NCCL needs the GPU)
    reader = RowReader(pairs, columns=["id", "prompt", "chosen", "rejected"], cache_groups=1)
    cache = ReferenceCache(spec.cache_dir, spec.cache_key) if spec.cache_dir else None
    schema = arrow_schema([("id", "string")] + [(c, "float64" if "logps" in c else "int64") for c in REFERENCE_COLUMNS])
    parts = path.with_suffix("")
    rounds = -(-reader.num_groups // world_size)
    chunk, before = CACHE_CHUNK_GROUPS, (0, 0)
    if cache is not None:
        listed = cache.pin()  # lookups read the cache as it is now, not the segments this run adds
        # Every rank must loop over the same chunks (a round's forwards are collective), and another
        # run may add segments between two ranks' listings: all take the largest count.
        before = tuple(int(v) for v in max_over_workers([cache.num_rows(listed), len(listed)], device))
        chunk = lookup_chunk_groups(before[0], 2 * reader.num_rows / max(reader.num_groups, 1))
    dummy = reader.take([0]).to_pydict()
    computed = 0
    engine.eval()
    with RowWriter(parts / f"part-{rank}.parquet", schema) as part:
        for first in range(0, rounds, chunk):
            mine = [g for g in (j * world_size + rank for j in range(first, min(rounds, first + chunk)))
                    if g < reader.num_groups]
            known = _cache_lookup(cache, reader, mine)
            new_entries = []
            for j in range(first, min(rounds, first + chunk)):
                g = j * world_size + rank
                rows = reader.group(g).to_pydict() if g < reader.num_groups else None
                values, todo = _score_group(engine, tokenizer, rows, known.pop(g, None), dummy, spec, device)
                if rows:
                    part.write_group(pa.table({"id": rows["id"], **values}, schema=schema))
                    computed += len(todo)
                    if cache is not None and todo:
                        new_entries.append(_cache_entries(rows, values, todo))
            if cache is not None and new_entries:
                cache.add_segment(*(np.concatenate(cols) for cols in zip(*new_entries)))
    engine.train()
    barrier()
    if rank == 0:
        part_readers = [RowReader(parts / f"part-{r}.parquet", cache_groups=1) for r in range(world_size)]
        with RowWriter(path, schema) as merged:
            for g in range(reader.num_groups):  # group g is part g % world_size's group g // world_size
                merged.write_group(part_readers[g % world_size].group(g // world_size))
        shutil.rmtree(parts, ignore_errors=True)
    read = (cache.rows_read, cache.lookups) if cache is not None else (0, 0)
    total, rows_read, lookups = (int(v) for v in sum_over_workers([computed, *read], device))
    lookup_s = max_over_workers([cache.lookup_seconds if cache is not None else 0.0], device)[0]
    barrier()
    summary = {"pairs": reader.num_rows, "computed": total, "seconds": time.perf_counter() - t0}
    if cache is not None:
        summary.update(cache_rows_before=before[0], cache_segments_before=before[1], lookups=lookups,
                       lookup_rows_read=rows_read, lookup_seconds=lookup_s, chunk_groups=chunk)
    if rank == 0:
        if cache is not None:  # no collective after this: the other ranks go on to train meanwhile
            summary.update(_compact(cache))
        print(_summary_line(summary, path), flush=True)
    return summary


def _compact(cache: "ReferenceCache") -> dict:
    """Compacts ``cache`` (if it holds enough segments); its figures. A failure (a full disk) leaves
    the cache as it was and the run goes on: compaction only saves later runs' time."""
    t0 = time.perf_counter()
    try:
        merged = cache.compact()
    except OSError as e:
        print(f"train-policy: reference cache not compacted ({e})", flush=True)
        merged = 0
    return {"cache_segments_merged": merged, "cache_segments_after": len(cache.segments()),
            "cache_rows_after": cache.num_rows(), "cache_bytes_after": cache.num_bytes(),
            "compact_rows_read": cache.merge_rows_read, "compact_seconds": time.perf_counter() - t0}


def _summary_line(s: dict, path: Path) -> str:
    n = s["pairs"]
    line = (f"train-policy: reference log-probs of {n} pairs ({s['computed']} computed, {n - s['computed']} from "
            f"the cache) in {s['seconds']:.1f}s -> {path}")
    if "lookups" not in s:
        return line
    return (f"{line}; cache: {s['cache_segments_before']} -> {s['cache_segments_after']} segments, "
            f"{s['cache_rows_before']} -> {s['cache_rows_after']} rows ({s['cache_bytes_after']} bytes), "
            f"{s['lookup_rows_read']} rows read by {s['lookups']} lookups of {s['chunk_groups']} groups in "
            f"{s['lookup_seconds']:.2f}s, compacted {s['cache_segments_merged']} segments "
            f"({s['compact_rows_read']} rows read) in {s['compact_seconds']:.2f}s")


def _score_group(engine, tokenizer, rows: Optional[dict], known, dummy: dict, spec: ReferenceSpec, device):
    """One round of the reference pass on one worker: the values of ``rows`` (a row group; None when
    this worker has none this round), from ``known`` (the cache's hits) or scored; and which rows
    were scored. Runs as many forwards as the busiest worker (collective)."""
    import numpy as np

    from cwpo_ray import logprobs
    from cwpo_ray.distributed import max_over_workers

    n = len(rows["id"]) if rows else 0
    values = {c: np.zeros(n, dtype=np.float64 if "logps" in c else np.int64) for c in REFERENCE_COLUMNS}
    todo = list(range(n))
    if known is not None:
        hit, found = known
        for c in REFERENCE_COLUMNS:
            values[c][:] = found[c]
        todo = [i for i in range(n) if not hit[i]]
    # Pairs with the same prompt in the same batch (pair_batch computes a shared prompt once), prompts of
    # similar length together (rows pack with less padding).
    todo.sort(key=lambda i: (len(rows["prompt"][i]), rows["prompt"][i],
                             len(rows["chosen"][i]) + len(rows["rejected"][i])))
    bs = spec.batch_size
    for b in range(int(max_over_workers([-(-len(todo) // bs)], device)[0])):
        idx = todo[b * bs:(b + 1) * bs]
        use, src = (idx, rows) if idx else ([0], dummy)  # a worker with nothing left scores a row for nothing
        out = logprobs.reference_logps(engine, tokenizer, [src["prompt"][i] for i in use],
                                       [src["chosen"][i] for i in use], [src["rejected"][i] for i in use],
                                       spec.lengths, spec.packing)
        for c in REFERENCE_COLUMNS:
            values[c][idx] = out[c][:len(idx)]
    return values, todo


def _cache_lookup(cache, reader, groups: list[int]) -> dict:
    """{group: (hit per row, values per row)} for the rows of ``groups`` whose responses are both in
    the cache; {} without a cache."""
    import numpy as np

    if cache is None or not groups:
        return {}
    keys, sizes = [], []
    for g in groups:
        rows = reader.group(g).to_pydict()
        for side in ("chosen", "rejected"):
            keys.append(np.array([ReferenceCache.key(p, r) for p, r in zip(rows["prompt"], rows[side])], dtype="S32"))
        sizes.append(len(rows["id"]))
    found, logps, tokens = cache.lookup(np.concatenate(keys))
    known, at = {}, 0
    for g, n in zip(groups, sizes):
        c, r = slice(at, at + n), slice(at + n, at + 2 * n)
        known[g] = (found[c] & found[r], {"ref_chosen_logps": logps[c], "ref_rejected_logps": logps[r],
                                          "chosen_tokens": tokens[c], "rejected_tokens": tokens[r]})
        at += 2 * n
    return known


def _cache_entries(rows: dict, values: dict, todo: list[int]):
    """(keys, logps, tokens) of the responses of the rows ``todo`` just scored."""
    import numpy as np

    keys = [ReferenceCache.key(rows["prompt"][i], rows[side][i]) for side in ("chosen", "rejected") for i in todo]
    logps = np.concatenate([values[f"ref_{side}_logps"][todo] for side in ("chosen", "rejected")])
    tokens = np.concatenate([values[f"{side}_tokens"][todo] for side in ("chosen", "rejected")])
    return np.array(keys, dtype="S32"), logps, tokens


def reference_key(source, cfg, precision: str = "fp32") -> str:
    """The start model (path, GGUF file, its files' sizes and mtimes), how pairs are tokenized (``cfg``:
    train-policy's settings) and,
    unless fp32 (so caches of earlier versions still match), the precision of the forward."""
    from cwpo_ray.fingerprints import path_fingerprint

    where = Path(source.path) / source.gguf_file if source.gguf_file else source.path
    extra = () if precision == "fp32" else (precision,)
    return path_fingerprint(where, source.gguf_file, cfg.max_prompt_length, cfg.max_length, cfg.chat_template,
                            *extra)
