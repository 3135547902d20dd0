"""Run the whole method for every arm: data -> annotator -> annotate -> SFT -> PO -> evaluate.

Arms (each crossed with every loss in `losses`):
  human               PO on the unlabeled split with its hidden human labels (weights 1)
  human_labeled_only  PO on the labeled split alone (the 30% of human labels, weights 1)
  ws                  PO on the unlabeled split with the annotator's labels, uniform weights
  cw                  the same with confidence weights (CW-PO; calibrated when the annotator is)
  cw_raw              the same with the uncalibrated confidence (T = 1): what calibration changes
  cw_ens              cw with the labels and confidences of the annotator's k fold models together: the
                      mean of their margins, calibrated by the same temperature (the annotator keeps its
                      fold models and a second stage, annotate-ensemble, labels; compare: cw_ens - cw)
  topk:F              the annotator's labels, only the fraction F most confident pairs
  gold                the unlabeled split labeled by the source's gold scores (ties dropped): the
                      noise-free ceiling, for a benchmark that has them (the built-in one does).
                      If it does not beat human, label quality cannot show at these settings.

SFT (`sft`): `shared` (default) runs one SFT on the labeled split's (prompt, chosen) and starts
every arm's PO from it, so all arms share one start and one reference and GRA compares like
with like; that same run's PO on the labeled split *is* the human_labeled_only arm for the
first loss. `per-arm` gives each arm its own SFT on its own training labels (the paper's
protocol; costs one SFT per arm). `none` starts PO from the base model (the prototype's setup).

The annotator is trained only when an arm reads its labels (not for arms=[human] or [gold]).
A GGUF start model is first dequantized once into OUT/start/model, which every stage loads.
Each stage writes into its own folder under OUT and, last, a marker `.stage.json` holding the
fingerprint of its settings and its inputs' fingerprints. A rerun skips a stage whose marker
matches, reruns one whose marker is missing or stale (its folder is cleared first), so an
interrupted pipeline resumes. MLflow: one parent run, a child run per arm x loss holding
that arm's eval/* metrics (its train-policy run nested below it); the parent holds every
arm's metrics as ARM.LOSS.* too, the annotator's metrics and the compare table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from cwpo_ray import arms as arm_registry
from cwpo_ray.arms import reads_weak_labels
from cwpo_ray.config import option, to_dict
from cwpo_ray.disk_space import annotator_bytes, input_bytes, policy_bytes, start_model_bytes, tables_bytes
from cwpo_ray.fingerprints import code_version, fingerprint
from cwpo_ray.orchestration.arm_tables import gold_table
from cwpo_ray.orchestration.markers import source_fingerprint, stage
from cwpo_ray.orchestration.runs import ArmRuns
from cwpo_ray.orchestration.stages import (FROM_POLICY, PACKAGE, arm_inputs, evaluate_policy, human_labels_used,
                                           policy_config, resolve_source, run_annotate, run_annotator, run_data,
                                           run_start_model, warn_if_annotator_did_not_learn)
from cwpo_ray.out_lock import hold_out
from cwpo_ray.recipes import annotate as annotate_stage
from cwpo_ray.recipes import data as data_stage
from cwpo_ray.recipes import evaluate as evaluate_stage
from cwpo_ray.recipes import train_annotator as annotator_stage
from cwpo_ray.recipes import train_policy as policy_stage

EPILOG = """examples:
  cwpo pipeline --config cwpo_ray/configs/quick.yaml            # the README's main command
  cwpo pipeline --config cwpo_ray/configs/full.yaml 'arms=[human,ws,cw,cw_raw]' 'losses=[dpo]'  # 3 seeds
  cwpo pipeline --config cwpo_ray/configs/full.yaml 'arms=[human]' evaluate.split=validation policy.lr=4e-5
  cwpo pipeline --config my.yaml arms=[human,cw,topk:0.3] losses=[dpo,ipo] policy.lr=1e-5
