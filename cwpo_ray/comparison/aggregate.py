"""The arm runs of a pipeline, aggregated per arm x loss over the seeds that ran it, and the arms'
paired differences (pure: rows as collect.collect_rows reads them, per-prompt outcomes through a callable).

One path for any number of seeds, one seed being n = 1: every value is the mean over the seeds of each
seed's own value, its interval the hierarchical bootstrap (resample seeds, then prompts within each
seed: gra.gra_over_seeds, gra.paired_difference_over_seeds). With one seed that bootstrap is the plain
bootstrap over the seed's prompts, draw for draw (gra.hierarchical_bootstrap).
"""

from __future__ import annotations

from typing import Callable, Optional

from cwpo_ray.arms import CONTRASTS

# judge -> prompt id -> 1 / 0.5 / 0 of a row's run (collect.outcomes_of), or None without its responses file
Outcomes = Callable[[dict], Optional[dict]]
# GRA and strict GRA with their intervals, as the evaluation logs them and the tables show them
INTERVAL_KEYS = ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi")


def is_pooled(row: dict) -> bool:
    """Whether a row's split pools several evaluated splits' prompts ("test+test_unseen"; collect.split_parts),
    which no logged figure covers."""
    return "+" in row.get("split", "test")


def seed_key(seed) -> tuple:
    """Sort order of seed tags: untagged (older runs) first, then numeric, then any other text."""
    if seed is None:
        return (0, 0, "")
    try:
        return (1, int(seed), "")
    except ValueError:
        return (2, 0, str(seed))


def seeds_of(rows: list[dict]) -> list:
    """The distinct seeds of the arm runs, in order; a run without a seed tag (older runs) is seed None."""
    return sorted({r["seed"] for r in rows}, key=seed_key)


def mean(values) -> float | None:
    """Mean of the values present (None and NaN left out); None when there are none."""
    xs = [v for v in values if v is not None and v == v]
    return sum(xs) / len(xs) if xs else None


def judge_over_seeds(logged: list[dict], outcomes: list[dict | None], pooled: bool = False) -> dict:
    """One judge's GRA and strict GRA for an arm x loss over the seeds that ran it, from each seed's logged
    metrics and its per-prompt wins (prompt id -> win; None where its responses file is missing). ``pooled``:
    the prompts of several evaluated splits together, which no logged figure covers: always from the wins."""
    from cwpo_ray.gra import gra_over_seeds

    if len(logged) == 1 and not pooled:
        # One seed (n = 1): the hierarchical bootstrap draws that seed every time, so its interval is the
        # percentile bootstrap over the seed's prompts (draw for draw) and carries prompt noise only: one seed
        # cannot show the between-seed spread. The seed's evaluation computed that same interval (with its own
        # n_boot and seed) and logged it; it is shown as is, so the table agrees with the run's eval/* metrics
        # and with the seed's row in the every-seed table, and needs no responses file.
        m = {k: logged[0].get(k) for k in INTERVAL_KEYS}
        m.update(gra_per_seed=[m["gra"]], gra_strict_per_seed=[m["gra_strict"]])
    elif all(outcomes):
        m = gra_over_seeds([[w[i] for i in sorted(w)] for w in outcomes])
    else:  # a seed left no responses file: the seeds' mean, but no interval to resample
        per, strict = [x.get("gra") for x in logged], [x.get("gra_strict") for x in logged]
        m = {"gra": mean(per), "gra_lo": None, "gra_hi": None, "gra_per_seed": per,
             "gra_strict": mean(strict), "gra_strict_lo": None, "gra_strict_hi": None, "gra_strict_per_seed": strict}
    return {**m, "gold_policy": mean(x.get("gold_policy") for x in logged),
            "gold_reference": mean(x.get("gold_reference") for x in logged)}


def each_seed(rows: list[dict], outcomes: Outcomes) -> list[dict]:
    """The rows for the every-seed table: as logged, except on a pooled split (several evaluated splits'
    prompts together), where no logged figure covers the prompts and each run's main-judge GRA and interval
    come from its pooled wins (the plain bootstrap over that seed's prompts; None without its responses)."""
    from cwpo_ray.gra import gra_over_seeds

    out = []
    for r in rows:
        if is_pooled(r):
            w = (outcomes(r) or {}).get(r["judge"])
            m = gra_over_seeds([[w[i] for i in sorted(w)]]) if w else dict.fromkeys(INTERVAL_KEYS)
            r = {**r, **{k: m[k] for k in INTERVAL_KEYS}}
        out.append(r)
    return out


