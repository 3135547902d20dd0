"""Run the whole method for every arm: data -> annotator -> annotate -> SFT -> PO -> evaluate.

Arms (each crossed with every loss in `losses`):
  human               PO on the unlabeled split with its hidden human labels (weights 1)
  human_labeled_only  PO on the labeled split alone (the 30% of human labels, weights 1)
  ws                  PO on the unlabeled split with the annotator's labels, uniform weights
  cw                  the same with confidence weights (CW-PO)
  topk:F              the annotator's labels, only the fraction F most confident pairs
  gold                the unlabeled split labeled by the source's gold scores (ties dropped): the
                      noise-free ceiling, for a benchmark that has them (the built-in one does).
                      If it does not beat human, label quality cannot show at these settings.

SFT (`sft`): `shared` (default) runs one SFT on the labeled split's (prompt, chosen) and starts
every arm's PO from it, so all arms share one start and one reference and GRA compares like
with like; that same run's PO on the labeled split *is* the human_labeled_only arm for the
first loss. `per-arm` gives each arm its own SFT on its own training labels (the paper's
protocol; costs one SFT per arm). `none` starts PO from the base model (the prototype's setup).

A GGUF start model is first dequantized once into OUT/start/model, which every stage loads.
Each stage writes into its own folder under OUT and, last, a marker `.stage.json` holding the
fingerprint of its settings and its inputs' fingerprints. A rerun skips a stage whose marker
matches, reruns one whose marker is missing or stale (its folder is cleared first), so an
interrupted pipeline resumes. MLflow: one parent run, a child run per arm x loss holding
that arm's eval/* metrics (its train-policy run nested below it); the parent holds every
arm's metrics as ARM.LOSS.* too, the annotator's metrics and the compare table.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from cwpo_ray.config import option, to_dict

EPILOG = """examples:
  cwpo pipeline --config cwpo_ray/configs/quick.yaml            # the README's main command
  cwpo pipeline --config cwpo_ray/configs/full.yaml out=runs/full seed=1
  cwpo pipeline --config my.yaml arms=[human,cw,topk:0.3] losses=[dpo,ipo] policy.lr=1e-5
