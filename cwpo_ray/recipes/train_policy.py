"""Train the strong policy: optional SFT, then confidence-weighted DPO / IPO / rDPO (Ray Train).

PAIRS (--data) is an annotated table (id, prompt, chosen, rejected, reward_chosen,
reward_rejected, confidence, annotator) or a labeled table (id, prompt, chosen, rejected:
human labels, weight 1). Pair weights (--weighting): `confidence` = the annotator's
confidence C (the paper's CW-PO; 1 for a labeled table), `none` = uniform weights,
`topk:F` = keep only the fraction F most confident pairs, uniform weights. The loss is
mean(weight * per-pair loss) over the batch, as in the paper.

Steps, all under --out DIR:
  1. DIR/train_pairs.parquet: the kept pairs and their `weight`.
  2. SFT on (prompt, chosen) for --sft-epochs epochs (0 skips it) -> DIR/sft.
  3. PO from the same start (DIR/sft, else --model), which is also the reference: before
     the first step the training workers score every pair once without gradients
     (DIR/reference.parquet), so PO never holds a second model in memory; with
     --reference-cache, responses an earlier run scored from the same start are reused.
     -> DIR/policy (merged LoRA if --lora), loadable with AutoModelForCausalLM as is.

Prompts are put in the model's chat format when its tokenizer has a chat template (as `cwpo
evaluate` generates; --no-chat-template keeps plain text). Truncation rule: the prompt is cut
from the LEFT to --max-prompt-length tokens, then the response (EOS appended) is cut from the
RIGHT so prompt + response fits --max-length; at least one response token is kept. The loss covers response tokens only. A pair goes through
the model as ONE row, prompt | chosen | rejected, with an attention mask that keeps rejected
from seeing chosen: the same log-probs as two sequences, the prompt computed once.

Batches: each optimizer step takes --grad-accumulation micro-batches of --batch-size pairs per
worker (the global batch is the same data whatever the worker count, and N workers x K
micro-batches give the same update as N*K workers); an epoch drops the last incomplete
global batch. Checkpoints every --checkpoint-every steps; a failed worker is restarted (--max-failures) and training
resumes from the last checkpoint at its step, with the optimizer and schedule state.
Rerunning the same command into the same DIR continues where it stopped (--no-resume
starts over). DIR must be on storage every worker can read and write. Metrics go to MLflow
(MLFLOW_TRACKING_URI, else ./mlflow/store) with TRL's names.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from cwpo_ray.config import option
from cwpo_ray.distributed import DistributedConfig
from cwpo_ray.losses import LOSS_TYPES

EPILOG = """examples:
  cwpo train-policy --data runs/annotated.parquet --model smollm2-135m --out runs/cw-dpo
  cwpo train-policy --data runs/data/unlabeled_human.parquet --model smollm2-135m --out runs/human-ipo \\
      --loss ipo --weighting none --num-workers 4 --strategy deepspeed --zero-stage 3
  cwpo train-policy --data runs/annotated.parquet --model my/folder --out runs/top30 --weighting topk:0.3 --lora
