"""Compare a pipeline's arms x losses from MLflow: GRA with its 95% bootstrap interval (ties
half) and strict GRA (ties 0, the paper's definition) with its own, mean
gold reward of the policy and of its SFT start, implicit-reward pair accuracy, the
annotator's accuracy (against the gold judge when the data has one, else against the hidden
human labels) and how many human labels each arm used. Then the contrasts the paper's claim is
about (cw - human, cw - ws, cw - cw_raw, ws - human, cw - human_labeled_only, per loss) as paired GRA
differences: every arm is judged on the same test prompts against the same start responses,
so the per-prompt differences are resampled together (gra.paired_difference), which
separates arms that two overlapping GRA intervals cannot.

When the evaluation ran extra judges (`cwpo evaluate`'s extra_judges), every arm's GRA is also
shown under each of them, and every paired difference is computed under each judge from the
per-judge score columns of the arm's responses.parquet. A contrast whose interval excludes 0
under some judges but not under others is flagged ``judge-specific``: the gain may come from
how one judge scores rather than from better responses (gra.across_judges).

When the parent's arm runs span several seeds (`cwpo pipeline ... seeds=[0,1,2]`: every seed its own
split, annotator and training), the tables are over seeds: per arm x loss (and judge) the mean over
seeds of each seed's GRA, a hierarchical bootstrap interval (resample seeds, then prompts within each
seed: gra.gra_over_seeds) and each seed's value; the paired differences likewise, paired on the
prompts within each seed (gra.paired_difference_over_seeds); then each seed's own numbers. The
chart shows each seed as a dot beside the mean and its interval, and the aggregated main-judge
numbers are also logged to the parent as ``seeds.ARM.LOSS.gra`` ... and ``seeds.A-B.LOSS.diff`` ....
Runs without a seed tag (older pipelines) count as one seed.

Reads the child runs of a pipeline parent run (--parent-run-id, default: the latest pipeline
run of --experiment). Prints the tables, writes OUT/compare.md, OUT/compare.png (GRA per
arm, one bar per loss, interval whiskers, the 0.5 line) and OUT/compare_paired.png (the
differences with their intervals, the 0 line), and logs them to the parent run. --split
validation compares the evaluations on the validation prompts instead (what settings are chosen
by) into compare_validation.md / .png / _paired.png.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cwpo_ray.config import option
from cwpo_ray.weighting import reads_weak_labels

EPILOG = """examples:
  cwpo compare                                   # latest pipeline run of experiment cwpo-pipeline
  cwpo compare --experiment my-exp --out runs/compare
  cwpo compare --parent-run-id 0123abcd... --out runs/compare
  cwpo compare --experiment my-exp --split validation   # the runs evaluated with evaluate.split validation
