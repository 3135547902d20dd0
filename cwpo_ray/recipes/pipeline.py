"""Run the whole method for every arm: data -> annotator -> annotate -> SFT -> PO -> evaluate.

Arms (each crossed with every loss in `losses`):
  human               PO on the unlabeled split with its hidden human labels (weights 1)
  human_labeled_only  PO on the labeled split alone (the 30% of human labels, weights 1)
  ws                  PO on the unlabeled split with the annotator's labels, uniform weights
  cw                  the same with confidence weights (CW-PO; calibrated when the annotator is)
  cw_raw              the same with the uncalibrated confidence (T = 1): what calibration changes
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

import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from cwpo_ray import arms as arm_registry
from cwpo_ray.arms import reads_weak_labels
from cwpo_ray.config import option, to_dict
from cwpo_ray.fingerprints import code_version, fingerprint, path_fingerprint
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
PACKAGE = Path(__file__).resolve().parent.parent
BUILTIN_SOURCE = f"pairs:{PACKAGE / 'benchmark_data'}"
# Pair accuracy scores test pairs as training tokenized them: these evaluate settings follow the policy's.
FROM_POLICY = ("max_length", "max_prompt_length", "chat_template")


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


# ----------------------------------------------------------------------------- stage markers

def source_fingerprint(source: str) -> str:
    """Local files by path, size and mtime (cheap at any size); a hub id by its name."""
    return path_fingerprint(source.partition(":")[2], source)


def stage(folder: Path, fp: str, work: Callable[[], dict], label: str = "") -> dict:
    """Run ``work`` into ``folder`` unless its marker says it is done with this fingerprint.

    The marker holds the fingerprint from the start and the result only at the end, each written
    atomically. A stage killed midway is run again: with the same fingerprint into its folder as it
    was (train-policy resumes from its checkpoints there), with another one (or no marker) into a
    cleared folder, so nothing of an old config leaks in. Returns what ``work`` returned (kept in
    the marker, so a skipped stage returns it too).
    """
    from cwpo_ray import console

    marker = folder / ".stage.json"
    saved = json.loads(marker.read_text()) if marker.exists() else {}
    if saved.get("fingerprint") == fp and "result" in saved:
        console.stage_line(label or folder.name, "done already, reusing", fingerprint=fp)
        return saved["result"]
    if saved.get("fingerprint") not in (None, fp):
        # Say why a stage an earlier run did is not reused: the code, or its settings and inputs.
        why = "the code" if saved.get("code_version", code_version()) != code_version() else "its settings or inputs"
        console.say(f"  {label or folder.name}: {why} changed since the last run "
                    f"(fingerprint {saved['fingerprint']} -> {fp}): running it again")
    if saved.get("fingerprint") != fp and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, {"fingerprint": fp, "code_version": code_version()})  # started, not done
    with console.timed_stage(label or folder.name) as done:
        result = work()
        done(result)
    _write_marker(marker, {"fingerprint": fp, "code_version": code_version(), "result": result})
    return result


def _write_marker(marker: Path, content: dict) -> None:
    from cwpo_ray.tables import atomic_path

    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(content, indent=2, default=str))


# ----------------------------------------------------------------------------- stages

def run_data(cfg: Config, out: Path) -> dict:
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
        builtin_test = {"builtin_test": str(out / "builtin_test.parquet")}
    return {**builtin_test, "labeled": str(out / "labeled.parquet"), "unlabeled": str(unlabeled),
            "unlabeled_human": str(out / "unlabeled_human.parquet"),
            "test": str(out / "test.parquet") if (out / "test.parquet").exists() else "",
            "validation": str(out / "validation.parquet") if (out / "validation.parquet").exists() else "",
            "n_labeled": manifest["counts"]["labeled"], "n_unlabeled": counts}


def annotator_config(cfg: Config, labeled: str, out: Path, parent_run_id: str) -> annotator_stage.Config:
    settings = {**asdict(cfg.annotator), "storage_path": cfg.annotator.storage_path or str(out / "ray")}
    return annotator_stage.Config(**settings, data=labeled, out=str(out / "annotator"), seed=cfg.seed,
                                  experiment=cfg.experiment, run_name="train-annotator", parent_run_id=parent_run_id,
                                  progress=False)


def run_annotator(cfg: Config, labeled: str, out: Path, parent_run_id: str) -> dict:
    annotator_stage.run(annotator_config(cfg, labeled, out, parent_run_id))
    best = json.loads((out / "annotator" / "eval.json").read_text())["best"]
    return {"annotator": str(out / "annotator"),
            "metrics": {f"annotator.heldout_{k}": v for k, v in best.items() if isinstance(v, (int, float))}}


def warn_if_annotator_did_not_learn(metrics: dict, seed: int) -> None:
    """Loudly, on the terminal: an annotator whose held-out accuracy interval includes 0.5 labels at
    chance, and every weak-label arm of this seed trains on noise."""
    from cwpo_ray import console

    lo, hi = metrics.get("annotator.heldout_accuracy_lo"), metrics.get("annotator.heldout_accuracy_hi")
    if lo is not None and lo <= 0.5:
        console.say(f"!!! WARNING (seed {seed}): the annotator has not learned: held-out accuracy "
                    f"{metrics['annotator.heldout_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] includes 0.5 (chance).\n"
                    "!!! The ws / cw / topk arms of this seed train on labels close to noise; their results say "
                    "little about the method.")


def run_annotate(cfg: Config, unlabeled: str, annotator: str, out: Path) -> dict:
    annotate_stage.run(annotate_stage.Config(**asdict(cfg.annotate), data=unlabeled, annotator=annotator,
                                             out=str(out)))
    report = json.loads((out / "report.json").read_text())
    metrics = {"annotator.mean_confidence": report.get("mean_confidence")}
    human = report.get("human_agreement") or {}
    metrics["annotator.human_agreement"] = human.get("accuracy")
    metrics.update(gold_accuracy(out / "annotated.parquet", resolve_source(cfg.source)))
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


def policy_config(cfg: Config, **kw) -> policy_stage.Config:
    """train-policy's config for one run: the policy section, the pipeline's bookkeeping, then ``kw``
    (data, model, out, loss, weighting, run names)."""
    settings = {**asdict(cfg.policy), "gguf_file": None}  # the start model is a plain folder by now
    return policy_stage.Config(**{**settings, **dict(
        seed=cfg.seed, experiment=cfg.experiment, progress=False,
        # the arms starting from one model score the same responses once
        reference_cache=str(Path(cfg.out).resolve() / "reference_cache")), **kw})


def evaluation_config(cfg: Config, policy: str, reference: str, test: str, out: Path,
                      run_id: str) -> evaluate_stage.Config:
    settings = {**asdict(cfg.evaluate), **{k: getattr(cfg.policy, k) for k in FROM_POLICY}}
    return evaluate_stage.Config(**settings, policy=policy, reference=reference, prompts=str(Path(test).resolve()),
                                 out=str(out.resolve()), seed=cfg.seed, experiment=cfg.experiment, run_id=run_id,
                                 cache_dir=str(out.resolve().parent.parent / "eval_cache"))


def evaluate_policy(cfg: Config, policy: str, reference: str, test: str, out: Path, run_id: str) -> dict:
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
    task = ray.remote(num_cpus=e.num_cpus, num_gpus=e.num_gpus, max_retries=0)(_evaluate_task)
    ecfg = evaluation_config(cfg, policy, reference, test, out, run_id)
    report = ray.get(task.remote(replace(ecfg, run_id="")))
    evaluate_stage.log_report(run_id, report, out, tracking.tracking_uri())
    return report["metrics"]


def _evaluate_task(ecfg: evaluate_stage.Config) -> dict:
    """The evaluation, wherever Ray placed it: eval.json and responses.parquet into ``ecfg.out``; the
    report returned (nothing logged: ``ecfg.run_id`` is empty and no MLflow run is active here)."""
    import torch

    torch.set_num_threads(max(1, int(ecfg.num_cpus)))
    evaluate_stage.run(ecfg)
    return json.loads((Path(ecfg.out) / "eval.json").read_text())


def arm_inputs(arm: str, tables: dict) -> tuple[str, str]:
    """(training table, weighting) of an arm, as the arms registry says."""
    spec = arm_registry.spec(arm)
    return tables[spec.reads], spec.weighting


def human_labels_used(arm: str, cfg: Config, tables: dict) -> int:
    """Human labels an arm consumed (arms.human_labels_used) with this seed's split and SFT setting."""
    return arm_registry.human_labels_used(arm, tables["n_labeled"], tables["n_unlabeled"], cfg.sft == "shared")