"""

BASE_ARMS = arm_registry.DEFAULT_ARMS  # what an arm reads and how it weighs: cwpo_ray/arms.py


@dataclass
class Config:
    """The pipeline: what runs (arms x losses), on what, where; each stage's settings in its own section,
    typed as that stage's ``Settings`` (same names and defaults as `cwpo STAGE --help`)."""

    out: str = option("runs/pipeline", "output folder (one subfolder per stage)")
    source: str = option("builtin", "builtin (the shipped benchmark) or KIND:WHERE as for `cwpo data`")
    test: str = option("", "test prompts table (default: the source's test split)")
    max_unlabeled: int = option(0, "use at most this many unlabeled pairs for PO (0: all)")
    arms: list[str] = option(help="arms to run", factory=lambda: list(BASE_ARMS))
    losses: list[str] = option(help="PO losses", factory=lambda: ["dpo"])
    sft: str = option("shared", "shared, per-arm or none", choices=("shared", "per-arm", "none"))
    seed: int = option(0, "seed of the split, training and sampling (every stage's seed)")
    seeds: list[int] = option(help="run every arm once per seed (each its own split, annotator and "
                                   "training; only the start model is shared); empty: just `seed`", factory=list)
    experiment: str = option("cwpo-pipeline", "MLflow experiment")
    run_name: str = option("pipeline", "MLflow parent run name")
    verbose: bool = option(False, "every stage's own output on the terminal (default: in OUT/pipeline.log, "
                                  "one line per stage here)")
    preflight: bool = option(True, "check the cluster first (`cwpo preflight`: imports, shared storage, MLflow, "
                                   "GPUs, inputs, disk on every node) and stop before any stage if a check fails")
    data: data_stage.Settings = option(factory=data_stage.Settings, flag=False)
    annotator: annotator_stage.Settings = option(factory=annotator_stage.Settings, flag=False)
    annotate: annotate_stage.Settings = option(factory=annotate_stage.Settings, flag=False)
    policy: policy_stage.Settings = option(factory=policy_stage.Settings, flag=False)
    evaluate: evaluate_stage.Settings = option(factory=evaluate_stage.Settings, flag=False)

    def seed_list(self) -> list[int]:
        return list(self.seeds) or [self.seed]

    def validate(self) -> None:
        from cwpo_ray.losses import LOSS_TYPES

        for arm in self.arms:
            try:
                arm_registry.spec(arm)
            except ValueError as e:
                raise ValueError(f"arms: {e}") from None
        for loss in self.losses:
            if loss not in LOSS_TYPES:
                raise ValueError(f"losses: unknown loss {loss!r} (known: {', '.join(LOSS_TYPES)})")
        if not self.arms or not self.losses:
            raise ValueError("arms and losses must each name at least one")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")
        defaults = evaluate_stage.Settings()
        for name in FROM_POLICY:
            value, policy_value = getattr(self.evaluate, name), getattr(self.policy, name)
            if value != getattr(defaults, name) and value != policy_value:
                raise ValueError(f"evaluate.{name}: the pipeline scores pairs as the policy is trained, with "
                                 f"policy.{name} ({policy_value!r}); set that instead")


# ----------------------------------------------------------------------------- the recipe

def resolve_test(cfg: Config, tables: dict) -> str:
    """The prompts the arms are evaluated on: the validation split while settings are being chosen
    (evaluate.split validation), the test prompts for the final measurement."""
    if cfg.evaluate.split == "validation":
        if not tables.get("validation"):
            raise ValueError("evaluate.split validation: the data stage wrote no validation split; set "
                             "data.validation_fraction > 0")
        return tables["validation"]
    if cfg.test:
        return cfg.test
    if cfg.source == "builtin":  # the shipped test table keeps the gold scores (ties are skipped)
        return tables.get("builtin_test") or str(PACKAGE / "benchmark_data" / "test.parquet")
    if not tables["test"]:
        raise ValueError("the source has no test split: give test=TABLE")
    return tables["test"]


def resolve_unseen(cfg: Config, tables: dict) -> str:
    """The second test set (evaluate.unseen_prompts), evaluated as the test_unseen split; "" for none."""
    spec = cfg.evaluate.unseen_prompts
    if spec != "builtin":
        return spec
    if "builtin_test_unseen" not in tables:
        raise ValueError("evaluate.unseen_prompts=builtin: only with source builtin (give a prompts table instead)")
    return tables["builtin_test_unseen"]


