"""GRA against the share of human labels the annotator was trained on (the paper's label-budget figure).

Each labeled fraction is its own pipeline run (`data.labeled_fraction=F`, arms ws and cw); the human arm
(all the labels) comes from one of them. Two steps:

    # after each pipeline run: its per-prompt wins, one small JSON file per (fraction, seed), kept in git
    # (a run's MLflow store and OUT folder live on one machine; the files outlive it)
    MLFLOW_TRACKING_URI=sqlite:////path/mlflow.db .venv/bin/python bench/label_budget.py export \\
        --run 0.3=cwpo-label-budget/label-budget-0.3 --seeds 0 --to bench/label_budget/wins
    # the table and the plot, from those files
    .venv/bin/python bench/label_budget.py table --wins bench/label_budget/wins --seeds 0,1,2 \\
        --split test+test_unseen --out bench/label_budget

Over the seeds, per fraction: each weak arm's GRA with its hierarchical interval (seeds, then prompts), and
its paired difference against human, per seed on the prompts both were judged on (the same test prompts
and start responses for a seed, whatever the fraction). Writes label_budget*.md and label_budget*.png (GRA
and arm - human against the fraction).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cwpo_ray.comparison import collect
from cwpo_ray.gra import gra_over_seeds, paired_difference_over_seeds

WEAK_ARMS = ("ws", "cw")
SPLITS = ("test", "test_unseen")  # what the pipeline evaluates each arm on (the `full` preset)


def seed_metrics(metrics: dict, seed: str) -> dict:
    """A parent run's metrics as they concern one seed: ``seedS.`` prefixes dropped, other seeds' left out
    (the pipeline prefixes per-seed metrics only when it runs several seeds)."""
    out = {}
    for k, v in metrics.items():
        head, _, rest = k.partition(".")
        if head == f"seed{seed}":
            out[rest] = v
        elif not (head.startswith("seed") and head[4:].isdigit()):
            out.setdefault(k, v)
    return out


def export(client, experiment: str, run_name: str, fraction: float, seeds: list[str], loss: str, to: Path) -> list[Path]:
    """One JSON file per seed of the newest pipeline run of that name: each arm's per-prompt wins (split ->
    judge -> prompt id -> 1 / 0.5 / 0) and the run's figures for that seed (the annotator's among them)."""
    exp, parent = collect.find_parent(client, experiment, "", run_name)
    rows = [r for r in collect.latest_runs(collect.collect_rows(client, exp, parent, SPLITS[0]))
            if r["loss"] == loss and r["seed"] in seeds]
    to.mkdir(parents=True, exist_ok=True)
    written = []
    with collect.outcomes_of(client) as outcomes:
        for seed in seeds:
            arms = {}
            for r in (r for r in rows if r["seed"] == seed):
                by_split = {s: outcomes({**r, "split": s}) for s in SPLITS}
                if not all(by_split.values()):
                    raise SystemExit(f"label_budget: {r['arm']} (seed {seed}) has no responses for every split "
                                     f"of {SPLITS}: is its evaluation finished?")
                arms[r["arm"]] = {"run_id": r["run_id"], "judge": r["judge"],
                                  "human_labels_used": r["human_labels_used"], **by_split}
            if not arms:
                raise SystemExit(f"label_budget: {experiment}/{run_name} has no {loss} arm of seed {seed}")
            doc = {"fraction": fraction, "seed": seed, "loss": loss, "experiment": experiment,
                   "run_name": run_name, "parent_run_id": parent.info.run_id,
                   "run": seed_metrics(parent.data.metrics, seed), "arms": arms}
            path = to / f"fraction{fraction}-seed{seed}.json"
            path.write_text(json.dumps(doc, sort_keys=True) + "\n")
            written.append(path)
    return written


def read_exported(folder: Path, loss: str) -> list[dict]:
    """export's files of ``loss``, by fraction then seed."""
    docs = [json.loads(p.read_text()) for p in folder.glob("fraction*-seed*.json")]
    return sorted((d for d in docs if d["loss"] == loss), key=lambda d: (d["fraction"], int(d["seed"])))


def load_wins(docs: list[dict], split: str, judge: str = "") -> dict[float, dict[str, dict[str, dict]]]:
    """fraction -> seed -> arm -> prompt id -> win, from export's files (read_exported): on ``split`` (a
    pooled split's ids prefixed by their set), under ``judge`` (default: each arm's main judge)."""
    parts = collect.split_parts(split)
    out: dict[float, dict[str, dict[str, dict]]] = {}
    for doc in docs:
        for arm, a in doc["arms"].items():
            pooled, by = collect.pooled_wins(parts, [a.get(p) for p in parts]), judge or a["judge"]
            if pooled and by in pooled:
                out.setdefault(doc["fraction"], {}).setdefault(doc["seed"], {})[arm] = pooled[by]
    return out


def wins_of(by_seed: dict[str, dict[str, dict]], arm: str, seeds: list[str]) -> list[dict] | None:
    """Per seed (in ``seeds`` order), the arm's wins by prompt id; None unless every seed has them."""
    out = [by_seed.get(s, {}).get(arm) for s in seeds]
    return out if all(out) else None