# ----------------------------------------------------------------------------- tables

def take_first(src: Path, dst: Path, n: int, seed: int) -> Path:
    """The ``n`` pairs first in a seeded hash order of their ids: a fixed random subset,
    the same whatever order the table was written in."""
    import pyarrow as pa

    from cwpo_ray.sources import hash_unit
    from cwpo_ray.tables import read_table, write_table

    table = read_table(src)
    ids = table.column("id").to_pylist()
    keep = sorted(range(len(ids)), key=lambda i: hash_unit(f"{seed}:subset:{ids[i]}"))[:n]
    write_table(table.take(pa.array(sorted(keep))), dst)
    return dst


def labeled_table(unlabeled: Path, dst: Path, a_wins: Callable[[dict], Optional[bool]]) -> int:
    """The unlabeled pairs as a labeled table, ``a_wins(row)`` choosing (None: leave the pair out)."""
    import pyarrow as pa

    from cwpo_ray.tables import LABELED_SCHEMA, read_table, write_table

    rows = []
    for r in read_table(unlabeled).to_pylist():
        a = a_wins(r)
        if a is None:
            continue
        rows.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["response_a" if a else "response_b"],
                     "rejected": r["response_b" if a else "response_a"]})
    write_table(pa.Table.from_pylist(rows, schema=LABELED_SCHEMA), dst)
    return len(rows)


