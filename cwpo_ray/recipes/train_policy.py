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
  Per-step metrics: DIR/metrics.jsonl (rank 0, one JSON object a line), logged to the MLflow run
     by the driver as they come.
  2 and 3 are one Ray Train run (one worker group, started once); a restarted group skips SFT
  once DIR/sft is saved, and each phase resumes only from its own checkpoints.

The training table, the step plan and why rows are read by index rather than streamed are in
``cwpo_ray.policy.train_table``; the reference pass and its cache in ``cwpo_ray.policy.reference``;
what each Ray Train worker runs in ``cwpo_ray.policy.worker``.

Prompts are put in the model's chat format when its tokenizer has a chat template (as `cwpo
evaluate` generates; --no-chat-template keeps plain text). Truncation rule: the prompt is cut
from the LEFT to --max-prompt-length tokens, then the response (EOS appended) is cut from the
RIGHT so prompt + response fits --max-length; at least one response token is kept. The loss
covers response tokens only. A pair's two sequences go through the model each in its own row
(--packing separate, the default on GPUs: any attention kernel) or as prompt | chosen | rejected
in one row with a mask that keeps rejected from seeing chosen, pairs of a batch with the same
prompt sharing it (shared_prefix, the default on CPUs: fewer tokens); the same log-probs either way.

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

import functools
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from cwpo_ray.config import option
from cwpo_ray.distributed import DistributedConfig
from cwpo_ray.losses import LOSS_TYPES
from cwpo_ray.out_lock import hold_out
from cwpo_ray.policy.train_table import write_train_pairs
from cwpo_ray.policy.worker import METRICS_FILE, SAVE_ERROR_FILE, Job, train_loop
from cwpo_ray.step_plan import StepPlan
from cwpo_ray.tables import atomic_path

PACKING_CHOICES = ("auto", "shared_prefix", "separate")
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")

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
    packing: str = option("auto", "how a pair's two sequences go through the model: separate (each in its own "
                                  "row: any attention kernel, e.g. flash_attention_2) or shared_prefix (prompt | "
                                  "chosen | rejected in one row with a 4D mask: fewer tokens, sdpa/eager only); "
                                  "auto: separate on GPUs, shared_prefix on CPU", choices=PACKING_CHOICES)
    attn_implementation: str = option("sdpa", "the policy's attention: sdpa, eager or flash_attention_2 "
                                              "(GPU, packing separate)", choices=ATTENTION_CHOICES)

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
        if self.packing not in PACKING_CHOICES:
            raise ValueError(f"packing must be one of {', '.join(PACKING_CHOICES)}, got {self.packing!r}")
        if self.attn_implementation not in ATTENTION_CHOICES:
            raise ValueError(f"attn_implementation must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got {self.attn_implementation!r}")
        if self.resolved_packing() == "shared_prefix" and self.attn_implementation == "flash_attention_2":
            raise ValueError("flash_attention_2 takes no 4D mask: set packing separate (or attn_implementation sdpa)")

    def resolved_packing(self) -> str:
        """``packing`` with auto decided: separate where the policy trains on GPUs (fused attention
        kernels need the plain mask), shared_prefix on CPUs, where fewer tokens is what counts."""
        if self.packing != "auto":
            return self.packing
        return "separate" if self.use_gpu else "shared_prefix"


@dataclass(kw_only=True)
class Config(Settings):
    data: str = option(help="annotated or labeled pair table (.parquet/.jsonl file or folder)", must_exist=True)
    out: str = option(help="output folder (sft/, policy/, train_pairs.parquet, reference.parquet, manifest.json)")
    loss: str = option("dpo", "per-pair loss", choices=LOSS_TYPES)
    weighting: str = option("confidence", "pair weights: none, confidence, confidence_raw (uncalibrated) or topk:F")
    resume: bool = option(True, "continue from DIR's last checkpoints; --no-resume starts over")
    keep_checkpoints: bool = option(False, "keep DIR/ray, Ray Train's checkpoints, once the run has finished "
                                           "(by default deleted after the final save: weights and AdamW moments, "
                                           "~3x the model, per run; a finished DIR run again then trains again)")
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


# ----------------------------------------------------------------------------- the recipe

def run(cfg: Config) -> int:
    from cwpo_ray import tracking
    from cwpo_ray.distributed import prepare_train_driver
    from cwpo_ray.models import ModelSource, resolve_model
    from cwpo_ray.ray_env import init_ray

    out = Path(cfg.out).resolve()
    # One run per DIR, held by this driver (the Ray Train workers do not lock): a second one is
    # refused, not mixed in (cwpo_ray/out_lock.py).
    with hold_out(out, "train-policy"):
        if not cfg.resume:
            for stale in ("ray", "sft", "policy", "reference.parquet", "reference", "mlflow_run_id", METRICS_FILE):
                _remove(out / stale)
            _remove(tracking.relay_mark(out / METRICS_FILE))
        _remove(out / SAVE_ERROR_FILE)
        start = resolve_model(cfg.model, cfg.gguf_file)
        n_pairs = write_train_pairs(cfg, out / "train_pairs.parquet")
        init_ray(meanwhile=functools.partial(prepare_train_driver, cfg.experiment))

        # A rerun into the same DIR continues the same MLflow run, as a restarted worker does.
        run_id_file = out / "mlflow_run_id"
        old_run_id = _existing_run(run_id_file, tracking.tracking_uri())
        with tracking.start_run(cfg.experiment, cfg.run_name or f"train-policy-{cfg.loss}-{cfg.weighting}",
                                run_id=old_run_id, parent_run_id=cfg.parent_run_id or None,
                                tags={"stage": "train-policy"}) as mlrun:
            run_id_file.write_text(mlrun.info.run_id)
            if old_run_id is None:
                tracking.log_config(cfg)

            # SFT on (prompt, chosen): the PO start and its reference. Then confidence-weighted PO, whose
            # workers first compute the reference log-probs once (DIR/reference.parquet), so PO never
            # holds a second model. Both phases run in one Ray Train run, on one worker group.
            jobs = []
            if cfg.sft_epochs > 0:
                jobs.append(make_job(cfg, "sft", start, out / "train_pairs.parquet", out / "sft", n_pairs))
                start = ModelSource(str(out / "sft"))
            jobs.append(make_job(cfg, "po", start, out / "train_pairs.parquet", out / "policy", n_pairs))
            result = train_phases(cfg, jobs, mlrun.info.run_id)
        if not cfg.keep_checkpoints and not cfg.storage_path:
            # The saved model supersedes them; kept (weights and AdamW moments, ~3x the model per run), a
            # pipeline's arms x seeds fill a disk.
            _remove(out / "ray")

        manifest = {"stage": "train-policy", "config": asdict(cfg), "pairs": n_pairs, "start": str(start),
                    "sft": str(out / "sft") if cfg.sft_epochs > 0 else None, "policy": str(out / "policy"),
                    "reference_table": str(out / "reference.parquet"), "mlflow_run_id": mlrun.info.run_id,
                    "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}}
        with atomic_path(out / "manifest.json") as tmp:  # never a manifest cut short by a full disk
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"train-policy: {n_pairs} pairs -> {out / 'policy'} (MLflow run {mlrun.info.run_id})")
    return 0


# ----------------------------------------------------------------------------- Ray Train

def make_job(cfg: Config, mode: str, source, table: Path, save_to: Path, n_pairs: int) -> Job:
    """One phase (SFT or PO): its step plan and learning rate; the model is saved to ``save_to``."""
    epochs, lr = (cfg.sft_epochs, cfg.sft_lr) if mode == "sft" else (cfg.epochs, cfg.lr)
    plan = StepPlan(n_pairs, cfg.batch_size, cfg.num_workers, epochs, cfg.seed, cfg.max_steps, cfg.grad_accumulation)
    warmup = cfg.warmup_steps if cfg.warmup_steps < plan.total_steps else plan.total_steps // 10
    print(f"train-policy {mode}: {n_pairs} pairs, {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), "
          f"global batch {plan.global_batch}, warm-up {warmup}, lr {lr}")
    if cfg.reference_cache:
        cfg = replace(cfg, reference_cache=str(Path(cfg.reference_cache).resolve()))  # workers may have another cwd
    return Job(cfg=cfg, mode=mode, model_path=source.path, gguf_file=source.gguf_file, table=str(table),
               save_to=str(save_to), lr=lr, warmup_steps=warmup, plan=plan,
               metrics_file=str(Path(cfg.out).resolve() / METRICS_FILE),
               reference_table=str(Path(cfg.out).resolve() / "reference.parquet"))


def train_phases(cfg: Config, jobs: list[Job], run_id: str):
    """One Ray Train run of ``train_loop`` through ``jobs`` in order (SFT, then PO).

    One run rather than one per phase: each Ray Train run starts its controller and worker actors, and
    each worker imports torch and transformers and loads the model again; in one run that is paid once
    (bench/RESULTS.md, fixed cost per stage).
    """
    from cwpo_ray import tracking
    from cwpo_ray.distributed import run_trainer

    out = Path(cfg.out).resolve()
    modes = "-".join(job.mode for job in jobs)
    # Ray Train keys a run's checkpoints by name under the storage path: one name per output folder,
    # so stages sharing a storage_path (the pipeline's arms on s3://) never resume each other's.
    name = modes if not cfg.storage_path else f"{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}-{modes}"
    with tracking.relay_metrics(jobs[0].metrics_file, run_id):
        result = run_trainer(train_loop, {"jobs": jobs}, cfg, name=name, default_storage=str(out / "ray"))
    error = out / SAVE_ERROR_FILE
    if error.exists():
        raise RuntimeError(f"train-policy: training finished, but saving the model failed (not retried: a retry "
                           f"would train again and fail the same way). The trained state is checkpointed under "
                           f"{cfg.storage_path or out / 'ray'}: rerun the same command once the cause is fixed and "
                           f"it saves without training again. The error:\n{error.read_text()}")
    return result


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

