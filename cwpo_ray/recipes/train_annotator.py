"""Train the weak annotator: a pretrained backbone + scalar head, Bradley-Terry loss (Ray Train).

DATA is a labeled pair table (id, prompt, chosen, rejected; Parquet or JSONL, file or folder).
A held-out slice (--heldout-fraction, chosen by a seeded hash of id, so it is the same on
any cluster) is scored after every epoch: BT loss, accuracy, ECE. The whole model is
fine-tuned (paper defaults: 5 epochs, Adam, lr 1e-5, batch 32 pairs across all workers).
The epoch with the lowest held-out BT loss is the one written to OUT -- not the last one:
an annotator trained towards zero training loss becomes overconfident (docs/METHOD.md).

Input text is prompt + separator + response. When it is longer than --max-length tokens the
prompt is cut from the LEFT (its end, nearest the response, survives); only a response that
alone does not fit is cut, from the right.

Runs on a Ray Train TorchTrainer (--num-workers, --strategy ddp|deepspeed, --zero-stage),
checkpoints every epoch and resumes from the last checkpoint after a worker failure
(--max-failures). OUT must be on storage the rank-0 worker sees. Writes OUT (a decoder: an HF
sequence-classification model; an encoder: backbone + reward_head.pt; see docs/ANNOTATOR_FORMAT.md;
tokenizer, annotator.json, eval.json, reliability.png, confidence_hist.png)
and logs metrics, plots and the folder to MLflow.

--keep-fold-models (folds > 1): the k fold models that chose the epoch count are kept too, each at
that count, in OUT/folds/fold-F/ (annotator folders, with the annotator's temperature: it was fit on
their held-out margins), for `cwpo annotate --confidence ensemble`; annotator.json and eval.json
name them under "fold_models". MLflow gets that list, not their weights.

The data plan (held-out split, k folds, the refit's epochs) is ``cwpo_ray.annotator_training.rounds``;
what each Ray Train worker runs is ``cwpo_ray.annotator_training.worker``; the kept fold models are
``cwpo_ray.annotator_training.fold_models``.
"""

from __future__ import annotations

import functools
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cwpo_ray.annotator_training.fold_models import keep_chosen
from cwpo_ray.annotator_training.rounds import fingerprint, load_pairs, plan_rounds
from cwpo_ray.annotator_training.worker import train_loop
from cwpo_ray.config import option
from cwpo_ray.distributed import DistributedConfig

EPILOG = """examples:
  cwpo train-annotator --data runs/data/hh/labeled.parquet --model minilm-l6 --out runs/annotator
  cwpo train-annotator --data labeled.parquet --model Qwen/Qwen2.5-0.5B --out runs/ann --num-workers 4 \\
      --strategy deepspeed --zero-stage 2 --use-gpu
"""