def human_table(unlabeled: Path, dst: Path) -> int:
    """The unlabeled pairs with their hidden human labels (the Human arm); a pair that never had
    a human label cannot be in it."""
    return labeled_table(unlabeled, dst, lambda r: r["human_choice"] == "a"
                         if r.get("human_choice") in ("a", "b") else None)


def source_gold(source: str) -> dict:
    """(prompt, response) -> gold score, when the source is a pairs table with gold_a / gold_b
    (the built-in benchmark is); else empty. The split tables do not carry gold columns."""
    from cwpo_ray.tables import read_table

    kind, _, where = source.partition(":")
    try:
        src = read_table(Path(where) / "pairs.parquet" if Path(where).is_dir() else where).to_pylist()
    except (FileNotFoundError, OSError):
        return {}
    if kind != "pairs" or not src or "gold_a" not in src[0]:
        return {}
    gold = {}
    for r in src:
        gold[(r["prompt"], r["response_a"])] = r["gold_a"]
        gold[(r["prompt"], r["response_b"])] = r["gold_b"]
    return gold


def gold_table(unlabeled: Path, source: str, dst: Path) -> int:
    """The unlabeled pairs labeled by their gold scores (the gold arm); pairs gold ties are left out."""
    gold = source_gold(source)
    if not gold:
        raise ValueError(f"arm 'gold' needs a pairs source with gold_a / gold_b columns; {source} has none")

    def a_wins(r):
        ga, gb = gold.get((r["prompt"], r["response_a"])), gold.get((r["prompt"], r["response_b"]))
        return None if ga is None or gb is None or ga == gb else ga > gb

    return labeled_table(unlabeled, dst, a_wins)


def gold_accuracy(annotated: Path, source: str) -> dict:
    """Annotator labels against the gold judge, when the source table carries gold_a / gold_b
    (the built-in benchmark does): plain and confidence-weighted accuracy on pairs gold does not tie."""
    import numpy as np

    from cwpo_ray import calibration
    from cwpo_ray.tables import read_table

    gold = source_gold(source)
    if not gold:
        return {}
    right, conf = [], []
    for r in read_table(annotated).to_pylist():
        gc, gr = gold.get((r["prompt"], r["chosen"])), gold.get((r["prompt"], r["rejected"]))
        if gc is None or gr is None or gc == gr:
            continue
        right.append(float(gc > gr))
        conf.append(r["confidence"])
    if not right:
        return {}
    out = {"annotator.gold_accuracy": float(np.mean(right)), "annotator.gold_pairs": len(right)}
    weighted = calibration.weighted_accuracy(conf, right)
    if weighted == weighted:  # nan when every confidence is 0
        out["annotator.gold_accuracy_cw"] = weighted
    return out


# ----------------------------------------------------------------------------- MLflow runs