def budget_table(wins: dict[float, dict[str, dict[str, dict]]], seeds: list[str], human_fraction: float) -> list[dict]:
    """One row per (fraction, weak arm), plus human: GRA and interval; weak arms also arm - human (paired).
    ``wins``: fraction -> seed -> arm -> prompt id -> win (load_wins)."""
    human = wins_of(wins.get(human_fraction, {}), "human", seeds)
    if human is None:
        raise SystemExit(f"the run at {human_fraction} has no human arm with responses on every seed {seeds}")
    table = [{"fraction": 1.0, "arm": "human", **gra_over_seeds([[w[i] for i in sorted(w)] for w in human])}]
    for f in sorted(wins):
        for arm in WEAK_ARMS:
            arm_wins = wins_of(wins[f], arm, seeds)
            if arm_wins is None:
                print(f"label_budget: {arm} at {f} misses a seed of {seeds}; left out")
                continue
            row = {"fraction": f, "arm": arm, **gra_over_seeds([[w[i] for i in sorted(w)] for w in arm_wins])}
            shared = [sorted(w.keys() & h.keys()) for w, h in zip(arm_wins, human)]
            d = paired_difference_over_seeds([[w[i] for i in ids] for w, ids in zip(arm_wins, shared)],
                                             [[h[i] for i in ids] for h, ids in zip(human, shared)])
            row.update(diff=d["diff"], diff_lo=d["lo"], diff_hi=d["hi"], diff_per_seed=d["per_seed"])
            table.append(row)
    return table


def markdown(table: list[dict], seeds: list[str], split: str, loss: str, judge: str = "") -> str:
    lines = [f"GRA by labeled fraction ({loss}, {split} prompts, {judge or 'the gold judge'}, seeds "
             f"{', '.join(seeds)}; mean over seeds, 95% hierarchical interval)", "",
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



def per_seed_markdown(docs: list[dict]) -> str:
    """One row per (seed, fraction): the annotator's figures and each arm's GRA (main judge, test / test_unseen)."""
    def f(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)

    lines = ["| seed | labeled fraction | labeled pairs | annotator: out-of-fold acc.; most confident third vs rest; p "
             "| gold agreement (cw-weighted) | mean confidence | human | ws | cw |",
             "|---|---:|---:|---|---|---:|---|---|---|"]
    for d in sorted(docs, key=lambda d: (int(d["seed"]), d["fraction"])):
        m = d["run"]
        gra = {}
        for arm, a in d["arms"].items():
            gra[arm] = " / ".join(f"{sum(w.values()) / len(w):.3f}" for w in (a[s][a["judge"]] for s in SPLITS))
        lines.append(
            f"| {d['seed']} | {d['fraction']:.1f} | {f(m.get('pairs.labeled'), '.0f')} "
            f"| {f(m.get('annotator.heldout_accuracy'))}; {f(m.get('annotator.heldout_confident_third_accuracy'))} vs "
            f"{f(m.get('annotator.heldout_other_accuracy'))}; p {f(m.get('annotator.heldout_learned_p'))} "
            f"| {f(m.get('annotator.gold_accuracy'))} ({f(m.get('annotator.gold_accuracy_cw'))}) "
            f"| {f(m.get('annotator.mean_confidence'))} | {gra.get('human', '')} | {gra.get('ws', '')} | {gra.get('cw', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a pipeline run's per-prompt wins into one JSON file per seed")
    ex.add_argument("--run", action="append", required=True, metavar="FRACTION=EXPERIMENT/RUN_NAME",
                    help="a pipeline run and the labeled fraction it used (repeatable)")
    ex.add_argument("--to", default="bench/label_budget/wins")
    tb = sub.add_parser("table", help="the table and the plot from the exported files")
    tb.add_argument("--wins", default="bench/label_budget/wins")
    tb.add_argument("--human", type=float, default=None,
                    help="the fraction whose run has the human arm (default: the largest)")
    tb.add_argument("--split", default="test", choices=("test", "test_unseen", "test+test_unseen"))
    tb.add_argument("--judge", default="", help="a second judge's wins (default: each arm's main judge)")
    tb.add_argument("--out", default="bench/label_budget")
    for p in (ex, tb):
        p.add_argument("--seeds", default="0,1,2", help="the seeds (comma-separated)")
        p.add_argument("--loss", default="dpo")
    args = ap.parse_args()
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]

    if args.command == "export":
        client = collect.mlflow_client()
        for spec in args.run:
            fraction, _, where = spec.partition("=")
            experiment, _, run_name = where.partition("/")
            for path in export(client, experiment, run_name, float(fraction), seeds, args.loss, Path(args.to)):
                print(f"label_budget: wrote {path}")
        return 0

    docs = read_exported(Path(args.wins), args.loss)
    wins = load_wins(docs, args.split, args.judge)
    if not wins:
        raise SystemExit(f"label_budget: no exported {args.loss} wins in {args.wins} (run `export` first)")
    table = budget_table(wins, seeds, args.human if args.human is not None else max(wins))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.split == "test" else "_" + args.split.replace("+", "_and_")) + (
        f"_{args.judge}" if args.judge else "")
    text = markdown(table, seeds, args.split, args.loss, args.judge)
    text += "\nEach run (GRA under its main judge, test / test_unseen):\n\n" + per_seed_markdown(
        [d for d in docs if d["seed"] in seeds])
    (out / f"label_budget{suffix}.md").write_text(text)
    chart(table, out / f"label_budget{suffix}.png",
          f"label budget, {args.loss}, {args.split} prompts, {args.judge or 'gold judge'}, seeds {args.seeds}")
    print(text)
    print(f"label_budget: wrote {out / f'label_budget{suffix}.md'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
