"""The annotator's accuracy against the gold judge on the unlabeled split, seed by seed.

The built-in benchmark, the `full` preset's annotator settings (MiniLM-L6, mean pooling,
max_length 128, 5 epochs at most, lr 2e-5, batch 16) with train-annotator's defaults where the
preset pins the old behaviour: the epoch count chosen by 5-fold cross-validation on the labeled
pairs then a refit on all of them (folds 5), a temperature fitted on the out-of-fold margins
(calibration temperature), and the data stage's default validation split (0.1 of the prompts
held out, so fewer labeled pairs than the preset's 315). Per seed it runs the pipeline's own
stage functions (stages.run_data, run_annotator, run_annotate), so "gold accuracy" is
exactly the number the pipeline logs as annotator.gold_accuracy (arm_tables.gold_accuracy: the
annotator's label against VADER's on the unlabeled pairs VADER does not tie).

Nothing here is chosen by gold accuracy: settings come from the preset and train-annotator's
defaults; the epoch count and the temperature are chosen on the labeled pairs (out-of-fold).

    python bench/annotator_seeds.py --seeds 0            # one seed (~6 min on 2 cores)
    python bench/annotator_seeds.py --seeds 0,1,2,3,4    # the seeds not saved yet, then the table
    python bench/annotator_seeds.py --seeds 0-4 --table  # only the table, from the saved results

Each seed's result is saved as bench/annotator_seeds/<tag>/seed-N.json (small; committed) as soon
as it is measured, so one seed per command accumulates. --set KEY=VALUE overrides a pipeline
setting (e.g. annotator.lr=1e-5) and needs --tag, so a variant's results are kept apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(k, v)

# The first full preset (full_seed0.yaml, what the saved seeds ran) with train-annotator's and the data
# stage's defaults where it pins the old behaviour (folds 1, calibration none, no validation split): its
# annotator settings are then full.yaml's.
DEFAULTS = ["annotator.folds=5", "annotator.calibration=temperature", "data.validation_fraction=0.1"]


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return seeds


def measure(seed: int, overrides: list[str], work: Path) -> dict:
    """One seed: the data stage's split, the annotator (k-fold epoch choice, refit, temperature), the
    annotation of the unlabeled split, and the pipeline's own gold accuracy of it."""
    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import pipeline
    from cwpo_ray.orchestration import stages

    cfg = load_config(pipeline.Config, str(REPO / "cwpo_ray" / "configs" / "full_seed0.yaml"),
                      overrides=DEFAULTS + overrides)
    cfg = replace(cfg, seed=seed, experiment="cwpo-annotator-seeds")
    out = work / f"seed-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    tables = stages.run_data(cfg, out / "data")
    ann = stages.run_annotator(cfg, tables["labeled"], out, parent_run_id="")
    t_ann = time.time() - t0
    labels = stages.run_annotate(cfg, tables["unlabeled"], ann["annotator"], out / "annotate")
    report = json.loads((Path(ann["annotator"]) / "eval.json").read_text())
    best, cal = report["best"], report["calibration"]
    folds = sorted({h["round"] for h in report["history"] if h["round"].startswith("fold-")})
    oof_by_epoch = []  # per epoch count, the folds' held-out BT loss and accuracy (what chose the epochs)
    for e in range(1, cfg.annotator.epochs + 1):
        rows = [h for h in report["history"] if h["round"] in folds and h["epoch"] == e]
        if len(rows) == len(folds) and rows:
            oof_by_epoch.append({
                "epoch": e, "heldout_bt_loss_mean_over_folds": sum(r["heldout_bt_loss"] for r in rows) / len(rows),
                "heldout_accuracy_mean_over_folds": sum(r["heldout_accuracy"] for r in rows) / len(rows)})
    m = labels["metrics"]
    return {**pooled_oof(out / "ray"), 
        "seed": seed, "overrides": DEFAULTS + overrides,
        "labeled_pairs": tables["n_labeled"], "unlabeled_pairs": tables["n_unlabeled"],
        "chosen_epochs": best["epoch"],
        "oof_accuracy": best["accuracy"], "oof_accuracy_lo": best["accuracy_lo"],
        "oof_accuracy_hi": best["accuracy_hi"], "oof_pairs": best["n"], "oof_bt_loss": best["bt_loss"],
        "oof_by_epoch": oof_by_epoch,
        "temperature": cal["temperature"], "ece_before": cal["ece_before"], "ece_after": cal["ece_after"],
        "gold_accuracy": m.get("annotator.gold_accuracy"), "gold_pairs": m.get("annotator.gold_pairs"),
        "gold_accuracy_cw": m.get("annotator.gold_accuracy_cw"),
        "human_agreement": m.get("annotator.human_agreement"),
        "mean_confidence": m.get("annotator.mean_confidence"),  # calibrated, on the unlabeled pairs
        "seconds_annotator": round(t_ann, 1), "seconds_total": round(time.time() - t0, 1),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def pooled_oof(ray_dir: Path) -> dict:
    """Per epoch count, the out-of-fold margins of all folds pooled (read from the run's last checkpoint,
    which carries them): accuracy, BT loss, the temperature fitted to them and the BT loss after it.
    Labeled pairs only. train-annotator chooses by the raw BT loss; the calibrated one is what the
    weights see after temperature scaling (recorded to judge that choice, not used by it)."""
    import torch

    from cwpo_ray import calibration

    states = sorted(ray_dir.glob("*/checkpoint_*/state.pt"))
    if not states:
        return {}
    oof = torch.load(states[-1], map_location="cpu", weights_only=False)["client_state"]["oof"]
    folds = [v for k, v in oof.items() if k.startswith("fold-")]
    rows = []
    for e in range(min(len(v) for v in folds)):
        margins = [x for v in folds for x in v[e]]
        t = calibration.fit_temperature(margins)
        lo, hi = calibration.wilson_interval(float((calibration.correctness(margins)).sum()), len(margins))
        rows.append({"epoch": e + 1, "accuracy": calibration.accuracy(margins), "accuracy_lo": lo, "accuracy_hi": hi,
                     "bt_loss": calibration.bt_loss(margins), "temperature": t,
                     "bt_loss_calibrated": calibration.bt_loss([x / t for x in margins])})
    return {"oof_pooled_by_epoch": rows}


def fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: list[dict]) -> str:
    lines = ["| seed | labeled pairs | chosen epochs | out-of-fold accuracy [95% Wilson] | T | "
             "gold accuracy (unlabeled) | gold pairs | mean confidence |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['labeled_pairs']} | {r['chosen_epochs']} | {fmt(r['oof_accuracy'])} "
                     f"[{fmt(r['oof_accuracy_lo'])}, {fmt(r['oof_accuracy_hi'])}] | {fmt(r['temperature'], '.2f')} | "
                     f"{fmt(r['gold_accuracy'])} | {r['gold_pairs']} | {fmt(r['mean_confidence'])} |")
    if results:
        mean = lambda k: sum(r[k] for r in results) / len(results)  # noqa: E731
        lines.append(f"| mean ({len(results)} seeds) | {mean('labeled_pairs'):.0f} | {mean('chosen_epochs'):.1f} | "
                     f"{mean('oof_accuracy'):.3f} | {mean('temperature'):.2f} | **{mean('gold_accuracy'):.3f}** | "
                     f"{mean('gold_pairs'):.0f} | {mean('mean_confidence'):.3f} |")
        lows = min(r["gold_accuracy"] for r in results)
        lines.append(f"\nlowest seed {lows:.3f} (target: none below 0.58, mean >= 0.60)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0-4", help="e.g. 0 | 0,1,2 | 0-4")
    p.add_argument("--table", action="store_true", help="only print the table of the saved seeds")
    p.add_argument("--force", action="store_true", help="measure again a seed already saved")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a pipeline setting")
    p.add_argument("--reanalyse", action="store_true", help="add the pooled out-of-fold figures to saved seeds "
                   "from their runs' checkpoints (no training)")
    p.add_argument("--tag", default="default", help="results folder name (required with --set)")
    p.add_argument("--work", default=str(REPO / "runs" / "annotator_seeds"), help="scratch folder")
    args = p.parse_args(argv)
    if args.set and args.tag == "default":
        p.error("--set changes the settings: give the variant a --tag")
    results_dir = REPO / "bench" / "annotator_seeds" / args.tag
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) / args.tag
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(work / 'mlflow.db').resolve()}")
    work.mkdir(parents=True, exist_ok=True)
    seeds = parse_seeds(args.seeds)
    for seed in seeds:
        path = results_dir / f"seed-{seed}.json"
        if args.reanalyse and path.exists():
            saved = json.loads(path.read_text())
            path.write_text(json.dumps({**saved, **pooled_oof(work / f"seed-{seed}" / "ray")}, indent=1) + "\n")
        if args.table or (path.exists() and not args.force):
            continue
        result = measure(seed, args.set, work)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"seed {seed}: gold accuracy {result['gold_accuracy']:.3f}, {result['seconds_total']:.0f} s -> {path}",
              flush=True)
    results = [json.loads((results_dir / f"seed-{s}.json").read_text()) for s in seeds
               if (results_dir / f"seed-{s}.json").exists()]
    print(f"\n{args.tag}: {' '.join(DEFAULTS + args.set)} over the full preset\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