class ArmRuns:
    """The pipeline's MLflow parent run and one child run per arm x loss.

    Runs are created and written with MlflowClient, never made "active" here, so the stage
    recipes can open their own runs (nested under these by ``parent_run_id``). Run ids are kept
    in OUT/mlflow_runs.json: a resumed pipeline logs to the same runs.
    """

    def __init__(self, cfg: Config, out: Path):
        from mlflow.tracking import MlflowClient

        from cwpo_ray import tracking

        self.cfg, self.path = cfg, out / "mlflow_runs.json"
        self.client = MlflowClient(tracking.tracking_uri())
        self.experiment_id = tracking.set_experiment(cfg.experiment).experiment_id
        fp = fingerprint({k: v for k, v in to_dict(cfg).items() if k not in ("verbose", "preflight")})
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        if saved.get("fingerprint") != fp or not self._alive(saved.get("parent")):
            saved = {"fingerprint": fp, "parent": self._create(cfg.run_name, {"stage": "pipeline"}), "children": {}}
            self.state = saved
            self._log_params()
        self.state = saved
        self._save()

    @property
    def parent_id(self) -> str:
        return self.state["parent"]

    def _alive(self, run_id: Optional[str]) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except Exception:
            return False

    def _create(self, name: str, tags: dict, parent: Optional[str] = None) -> str:
        from cwpo_ray.tracking import git_commit

        tags = {"git_commit": git_commit(), **tags, **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def _save(self) -> None:
        self.path.write_text(json.dumps(self.state, indent=2))

    def _log_params(self) -> None:
        from mlflow.entities import Param

        from cwpo_ray.config import flatten

        params = [Param(k, str(v)[:500]) for k, v in flatten(to_dict(self.cfg)).items()]
        self.client.log_batch(self.parent_id, params=params)
        self.client.log_dict(self.parent_id, to_dict(self.cfg), "pipeline_config.yaml")

    def log_parent(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                self.client.log_metric(self.parent_id, k, float(v))

    def key(self, arm: str, loss: str, seed: int) -> str:
        """``arm/loss``, and ``seedS/arm/loss`` when the pipeline runs several seeds."""
        return f"seed{seed}/{arm}/{loss}" if len(self.cfg.seed_list()) > 1 else f"{arm}/{loss}"

    def child(self, arm: str, loss: str, seed: int, fp: str, human_labels: int) -> str:
        key = self.key(arm, loss, seed)
        saved = self.state["children"].get(key)
        if saved and saved["fingerprint"] == fp and self._alive(saved["run_id"]):
            return saved["run_id"]
        name = f"{arm}-{loss}" + (f"-seed{seed}" if key.startswith("seed") else "")
        run_id = self._create(name, {"stage": "arm", "arm": arm, "loss": loss, "seed": str(seed)},
                              parent=self.parent_id)
        for k, v in {"arm": arm, "loss": loss, "seed": seed, "human_labels_used": human_labels,
                     "sft": self.cfg.sft}.items():
            self.client.log_param(run_id, k, str(v))
        self.client.log_metric(run_id, "human_labels_used", float(human_labels))
        self.state["children"][key] = {"run_id": run_id, "fingerprint": fp}
        self._save()
        return run_id

    def finish_child(self, arm: str, loss: str, seed: int, metrics: dict, responses: Path, split: str) -> None:
        """Every arm's metrics on the parent too (ARM.LOSS.gra ..., ARM.LOSS.validation.gra ... for the
        validation split), so one run holds them all; its per-prompt responses and scores on its own
        run (test: at the root, for compare's paired differences; validation: under validation/)."""
        key = self.key(arm, loss, seed)
        run_id = self.state["children"][key]["run_id"]
        if responses.exists():
            self.client.log_artifact(run_id, str(responses), evaluate_stage.artifact_dir(split))
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        prefix = evaluate_stage.metric_prefix(split)
        for k, v in numeric.items():
            self.client.log_metric(run_id, f"{prefix}/{k}", v)  # idempotent with evaluate's own logging
        name = key.replace(":", "").replace("/", ".") + ("" if split == "test" else f".{split}")
        self.log_parent({f"{name}.{k}": v for k, v in numeric.items()})
        self.client.set_terminated(run_id)

    def close(self) -> None:
        self.client.set_terminated(self.parent_id)


# ----------------------------------------------------------------------------- the recipe

def resolve_source(source: str) -> str:
    return BUILTIN_SOURCE if source == "builtin" else source


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


def run(cfg: Config) -> int:
    from cwpo_ray import console

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.verbose:
        return run_stages(cfg, out)
    log = out / "pipeline.log"
    print(f"pipeline: {len(cfg.arms)} arm(s) x {len(cfg.losses)} loss(es) -> {out}; every stage's own output "
          f"goes to {log}", flush=True)
    try:
        with console.log_to(log):
            return run_stages(cfg, out)
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
                                                                  cfg.policy.gguf_file))["model"]
    seeds = cfg.seed_list()
    for seed in seeds:
        if len(seeds) > 1:
            console.say(f"seed {seed}:")
        run_seed(replace(cfg, seed=seed), out if len(seeds) == 1 else out / f"seed-{seed}", runs, start, fp_base)

    with console.timed_stage("compare") as done:
        compare.run(compare.Config(experiment=cfg.experiment, parent_run_id=runs.parent_id, out=str(out / "compare"),
                                   split=cfg.evaluate.split))
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