def arm_rows(rows: list[dict], outcomes: Outcomes) -> list[dict]:
    """One row per arm x loss, in the order of ``rows``: each judge's GRA and strict GRA over the seeds that
    ran it (judge_over_seeds) with the per-seed values (``*_per_seed``: seed -> value), ``seeds`` (those
    seeds), ``n`` (seed -> prompts); the other columns are means over seeds."""
    groups: dict[tuple, dict] = {}
    for r in rows:  # rows come sorted by loss, arm, seed
        groups.setdefault((r["arm"], r["loss"]), {})[r["seed"]] = r
    out = []
    for (arm, loss), by_seed in groups.items():
        seeds = list(by_seed)
        runs = [by_seed[s] for s in seeds]
        found = [outcomes(r) for r in runs]
        pooled = is_pooled(runs[0])
        agg = judge_over_seeds(runs, [w.get(r["judge"]) if w else None for r, w in zip(runs, found)], pooled)
        judges = {j: judge_over_seeds([r["judges"][j] for r in runs], [w.get(j) if w else None for w in found],
                                      pooled)
                  for j in runs[0]["judges"] if all(j in r["judges"] for r in runs)}
        for m in [agg, *judges.values()]:
            m["gra_per_seed"] = dict(zip(seeds, m["gra_per_seed"]))
            m["gra_strict_per_seed"] = dict(zip(seeds, m["gra_strict_per_seed"]))
        out.append({"arm": arm, "loss": loss, "seeds": seeds, "judge": runs[0]["judge"], **agg, "judges": judges,
                    "n": {s: r["n"] for s, r in zip(seeds, runs)},
                    "pair_accuracy": mean(r["pair_accuracy"] for r in runs),
                    "annotator_accuracy": mean(r["annotator_accuracy"] for r in runs),
                    "human_labels_used": mean(r["human_labels_used"] for r in runs)})
    return out


def paired_rows(rows: list[dict], outcomes: Outcomes) -> list[dict]:
    """The CONTRASTS present, per loss and per judge, as paired GRA differences over the seeds where both
    arms ran and left their responses: within a seed the per-prompt differences on shared prompts, then the
    hierarchical bootstrap (gra.paired_difference_over_seeds; one seed: gra.paired_difference). Each carries
    ``per_seed`` and ``n`` (seed -> difference, prompts) and ``across``, the contrast's reading over judges."""
    from cwpo_ray.gra import across_judges, paired_difference_over_seeds

    by_key = {(r["arm"], r["loss"], r["seed"]): r for r in rows}
    seeds = seeds_of(rows)
    out = []
    for loss in dict.fromkeys(r["loss"] for r in rows):
        for a, b in CONTRASTS:
            both = []  # (seed, wins of a, wins of b) where both arms ran and left their responses
            for s in seeds:
                ra, rb = by_key.get((a, loss, s)), by_key.get((b, loss, s))
                wa, wb = (outcomes(ra), outcomes(rb)) if ra and rb else (None, None)
                if wa and wb:
                    both.append((s, wa, wb))
            if not both:
                continue
            group = []
            for judge in [j for j in both[0][1] if all(j in wa and j in wb for _, wa, wb in both)]:
                xs, ys = [], []
                for _, wa, wb in both:
                    ids = sorted(wa[judge].keys() & wb[judge].keys())
                    xs.append([wa[judge][i] for i in ids])
                    ys.append([wb[judge][i] for i in ids])
                d = paired_difference_over_seeds(xs, ys)
                group.append({"loss": loss, "a": a, "b": b, "judge": judge, **d,
                              "per_seed": dict(zip([s for s, _, _ in both], d["per_seed"])),
                              "n": dict(zip([s for s, _, _ in both], d["n"]))})
            verdict = across_judges([(p["lo"], p["hi"]) for p in group])
            out += [dict(p, across=verdict) for p in group]
    return out


def seed_metrics(agg: list[dict], pairs: list[dict], split: str = "test") -> dict:
    """The aggregated main-judge numbers as parent-run metrics: seeds.ARM.LOSS.gra ..., seeds.A-B.LOSS.diff ...
    (the pipeline logs each seed's as seedS.ARM.LOSS.gra ...); seeds.validation.ARM... for the validation split."""
    out = {}
    base = "seeds" if split == "test" else f"seeds.{split.replace('+', '_and_')}"  # MLflow names take no '+'
    for r in agg:
        name = f"{base}.{r['arm'].replace(':', '')}.{r['loss']}"
        for k in INTERVAL_KEYS:
            out[f"{name}.{k}"] = r[k]
        out[f"{name}.n_seeds"] = len(r["seeds"])
    for p in pairs:
        if p["judge"] == next(r["judge"] for r in agg):
            name = f"{base}.{p['a'].replace(':', '')}-{p['b'].replace(':', '')}.{p['loss']}"
            out.update({f"{name}.diff": p["diff"], f"{name}.lo": p["lo"], f"{name}.hi": p["hi"]})
    return {k: float(v) for k, v in out.items() if v is not None and v == v}
