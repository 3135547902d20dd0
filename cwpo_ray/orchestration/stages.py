"""Each pipeline stage as a call of its `cwpo` recipe with the settings the pipeline derives for it
(data, the annotator, annotation, the start model, a policy's training, its evaluation as a Ray task),
and what an arm reads."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from cwpo_ray import arms as arm_registry
from cwpo_ray.recipes import annotate as annotate_stage
from cwpo_ray.recipes import data as data_stage
from cwpo_ray.recipes import evaluate as evaluate_stage
from cwpo_ray.recipes import train_annotator as annotator_stage
from cwpo_ray.evaluation import reporting
from cwpo_ray.orchestration.arm_tables import gold_accuracy, human_table, take_first
from cwpo_ray.recipes import train_policy as policy_stage


PACKAGE = Path(__file__).resolve().parent.parent
BUILTIN_SOURCE = f"pairs:{PACKAGE / 'benchmark_data'}"
# Pair accuracy scores test pairs as training tokenized them: these evaluate settings follow the policy's.
FROM_POLICY = ("max_length", "max_prompt_length", "chat_template")


def resolve_source(source: str) -> str:
    return BUILTIN_SOURCE if source == "builtin" else source


def run_data(cfg, out: Path) -> dict:
    """Normalize and split; then the tables the arms train on."""
    data_stage.run(data_stage.Config(**asdict(cfg.data), source=resolve_source(cfg.source), out=str(out),
                                     seed=cfg.seed, progress=False))
    unlabeled = out / "unlabeled.parquet"
    if cfg.max_unlabeled:
        unlabeled = take_first(unlabeled, out / "unlabeled_used.parquet", cfg.max_unlabeled, cfg.seed)
    counts = human_table(unlabeled, out / "unlabeled_human.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    builtin_test = {}
    if cfg.source == "builtin":
        # The shipped test table, copied next to the split: the evaluation task may run on another node,
        # where the path of this process's package (under `ray job submit`, the job's temporary copy of
        # the working dir on the head node) is not there.
        shutil.copyfile(PACKAGE / "benchmark_data" / "test.parquet", out / "builtin_test.parquet")
        shutil.copyfile(PACKAGE / "benchmark_data" / "test_unseen.parquet", out / "builtin_test_unseen.parquet")
        builtin_test = {"builtin_test": str(out / "builtin_test.parquet"),
                        "builtin_test_unseen": str(out / "builtin_test_unseen.parquet")}
    return {**builtin_test, "labeled": str(out / "labeled.parquet"), "unlabeled": str(unlabeled),
            "unlabeled_human": str(out / "unlabeled_human.parquet"),
            "test": str(out / "test.parquet") if (out / "test.parquet").exists() else "",
            "validation": str(out / "validation.parquet") if (out / "validation.parquet").exists() else "",
            "n_labeled": manifest["counts"]["labeled"], "n_unlabeled": counts}


def annotator_config(cfg, labeled: str, out: Path, parent_run_id: str,
                     keep_fold_models: bool = False) -> annotator_stage.Config:
    settings = {**asdict(cfg.annotator), "storage_path": cfg.annotator.storage_path or str(out / "ray")}
    return annotator_stage.Config(**settings, data=labeled, out=str(out / "annotator"), seed=cfg.seed,
                                  experiment=cfg.experiment, run_name="train-annotator", parent_run_id=parent_run_id,
                                  progress=False, keep_fold_models=keep_fold_models)


def run_annotator(cfg, labeled: str, out: Path, parent_run_id: str, keep_fold_models: bool = False) -> dict:
    """``keep_fold_models``: an arm trains on the fold ensemble's labels (cw_ens)."""
    annotator_stage.run(annotator_config(cfg, labeled, out, parent_run_id, keep_fold_models))
    best = json.loads((out / "annotator" / "eval.json").read_text())["best"]
    return {"annotator": str(out / "annotator"),
            "metrics": {f"annotator.heldout_{k}": v for k, v in best.items() if isinstance(v, (int, float))}}