"""

ARM_ORDER = ("human", "human_labeled_only", "ws", "cw", "cw_raw", "gold")
# cw - cw_raw: the calibrated confidence as weight against the uncalibrated one (each shown when both arms ran).
CONTRASTS = (("cw", "human"), ("cw", "ws"), ("cw", "cw_raw"), ("ws", "human"), ("cw", "human_labeled_only"),
             ("gold", "human"))


@dataclass
class Config:
    experiment: str = option("cwpo-pipeline", "MLflow experiment of the pipeline run")
    parent_run_id: str = option("", "pipeline parent run (default: the latest pipeline run of the experiment)")
    out: str = option("runs/compare", "folder for compare.md and compare.png")
    log: bool = option(True, "also log the table and chart to the parent run")
    split: str = option("test", "which evaluation of the arms: test (the measurement) or validation (the prompts "
                                "settings are chosen on)", choices=("test", "validation"))


def split_file(name: str, split: str) -> str:
    """compare.md for the test split, compare_validation.md for the validation split."""
    stem, dot, ext = name.partition(".")
    return name if split == "test" else f"{stem}_{split}{dot}{ext}"


def _client():
    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking

    return MlflowClient(tracking.tracking_uri())


def find_parent(client, experiment: str, parent_run_id: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    if parent_run_id:
        return exp, client.get_run(parent_run_id)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"no pipeline run in experiment {experiment!r}")
    return exp, runs[0]


GRA_KEYS = ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi", "gold_policy", "gold_reference")


def judge_metrics(metrics: dict, prefix: str = "eval") -> tuple[dict, dict]:
    """(main judge's GRA metrics, {extra judge: its GRA metrics}) from a run's ``eval/*`` metrics
    (``validation/*`` for the validation split); an extra judge's are logged as ``eval/JUDGE.gra`` ...."""
    p = prefix + "/"
    main = {k: metrics.get(p + k) for k in GRA_KEYS}
    extra_names = sorted(k[len(p):-len(".gra")] for k in metrics if k.startswith(p) and k.endswith(".gra"))
    return main, {j: {k: metrics.get(f"{p}{j}.{k}") for k in GRA_KEYS} for j in extra_names}


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


def collect_rows(client, exp, parent, split: str = "test") -> list[dict]:
    """One row per child (arm x loss, x seed when the pipeline ran several) run, in a stable arm order;
    its metrics are those of the arm's evaluation on ``split``."""
    from cwpo_ray.recipes.evaluate import metric_prefix

    prefix = metric_prefix(split)
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'arm'")
    pm = parent.data.metrics

    def annotator_accuracy(seed):
        # The pipeline prefixes a seed's annotator metrics with "seedS." when it runs several seeds.
        for prefix in ([f"seed{seed}."] if seed is not None else []) + [""]:
            for k in ("annotator.gold_accuracy", "annotator.human_agreement"):
                if prefix + k in pm:
                    return pm[prefix + k]
        return None

    rows = []
    for run in children:
        m, tags = run.data.metrics, run.data.tags
        arm = tags.get("arm", run.info.run_name)
        seed = tags.get("seed")
        annotator_acc = annotator_accuracy(seed)
        main, extra = judge_metrics(m, prefix)
        rows.append({
            "split": split,
            "arm": arm, "loss": tags.get("loss", ""), "seed": seed, "run_id": run.info.run_id,
            "start_time": run.info.start_time or 0, **main,
            # runs evaluated before the judge was tagged: "gold"
            "judge": tags.get(f"{prefix}/judge", "gold"), "judges": extra,
            "n": m.get(f"{prefix}/n"), "pair_accuracy": m.get(f"{prefix}/pair_accuracy"),
            # Only the weak-label arms rest on the annotator's labels.
            "annotator_accuracy": annotator_acc if reads_weak_labels(arm) else None,
            "human_labels_used": m.get("human_labels_used"),
        })
    order = {a: i for i, a in enumerate(ARM_ORDER)}
    return sorted(rows, key=lambda r: (r["loss"], order.get(r["arm"], len(order)), r["arm"], seed_key(r["seed"])))


def wins_by_judge(rows: list[dict], main_judge: str) -> dict[str, dict]:
    """judge -> {prompt id -> 1 / 0.5 / 0} from the rows of a responses.parquet: the main judge's from
    ``policy_score`` / ``reference_score``, every other judge's from ``policy_score_<judge>`` /
    ``reference_score_<judge>`` (pure)."""
    from cwpo_ray.gra import wins

    if not rows:
        return {}
    ids = [r["id"] for r in rows]
    out = {main_judge: dict(zip(ids, wins([r["policy_score"] for r in rows],
                                          [r["reference_score"] for r in rows]).tolist()))}
    for col in rows[0]:
        judge = col[len("policy_score_"):] if col.startswith("policy_score_") else None
        if judge and judge != main_judge and f"reference_score_{judge}" in rows[0]:
            out[judge] = dict(zip(ids, wins([r[col] for r in rows],
                                            [r[f"reference_score_{judge}"] for r in rows]).tolist()))
    return out


def per_prompt_wins(client, run_id: str, dst: Path, main_judge: str = "gold", split: str = "test") -> dict | None:
    """judge -> prompt id -> 1 / 0.5 / 0 (the arm's response scored above / equal to / below the
    start's), from the responses.parquet the pipeline logs to each arm's run (a validation evaluation's
    under validation/); None when it is not there."""
    from mlflow.exceptions import MlflowException

    from cwpo_ray.recipes.evaluate import artifact_dir
    from cwpo_ray.tables import read_table

    dst.mkdir(parents=True, exist_ok=True)
    folder = artifact_dir(split)
    try:
        path = client.download_artifacts(run_id, f"{folder}/responses.parquet" if folder else "responses.parquet",
                                         str(dst))
    except (MlflowException, OSError):
        return None
    return wins_by_judge(read_table(path).to_pylist(), main_judge)


def paired_rows(client, rows: list[dict]) -> list[dict]:
    """The CONTRASTS present in ``rows``, per loss and per judge both arms were scored by, as paired
    GRA differences on shared prompts; each carries ``across``, the contrast's reading over judges."""
    from cwpo_ray.gra import across_judges, paired_difference

    by_key = {(r["arm"], r["loss"]): r for r in rows}
    found: dict[str, dict | None] = {}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        def outcomes(row):
            if row["run_id"] not in found:
                found[row["run_id"]] = per_prompt_wins(client, row["run_id"], Path(tmp) / row["run_id"], row["judge"],
                                                       row["split"])
            return found[row["run_id"]]

        for loss in dict.fromkeys(r["loss"] for r in rows):
            for a, b in CONTRASTS:
                ra, rb = by_key.get((a, loss)), by_key.get((b, loss))
                wa, wb = (outcomes(ra), outcomes(rb)) if ra and rb else (None, None)
                if not wa or not wb:
                    continue
                group = []
                for judge in [j for j in wa if j in wb]:  # the main judge first
                    ids = sorted(wa[judge].keys() & wb[judge].keys())
                    group.append({"loss": loss, "a": a, "b": b, "judge": judge,
                                  **paired_difference([wa[judge][i] for i in ids], [wb[judge][i] for i in ids])})
                verdict = across_judges([(p["lo"], p["hi"]) for p in group])
                out += [dict(p, across=verdict) for p in group]
    return out


def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    return "-" if lo is None or hi is None else f"[{_f(lo)}, {_f(hi)}]"


def markdown(rows: list[dict], title: str) -> str:
    judges = ", ".join(dict.fromkeys(r["judge"] for r in rows))
    head = ("| arm | loss | GRA | 95% CI | GRA strict | strict 95% CI | gold (policy) | gold (SFT start) | pair acc. "
            "| annotator acc. | human labels | test prompts |")
    lines = [f"### {title}", "",
             f"Gold judge: {judges}. GRA counts a tie half; GRA strict counts only a higher score (the paper's "
             "definition).", "", head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['loss']} | {_f(r['gra'])} | {_ci(r, 'gra')} | {_f(r['gra_strict'])} | "
                     f"{_ci(r, 'gra_strict')} | {_f(r['gold_policy'])} | "
                     f"{_f(r['gold_reference'])} | {_f(r['pair_accuracy'])} | {_f(r['annotator_accuracy'])} | "
                     f"{_f(r['human_labels_used'], 0)} | {_f(r['n'], 0)} |")
    return "\n".join(lines) + "\n"


def judges_markdown(rows: list[dict]) -> str:
    """Every arm under every judge its evaluation ran (the main judge first); empty with one judge."""
    if not any(r["judges"] for r in rows):
        return ""
    lines = ["### GRA under every judge", "",
             "| arm | loss | judge | GRA | 95% CI | GRA strict | strict 95% CI | gold (policy) | gold (SFT start) |",
             "|" + "---|" * 9]
    for r in rows:
        for judge, m in [(r["judge"], r), *r["judges"].items()]:
            lines.append(f"| {r['arm']} | {r['loss']} | {judge} | {_f(m['gra'])} | {_ci(m, 'gra')} | "
                         f"{_f(m['gra_strict'])} | {_ci(m, 'gra_strict')} | {_f(m['gold_policy'])} | "
                         f"{_f(m['gold_reference'])} |")
    return "\n".join(lines) + "\n"


def paired_markdown(pairs: list[dict]) -> str:
    several = any(p.get("across") for p in pairs)
    lines = ["### Paired GRA differences (same prompts, same start responses; 95% bootstrap over prompts)", "",
             "| loss | contrast | judge | difference | 95% CI | interval excludes 0 | across judges | prompts |",
             "|" + "---|" * 8]
    for p in pairs:
        excludes = "yes" if p["lo"] > 0 or p["hi"] < 0 else "no"
        lines.append(f"| {p['loss']} | {p['a']} - {p['b']} | {p.get('judge', '-')} | {p['diff']:+.3f} | "
                     f"[{p['lo']:+.3f}, {p['hi']:+.3f}] | {excludes} | {p.get('across') or '-'} | {p['n']} |")
    if several:
        lines += ["", "across judges: *all judges* = the interval excludes 0 on the same side under every judge; "
                      "*judge-specific* = it excludes 0 under some judges and not under others (the difference may "
                      "come from how one judge scores); *judges disagree* = it excludes 0 on opposite sides; "
                      "*none* = under no judge."]
    return "\n".join(lines) + "\n"


def paired_chart(pairs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({p.get("judge") for p in pairs}) > 1
    labels = [f"{p['a']} - {p['b']} ({p['loss']}" + (f", {p['judge']})" if several else ")") for p in pairs]
    ys = list(range(len(pairs)))[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(pairs) + 1.4))
    over_seeds = any("per_seed" in p for p in pairs)
    ax.errorbar([p["diff"] for p in pairs], ys, fmt="o", capsize=3, label="mean over seeds" if over_seeds else None,
                xerr=[[p["diff"] - p["lo"] for p in pairs], [p["hi"] - p["diff"] for p in pairs]])
    if over_seeds:  # each seed's own difference, a small dot on the contrast's line
        dots = [(v, y) for p, y in zip(pairs, ys) for v in p.get("per_seed", []) if v is not None]
        ax.plot([v for v, _ in dots], [y for _, y in dots], "o", ms=3.5, color="black", alpha=0.7, label="one seed")
        ax.legend(fontsize=7, loc="best")
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("GRA difference (95% hierarchical bootstrap over seeds and prompts)" if over_seeds
                  else "GRA difference (95% paired bootstrap)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    width = 0.8 / max(len(losses), 1)
    over_seeds = any("gra_per_seed" in r for r in rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 3.6))
    dots = []
    for j, loss in enumerate(losses):
        xs, ys, errs = [], [], [[], []]
        for i, arm in enumerate(arms):
            r = next((r for r in rows if r["arm"] == arm and r["loss"] == loss and r["gra"] is not None), None)
            if r is None:
                continue
            xs.append(i + (j - (len(losses) - 1) / 2) * width)
            ys.append(r["gra"])
            errs[0].append(max(r["gra"] - (r["gra_lo"] if r["gra_lo"] is not None else r["gra"]), 0))
            errs[1].append(max((r["gra_hi"] if r["gra_hi"] is not None else r["gra"]) - r["gra"], 0))
            vals = [v for v in r.get("gra_per_seed", []) if v is not None]
            # each seed's GRA, spread a little across the bar so equal values stay visible
            step = width / (2 * max(len(vals), 1))
            dots += [(xs[-1] + (k - (len(vals) - 1) / 2) * step, v) for k, v in enumerate(vals)]
        ax.bar(xs, ys, width=width, yerr=np.array(errs), capsize=3, label=loss)
    if dots:
        ax.plot([x for x, _ in dots], [y for _, y in dots], "o", ms=3.5, color="black", alpha=0.7, label="one seed")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("GRA vs SFT start: mean over seeds\n(95% hierarchical CI)" if over_seeds
                  else "GRA vs SFT start (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(title="loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- results over seeds

def _mean(values) -> float | None:
    """Mean of the values present (None and NaN left out); None when there are none."""
    xs = [v for v in values if v is not None and v == v]
    return sum(xs) / len(xs) if xs else None


def _seed_values(by_seed: dict, seeds: list, digits: int = 3) -> str:
    """Each seed's value in seed order, "-" where a seed has none: "0.630 / 0.580 / 0.610"."""
    return " / ".join(_f(by_seed.get(s), digits) for s in seeds)


def _seed_name(seed) -> str:
    return "untagged" if seed is None else str(seed)


def _judge_over_seeds(metrics: list[dict], outcomes: list[dict | None]) -> dict:
    """One judge's GRA over the seeds of an arm x loss: from every seed's per-prompt wins (hierarchical
    interval) when all of them are there, else the mean of the seeds' logged GRAs with no interval."""
    from cwpo_ray.gra import gra_over_seeds

    if outcomes and all(outcomes):
        m = gra_over_seeds([[w[i] for i in sorted(w)] for w in outcomes])
    else:
        per, strict = [x.get("gra") for x in metrics], [x.get("gra_strict") for x in metrics]
        m = {"gra": _mean(per), "gra_lo": None, "gra_hi": None, "gra_per_seed": per,
             "gra_strict": _mean(strict), "gra_strict_lo": None, "gra_strict_hi": None, "gra_strict_per_seed": strict}
    return {**m, "gold_policy": _mean(x.get("gold_policy") for x in metrics),
            "gold_reference": _mean(x.get("gold_reference") for x in metrics)}


def rows_over_seeds(rows: list[dict], outcomes) -> list[dict]:
    """One row per arm x loss: each judge's GRA and strict GRA as the mean over the seeds that ran it,
    with the hierarchical interval (gra.gra_over_seeds) and the per-seed values (``*_per_seed``: seed ->
    value); the other columns are means over seeds. ``outcomes(row)``: judge -> prompt id -> win, or None."""
    groups: dict[tuple, dict] = {}
    for r in rows:  # rows come sorted by loss, arm, seed
        groups.setdefault((r["arm"], r["loss"]), {})[r["seed"]] = r
    out = []
    for (arm, loss), by_seed in groups.items():
        seeds = list(by_seed)
        runs = [by_seed[s] for s in seeds]
        main = runs[0]["judge"]
        found = [outcomes(r) for r in runs]
        agg = _judge_over_seeds(runs, [w.get(r["judge"]) if w else None for r, w in zip(runs, found)])
        judges = {}
        for j in [j for j in runs[0]["judges"] if all(j in r["judges"] for r in runs)]:
            judges[j] = _judge_over_seeds([r["judges"][j] for r in runs], [w.get(j) if w else None for w in found])
        for m in [agg, *judges.values()]:  # seed -> value, for the tables and the chart
            m["gra_per_seed"] = dict(zip(seeds, m["gra_per_seed"]))
            m["gra_strict_per_seed"] = dict(zip(seeds, m["gra_strict_per_seed"]))
        out.append({"arm": arm, "loss": loss, "seeds": seeds, "judge": main, **agg, "judges": judges,
                    "n": {s: r["n"] for s, r in zip(seeds, runs)},
                    "pair_accuracy": _mean(r["pair_accuracy"] for r in runs),
                    "annotator_accuracy": _mean(r["annotator_accuracy"] for r in runs),
                    "human_labels_used": _mean(r["human_labels_used"] for r in runs)})
    return out


def paired_rows_over_seeds(rows: list[dict], outcomes) -> list[dict]:
    """The CONTRASTS present, per loss and per judge, as paired GRA differences over the seeds where both
    arms ran: within a seed the per-prompt differences on shared prompts, then the hierarchical bootstrap
    (gra.paired_difference_over_seeds); each carries ``across``, the contrast's reading over judges."""
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


def _counts(by_seed: dict, seeds: list) -> str:
    """Prompts per seed: one number when every seed has the same, else each seed's."""
    values = [by_seed.get(s) for s in seeds]
    present = {v for v in values if v is not None}
    return _f(present.pop(), 0) if len(present) == 1 and None not in values else _seed_values(by_seed, seeds, 0)


def markdown_over_seeds(agg: list[dict], seeds: list, title: str) -> str:
    judges = ", ".join(dict.fromkeys(r["judge"] for r in agg))
    names = " / ".join(_seed_name(s) for s in seeds)
    lines = [f"### {title}", "",
             f"Over {len(seeds)} seeds ({names}; each its own split, annotator and training): every value is the mean "
             "over the seeds of each seed's own value; the 95% interval is a hierarchical bootstrap (resample seeds, "
             "then prompts within each seed); *per seed* lists each seed's value in that order (- where it did "
             f"not run). Gold judge: {judges}. GRA counts a tie half; GRA strict counts only a higher score (the "
             "paper's definition).", "",
             "| arm | loss | seeds | GRA | 95% CI | GRA per seed | GRA strict | strict 95% CI | strict per seed "
             "| gold (policy) | gold (SFT start) | pair acc. | annotator acc. | human labels | test prompts |",
             "|" + "---|" * 15]
    for r in agg:
        lines.append(f"| {r['arm']} | {r['loss']} | {len(r['seeds'])} | {_f(r['gra'])} | {_ci(r, 'gra')} | "
                     f"{_seed_values(r['gra_per_seed'], seeds)} | {_f(r['gra_strict'])} | {_ci(r, 'gra_strict')} | "
                     f"{_seed_values(r['gra_strict_per_seed'], seeds)} | {_f(r['gold_policy'])} | "
                     f"{_f(r['gold_reference'])} | {_f(r['pair_accuracy'])} | {_f(r['annotator_accuracy'])} | "
                     f"{_f(r['human_labels_used'], 0)} | {_counts(r['n'], seeds)} |")
    return "\n".join(lines) + "\n"


def judges_markdown_over_seeds(agg: list[dict], seeds: list) -> str:
    """Every arm under every judge, over seeds (the main judge first); empty with one judge."""
    if not any(r["judges"] for r in agg):
        return ""
    lines = ["### GRA under every judge, over seeds", "",
             "| arm | loss | judge | seeds | GRA | 95% CI | GRA per seed | GRA strict | strict 95% CI | gold (policy) "
             "| gold (SFT start) |", "|" + "---|" * 11]
    for r in agg:
        for judge, m in [(r["judge"], r), *r["judges"].items()]:
            lines.append(f"| {r['arm']} | {r['loss']} | {judge} | {len(r['seeds'])} | {_f(m['gra'])} | "
                         f"{_ci(m, 'gra')} | {_seed_values(m['gra_per_seed'], seeds)} | {_f(m['gra_strict'])} | "
                         f"{_ci(m, 'gra_strict')} | {_f(m['gold_policy'])} | {_f(m['gold_reference'])} |")
    return "\n".join(lines) + "\n"


def paired_markdown_over_seeds(pairs: list[dict], seeds: list) -> str:
    several = any(p.get("across") for p in pairs)
    lines = ["### Paired GRA differences over seeds (within a seed: same prompts, same start responses; 95% "
             "hierarchical bootstrap: seeds, then prompts)", "",
             "| loss | contrast | judge | difference | 95% CI | per seed | interval excludes 0 | across judges | seeds "
             "| prompts |", "|" + "---|" * 10]
    for p in pairs:
        excludes = "yes" if p["lo"] > 0 or p["hi"] < 0 else "no"
        per = " / ".join("-" if p["per_seed"].get(s) is None else f"{p['per_seed'][s]:+.3f}" for s in seeds)
        lines.append(f"| {p['loss']} | {p['a']} - {p['b']} | {p['judge']} | {p['diff']:+.3f} | "
                     f"[{p['lo']:+.3f}, {p['hi']:+.3f}] | {per} | {excludes} | {p.get('across') or '-'} | "
                     f"{p['n_seeds']} | {_counts(p['n'], seeds)} |")
    if several:
        lines += ["", "across judges: as in the single-seed table, read from each judge's interval over seeds."]
    return "\n".join(lines) + "\n"


def seeds_markdown(rows: list[dict]) -> str:
    """Every seed's own numbers, as its evaluation logged them (interval over its prompts alone)."""
    lines = ["### Every seed (its own evaluation: 95% bootstrap over its prompts)", "",
             "| arm | loss | seed | GRA | 95% CI | GRA strict | strict 95% CI | test prompts |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['loss']} | {_seed_name(r['seed'])} | {_f(r['gra'])} | {_ci(r, 'gra')} | "
                     f"{_f(r['gra_strict'])} | {_ci(r, 'gra_strict')} | {_f(r['n'], 0)} |")
    return "\n".join(lines) + "\n"


def metrics_over_seeds(agg: list[dict], pairs: list[dict], split: str = "test") -> dict:
    """The aggregated main-judge numbers as parent-run metrics: seeds.ARM.LOSS.gra ..., seeds.A-B.LOSS.diff ...
    (the pipeline logs each seed's as seedS.ARM.LOSS.gra ...); seeds.validation.ARM... for the validation split."""
    out = {}
    base = "seeds" if split == "test" else f"seeds.{split}"
    for r in agg:
        name = f"{base}.{r['arm'].replace(':', '')}.{r['loss']}"
        for k in ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi"):
            out[f"{name}.{k}"] = r[k]
        out[f"{name}.n_seeds"] = len(r["seeds"])
    for p in pairs:
        if p["judge"] == next(r["judge"] for r in agg):
            name = f"{base}.{p['a'].replace(':', '')}-{p['b'].replace(':', '')}.{p['loss']}"
            out.update({f"{name}.diff": p["diff"], f"{name}.lo": p["lo"], f"{name}.hi": p["hi"]})
    return {k: float(v) for k, v in out.items() if v is not None and v == v}


def latest_runs(rows: list[dict]) -> list[dict]:
    """One run per arm x loss x seed, the newest: a pipeline resumed after a change of code or settings
    starts a new child run for what it reruns, and the one it replaced stays under the parent."""
    newest: dict[tuple, dict] = {}
    for r in rows:
        k = (r["arm"], r["loss"], r["seed"])
        if k not in newest or r["start_time"] > newest[k]["start_time"]:
            newest[k] = r
    keep = {id(r) for r in newest.values()}
    return [r for r in rows if id(r) in keep]


def replaced_note(replaced: int) -> str:
    return (f"\n{replaced} older run(s) of an arm x loss x seed that a newer run replaced are left out.\n"
            if replaced else "")


def report_over_seeds(client, rows: list[dict], seeds: list, title: str, out: Path,
                      replaced: int = 0, split: str = "test") -> tuple[str, list[Path], dict]:
    """compare.md's text, the charts (written under ``out``) and the parent-run metrics, over seeds."""
    with tempfile.TemporaryDirectory() as tmp:
        found: dict[str, dict | None] = {}

        def outcomes(row):
            if row["run_id"] not in found:
                found[row["run_id"]] = per_prompt_wins(client, row["run_id"], Path(tmp) / row["run_id"], row["judge"],
                                                       row["split"])
            return found[row["run_id"]]

        agg = rows_over_seeds(rows, outcomes)
        pairs = paired_rows_over_seeds(rows, outcomes)
    by_judge = judges_markdown_over_seeds(agg, seeds)
    text = (markdown_over_seeds(agg, seeds, title) + ("\n" + by_judge if by_judge else "")
            + ("\n" + paired_markdown_over_seeds(pairs, seeds) if pairs else "") + "\n" + seeds_markdown(rows)
            + replaced_note(replaced))
    names = "/".join(_seed_name(s) for s in seeds)
    chart_rows = [dict(r, gra_per_seed=[r["gra_per_seed"].get(s) for s in seeds]) for r in agg]
    bar_chart(chart_rows, out / split_file("compare.png", split), f"{title}\nmean over seeds {names}, one dot per seed")
    files = [out / split_file("compare.png", split)]
    if pairs:
        paired_chart([dict(p, per_seed=list(p["per_seed"].values())) for p in pairs],
                     out / split_file("compare_paired.png", split), f"{title}\nover seeds {names}, one dot per seed")
        files.append(out / split_file("compare_paired.png", split))
    return text, files, metrics_over_seeds(agg, pairs, split)


def prompts_column(text: str, split: str) -> str:
    """The tables' prompt-count column names the split compared."""
    return text if split == "test" else text.replace("| test prompts |", f"| {split} prompts |")


def run(cfg: Config) -> int:
    client = _client()
    exp, parent = find_parent(client, cfg.experiment, cfg.parent_run_id)
    all_rows = collect_rows(client, exp, parent, cfg.split)
    if not all_rows:
        raise ValueError(f"pipeline run {parent.info.run_id} has no arm runs yet")
    if cfg.split != "test":
        all_rows = [r for r in all_rows if r["n"] is not None]  # arms evaluated on that split
        if not all_rows:
            raise ValueError(f"pipeline run {parent.info.run_id} has no arm evaluated on the {cfg.split} split")
    rows = latest_runs(all_rows)
    replaced = len(all_rows) - len(rows)
    title = (f"{cfg.experiment} / {parent.info.run_name} ({parent.info.run_id[:8]})"
             + ("" if cfg.split == "test" else f", {cfg.split} prompts"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / split_file("compare.md", cfg.split)
    seeds = seeds_of(rows)
    if len(seeds) > 1:
        text, charts, metrics = report_over_seeds(client, rows, seeds, title, out, replaced, cfg.split)
        text = prompts_column(text, cfg.split)
        print(text, flush=True)
        md.write_text(text)
        files = [md, *charts]
        if cfg.log:
            for k, v in metrics.items():
                client.log_metric(parent.info.run_id, k, v)
            for f in files:
                client.log_artifact(parent.info.run_id, str(f))
        print(f"cwpo compare: wrote {', '.join(str(f) for f in files)}", flush=True)
        return 0
    pairs = paired_rows(client, rows)
    by_judge = judges_markdown(rows)
    text = (markdown(rows, title) + ("\n" + by_judge if by_judge else "")
            + ("\n" + paired_markdown(pairs) if pairs else "") + replaced_note(replaced))
    text = prompts_column(text, cfg.split)
    print(text, flush=True)
    md.write_text(text)
    bar_chart(rows, out / split_file("compare.png", cfg.split), title)
    files = [md, out / split_file("compare.png", cfg.split)]
    if pairs:
        paired_chart(pairs, out / split_file("compare_paired.png", cfg.split), title)
        files.append(out / split_file("compare_paired.png", cfg.split))
    if cfg.log:
        for f in files:
            client.log_artifact(parent.info.run_id, str(f))
    print(f"cwpo compare: wrote {', '.join(str(f) for f in files)}", flush=True)
    return 0