def run(cfg: Config) -> int:
    from cwpo_ray import console

    out = Path(cfg.out).resolve()
    # One pipeline per OUT: a second one is refused before it clears any stage folder. Its stages,
    # run in this process, lock their own subfolders (cwpo_ray/out_lock.py).
    with hold_out(out, "pipeline"):
        if cfg.verbose:
            return run_stages(cfg, out)
        log = out / "pipeline.log"
        print(f"pipeline: {len(cfg.arms)} arm(s) x {len(cfg.losses)} loss(es) -> {out}; every stage's own output "
              f"goes to {log}", flush=True)
        try:
            with console.log_to(log):
                return run_stages(cfg, out)
        except (KeyboardInterrupt, SystemExit) as stop:
            # Ctrl-C, or a SIGTERM, which Ray's driver handler turns into sys.exit: no traceback follows,
            # so say what happened and that the finished stages are kept.
            how = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else f"a signal or exit (code {stop.code})"
            print(f"pipeline: stopped by {how}; the finished stages are kept: rerun the same command to continue "
                  f"from them. Every stage's own output is in {log}", file=sys.stderr, flush=True)
            raise
        except BaseException:  # the traceback follows on the terminal; the rest of the story is in the log
            print(f"pipeline: stopped by the error below; every stage's own output is in {log}", file=sys.stderr,
                  flush=True)
            raise


def run_stages(cfg: Config, out: Path) -> int:
    from cwpo_ray import console, ray_env, tracking
    from cwpo_ray.recipes import compare

    ray_env.init_ray()
    if cfg.preflight:
        from cwpo_ray.recipes import preflight

        preflight.require(cfg)  # raises with the failed checks' table, before any stage
    warn_if_tracking_store_is_temporary()
    runs = ArmRuns(cfg, out)  # the MLflow parent run (reused on resume) and its children
    # The start model (a GGUF dequantized once) is the only thing the seeds share.
    fp_base = fingerprint("base", code_version(), cfg.policy.model, cfg.policy.gguf_file)
    start = stage(out / "start", fp_base, lambda: run_start_model(cfg.policy.model, out / "start",
                                                                  cfg.policy.gguf_file),
                  need=lambda: start_model_bytes(cfg.policy.model, cfg.policy.gguf_file))["model"]
    seeds = cfg.seed_list()
    for seed in seeds:
        if len(seeds) > 1:
            console.say(f"seed {seed}:")
        run_seed(replace(cfg, seed=seed), out if len(seeds) == 1 else out / f"seed-{seed}", runs, start, fp_base)

    with console.timed_stage("compare") as done:
        compared = [cfg.evaluate.split]
        if cfg.evaluate.unseen_prompts and cfg.evaluate.split == "test":
            compared += ["test_unseen", "test+test_unseen"]
        for split in compared:
            compare.run(compare.Config(experiment=cfg.experiment, parent_run_id=runs.parent_id,
                                       out=str(out / "compare"), split=split))
        done({})
    runs.close()
    # The terminal gets the main judge's table and the paired differences; compare.md has every judge.
    console.show_file(out / "compare" / compare.split_file("compare.md", cfg.evaluate.split),
                      skip_sections=("GRA under every judge",), max_line=160)
    console.say(f"pipeline: done -> {out} (MLflow experiment {cfg.experiment!r}, parent run {runs.parent_id}; "
                f"tracking URI {tracking.tracking_uri()})")
    return 0


def warn_if_tracking_store_is_temporary() -> None:
    """Loudly: in a Ray job without MLFLOW_TRACKING_URI the runs go to the default SQLite store under the
    driver's working dir, the job's temporary copy that Ray deletes afterwards."""
    import os

    from cwpo_ray import console
    from cwpo_ray.config import running_as_ray_job

    if running_as_ray_job() and not os.environ.get("MLFLOW_TRACKING_URI"):
        console.say("!!! WARNING: MLFLOW_TRACKING_URI is not set: this job's MLflow runs go to a SQLite file in its "
                    "temporary working dir, which Ray deletes when the job ends. Set it in the runtime env's "
                    "env_vars or in the nodes' environment (mlflow/README.md).")