def warn_if_annotator_did_not_learn(metrics: dict, seed: int) -> None:
    """What the labeled pairs say about the annotator, on the terminal (calibration.learned_verdict): that it
    learned; that they do not show it (a note: against human labels that are themselves ~67% right, a useful
    annotator's test at a few hundred pairs misses often); or, loudly, that its out-of-fold calls lean wrong
    or even, the sign of an annotator that labels at chance, whose weak-label arms train on noise. Plain
    accuracy is not the test: a useful annotator scores ~0.55 against such labels."""
    from cwpo_ray import console
    from cwpo_ray.calibration import learned_verdict

    p = metrics.get("annotator.heldout_learned_p")
    if p is None:
        return
    third, rest = metrics.get("annotator.heldout_confident_third_accuracy"), metrics.get("annotator.heldout_other_accuracy")
    n = metrics.get("annotator.heldout_n")
    figures = (f"accuracy against the human labels {metrics['annotator.heldout_accuracy']:.3f}; "
               f"{third:.3f} on its most confident third vs {rest:.3f} on the rest; signed-rank p = {p:.3g}")
    verdict = learned_verdict(p)
    if verdict == "learned":
        console.say(f"annotator (seed {seed}) learned: {figures}")
    elif verdict == "not shown":
        console.say(f"annotator (seed {seed}): its {n or 'few'} labeled pairs do not show that it learned ({figures}); "
                    "with noisy human labels that is common for a useful annotator too. Where the data has a gold "
                    "judge, the annotate line gives its agreement with it.")
    else:
        console.say(f"!!! WARNING (seed {seed}): no sign that the annotator learned: its out-of-fold calls are not "
                    f"right more often than wrong ({figures}).\n"
                    "!!! The ws / cw / topk arms of this seed may train on labels close to noise; their results "
                    "say little about the method.")


def run_annotate(cfg, unlabeled: str, annotator: str, out: Path, confidence: str = "single") -> dict:
    """The annotate stage; ``confidence`` ensemble: labeled by the annotator's fold models (the
    annotate-ensemble stage), its metrics named annotator_ensemble.* (``Arm.annotator_metrics``)."""
    annotate_stage.run(annotate_stage.Config(**asdict(cfg.annotate), data=unlabeled, annotator=annotator,
                                             out=str(out), confidence=confidence))
    report = json.loads((out / "report.json").read_text())
    metrics = {"annotator.mean_confidence": report.get("mean_confidence")}
    human = report.get("human_agreement") or {}
    metrics["annotator.human_agreement"] = human.get("accuracy")
    metrics.update(gold_accuracy(out / "annotated.parquet", resolve_source(cfg.source)))
    if confidence == "ensemble":
        ens = report.get("ensemble") or {}
        metrics.update({"annotator.fold_disagreement": ens.get("mean_fold_disagreement"),
                        "annotator.fold_unanimous_share": ens.get("unanimous_share")})
        metrics = {k.replace("annotator.", "annotator_ensemble.", 1): v for k, v in metrics.items()}
    return {"annotated": str(out / "annotated.parquet"), "rows": report.get("annotated"),
            "metrics": {k: v for k, v in metrics.items() if v is not None}}


def run_start_model(model: str, out: Path, gguf_file: Optional[str] = None) -> dict:
    """A GGUF start model dequantized once into a plain transformers folder.

    Every arm's training, its final save and the evaluation of the start model load it; from
    GGUF each load re-dequantizes the weights and rebuilds the tokenizer (~15 s on 2 cores).
    The folder holds the same fp32 weights and tokenizer, so results do not change.
    """
    from cwpo_ray.models import load_causal_lm, load_tokenizer, resolve_model
    from cwpo_ray.tables import atomic_path

    source = resolve_model(model, gguf_file)
    if not source.gguf_file:
        return {"model": model}
    with atomic_path(out / "model") as tmp:
        load_causal_lm(source).save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
    return {"model": str(out / "model")}