"""

BASE_ARMS = ("human", "human_labeled_only", "ws", "cw")
EXTRA_ARMS = ("gold",)  # and topk:F
PACKAGE = Path(__file__).resolve().parent.parent
BUILTIN_SOURCE = f"pairs:{PACKAGE / 'benchmark_data'}"


@dataclass
class AnnotatorSettings:
    model: str = option("minilm-l6", "annotator backbone")
    epochs: int = option(5, "epochs (the best held-out epoch is kept)")
    lr: float = option(2e-5, "learning rate")
    batch_size: int = option(16, "pairs per step")
    max_length: int = option(256, "tokens of prompt + response")
    pooling: str = option("", "first, last or mean ('' : the backbone's default)")
    num_workers: int = option(1, "Ray Train workers")
    strategy: str = option("ddp", "ddp or deepspeed")
    cpus_per_worker: float = option(1.0, "CPUs per worker (also its torch threads)")


@dataclass
class PolicySettings:
    model: str = option("smollm2-135m", "strong model (start of SFT)")
    sft_epochs: int = option(1, "SFT epochs")
    sft_lr: float = option(1e-5, "SFT learning rate")
    epochs: int = option(1, "PO epochs")
    lr: float = option(1e-5, "PO learning rate")
    beta: float = option(0.5, "PO beta")
    warmup_steps: int = option(10, "warm-up steps")
    batch_size: int = option(8, "pairs per worker per step")
    max_length: int = option(96, "tokens of prompt + response")
    max_prompt_length: int = option(48, "prompt tokens")
    max_steps: Optional[int] = option(None, "cap on steps per stage")
    chat_template: bool = option(True, "prompts in the model's chat format (training and pair accuracy)")
    lora: bool = option(False, "LoRA adapters")
    num_workers: int = option(1, "Ray Train workers")
    strategy: str = option("ddp", "ddp or deepspeed")
    cpus_per_worker: float = option(1.0, "CPUs per worker")


@dataclass
class EvalSettings:
    judge: str = option("vader", "gold judge")
    temperature: float = option(0.95, "sampling temperature")
    max_new_tokens: int = option(40, "new tokens per response")
    max_prompts: Optional[int] = option(None, "test prompts evaluated (None: all)")
    batch_size: int = option(16, "prompts per generation batch")
    engine: str = option("auto", "auto, vllm, transformers or ray")
    pair_accuracy: bool = option(True, "implicit-reward accuracy on the test pairs")


@dataclass
class Config:
    out: str = option("runs/pipeline", "output folder (one subfolder per stage)")
    source: str = option("builtin", "builtin (the shipped benchmark) or KIND:WHERE as for `cwpo data`")
    test: str = option("", "test prompts table (default: the source's test split)")
    labeled_fraction: float = option(0.3, "fraction of train pairs that keep their human label")
    max_unlabeled: int = option(0, "use at most this many unlabeled pairs for PO (0: all)")
    arms: list[str] = option(help="arms to run", factory=lambda: list(BASE_ARMS))
    losses: list[str] = option(help="PO losses", factory=lambda: ["dpo"])
    sft: str = option("shared", "shared, per-arm or none", choices=("shared", "per-arm", "none"))
    seed: int = option(0, "seed of the split, training and sampling")
    experiment: str = option("cwpo-pipeline", "MLflow experiment")
    run_name: str = option("pipeline", "MLflow parent run name")
    annotator: AnnotatorSettings = option(factory=AnnotatorSettings, flag=False)
    policy: PolicySettings = option(factory=PolicySettings, flag=False)
    evaluate: EvalSettings = option(factory=EvalSettings, flag=False)

    def validate(self) -> None:
        from cwpo_ray.losses import LOSS_TYPES
        from cwpo_ray.weighting import parse_weighting

        for arm in self.arms:
            if arm not in BASE_ARMS + EXTRA_ARMS:
                if not arm.startswith("topk:"):
                    raise ValueError(f"arms: unknown arm {arm!r} (known: {', '.join(BASE_ARMS + EXTRA_ARMS)}, "
                                     "topk:F)")
                parse_weighting(arm)
        for loss in self.losses:
            if loss not in LOSS_TYPES:
                raise ValueError(f"losses: unknown loss {loss!r} (known: {', '.join(LOSS_TYPES)})")
        if not self.arms or not self.losses:
            raise ValueError("arms and losses must each name at least one")


# ----------------------------------------------------------------------------- stage markers

def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_fingerprint(source: str) -> str:
    """Local files by path, size and mtime (cheap at any size); a hub id by its name."""
    where = Path(source.partition(":")[2])
    if not where.exists():
        return fingerprint(source)
    files = sorted(where.rglob("*")) if where.is_dir() else [where]
    return fingerprint(source, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])


def stage(folder: Path, fp: str, work: Callable[[], dict]) -> dict:
    """Run ``work`` into ``folder`` unless its marker says it is done with this fingerprint.

    The marker holds the fingerprint from the start and the result only at the end. A stage
    killed midway is run again: with the same fingerprint into its folder as it was (train-policy
    resumes from its checkpoints there), with another one (or no marker) into a cleared folder, so
    nothing of an old config leaks in. Returns what ``work`` returned (kept in the marker, so a
    skipped stage returns it too).
    """
    marker = folder / ".stage.json"
    saved = json.loads(marker.read_text()) if marker.exists() else {}
    if saved.get("fingerprint") == fp and "result" in saved:
        print(f"pipeline: {folder.name}: done already (fingerprint {fp}), reusing", flush=True)
        return saved["result"]
    if saved.get("fingerprint") != fp and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp}))  # started, not done
    result = work()
    marker.write_text(json.dumps({"fingerprint": fp, "result": result}, indent=2, default=str))
    return result


# ----------------------------------------------------------------------------- stages

def run_data(cfg: Config, out: Path) -> dict:
    """Normalize and split; then the tables the arms train on."""
    from cwpo_ray.recipes import data

    data.run(data.Config(source=resolve_source(cfg.source), out=str(out), labeled_fraction=cfg.labeled_fraction,
                         seed=cfg.seed, progress=False))
    unlabeled = out / "unlabeled.parquet"
    if cfg.max_unlabeled:
        unlabeled = take_first(unlabeled, out / "unlabeled_used.parquet", cfg.max_unlabeled, cfg.seed)
    counts = human_table(unlabeled, out / "unlabeled_human.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"labeled": str(out / "labeled.parquet"), "unlabeled": str(unlabeled),
            "unlabeled_human": str(out / "unlabeled_human.parquet"),
            "test": str(out / "test.parquet") if (out / "test.parquet").exists() else "",
            "n_labeled": manifest["counts"]["labeled"], "n_unlabeled": counts}


def run_annotator(cfg: Config, labeled: str, out: Path) -> dict:
    from cwpo_ray.recipes import train_annotator as ta

    a = cfg.annotator
    ta.run(ta.Config(data=labeled, model=a.model, out=str(out / "annotator"), epochs=a.epochs, lr=a.lr,
                     batch_size=a.batch_size, max_length=a.max_length, pooling=a.pooling, seed=cfg.seed,
                     num_workers=a.num_workers, strategy=a.strategy, cpus_per_worker=a.cpus_per_worker,
                     experiment=cfg.experiment,
                     run_name="train-annotator", progress=False, storage_path=str(out / "ray")))
    best = json.loads((out / "annotator" / "eval.json").read_text())["best"]
    return {"annotator": str(out / "annotator"),
            "metrics": {f"annotator.heldout_{k}": v for k, v in best.items() if isinstance(v, (int, float))}}


def run_annotate(cfg: Config, unlabeled: str, annotator: str, out: Path) -> dict:
    from cwpo_ray.recipes import annotate
    annotate.run(annotate.Config(data=unlabeled, annotator=annotator, out=str(out), num_actors=1,
                                 cpus_per_actor=0.5, torch_threads=2))
    report = json.loads((out / "report.json").read_text())
    metrics = {"annotator.mean_confidence": report.get("mean_confidence")}
    human = report.get("human_agreement") or {}
    metrics["annotator.human_agreement"] = human.get("accuracy")
    metrics.update(gold_accuracy(out / "annotated.parquet", resolve_source(cfg.source)))
    return {"annotated": str(out / "annotated.parquet"), "metrics": {k: v for k, v in metrics.items() if v is not None}}


def run_start_model(model: str, out: Path) -> dict:
    """A GGUF start model dequantized once into a plain transformers folder.

    Every arm's training, its final save and the evaluation of the start model load it; from
    GGUF each load re-dequantizes the weights and rebuilds the tokenizer (~15 s on 2 cores).
    The folder holds the same fp32 weights and tokenizer, so results do not change.
    """
    from cwpo_ray.models import load_causal_lm, load_tokenizer, resolve_model
    from cwpo_ray.tables import atomic_path

    source = resolve_model(model)
    if not source.gguf_file:
        return {"model": model}
    with atomic_path(out / "model") as tmp:
        load_causal_lm(source).save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
    return {"model": str(out / "model")}


def policy_config(cfg: Config, **kw):
    from cwpo_ray.recipes import train_policy as tp

    p = cfg.policy
    return tp.Config(**{**dict(model=p.model, sft_epochs=p.sft_epochs, sft_lr=p.sft_lr, epochs=p.epochs, lr=p.lr,
                                beta=p.beta, warmup_steps=p.warmup_steps, batch_size=p.batch_size,
                                max_length=p.max_length, max_prompt_length=p.max_prompt_length,
                                max_steps=p.max_steps, chat_template=p.chat_template, lora=p.lora,
                                num_workers=p.num_workers,
                                strategy=p.strategy, cpus_per_worker=p.cpus_per_worker, seed=cfg.seed,
                                experiment=cfg.experiment, progress=False,
                                # the arms starting from one model score the same responses once
                                reference_cache=str(Path(cfg.out).resolve() / "reference_cache")), **kw})


def evaluate_policy(cfg: Config, policy: str, reference: str, test: str, out: Path, run_id: str) -> dict:
    from cwpo_ray.recipes import evaluate

    e = cfg.evaluate
    evaluate.run(evaluate.Config(policy=policy, reference=reference, prompts=test, out=str(out), judge=e.judge,
                                 temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                                 max_prompts=e.max_prompts, batch_size=e.batch_size, engine=e.engine,
                                 pair_accuracy=e.pair_accuracy, max_length=cfg.policy.max_length,
                                 max_prompt_length=cfg.policy.max_prompt_length,
                                 chat_template=cfg.policy.chat_template, seed=cfg.seed,
                                 experiment=cfg.experiment, run_id=run_id, cache_dir=str(out.parent.parent / "eval_cache")))
    return json.loads((out / "eval.json").read_text())["metrics"]


def arm_inputs(arm: str, tables: dict) -> tuple[str, str]:
    """(training table, weighting) of an arm."""
    if arm == "human":
        return tables["unlabeled_human"], "none"
    if arm == "human_labeled_only":
        return tables["labeled"], "none"
    if arm == "ws":
        return tables["annotated"], "none"
    if arm == "gold":
        return tables["unlabeled_gold"], "none"
    if arm == "cw":
        return tables["annotated"], "confidence"
    return tables["annotated"], arm  # topk:F


def human_labels_used(arm: str, cfg: Config, tables: dict) -> int:
    """Human labels an arm consumed: the labeled split (annotator or SFT/PO), plus the unlabeled
    split's hidden labels for the human arm."""
    n = tables["n_labeled"]
    if arm == "gold":
        return n if cfg.sft == "shared" else 0
    if arm == "human":
        return tables["n_unlabeled"] + (n if cfg.sft == "shared" else 0)
    return n


