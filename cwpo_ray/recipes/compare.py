"""Compare a pipeline's arms x losses from MLflow: GRA with its 95% bootstrap interval (ties
half) and strict GRA (ties 0, the paper's definition) with its own, mean
gold reward of the policy and of its SFT start, implicit-reward pair accuracy, the
annotator's accuracy (against the gold judge when the data has one, else against the hidden
human labels) and how many human labels each arm used. Then the contrasts the paper's claim is
about (cwpo_ray.arms.CONTRASTS: cw - human, cw - ws, cw - cw_raw, ws - human, ..., per loss) as paired GRA
differences: every arm is judged on the same test prompts against the same start responses,
so the per-prompt differences are resampled together (gra.paired_difference), which
separates arms that two overlapping GRA intervals cannot.

When the evaluation ran extra judges (`cwpo evaluate`'s extra_judges), every arm's GRA is also
shown under each of them, and every paired difference is computed under each judge from the
per-judge score columns of the arm's responses.parquet. A contrast whose interval excludes 0
under some judges but not under others is flagged ``judge-specific``: the gain may come from
how one judge scores rather than from better responses (gra.across_judges).

Seeds: one seed is the n = 1 case of several (cwpo_ray.comparison.aggregate). When the arm runs span
several seeds (`cwpo pipeline ... seeds=[0,1,2]`: every seed its own split, annotator and training),
every value is the mean over seeds of each seed's value, with a hierarchical bootstrap interval
(resample seeds, then prompts within each seed) and each seed's value; the paired differences likewise,
paired on the prompts within each seed; then each seed's own numbers. The chart shows each seed as a dot
beside the mean and its interval, and the aggregated main-judge numbers are also logged to the parent as
``seeds.ARM.LOSS.gra`` ... and ``seeds.A-B.LOSS.diff`` .... Runs without a seed tag (older pipelines)
count as one seed.

Reads the child runs of a pipeline parent run (--parent-run-id, default: the latest pipeline
run of --experiment). Prints the tables, writes OUT/compare.md, OUT/compare.png (GRA per
arm, one bar per loss, interval whiskers, the 0.5 line) and OUT/compare_paired.png (the
differences with their intervals, the 0 line), and logs them to the parent run. --split
validation compares the evaluations on the validation prompts instead (what settings are chosen
by) into compare_validation.md / .png / _paired.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cwpo_ray.comparison import aggregate, charts, collect, markdown
from cwpo_ray.config import option

EPILOG = """examples:
  cwpo compare                                   # latest pipeline run of experiment cwpo-pipeline
  cwpo compare --experiment my-exp --out runs/compare
  cwpo compare --parent-run-id 0123abcd... --out runs/compare
  cwpo compare --experiment my-exp --split validation   # the runs evaluated with evaluate.split validation
"""


@dataclass
class Config:
    experiment: str = option("cwpo-pipeline", "MLflow experiment of the pipeline run")
    parent_run_id: str = option("", "pipeline parent run (default: the latest pipeline run of the experiment)")
    out: str = option("runs/compare", "folder for compare.md and compare.png")
    log: bool = option(True, "also log the table and chart to the parent run")
    split: str = option("test", "which evaluation of the arms: test (the measurement), validation (the prompts "
                                "settings are chosen on), test_unseen (evaluate.unseen_prompts) or "
                                "test+test_unseen (both sets' prompts pooled, each seed's intervals over all)",
                        choices=("test", "validation", "test_unseen", "test+test_unseen"))


def split_file(name: str, split: str) -> str:
    """compare.md for the test split, compare_validation.md for the validation split."""
    stem, dot, ext = name.partition(".")
    return name if split == "test" else f"{stem}_{split.replace('+', '_and_')}{dot}{ext}"


def run(cfg: Config) -> int:
    client = collect.mlflow_client()
    exp, parent = collect.find_parent(client, cfg.experiment, cfg.parent_run_id)
    all_rows = collect.collect_rows(client, exp, parent, cfg.split)
    if not all_rows:
        raise ValueError(f"pipeline run {parent.info.run_id} has no arm runs yet")
    if cfg.split != "test":
        all_rows = [r for r in all_rows if r["n"] is not None]  # arms evaluated on that split
        if not all_rows:
            raise ValueError(f"pipeline run {parent.info.run_id} has no arm evaluated on the {cfg.split} split")
    rows = collect.latest_runs(all_rows)
    seeds = aggregate.seeds_of(rows)
    with collect.outcomes_of(client) as outcomes:  # each arm run's per-prompt wins, downloaded once
        agg = aggregate.arm_rows(rows, outcomes)
        pairs = aggregate.paired_rows(rows, outcomes)
        own = aggregate.each_seed(rows, outcomes) if len(seeds) > 1 else []  # one seed: the tables above are it

    title = (f"{cfg.experiment} / {parent.info.run_name} ({parent.info.run_id[:8]})"
             + ("" if cfg.split == "test" else f", {cfg.split} prompts"))
    text = markdown.document(agg, pairs, own, seeds, title, replaced=len(all_rows) - len(rows), split=cfg.split)
    print(text, flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    md, png, paired_png = (out / split_file(name, cfg.split) for name in ("compare.md", "compare.png",
                                                                           "compare_paired.png"))
    md.write_text(text)
    charts.bar_chart(agg, seeds, png, title)
    files = [md, png]
    if pairs:
        charts.paired_chart(pairs, seeds, paired_png, title)
        files.append(paired_png)
    if cfg.log:
        # One seed: the pipeline already logged each arm's numbers to the parent as ARM.LOSS.*.
        metrics = aggregate.seed_metrics(agg, pairs, cfg.split) if len(seeds) > 1 else {}
        for k, v in metrics.items():
            client.log_metric(parent.info.run_id, k, v)
        for f in files:
            client.log_artifact(parent.info.run_id, str(f))
    print(f"cwpo compare: wrote {', '.join(str(f) for f in files)}", flush=True)
    return 0