def policy_config(cfg, **kw) -> policy_stage.Config:
    """train-policy's config for one run: the policy section, the pipeline's bookkeeping, then ``kw``
    (data, model, out, loss, weighting, run names)."""
    settings = {**asdict(cfg.policy), "gguf_file": None}  # the start model is a plain folder by now
    return policy_stage.Config(**{**settings, **dict(
        seed=cfg.seed, experiment=cfg.experiment, progress=False,
        # the arms starting from one model score the same responses once
        reference_cache=str(Path(cfg.out).resolve() / "reference_cache")), **kw})


def evaluation_config(cfg, policy: str, reference: str, test: str, out: Path,
                      run_id: str) -> evaluate_stage.Config:
    settings = {**asdict(cfg.evaluate), **{k: getattr(cfg.policy, k) for k in FROM_POLICY}}
    return evaluate_stage.Config(**settings, policy=policy, reference=reference, prompts=str(Path(test).resolve()),
                                 out=str(out.resolve()), seed=cfg.seed, experiment=cfg.experiment, run_id=run_id,
                                 cache_dir=str(out.resolve().parent.parent / "eval_cache"))


def evaluate_policy(cfg, policy: str, reference: str, test: str, out: Path, run_id: str) -> dict:
    """`cwpo evaluate` as a Ray task with the resources the evaluate section asks for (a GPU on a GPU
    cluster), not in the job's driver, which on a cluster is usually a CPU head node.

    The task logs nothing to MLflow: it returns its report and this driver logs it to the arm's run,
    with the tracking URI this process resolved. Without MLFLOW_TRACKING_URI that URI is a SQLite
    file under the driver's working dir on the head node (the job's temporary copy under
    `ray job submit`), which a task on a GPU node cannot open: it used to fail there, after all
    generation.
    """
    import ray

    from cwpo_ray import tracking

    e = cfg.evaluate
    pinned = {"resources": {e.node_resource: 0.01}} if e.node_resource else {}
    task = ray.remote(num_cpus=e.num_cpus, num_gpus=e.num_gpus, max_retries=0, **pinned)(_evaluate_task)
    ecfg = evaluation_config(cfg, policy, reference, test, out, run_id)
    report, node = ray.get(task.remote(replace(ecfg, run_id="")))
    # Where it ran, beside where the driver runs: what shows a GPU task really left the head node.
    where = {"evaluated_on_node": node, "driver_node": ray.get_runtime_context().get_node_id()}
    reporting.log_report(run_id, report, out, tracking.tracking_uri(), extra_tags=where)
    return report["metrics"]


def _evaluate_task(ecfg: evaluate_stage.Config) -> tuple[dict, str]:
    """The evaluation, wherever Ray placed it: eval.json and responses.parquet into ``ecfg.out``; the
    report and the node it ran on returned (nothing logged: ``ecfg.run_id`` is empty and no MLflow
    run is active here)."""
    import torch

    import ray

    torch.set_num_threads(max(1, int(ecfg.num_cpus)))
    evaluate_stage.run(ecfg)
    return json.loads((Path(ecfg.out) / "eval.json").read_text()), ray.get_runtime_context().get_node_id()


def arm_inputs(arm: str, tables: dict) -> tuple[str, str]:
    """(training table, weighting) of an arm, as the arms registry says."""
    spec = arm_registry.spec(arm)
    return tables[spec.reads], spec.weighting


def human_labels_used(arm: str, cfg, tables: dict) -> int:
    """Human labels an arm consumed (arms.human_labels_used) with this seed's split and SFT setting."""
    return arm_registry.human_labels_used(arm, tables["n_labeled"], tables["n_unlabeled"], cfg.sft == "shared")