# ----------------------------------------------------------------------------- tables

def take_first(src: Path, dst: Path, n: int, seed: int) -> Path:
    """The ``n`` pairs first in a seeded hash order of their ids: a fixed random subset,
    the same whatever order the table was written in."""
    import pyarrow as pa

    from cwpo_ray.sources import _unit
    from cwpo_ray.tables import read_table, write_table

    table = read_table(src)
    ids = table.column("id").to_pylist()
    keep = sorted(range(len(ids)), key=lambda i: _unit(f"{seed}:subset:{ids[i]}"))[:n]
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
    right, conf = np.asarray(right), np.asarray(conf)
    out = {"annotator.gold_accuracy": float(right.mean()), "annotator.gold_pairs": len(right)}
    if conf.sum() > 0:
        out["annotator.gold_accuracy_cw"] = float((right * conf).sum() / conf.sum())
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
        fp = fingerprint(to_dict(cfg))
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

    def child(self, arm: str, loss: str, fp: str, human_labels: int) -> str:
        key = f"{arm}/{loss}"
        saved = self.state["children"].get(key)
        if saved and saved["fingerprint"] == fp and self._alive(saved["run_id"]):
            return saved["run_id"]
        run_id = self._create(f"{arm}-{loss}", {"stage": "arm", "arm": arm, "loss": loss}, parent=self.parent_id)
        for k, v in {"arm": arm, "loss": loss, "human_labels_used": human_labels, "sft": self.cfg.sft}.items():
            self.client.log_param(run_id, k, str(v))
        self.client.log_metric(run_id, "human_labels_used", float(human_labels))
        self.state["children"][key] = {"run_id": run_id, "fingerprint": fp}
        self._save()
        return run_id

    def finish_child(self, arm: str, loss: str, metrics: dict, responses: Path) -> None:
        """Every arm's eval metrics on the parent too (ARM.LOSS.gra ...), so one run holds them all;
        its per-prompt responses and scores on its own run, for compare's paired differences."""
        run_id = self.state["children"][f"{arm}/{loss}"]["run_id"]
        if responses.exists():
            self.client.log_artifact(run_id, str(responses))
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        for k, v in numeric.items():
            self.client.log_metric(run_id, f"eval/{k}", v)  # idempotent with evaluate's own logging
        self.log_parent({f"{arm.replace(':', '')}.{loss}.{k}": v for k, v in numeric.items()})
        self.client.set_terminated(run_id)

    def close(self) -> None:
        self.client.set_terminated(self.parent_id)


