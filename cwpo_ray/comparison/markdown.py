"""compare.md: the arms' GRA over seeds, under every judge, their paired differences and, with several
seeds, each seed's own numbers, as Markdown tables (pure: rows from aggregate.arm_rows / paired_rows).

One seed is the n = 1 case: the columns that only say something with several seeds (seeds, per seed)
are left out, so a one-seed table reads as a plain arms x losses table.
"""

from __future__ import annotations

import math
from typing import Callable

from cwpo_ray.gra import excludes_zero

ACROSS_JUDGES = ("across judges: *all judges* = the interval excludes 0 on the same side under every judge; "
                 "*judge-specific* = it excludes 0 under some judges and not under others (the difference may "
                 "come from how one judge scores); *judges disagree* = it excludes 0 on opposite sides; "
                 "*none* = under no judge.")
DEFINITIONS = "GRA counts a tie half; GRA strict counts only a higher score (the paper's definition)."

Column = tuple[str, Callable[[dict], str]]


def fmt(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def interval(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    return "-" if lo is None or hi is None else f"[{fmt(lo)}, {fmt(hi)}]"


def seed_name(seed) -> str:
    return "untagged" if seed is None else str(seed)


def per_seed(by_seed: dict, seeds: list, digits: int = 3, signed: bool = False) -> str:
    """Each seed's value in seed order, "-" where a seed has none: "0.630 / 0.580 / 0.610"."""
    def one(v):
        return "-" if v is None else f"{v:+.3f}" if signed else fmt(v, digits)

    return " / ".join(one(by_seed.get(s)) for s in seeds)


def counts(by_seed: dict, seeds: list) -> str:
    """Prompts per seed: one number when every seed has the same, else each seed's."""
    values = [by_seed.get(s) for s in seeds]
    present = {v for v in values if v is not None}
    return fmt(present.pop(), 0) if len(present) == 1 and None not in values else per_seed(by_seed, seeds, 0)


def table(columns: list[Column], items: list[dict]) -> list[str]:
    return ["| " + " | ".join(head for head, _ in columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(x) for _, cell in columns) + " |" for x in items)]


def gra_table(agg: list[dict], seeds: list, title: str) -> str:
    """Every arm x loss under the main judge: GRA and strict GRA with their intervals (over seeds and
    prompts; over prompts with one seed), gold rewards, pair accuracy, annotator accuracy, human labels."""
    several = len(seeds) > 1
    judges = ", ".join(dict.fromkeys(r["judge"] for r in agg))
    over = (f"Over {len(seeds)} seeds ({' / '.join(seed_name(s) for s in seeds)}; each its own split, annotator and "
            "training): every value is the mean over the seeds of each seed's own value; the 95% interval is a "
            "hierarchical bootstrap (resample seeds, then prompts within each seed); *per seed* lists each seed's "
            "value in that order (- where it did not run). ") if several else ""
    columns = [("arm", lambda r: r["arm"]), ("loss", lambda r: r["loss"]),
               *([("seeds", lambda r: str(len(r["seeds"])))] if several else []),
               ("GRA", lambda r: fmt(r["gra"])), ("95% CI", lambda r: interval(r, "gra")),
               *([("GRA per seed", lambda r: per_seed(r["gra_per_seed"], seeds))] if several else []),
               ("GRA strict", lambda r: fmt(r["gra_strict"])), ("strict 95% CI", lambda r: interval(r, "gra_strict")),
               *([("strict per seed", lambda r: per_seed(r["gra_strict_per_seed"], seeds))] if several else []),
               ("gold (policy)", lambda r: fmt(r["gold_policy"])),
               ("gold (SFT start)", lambda r: fmt(r["gold_reference"])),
               ("pair acc.", lambda r: fmt(r["pair_accuracy"])),
               ("annotator acc.", lambda r: fmt(r["annotator_accuracy"])),
               ("human labels", lambda r: fmt(r["human_labels_used"], 0)),
               ("test prompts", lambda r: counts(r["n"], seeds))]
    lines = [f"### {title}", "", f"{over}Gold judge: {judges}. {DEFINITIONS}", "", *table(columns, agg)]
    return "\n".join(lines) + "\n"


def judges_table(agg: list[dict], seeds: list) -> str:
    """Every arm under every judge its evaluation ran (the main judge first); empty with one judge."""
    if not any(r["judges"] for r in agg):
        return ""
    several = len(seeds) > 1
    items = [dict(m, arm=r["arm"], loss=r["loss"], judge=judge, seeds=r["seeds"])
             for r in agg for judge, m in [(r["judge"], r), *r["judges"].items()]]
    columns = [("arm", lambda m: m["arm"]), ("loss", lambda m: m["loss"]), ("judge", lambda m: m["judge"]),
               *([("seeds", lambda m: str(len(m["seeds"])))] if several else []),
               ("GRA", lambda m: fmt(m["gra"])), ("95% CI", lambda m: interval(m, "gra")),
               *([("GRA per seed", lambda m: per_seed(m["gra_per_seed"], seeds))] if several else []),
               ("GRA strict", lambda m: fmt(m["gra_strict"])), ("strict 95% CI", lambda m: interval(m, "gra_strict")),
               ("gold (policy)", lambda m: fmt(m["gold_policy"])),
               ("gold (SFT start)", lambda m: fmt(m["gold_reference"]))]
    lines = ["### GRA under every judge" + (", over seeds" if several else ""), "", *table(columns, items)]
    return "\n".join(lines) + "\n"


def paired_table(pairs: list[dict], seeds: list) -> str:
    """The contrasts as paired GRA differences, per loss and judge, with how each reads across judges."""
    several = len(seeds) > 1
    title = ("Paired GRA differences over seeds (within a seed: same prompts, same start responses; 95% "
             "hierarchical bootstrap: seeds, then prompts)" if several else
             "Paired GRA differences (same prompts, same start responses; 95% bootstrap over prompts)")
    columns = [("loss", lambda p: p["loss"]), ("contrast", lambda p: f"{p['a']} - {p['b']}"),
               ("judge", lambda p: p["judge"]), ("difference", lambda p: f"{p['diff']:+.3f}"),
               ("95% CI", lambda p: f"[{p['lo']:+.3f}, {p['hi']:+.3f}]"),
               *([("per seed", lambda p: per_seed(p["per_seed"], seeds, signed=True))] if several else []),
               ("interval excludes 0", lambda p: "yes" if excludes_zero(p["lo"], p["hi"]) else "no"),
               ("across judges", lambda p: p.get("across") or "-"),
               *([("seeds", lambda p: str(p["n_seeds"]))] if several else []),
               ("prompts", lambda p: counts(p["n"], seeds))]
    lines = [f"### {title}", "", *table(columns, pairs)]
    if any(p.get("across") for p in pairs):
        lines += ["", ACROSS_JUDGES + (" Over seeds, each judge's interval is its interval over seeds." if several
                                       else "")]
    return "\n".join(lines) + "\n"


def seeds_table(rows: list[dict]) -> str:
    """Every seed's own numbers, as its evaluation logged them (interval over its prompts alone)."""
    columns = [("arm", lambda r: r["arm"]), ("loss", lambda r: r["loss"]), ("seed", lambda r: seed_name(r["seed"])),
               ("GRA", lambda r: fmt(r["gra"])), ("95% CI", lambda r: interval(r, "gra")),
               ("GRA strict", lambda r: fmt(r["gra_strict"])), ("strict 95% CI", lambda r: interval(r, "gra_strict")),
               ("test prompts", lambda r: fmt(r["n"], 0))]
    lines = ["### Every seed (its own evaluation: 95% bootstrap over its prompts)", "", *table(columns, rows)]
    return "\n".join(lines) + "\n"


def document(agg: list[dict], pairs: list[dict], rows: list[dict], seeds: list, title: str, replaced: int = 0,
             split: str = "test") -> str:
    """compare.md: the main table, every judge's (when there are several), the paired differences (when
    some contrast ran), each seed's own numbers (with several seeds) and a note on replaced runs."""
    parts = [gra_table(agg, seeds, title), judges_table(agg, seeds), paired_table(pairs, seeds) if pairs else "",
             seeds_table(rows) if len(seeds) > 1 else ""]
    text = "\n".join(p for p in parts if p)
    if replaced:
        text += f"\n{replaced} older run(s) of an arm x loss x seed that a newer run replaced are left out.\n"
    # The prompt-count columns name the split compared.
    return text if split == "test" else text.replace("| test prompts |", f"| {split} prompts |")