def run_weak_label_stages(cfg: Config, out: Path, tables: dict, fp_data: str,
                          parent_run_id: str) -> tuple[dict, dict, dict]:
    """The annotator and the annotate stages the arms read: annotate (the annotator's labels) when an arm
    reads those, annotate-ensemble (its k fold models' mean margin) when one needs that (cw_ens). The
    annotator keeps its fold models only then, and only then does keep_fold_models enter its fingerprint:
    a pipeline without cw_ens reuses the stages it ran before. Returns the tables with the labeled ones
    added, the fingerprint of each labeled table, and the annotator's metrics."""
    ensemble = any(arm_registry.needs_ensemble(arm) for arm in cfg.arms)
    single = any(arm_registry.spec(arm).reads == arm_registry.WEAK_LABELS for arm in cfg.arms)
    fp_ann = fingerprint("annotator", fp_data, to_dict(cfg.annotator), *(["keep_fold_models"] if ensemble else []))
    ann = stage(out / "annotator", fp_ann, lambda: run_annotator(cfg, tables["labeled"], out / "annotator",
                                                                 parent_run_id, keep_fold_models=ensemble),
                need=lambda: annotator_bytes(cfg.annotator.model, cfg.annotator.gguf_file, tables["labeled"],
                                             cfg.annotator.folds * cfg.annotator.epochs if ensemble else 0,
                                             cfg.annotator.storage_path))
    warn_if_annotator_did_not_learn(ann["metrics"], cfg.seed)
    fps, metrics = {}, dict(ann["metrics"])
    for table, folder, confidence, wanted in ((arm_registry.WEAK_LABELS, "annotate", "single", single),
                                              (arm_registry.ENSEMBLE_LABELS, "annotate-ensemble", "ensemble", ensemble)):
        if not wanted:
            continue
        fps[table] = fingerprint(folder, fp_ann, to_dict(cfg.annotate))
        labels = stage(out / folder, fps[table], lambda folder=folder, confidence=confidence: run_annotate(
            cfg, tables["unlabeled"], ann["annotator"], out / folder, confidence=confidence),
            need=lambda: tables_bytes(input_bytes(tables["unlabeled"])))
        tables = {**tables, table: labels["annotated"]}
        metrics.update(labels["metrics"])
    return tables, fps, metrics


