"""The training tables of the arms that are not the annotated one: the first n pairs, the simulated
humans' labels, the gold judge's labels; and the annotator's agreement with gold."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional


def take_first(src: Path, dst: Path, n: int, seed: int) -> Path:
    """The ``n`` pairs first in a seeded hash order of their ids: a fixed random subset,
    the same whatever order the table was written in."""
    import pyarrow as pa

    from cwpo_ray.sources import hash_unit
    from cwpo_ray.tables import read_table, write_table

    table = read_table(src)
    ids = table.column("id").to_pylist()
    keep = sorted(range(len(ids)), key=lambda i: hash_unit(f"{seed}:subset:{ids[i]}"))[:n]
    write_table(table.take(pa.array(sorted(keep))), dst)
    return dst


def labeled_table(unlabeled: Path, dst: Path, a_wins: Callable[[dict], Optional[bool]]) -> int:
    """The unlabeled pairs as a labeled table, ``a_wins(row)`` choosing (None: leave the pair out)."""
    import pyarrow as pa

    from cwpo_ray.tables import LABELED_SCHEMA, read_table, write_table

    rows = []
    for r in read_table(unlabeled).to_pylist():
        a = a_wins(r)
        if a is None:
            continue
        rows.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["response_a" if a else "response_b"],
                     "rejected": r["response_b" if a else "response_a"]})
    write_table(pa.Table.from_pylist(rows, schema=LABELED_SCHEMA), dst)
    return len(rows)


def human_table(unlabeled: Path, dst: Path) -> int:
    """The unlabeled pairs with their hidden human labels (the Human arm); a pair that never had
    a human label cannot be in it."""
    return labeled_table(unlabeled, dst, lambda r: r["human_choice"] == "a"
                         if r.get("human_choice") in ("a", "b") else None)


def source_gold(source: str) -> dict:
    """(prompt, response) -> gold score, when the source is a pairs table with gold_a / gold_b
    (the built-in benchmark is); else empty. The split tables do not carry gold columns."""
    from cwpo_ray.tables import read_table

    kind, _, where = source.partition(":")
    try:
        src = read_table(Path(where) / "pairs.parquet" if Path(where).is_dir() else where).to_pylist()
    except (FileNotFoundError, OSError):
        return {}
    if kind != "pairs" or not src or "gold_a" not in src[0]:
        return {}
    gold = {}
    for r in src:
        gold[(r["prompt"], r["response_a"])] = r["gold_a"]
        gold[(r["prompt"], r["response_b"])] = r["gold_b"]
    return gold


def gold_table(unlabeled: Path, source: str, dst: Path) -> int:
    """The unlabeled pairs labeled by their gold scores (the gold arm); pairs gold ties are left out."""
    gold = source_gold(source)
    if not gold:
        raise ValueError(f"arm 'gold' needs a pairs source with gold_a / gold_b columns; {source} has none")

    def a_wins(r):
        ga, gb = gold.get((r["prompt"], r["response_a"])), gold.get((r["prompt"], r["response_b"]))
        return None if ga is None or gb is None or ga == gb else ga > gb

    return labeled_table(unlabeled, dst, a_wins)


def gold_accuracy(annotated: Path, source: str) -> dict:
    """Annotator labels against the gold judge, when the source table carries gold_a / gold_b
    (the built-in benchmark does): plain and confidence-weighted accuracy on pairs gold does not tie."""
    import numpy as np

    from cwpo_ray import calibration
    from cwpo_ray.tables import read_table

    gold = source_gold(source)
    if not gold:
        return {}
    right, conf = [], []
    for r in read_table(annotated).to_pylist():
        gc, gr = gold.get((r["prompt"], r["chosen"])), gold.get((r["prompt"], r["rejected"]))
        if gc is None or gr is None or gc == gr:
            continue
        right.append(float(gc > gr))
        conf.append(r["confidence"])
    if not right:
        return {}
    out = {"annotator.gold_accuracy": float(np.mean(right)), "annotator.gold_pairs": len(right)}
    weighted = calibration.weighted_accuracy(conf, right)
    if weighted == weighted:  # nan when every confidence is 0
        out["annotator.gold_accuracy_cw"] = weighted
    return out


