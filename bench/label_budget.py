"""GRA against the share of human labels the annotator was trained on (the paper's label-budget figure).

Each labeled fraction is its own pipeline run (`data.labeled_fraction=F`, arms ws and cw); the human arm
(all the labels) comes from one of them. Over the seeds every run has, per fraction: each weak arm's GRA
with its hierarchical interval (seeds, then prompts), and its paired difference against human, per seed on
the prompts both were judged on (the same test prompts and start responses for a seed, whatever the
fraction). Writes label_budget.md and label_budget.png (GRA and arm - human against the fraction).

    MLFLOW_TRACKING_URI=sqlite:////path/mlflow.db .venv/bin/python bench/label_budget.py \\
        --run 0.3=cwpo-six-seeds/six-seeds --run 0.1=cwpo-label-budget/label-budget-0.1 \\
        --run 0.2=cwpo-label-budget/label-budget-0.2 --seeds 0,1,2 --out bench/label_budget
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cwpo_ray.comparison import collect
from cwpo_ray.gra import gra_over_seeds, paired_difference_over_seeds

WEAK_ARMS = ("ws", "cw")


def pipeline_rows(client, experiment: str, run_name: str, split: str, loss: str, seeds: list[str]) -> list[dict]:
    """The newest arm runs of the newest pipeline run of that name, for ``loss`` and ``seeds``."""
    exp, parent = collect.find_parent(client, experiment, "", run_name)
    rows = collect.latest_runs(collect.collect_rows(client, exp, parent, split))
    return [r for r in rows if r["loss"] == loss and r["seed"] in seeds]


def wins_of(rows: list[dict], arm: str, seeds: list[str], outcomes) -> list[dict] | None:
    """Per seed (in ``seeds`` order), the arm's main-judge wins by prompt id; None unless every seed has them."""
    by_seed = {r["seed"]: r for r in rows if r["arm"] == arm}
    out = []
    for s in seeds:
        w = outcomes(by_seed[s]) if s in by_seed else None
        if not w:
            return None
        out.append(w[by_seed[s]["judge"]])
    return out


def budget_table(runs: dict[float, list[dict]], seeds: list[str], outcomes, human_fraction: float) -> list[dict]:
    """One row per (fraction, weak arm), plus human: GRA and interval; weak arms also arm - human (paired)."""
    human = wins_of(runs[human_fraction], "human", seeds, outcomes)
    if human is None:
        raise SystemExit(f"the run at {human_fraction} has no human arm with responses on every seed {seeds}")
    table = [{"fraction": 1.0, "arm": "human", **gra_over_seeds([[w[i] for i in sorted(w)] for w in human])}]
    for f in sorted(runs):
        for arm in WEAK_ARMS:
            wins = wins_of(runs[f], arm, seeds, outcomes)
            if wins is None:
                print(f"label_budget: {arm} at {f} misses a seed of {seeds}; left out")
                continue
            row = {"fraction": f, "arm": arm, **gra_over_seeds([[w[i] for i in sorted(w)] for w in wins])}
            shared = [sorted(w.keys() & h.keys()) for w, h in zip(wins, human)]
            d = paired_difference_over_seeds([[w[i] for i in ids] for w, ids in zip(wins, shared)],
                                             [[h[i] for i in ids] for h, ids in zip(human, shared)])
            row.update(diff=d["diff"], diff_lo=d["lo"], diff_hi=d["hi"], diff_per_seed=d["per_seed"])
            table.append(row)
    return table


def markdown(table: list[dict], seeds: list[str], split: str, loss: str) -> str:
    lines = [f"GRA by labeled fraction ({loss}, {split} prompts, seeds {', '.join(seeds)}; mean over seeds, 95% "
             "hierarchical interval)", "",
             "| labeled fraction | arm | GRA | 95% CI | per seed | arm - human | 95% CI | per seed |",
             "|---:|---|---:|---|---|---:|---|---|"]
    for r in table:
        per = " / ".join(f"{x:.3f}" for x in r["gra_per_seed"])
        diff = ("", "", "") if "diff" not in r else (
            f"{r['diff']:+.3f}", f"[{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]",
            " / ".join(f"{x:+.3f}" for x in r["diff_per_seed"]))
        lines.append(f"| {r['fraction']:.1f} | {r['arm']} | {r['gra']:.3f} | [{r['gra_lo']:.3f}, {r['gra_hi']:.3f}] "
                     f"| {per} | {diff[0]} | {diff[1]} | {diff[2]} |")
    return "\n".join(lines) + "\n"


def chart(table: list[dict], path: Path, title: str) -> None:
    from cwpo_ray.comparison.charts import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    human = next(r for r in table if r["arm"] == "human")
    left.axhspan(human["gra_lo"], human["gra_hi"], color="grey", alpha=0.2)
    left.axhline(human["gra"], color="grey", label="human (all labels)")
    left.axhline(0.5, color="black", lw=0.8, ls=":")
    right.axhline(0.0, color="black", lw=0.8, ls=":")
    for k, arm in enumerate(WEAK_ARMS):
        rows = [r for r in table if r["arm"] == arm]
        if not rows:
            continue
        x = [r["fraction"] + (k - 0.5) * 0.006 for r in rows]  # side by side, not on top of each other
        for ax, key, lo, hi in ((left, "gra", "gra_lo", "gra_hi"), (right, "diff", "diff_lo", "diff_hi")):
            y = [r[key] for r in rows]
            ax.errorbar(x, y, yerr=[[a - r[lo] for a, r in zip(y, rows)], [r[hi] - a for a, r in zip(y, rows)]],
                        marker="o", capsize=3, label=arm)
    fractions = sorted({r["fraction"] for r in table if r["arm"] != "human"})
    for ax in (left, right):
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.set_xlim(min(fractions) - 0.05, max(fractions) + 0.05)
    left.set(xlabel="share of the human labels the annotator saw", ylabel="GRA", title="GRA")
    right.set(xlabel="share of the human labels the annotator saw", ylabel="GRA difference",
              title="arm - human (paired)")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="FRACTION=EXPERIMENT/RUN_NAME",
                    help="a pipeline run and the labeled fraction it used (repeat for each fraction)")
    ap.add_argument("--human", type=float, default=None,
                    help="the fraction whose run has the human arm (default: the largest)")
    ap.add_argument("--seeds", default="0,1,2", help="the seeds every run must have (comma-separated)")
    ap.add_argument("--loss", default="dpo")
    ap.add_argument("--split", default="test", choices=("test", "test_unseen", "test+test_unseen"))
    ap.add_argument("--out", default="bench/label_budget")
    args = ap.parse_args()

    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    client = collect.mlflow_client()
    runs = {}
    for spec in args.run:
        fraction, _, where = spec.partition("=")
        experiment, _, run_name = where.partition("/")
        runs[float(fraction)] = pipeline_rows(client, experiment, run_name, args.split, args.loss, seeds)
    with collect.outcomes_of(client) as outcomes:
        table = budget_table(runs, seeds, outcomes, args.human if args.human is not None else max(runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.split == "test" else "_" + args.split.replace("+", "_and_")
    text = markdown(table, seeds, args.split, args.loss)
    (out / f"label_budget{suffix}.md").write_text(text)
    chart(table, out / f"label_budget{suffix}.png", f"label budget, {args.loss}, {args.split} prompts, seeds {args.seeds}")
    print(text)
    print(f"label_budget: wrote {out / f'label_budget{suffix}.md'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