def run_seed(cfg: Config, out: Path, runs: ArmRuns, start: str, fp_base: str) -> None:
    """Every stage of one seed: its split, annotator, annotation, SFT and arms, under ``out``."""
    tag = f"seed{cfg.seed}." if len(runs.cfg.seed_list()) > 1 else ""
    fp_data = fingerprint("data", code_version(), cfg.source, source_fingerprint(resolve_source(cfg.source)),
                          to_dict(cfg.data), cfg.max_unlabeled, cfg.seed)
    tables = stage(out / "data", fp_data, lambda: run_data(cfg, out / "data"),
                   need=lambda: tables_bytes(input_bytes(resolve_source(cfg.source).partition(":")[2])))
    fp_labels_of, weak_metrics = {}, {}
    if any(reads_weak_labels(arm) for arm in cfg.arms):
        tables, fp_labels_of, weak_metrics = run_weak_label_stages(cfg, out, tables, fp_data, runs.parent_id)
    else:
        from cwpo_ray import console

        console.say(f"annotator: not trained (none of the arms {cfg.arms} reads weak labels)")
    runs.log_parent({tag + k: v for k, v in {**weak_metrics, "pairs.labeled": tables["n_labeled"],
                                             "pairs.unlabeled": tables["n_unlabeled"]}.items()})
    test = resolve_test(cfg, tables)
    if any(arm_registry.spec(arm).reads == arm_registry.GOLD_LABELS for arm in cfg.arms):
        # cheap, and a function of the split alone: rebuilt rather than staged
        path = out / "data" / "unlabeled_gold.parquet"
        tables = {**tables, "unlabeled_gold": str(path),
                  "n_gold": gold_table(Path(tables["unlabeled"]), resolve_source(cfg.source), path)}

    # The shared SFT start (see the module doc): SFT + PO on the labeled split.
    policy_fp = to_dict(cfg.policy)
    fp_start, shared_po = fp_base, None
    if cfg.sft == "shared":
        fp_start = fingerprint("sft", fp_base, fp_data, policy_fp, cfg.losses[0])
        stage(out / "sft", fp_start, lambda: {"code": policy_stage.run(policy_config(
            cfg, data=tables["labeled"], model=start, out=str(out / "sft"), loss=cfg.losses[0], weighting="none",
            run_name="sft-shared", parent_run_id=runs.parent_id))},
              need=lambda: policy_bytes(start, None, cfg.policy.lora, True, tables["labeled"], cfg.policy.storage_path))
        start, shared_po = str(out / "sft" / "sft"), str(out / "sft" / "policy")

    split, unseen = cfg.evaluate.split, resolve_unseen(cfg, tables)
    for loss in cfg.losses:
        for arm in cfg.arms:
            name = f"{arm.replace(':', '')}-{loss}"
            folder = out / "arms" / name
            data, weighting = arm_inputs(arm, tables)
            # The human and gold arms do not read the annotator's labels: a new annotator leaves them done.
            fp_labels = fp_labels_of.get(arm_registry.spec(arm).reads, fp_data)
            fp_train = fingerprint("train", arm, loss, fp_start, fp_labels, policy_fp, cfg.seed)
            # Evaluation is its own stage: a validation pass and then the test pass share the training.
            eval_settings = {k: v for k, v in to_dict(cfg.evaluate).items() if k != "unseen_prompts"}
            fp_eval = fingerprint("eval", fp_train, eval_settings, test, cfg.seed)
            run_id = runs.child(arm, loss, cfg.seed, fp_train, human_labels_used(arm, cfg, tables))
            if arm == "human_labeled_only" and loss == cfg.losses[0] and shared_po:
                policy, reference = shared_po, start  # the shared SFT run trained exactly this arm
            else:
                stage(folder / "train", fp_train, lambda data=data, weighting=weighting, run_id=run_id, name=name,
                      folder=folder, loss=loss: {"policy": policy_stage.run(policy_config(
                          cfg, data=data, model=start, out=str(folder / "train"), loss=loss, weighting=weighting,
                          sft_epochs=cfg.policy.sft_epochs if cfg.sft == "per-arm" else 0,
                          run_name=f"train-{name}", parent_run_id=run_id))}, label=f"{name} train",
                      need=lambda data=data: policy_bytes(start, None, cfg.policy.lora, cfg.sft == "per-arm", data,
                                                          cfg.policy.storage_path))
                policy = str(folder / "train" / "policy")
                reference = str(folder / "train" / "sft") if cfg.sft == "per-arm" else start
            eval_dir = folder / ("eval" if split == "test" else f"eval_{split}")
            metrics = stage(eval_dir, fp_eval, lambda policy=policy, reference=reference, run_id=run_id,
                            eval_dir=eval_dir: evaluate_policy(cfg, policy, reference, test, eval_dir, run_id),
                            label=f"{name} {'evaluate' if split == 'test' else split}")
            runs.finish_child(arm, loss, cfg.seed, metrics, eval_dir / "responses.parquet", split)
            if unseen and split == "test":  # the same policy on prompts of topics no training pair had
                unseen_cfg = replace(cfg, evaluate=replace(cfg.evaluate, split="test_unseen"))
                unseen_dir = folder / "eval_test_unseen"
                metrics = stage(unseen_dir, fingerprint("eval", fp_train, eval_settings, unseen, cfg.seed, "unseen"),
                                lambda policy=policy, reference=reference, run_id=run_id, unseen_dir=unseen_dir:
                                evaluate_policy(unseen_cfg, policy, reference, unseen, unseen_dir, run_id),
                                label=f"{name} test_unseen")
                runs.finish_child(arm, loss, cfg.seed, metrics, unseen_dir / "responses.parquet", "test_unseen")