@dataclass
class Settings(DistributedConfig):
    """How the annotator is trained: everything but its input, output and run bookkeeping.
    The pipeline's ``annotator`` section is this class, so every option has one name and default."""

    model: str = option("minilm-l6", "backbone: a built-in name (minilm-l6, smollm2-135m), a folder, a .gguf "
                                     "file or a hub id")
    gguf_file: Optional[str] = option(None, "GGUF file inside the model folder")
    pooling: str = option("", "first, last or mean ('' : first token for encoders, last non-pad for decoders)")
    max_length: int = option(512, "tokens of prompt + response (the prompt is cut from the left)")
    epochs: int = option(5, "passes over the training pairs")
    # The paper's value; the built-in presets set 2e-5 (MiniLM-L6 on ~300 pairs moved too little at 1e-5).
    lr: float = option(1e-5, "learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay (0: plain Adam, as in the paper)")
    batch_size: int = option(32, "pairs per optimizer step, over all workers")
    eval_batch_size: int = option(64, "sequences per forward pass when scoring held-out pairs")
    max_grad_norm: float = option(1.0, "gradient clipping (0: none)")
    heldout_fraction: float = option(0.1, "folds 1: fraction of pairs held out to choose the epoch (hash of id)")
    # Five folds: every labeled pair is held out once, so the epoch count is chosen on all ~300 of them
    # instead of on 10% (~30 pairs, too noisy to choose by: one seed of the full preset kept epoch 1).
    folds: int = option(5, "choose the epoch count by k-fold cross-validation on the labeled pairs, then train "
                           "on all of them for that many epochs (1: one held-out split, its best epoch kept)")
    calibration: str = option("temperature", "temperature: fit one T on out-of-fold margins so that confidence "
                                             "C = 2(sigma(|r_a - r_b| / T) - 1/2) is calibrated; none: T = 1",
                              choices=("temperature", "none"))
    # Temperature scaling afterwards undoes an epoch's overconfidence, so raw BT loss penalizes what
    # calibration fixes: on the built-in benchmark it chose 1-3 epochs and left four of five seeds'
    # annotators at chance; the calibrated loss lifted every seed's gold accuracy (bench/RESULTS.md,
    # "The annotator over five seeds"). The rule itself reads labeled pairs only.
    select_by: str = option("calibrated_bt_loss", "folds > 1: choose the epoch count by the pooled out-of-fold "
                                                  "BT loss after fitting a temperature to those margins "
                                                  "(calibrated_bt_loss) or by the raw loss (bt_loss)",
                            choices=("bt_loss", "calibrated_bt_loss"))
    log_every: int = option(10, "log the training loss every N steps")

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be at least 1")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_workers {self.num_workers}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.folds < 1:
            raise ValueError(f"folds must be at least 1, got {self.folds}")
        if self.select_by not in ("bt_loss", "calibrated_bt_loss"):
            raise ValueError(f"select_by must be bt_loss or calibrated_bt_loss, got {self.select_by!r}")
        if self.calibration not in ("temperature", "none"):
            raise ValueError(f"calibration must be temperature or none, got {self.calibration!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class Config(Settings):
    data: str = option(help="labeled pairs (id, prompt, chosen, rejected): a table file or folder", must_exist=True)
    out: str = option(help="output annotator folder (replaced atomically)")
    seed: int = option(0, "seed of the held-out split, the head init and the batch order")
    experiment: str = option("cwpo", "MLflow experiment")
    run_name: str = option("train-annotator", "MLflow run name")
    parent_run_id: str = option("", "MLflow parent run id (the pipeline's)")
    progress: bool = option(True, "progress bar (rank 0)")
    # Not a Settings option: the pipeline sets it when an arm needs the ensemble (cw_ens), and the
    # annotator stage of a pipeline without one keeps its fingerprint.
    keep_fold_models: bool = option(False, "folds > 1: also keep the k fold models at the chosen epoch count, in "
                                           "OUT/folds/fold-F/ (calibrated by the same temperature), for `cwpo "
                                           "annotate --confidence ensemble`; no extra training, but every fold's "
                                           "model is saved after every epoch until the count is chosen "
                                           "(k x epochs copies on disk at the peak)")
    fail_at_epoch: Optional[int] = option(None, "testing: kill one worker once, after this many epochs",
                                          flag=False)

    def validate(self) -> None:
        super().validate()
        if not self.out.strip():
            raise ValueError("out: an output folder is required")
        if self.keep_fold_models and self.folds < 2:
            raise ValueError(f"keep_fold_models needs folds > 1 (there are no fold models with folds {self.folds})")


# ----------------------------------------------------------------------------- the recipe

def calibrate(folder: Path, cfg: Settings) -> dict:
    """Fit the temperature on the held-out margins (out-of-fold with folds > 1), store it in the
    annotator's metadata, and add ECE before and after and the plots to its report."""
    from cwpo_ray import calibration, plots

    report = json.loads((folder / "eval.json").read_text())
    margins = report["heldout_margins"]
    t = calibration.fit_temperature(margins) if cfg.calibration == "temperature" else 1.0
    report["calibration"] = {
        "method": cfg.calibration, "temperature": t, "pairs": len(margins),
        "fit_on": ("out-of-fold margins: every labeled pair, scored by the fold model that did not train on it"
                   if cfg.folds > 1 else "the held-out split, which also chose the epoch (optimistic)"),
        "ece_before": calibration.ece(margins), "ece_after": calibration.ece([m / t for m in margins]),
        "mean_confidence_before": float(calibration.calibrated_confidence(margins).mean()),
        "mean_confidence_after": float(calibration.calibrated_confidence(margins, t).mean())}
    meta_path = folder / "annotator.json"
    meta = json.loads(meta_path.read_text())
    meta["temperature"] = t
    meta_path.write_text(json.dumps(meta, indent=2))
    (folder / "eval.json").write_text(json.dumps(report, indent=1))
    plots.reliability_diagram(margins, folder / "reliability.png", title=f"before calibration (ECE "
                              f"{report['calibration']['ece_before']:.3f})")
    plots.reliability_diagram([m / t for m in margins], folder / "reliability_calibrated.png",
                              title=f"after, T = {t:.2f} (ECE {report['calibration']['ece_after']:.3f})")
    plots.confidence_histogram(margins, folder / "confidence_hist.png")
    return report


def log_results(out: Path, report: dict) -> None:
    """Best-epoch metrics, the plots and the annotator folder (its fold models by name only) to the active
    MLflow run."""
    import mlflow

    from cwpo_ray.annotator import FOLDS_DIR

    best = report["best"]
    mlflow.log_metrics({f"best_heldout_{k}": float(v) for k, v in best.items() if k not in ("n", "epoch")})
    mlflow.log_metric("best_epoch", best["epoch"])
    mlflow.log_metrics({f"calibration_{k}": float(v) for k, v in report["calibration"].items()
                        if isinstance(v, (int, float))})
    mlflow.log_artifact(str(out / "reliability.png"))
    mlflow.log_artifact(str(out / "reliability_calibrated.png"))
    mlflow.log_artifact(str(out / "confidence_hist.png"))
    # The annotator folder, but not its k fold models (k more copies of the model); what they are is logged.
    for part in sorted(out.iterdir()):
        if part.name == FOLDS_DIR:
            mlflow.log_dict(report["fold_models"], "annotator/fold_models.json")
        elif part.is_dir():
            mlflow.log_artifacts(str(part), f"annotator/{part.name}")
        else:
            mlflow.log_artifact(str(part), "annotator")


def run(cfg: Config) -> int:
    import ray

    from cwpo_ray import tracking
    from cwpo_ray.calibration import learned_verdict
    from cwpo_ray.distributed import prepare_train_driver, run_trainer
    from cwpo_ray.ray_env import init_ray
    from cwpo_ray.tables import atomic_path

    rows = load_pairs(cfg.data)
    rounds = plan_rounds(rows, cfg, cfg.seed)  # refuses a split that leaves a side empty, before Ray starts
    if cfg.folds == 1:
        print(f"train-annotator: {len(rounds[0].train)} training pairs, {len(rounds[0].heldout)} held out; "
              f"{cfg.num_workers} {cfg.strategy} workers")
    else:
        print(f"train-annotator: {len(rows)} pairs; the epoch count (1-{cfg.epochs}) chosen by {cfg.folds}-fold "
              f"cross-validation, then trained on all; {cfg.num_workers} {cfg.strategy} workers")
    out = Path(cfg.out).resolve()
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    metrics_file = staging.with_name(staging.name + ".metrics.jsonl")  # rank 0's, relayed to the run
    fold_store = staging.with_name(staging.name + ".folds")  # keep_fold_models: every fold's every epoch
    init_ray(meanwhile=functools.partial(prepare_train_driver, cfg.experiment))
    with tracking.start_run(cfg.experiment, cfg.run_name, parent_run_id=cfg.parent_run_id or None,
                            tags={"stage": "train-annotator"}) as run_:
        tracking.log_config(cfg)
        loop_config = {
            "cfg": cfg, "fingerprint": fingerprint(rows), "staging": str(staging),
            "rows_ref": ray.put(rows),
            "metrics_file": str(metrics_file),
            "fold_models": str(fold_store) if cfg.keep_fold_models else "",
        }
        try:
            with tracking.relay_metrics(metrics_file, run_.info.run_id):
                run_trainer(train_loop, loop_config, cfg, name=f"train-annotator-{uuid.uuid4().hex[:8]}",
                            default_storage=str(out.parent / "ray"))
            report = calibrate(staging, cfg)
            if cfg.keep_fold_models:
                report = keep_chosen(fold_store, staging, cfg.folds)
            with atomic_path(out) as tmp:
                staging.rename(tmp)
        finally:
            for leftover in (staging, staging.with_name(staging.name + ".tmp"),
                             staging.with_name(staging.name + ".failed-once"), metrics_file, fold_store,
                             tracking.relay_mark(metrics_file)):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        # Trained and published: a tracking server that is down now is waited for, not a reason to fail (a
        # retry after a partial log logs those metrics again, a second point at the same step).
        tracking.when_reachable(lambda: log_results(out, report), "logging the annotator's results")
    best, cal = report["best"], report["calibration"]
    where = "out-of-fold" if cfg.folds > 1 else "held-out"
    print(f"epochs {best['epoch']}: {where} BT loss {best['bt_loss']:.4f}, accuracy {best['accuracy']:.3f} "
          f"[{best['accuracy_lo']:.3f}, {best['accuracy_hi']:.3f}] on {best['n']} pairs, mean confidence "
          f"{best['mean_confidence']:.3f}; temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.3f} -> "
          f"{cal['ece_after']:.3f}")
    print(f"  its most confident third: accuracy {best['confident_third_accuracy']:.3f} vs {best['other_accuracy']:.3f} "
          f"on the rest; signed-rank test that its calls beat chance: p = {best['learned_p']:.3g}")
    verdict = learned_verdict(best["learned_p"])  # nan (too few pairs) warns too
    if verdict == "no sign":
        print(f"WARNING: no sign that the annotator learned: its {where} calls are not right more often than "
              f"wrong (p = {best['learned_p']:.3g}). Its labels and confidences may be noise; more labeled pairs, "
              "another lr or backbone may help.")
    elif verdict == "not shown":
        print(f"note: these {best['n']} labeled pairs do not show that the annotator learned (p = "
              f"{best['learned_p']:.3g}); against noisy human labels a useful annotator often scores so. Its agreement "
              "with better labels (a gold judge, or labels held back) is what tells.")
    if cfg.keep_fold_models:
        print(f"kept the {cfg.folds} fold models at {best['epoch']} epochs in {out / report['fold_models']['folder']} "
              "(for `cwpo annotate --confidence ensemble`)")
    print(f"wrote {out}")
    return 0