def run_seed(cfg: Config, out: Path, runs: ArmRuns, start: str, fp_base: str) -> None:
    """Every stage of one seed: its split, annotator, annotation, SFT and arms, under ``out``."""
    tag = f"seed{cfg.seed}." if len(runs.cfg.seed_list()) > 1 else ""
    fp_data = fingerprint("data", code_version(), cfg.source, source_fingerprint(resolve_source(cfg.source)),
                          to_dict(cfg.data), cfg.max_unlabeled, cfg.seed)
    tables = stage(out / "data", fp_data, lambda: run_data(cfg, out / "data"))
    fp_lab, weak_metrics = None, {}
    if any(reads_weak_labels(arm) for arm in cfg.arms):
        fp_ann = fingerprint("annotator", fp_data, to_dict(cfg.annotator))
        ann = stage(out / "annotator", fp_ann, lambda: run_annotator(cfg, tables["labeled"], out / "annotator",
                                                                     runs.parent_id))
        warn_if_annotator_did_not_learn(ann["metrics"], cfg.seed)
        fp_lab = fingerprint("annotate", fp_ann, to_dict(cfg.annotate))
        labels = stage(out / "annotate", fp_lab, lambda: run_annotate(cfg, tables["unlabeled"], ann["annotator"],
                                                                      out / "annotate"))
        tables = {**tables, "annotated": labels["annotated"]}
        weak_metrics = {**ann["metrics"], **labels["metrics"]}
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
            run_name="sft-shared", parent_run_id=runs.parent_id))})
        start, shared_po = str(out / "sft" / "sft"), str(out / "sft" / "policy")

    split = cfg.evaluate.split
    for loss in cfg.losses:
        for arm in cfg.arms:
            name = f"{arm.replace(':', '')}-{loss}"
            folder = out / "arms" / name
            data, weighting = arm_inputs(arm, tables)
            # The human and gold arms do not read the annotator's labels: a new annotator leaves them done.
            fp_labels = fp_lab if reads_weak_labels(arm) else fp_data
            fp_train = fingerprint("train", arm, loss, fp_start, fp_labels, policy_fp, cfg.seed)
            # Evaluation is its own stage: a validation pass and then the test pass share the training.
            fp_eval = fingerprint("eval", fp_train, to_dict(cfg.evaluate), test, cfg.seed)
            run_id = runs.child(arm, loss, cfg.seed, fp_train, human_labels_used(arm, cfg, tables))
            if arm == "human_labeled_only" and loss == cfg.losses[0] and shared_po:
                policy, reference = shared_po, start  # the shared SFT run trained exactly this arm
            else:
                stage(folder / "train", fp_train, lambda data=data, weighting=weighting, run_id=run_id, name=name,
                      folder=folder, loss=loss: {"policy": policy_stage.run(policy_config(
                          cfg, data=data, model=start, out=str(folder / "train"), loss=loss, weighting=weighting,
                          sft_epochs=cfg.policy.sft_epochs if cfg.sft == "per-arm" else 0,
                          run_name=f"train-{name}", parent_run_id=run_id))}, label=f"{name} train")
                policy = str(folder / "train" / "policy")
                reference = str(folder / "train" / "sft") if cfg.sft == "per-arm" else start
            eval_dir = folder / ("eval" if split == "test" else f"eval_{split}")
            metrics = stage(eval_dir, fp_eval, lambda policy=policy, reference=reference, run_id=run_id,
                            eval_dir=eval_dir: evaluate_policy(cfg, policy, reference, test, eval_dir, run_id),
                            label=f"{name} {'evaluate' if split == 'test' else split}")
            runs.finish_child(arm, loss, cfg.seed, metrics, eval_dir / "responses.parquet", split)