# ----------------------------------------------------------------------------- the recipe

def resolve_source(source: str) -> str:
    return BUILTIN_SOURCE if source == "builtin" else source


def resolve_test(cfg: Config, tables: dict) -> str:
    if cfg.test:
        return cfg.test
    if cfg.source == "builtin":  # the shipped test table keeps the gold scores (ties are skipped)
        return str(PACKAGE / "benchmark_data" / "test.parquet")
    if not tables["test"]:
        raise ValueError("the source has no test split: give test=TABLE")
    return tables["test"]


def run(cfg: Config) -> int:
    from cwpo_ray import ray_env, tracking
    from cwpo_ray.recipes import compare, train_policy

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray_env.init_ray()
    runs = ArmRuns(cfg, out)  # the MLflow parent run (reused on resume) and its children

    fp_data = fingerprint("data", cfg.source, source_fingerprint(resolve_source(cfg.source)), cfg.labeled_fraction,
                          cfg.max_unlabeled, cfg.seed)
    tables = stage(out / "data", fp_data, lambda: run_data(cfg, out / "data"))
    fp_ann = fingerprint("annotator", fp_data, to_dict(cfg.annotator), cfg.seed)
    ann = stage(out / "annotator", fp_ann, lambda: run_annotator(cfg, tables["labeled"], out / "annotator"))
    fp_lab = fingerprint("annotate", fp_ann)
    labels = stage(out / "annotate", fp_lab, lambda: run_annotate(cfg, tables["unlabeled"], ann["annotator"],
                                                                  out / "annotate"))
    tables = {**tables, "annotated": labels["annotated"]}
    runs.log_parent({**ann["metrics"], **labels["metrics"], "pairs.labeled": tables["n_labeled"],
                     "pairs.unlabeled": tables["n_unlabeled"]})
    test = resolve_test(cfg, tables)
    if "gold" in cfg.arms:  # cheap, and a function of the split alone: rebuilt rather than staged
        path = out / "data" / "unlabeled_gold.parquet"
        tables = {**tables, "unlabeled_gold": str(path),
                  "n_gold": gold_table(Path(tables["unlabeled"]), resolve_source(cfg.source), path)}

    # The shared SFT start (see the module doc): SFT + PO on the labeled split.
    policy_fp = to_dict(cfg.policy)
    fp_start = fingerprint("base", cfg.policy.model)
    start = stage(out / "start", fp_start, lambda: run_start_model(cfg.policy.model, out / "start"))["model"]
    shared_po = None
    if cfg.sft == "shared":
        fp_start = fingerprint("sft", fp_data, policy_fp, cfg.losses[0], cfg.seed)
        stage(out / "sft", fp_start, lambda: {"code": train_policy.run(policy_config(
            cfg, data=tables["labeled"], model=start, out=str(out / "sft"), loss=cfg.losses[0], weighting="none",
            run_name="sft-shared", parent_run_id=runs.parent_id))})
        start, shared_po = str(out / "sft" / "sft"), str(out / "sft" / "policy")

    for loss in cfg.losses:
        for arm in cfg.arms:
            name = f"{arm.replace(':', '')}-{loss}"
            folder = out / "arms" / name
            data, weighting = arm_inputs(arm, tables)
            # The human and gold arms do not read the annotator's labels: a new annotator leaves them done.
            fp_labels = fp_data if arm.startswith("human") or arm == "gold" else fp_lab
            fp_arm = fingerprint("arm", arm, loss, fp_start, fp_labels, policy_fp, to_dict(cfg.evaluate), test,
                                 cfg.seed)
            run_id = runs.child(arm, loss, fp_arm, human_labels_used(arm, cfg, tables))

            def work(arm=arm, loss=loss, folder=folder, data=data, weighting=weighting, run_id=run_id):
                if arm == "human_labeled_only" and loss == cfg.losses[0] and shared_po:
                    policy, reference = shared_po, start  # the shared SFT run trained exactly this arm
                else:
                    train_policy.run(policy_config(
                        cfg, data=data, model=start, out=str(folder / "train"), loss=loss, weighting=weighting,
                        sft_epochs=cfg.policy.sft_epochs if cfg.sft == "per-arm" else 0,
                        run_name=f"train-{name}", parent_run_id=run_id))
                    policy = str(folder / "train" / "policy")
                    reference = str(folder / "train" / "sft") if cfg.sft == "per-arm" else start
                return evaluate_policy(cfg, policy, reference, test, folder / "eval", run_id)

            metrics = stage(folder, fp_arm, work)
            runs.finish_child(arm, loss, metrics, folder / "eval" / "responses.parquet")

    compare.run(compare.Config(experiment=cfg.experiment, parent_run_id=runs.parent_id, out=str(out / "compare")))
    runs.close()
    print(f"pipeline: done -> {out} (MLflow experiment {cfg.experiment!r}, parent run {runs.parent_id}); "
          f"tracking URI {tracking.tracking_uri()}", flush=True)
    return 0