"""


@dataclass
class Settings(DistributedConfig):
    """How the policy is trained: everything but its inputs, outputs, the arm (loss, weighting) and
    run bookkeeping. The pipeline's ``policy`` section is this class: one name and default per option."""

    model: str = option("smollm2-135m", "policy start: a local folder, a hub id, a .gguf file or smollm2-135m")
    gguf_file: Optional[str] = option(None, "GGUF file inside --model's folder")
    beta: float = option(0.5, "PO temperature beta")
    epsilon: float = option(0.1, "rDPO label-noise rate")
    epochs: int = option(1, "PO epochs")
    # The paper's values (lr 5e-6, 100 warm-up steps); the built-in presets, with far fewer steps,
    # set their own.
    lr: float = option(5e-6, "PO peak learning rate (cosine schedule after warm-up)")
    warmup_steps: int = option(100, "linear warm-up steps (capped at 10%% of the steps when there are fewer)")
    weight_decay: float = option(0.05, "AdamW weight decay (PO and SFT)")
    batch_size: int = option(8, "pairs per worker per forward pass (micro-batch)")
    grad_accumulation: int = option(1, "micro-batches per optimizer step (global batch = batch_size x "
                                       "grad_accumulation x num_workers)")
    max_length: int = option(512, "max tokens of prompt + response")
    max_prompt_length: int = option(256, "max prompt tokens (cut from the left)")
    max_steps: Optional[int] = option(None, "stop each stage after this many steps (smoke tests, benchmarks)")
    chat_template: bool = option(True, "prompts in the model's chat format when its tokenizer has one (as "
                                       "`cwpo evaluate` generates); --no-chat-template: plain text")
    sft_epochs: int = option(3, "SFT epochs on (prompt, chosen) before PO; 0 skips SFT")
    sft_lr: float = option(1e-5, "SFT peak learning rate")
    lora: bool = option(False, "train LoRA adapters (merged into the saved model)")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: str = option("", "comma-separated module names for LoRA (empty: peft's default for the model)")
    checkpoint_every: int = option(50, "checkpoint every N optimizer steps")
    ref_batch_size: int = option(16, "pairs per worker per batch in the reference log-prob pass")

    def validate(self) -> None:
        from cwpo_ray.logprobs import Lengths

        super().validate()
        Lengths(self.max_prompt_length, self.max_length)
        for name in ("epochs", "batch_size", "grad_accumulation", "num_workers", "checkpoint_every", "ref_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sft_epochs < 0 or self.warmup_steps < 0:
            raise ValueError("sft_epochs and warmup_steps must be >= 0")
        if not self.beta > 0 or not 0 <= self.epsilon < 0.5:
            raise ValueError(f"need beta > 0 and 0 <= epsilon < 0.5, got {self.beta}, {self.epsilon}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass(kw_only=True)
class Config(Settings):
    data: str = option(help="annotated or labeled pair table (.parquet/.jsonl file or folder)", must_exist=True)
    out: str = option(help="output folder (sft/, policy/, train_pairs.parquet, reference.parquet, manifest.json)")
    loss: str = option("dpo", "per-pair loss", choices=LOSS_TYPES)
    weighting: str = option("confidence", "pair weights: none, confidence or topk:F")
    resume: bool = option(True, "continue from DIR's last checkpoints; --no-resume starts over")
    reference_cache: str = option("", "folder of reference log-probs shared by runs from the same start model "
                                      "(responses scored before are not scored again)")
    seed: int = option(0, "seed of initialization, data order and LoRA")
    experiment: str = option("cwpo", "MLflow experiment")
    run_name: str = option("", "MLflow run name (default: train-policy-LOSS-WEIGHTING)")
    parent_run_id: str = option("", "MLflow parent run id (the pipeline's)")
    progress: bool = option(True, "tqdm progress bar on rank 0")
    fail_at_step: int = option(-1, "testing: the last worker fails once at this PO step", flag=False)

    def validate(self) -> None:
        from cwpo_ray.weighting import parse_weighting

        super().validate()
        parse_weighting(self.weighting)


@dataclass
class Job:
    """What one Ray Train run (SFT or PO) of ``train_loop`` needs besides the stage's config."""

    cfg: Config
    mode: str                 # "sft" or "po"
    model_path: str
    gguf_file: Optional[str]
    table: str                # train_pairs.parquet
    save_to: str
    lr: float
    warmup_steps: int
    plan: "StepPlan"
    run_id: str
    tracking_uri: str
    reference_table: str
    reference_key: str

    @property
    def lengths(self):
        from cwpo_ray.logprobs import Lengths

        return Lengths(self.cfg.max_prompt_length, self.cfg.max_length, self.cfg.chat_template)

    @property
    def reference(self) -> "ReferenceSpec":
        return ReferenceSpec(self.reference_table, self.lengths, self.cfg.ref_batch_size, self.cfg.reference_cache,
                             self.reference_key)


@dataclass
class ReferenceSpec:
    """Where and how the reference log-probs of a PO run are computed and kept."""

    table: str            # DIR/reference.parquet
    lengths: "object"     # logprobs.Lengths: how pairs are tokenized
    batch_size: int
    cache_dir: str        # shared across runs from the same start ("" : none)
    cache_key: str        # the start model and tokenization (reference_key)


# ----------------------------------------------------------------------------- the recipe

def run(cfg: Config) -> int:
    from cwpo_ray import tracking
    from cwpo_ray.models import ModelSource, resolve_model

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        for stale in ("ray", "sft", "policy", "reference.parquet", "mlflow_run_id"):
            _remove(out / stale)
    start = resolve_model(cfg.model, cfg.gguf_file)
    n_pairs = write_train_pairs(cfg, out / "train_pairs.parquet")

    # A rerun into the same DIR continues the same MLflow run, as a restarted worker does.
    run_id_file = out / "mlflow_run_id"
    old_run_id = _existing_run(run_id_file, tracking.tracking_uri())
    with tracking.start_run(cfg.experiment, cfg.run_name or f"train-policy-{cfg.loss}-{cfg.weighting}",
                            run_id=old_run_id, parent_run_id=cfg.parent_run_id or None,
                            tags={"stage": "train-policy"}) as mlrun:
        run_id_file.write_text(mlrun.info.run_id)
        if old_run_id is None:
            tracking.log_config(cfg)
        run_ids = (mlrun.info.run_id, tracking.tracking_uri())

        # SFT on (prompt, chosen): the PO start and its reference.
        if cfg.sft_epochs > 0:
            train_stage(cfg, "sft", start, out / "train_pairs.parquet", out / "sft", n_pairs, *run_ids)
            start = ModelSource(str(out / "sft"))

        # Confidence-weighted PO; its workers first compute the reference log-probs once
        # (DIR/reference.parquet), so PO never holds a second model.
        result = train_stage(cfg, "po", start, out / "train_pairs.parquet", out / "policy", n_pairs, *run_ids)

    manifest = {"stage": "train-policy", "config": asdict(cfg), "pairs": n_pairs, "start": str(start),
                "sft": str(out / "sft") if cfg.sft_epochs > 0 else None, "policy": str(out / "policy"),
                "reference_table": str(out / "reference.parquet"), "mlflow_run_id": mlrun.info.run_id,
                "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"train-policy: {n_pairs} pairs -> {out / 'policy'} (MLflow run {mlrun.info.run_id})")
    return 0


# ----------------------------------------------------------------------------- data

def write_train_pairs(cfg: Config, path: Path) -> int:
    """The kept pairs with their weight column; returns how many."""
    import pyarrow as pa

    from cwpo_ray.weighting import pair_weights
    from cwpo_ray.tables import LABELED_COLUMNS, read_table, require_columns, write_table

    names = require_columns(cfg.data, LABELED_COLUMNS)
    annotated = "confidence" in names
    table = read_table(cfg.data, columns=list(LABELED_COLUMNS) + (["confidence"] if annotated else []))
    confidence = table.column("confidence").to_pylist() if annotated else None
    if confidence is not None and any(c is None or not 0 <= c <= 1 for c in confidence):
        raise ValueError(f"{cfg.data}: confidence must be in [0, 1] on every row")
    keep, weights = pair_weights(confidence, cfg.weighting, table.num_rows)
    table = table.select(list(LABELED_COLUMNS)).take(keep).append_column("weight", pa.array(weights, pa.float64()))
    if table.num_rows < cfg.batch_size * cfg.grad_accumulation * cfg.num_workers:
        raise ValueError(f"{table.num_rows} pairs is fewer than one global batch ({cfg.batch_size} x "
                         f"{cfg.grad_accumulation} micro-batches x {cfg.num_workers} workers)")
    write_table(table, path)
    return table.num_rows


def ensure_reference(engine, tokenizer, rows: dict, spec: ReferenceSpec, rank: int, world_size: int) -> dict:
    """``rows`` with ref_chosen_logps / ref_rejected_logps (and token counts), computed once.

    Computed here, by the training workers themselves, before the first PO step: they
    already hold the start model, which IS the reference, so the pass costs no second
    model and no extra processes, and it runs under the same placement (ZeRO-3 sharding,
    GPUs) as training, so a reference too big for one device still fits. Each worker scores
    every world_size-th pair still to score without gradients, in batches of similar length
    (less padding); rank 0 writes the table, so a resumed or repeated run reads it back.
    With --reference-cache, responses another run already scored from the same start model
    at the same lengths are taken from the cache (the pipeline's human / ws / cw arms score
    the same texts).
    """
    import torch.distributed as td

    from cwpo_ray import logprobs
    from cwpo_ray.tables import read_table, write_table

    path = Path(spec.table)
    if path.exists():
        return read_table(path).to_pydict()
    t0 = time.perf_counter()
    lengths = spec.lengths
    n, bs = len(rows["id"]), spec.batch_size
    cache = ReferenceCache(spec.cache_dir, spec.cache_key) if spec.cache_dir else None
    known = cache.load() if cache else {}
    todo = [i for i in range(n) if ReferenceCache.key(rows["prompt"][i], rows["chosen"][i]) not in known
            or ReferenceCache.key(rows["prompt"][i], rows["rejected"][i]) not in known]
    size = lambda i: len(rows["prompt"][i]) + max(len(rows["chosen"][i]), len(rows["rejected"][i]))  # noqa: E731
    mine = sorted(todo[rank::world_size], key=size)
    # Every worker runs the same number of forwards (ZeRO-3 forwards are collective): a
    # worker that runs out repeats row 0 and throws the result away.
    n_batches = -(-(-(-len(todo) // world_size)) // bs)
    scored: dict[int, dict] = {}
    engine.eval()
    for b in range(n_batches):
        idx = mine[b * bs:(b + 1) * bs]
        use = idx or [0]
        out = logprobs.reference_logps(engine, tokenizer, [rows["prompt"][i] for i in use],
                                     [rows["chosen"][i] for i in use], [rows["rejected"][i] for i in use], lengths)
        for j, i in enumerate(idx):
            scored[i] = {k: v[j] for k, v in out.items()}
    engine.train()
    if world_size > 1 and td.is_initialized():
        parts: list = [None] * world_size
        td.all_gather_object(parts, scored)
        scored = {i: v for part in parts for i, v in part.items()}
    for i in set(range(n)) - set(scored):  # the rest come from the cache
        (c_logps, c_tokens), (r_logps, r_tokens) = (known[ReferenceCache.key(rows["prompt"][i], rows[side][i])]
                                                    for side in ("chosen", "rejected"))
        scored[i] = {"ref_chosen_logps": c_logps, "chosen_tokens": c_tokens,
                     "ref_rejected_logps": r_logps, "rejected_tokens": r_tokens}
    for key in ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens"):
        rows[key] = [scored[i][key] for i in range(n)]
    if rank == 0:
        import pyarrow as pa

        write_table(pa.Table.from_pydict(rows), path)
        if cache and todo:
            cache.add(rows, todo)
        print(f"train-policy: reference log-probs of {n} pairs ({len(todo)} computed, {n - len(todo)} from "
              f"the cache) in {time.perf_counter() - t0:.1f}s -> {path}")
    return rows


class ReferenceCache:
    """Reference log-probs of (prompt, response) texts under one start model and one truncation.

    One Parquet file per (model, tokenization) fingerprint in a shared folder: key (a hash of
    the prompt and the response), logps, tokens. Only rank 0 writes it, atomically.
    """

    def __init__(self, folder: str, model_key: str):
        self.path = Path(folder) / f"reference-{model_key}.parquet"

    @staticmethod
    def key(prompt: str, response: str) -> str:
        import hashlib

        return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()[:32]

    def load(self) -> dict[str, tuple[float, int]]:
        from cwpo_ray.tables import read_table

        if not self.path.exists():
            return {}
        t = read_table(self.path).to_pydict()
        return {k: (lp, n) for k, lp, n in zip(t["key"], t["logps"], t["tokens"])}

    def add(self, rows: dict, idx: list[int]) -> None:
        import pyarrow as pa

        from cwpo_ray.tables import write_table

        entries = self.load()
        for i in idx:
            for side in ("chosen", "rejected"):
                entries[self.key(rows["prompt"][i], rows[side][i])] = (rows[f"ref_{side}_logps"][i],
                                                                        rows[f"{side}_tokens"][i])
        keys = sorted(entries)
        write_table(pa.table({"key": keys, "logps": [entries[k][0] for k in keys],
                              "tokens": [entries[k][1] for k in keys]}), self.path)


def reference_key(source, cfg: Settings) -> str:
    """The start model (path, GGUF file, its files' sizes and mtimes) and how pairs are tokenized."""
    from cwpo_ray.fingerprints import path_fingerprint

    where = Path(source.path) / source.gguf_file if source.gguf_file else source.path
    return path_fingerprint(where, source.gguf_file, cfg.max_prompt_length, cfg.max_length, cfg.chat_template)


# ----------------------------------------------------------------------------- Ray Train

def train_stage(cfg: Config, mode: str, source, table: Path, save_to: Path, n_pairs: int, run_id: str,
                tracking_uri: str):
    """One Ray Train run (SFT or PO) of ``train_loop``; the model is saved to ``save_to``."""
    from cwpo_ray.distributed import run_trainer

    epochs, lr = (cfg.sft_epochs, cfg.sft_lr) if mode == "sft" else (cfg.epochs, cfg.lr)
    plan = StepPlan(n_pairs, cfg.batch_size, cfg.num_workers, epochs, cfg.seed, cfg.max_steps, cfg.grad_accumulation)
    warmup = cfg.warmup_steps if cfg.warmup_steps < plan.total_steps else plan.total_steps // 10
    print(f"train-policy {mode}: {n_pairs} pairs, {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), "
          f"global batch {plan.global_batch}, warm-up {warmup}, lr {lr}")
    out = Path(cfg.out).resolve()
    if cfg.reference_cache:
        cfg = replace(cfg, reference_cache=str(Path(cfg.reference_cache).resolve()))  # workers may have another cwd
    job = Job(cfg=cfg, mode=mode, model_path=source.path, gguf_file=source.gguf_file, table=str(table),
              save_to=str(save_to), lr=lr, warmup_steps=warmup, plan=plan, run_id=run_id, tracking_uri=tracking_uri,
              reference_table=str(out / "reference.parquet"), reference_key=reference_key(source, cfg))
    # Ray Train keys a run's checkpoints by name under the storage path: one name per output folder,
    # so stages sharing a storage_path (the pipeline's arms on s3://) never resume each other's.
    name = mode if not cfg.storage_path else f"{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}-{mode}"
    return run_trainer(train_loop, {"job": job}, cfg, name=name, default_storage=str(out / "ray"))


@dataclass
class StepPlan:
    """Which rows each worker trains on at each step: deterministic, so a resumed run sees the same data."""

    n: int
    batch_size: int
    world: int
    epochs: int
    seed: int
    max_steps: Optional[int] = None
    accumulation: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def rows(self, step: int, rank: int) -> list[list[int]]:
        """This worker's micro-batches of optimizer step ``step``."""
        import torch

        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        per_worker = self.batch_size * self.accumulation
        start = i * self.global_batch + rank * per_worker
        mine = order[start:start + per_worker].tolist()
        return [mine[k:k + self.batch_size] for k in range(0, per_worker, self.batch_size)]


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: SFT (job.mode == 'sft') or PO, with checkpoints and resume."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from cwpo_ray.distributed import RankZeroLogger, adamw, device_for, report, resume, setup_engine, world
    from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer
    from cwpo_ray.tables import read_table

    job: Job = loop_config["job"]
    cfg, dist, plan = job.cfg, loop_config["dist"], job.plan
    rank, world_size = world()
    device = device_for(dist)
    source = ModelSource(job.model_path, job.gguf_file)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(source)
    model = _with_lora(load_causal_lm(source), cfg).to(device)
    rows = read_table(job.table).to_pydict()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, job.lr, cfg.weight_decay)
    engine = setup_engine(model, optimizer, lambda opt: get_cosine_schedule_with_warmup(
        opt, job.warmup_steps, plan.total_steps), dist, micro_batch_size=plan.batch_size,
        accumulation_steps=plan.accumulation)
    start = (resume(engine) or {}).get("step", 0)
    logger = RankZeroLogger(job.tracking_uri, job.run_id)
    if job.mode == "po":
        t0 = time.perf_counter()
        rows = ensure_reference(engine, tokenizer, rows, job.reference, rank, world_size)
        if start == 0:
            logger.log_metrics({"reference/seconds": time.perf_counter() - t0}, step=0)
    prefix = "sft/" if job.mode == "sft" else ""

    engine.train()
    bar = _progress_bar(job, rank, start)
    loop_start = time.perf_counter()
    for step in range(start, plan.total_steps):
        _maybe_fail(job, step, rank, world_size)
        t0 = time.perf_counter()
        metrics = {}
        for micro in plan.rows(step, rank):
            loss, micro_metrics = step_loss(engine, tokenizer, rows, micro, job)
            engine.backward_and_step(loss)  # steps the optimizer after the last micro-batch
            for k, v in micro_metrics.items():  # token counts summed, the rest averaged
                metrics[k] = metrics.get(k, 0.0) + (v if k == "tokens" else v / plan.accumulation)
        metrics = _mean_over_workers(metrics, world_size, device)
        seconds = time.perf_counter() - t0
        metrics.update({"pairs_per_s": plan.global_batch / seconds, "tokens_per_s": metrics.pop("tokens") / seconds,
                        "learning_rate": engine.scheduler.get_last_lr()[0], "epoch": (step + 1) / plan.steps_per_epoch})
        logger.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            report({**metrics, "step": step + 1}, engine, {"step": step + 1})
        elif step + 1 == plan.total_steps:
            # No checkpoint at the end: the final model is saved next; a model + AdamW state written
            # only to be deleted was the largest fixed cost of a short epoch (bench/RESULTS.md).
            report({**metrics, "step": step + 1})
    if bar is not None:
        bar.close()
    # Whole-loop time (logging and checkpoints included), what a trainer's "runtime" reports.
    logger.log_metrics({prefix + "loop_seconds": time.perf_counter() - loop_start}, step=plan.total_steps)
    save_final_model(engine, tokenizer, source, job, rank)


def step_loss(engine, tokenizer, rows: dict, idx: list[int], job: Job):
    """The loss of one worker's batch and its metrics (token count as 'tokens', summed later)."""
    from cwpo_ray import logprobs

    lengths = job.lengths
    pick = lambda col: [rows[col][i] for i in idx]  # noqa: E731
    if job.mode == "sft":
        batch = logprobs.sft_batch(tokenizer, pick("prompt"), pick("chosen"), lengths)
        loss, tokens = logprobs.sft_loss(engine, batch)
        return loss, {"loss": float(loss.detach()), "tokens": float(tokens)}
    batch = logprobs.pair_batch(tokenizer, pick("prompt"), pick("chosen"), pick("rejected"), lengths)
    return logprobs.po_loss(engine, batch, pick("ref_chosen_logps"), pick("ref_rejected_logps"), pick("weight"),
                          loss_type=job.cfg.loss, beta=job.cfg.beta, epsilon=job.cfg.epsilon)


def _mean_over_workers(metrics: dict, world_size: int, device) -> dict:
    """Every worker's metrics averaged (token counts summed): what rank 0 logs is the global batch's."""
    from cwpo_ray.distributed import sum_over_workers

    keys = sorted(metrics)
    sums = sum_over_workers([metrics[k] for k in keys], device)
    return {k: v if k == "tokens" else v / world_size for k, v in zip(keys, sums)}


def save_final_model(engine, tokenizer, source, job: Job, rank: int) -> None:
    """save_pretrained (+ tokenizer) from rank 0, LoRA merged, published atomically."""
    from cwpo_ray.models import load_causal_lm
    from cwpo_ray.tables import atomic_path

    state = engine.full_state_dict()  # collective under ZeRO-3: every rank calls it
    if rank != 0:
        return
    # A fresh, unwrapped, unpartitioned copy to load the weights into: it is the same for
    # DDP and every ZeRO stage, and LoRA merges into it.
    model = _with_lora(load_causal_lm(source), job.cfg)
    missing, unexpected = model.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) | {"lm_head.weight"}
    if unexpected or any(not any(k.endswith(t) for t in tied) for k in missing):
        raise RuntimeError(f"final weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if job.cfg.lora:
        model = model.merge_and_unload()
    with atomic_path(job.save_to) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _with_lora(model, cfg: Settings):
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] or None
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def _progress_bar(job: Job, rank: int, start: int):
    if rank != 0 or not job.cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=job.plan.total_steps, initial=start, desc=job.mode, unit="step", mininterval=1.0)


def _maybe_fail(job: Job, step: int, rank: int, world_size: int) -> None:
    """Testing hook: the last worker's process dies once at PO step ``fail_at_step``."""
    from cwpo_ray.distributed import die_once

    if job.mode == "po" and step == job.cfg.fail_at_step and rank == world_size - 1:
        die_once(Path(job.save_to).parent / f".failed-at-{step}")


def _existing_run(run_id_file: Path, uri: str) -> Optional[str]:
    """The run id saved by an earlier attempt, if that run exists on the current tracking server."""
    if not run_id_file.exists():
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id = run_id_file.read_text().strip()
    try:
        MlflowClient(uri).get_run(run_id)
        return run_id
    except MlflowException:
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()

