"""What runs on every Ray Train worker of train-policy: each phase (SFT, then PO) from loading the
start through the reference pass and the steps to the final save, with checkpoints and resume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cwpo_ray.policy.reference import ReferenceSpec, ensure_reference, reference_key
from cwpo_ray.policy.train_table import BatchReader
from cwpo_ray.step_plan import StepPlan

METRICS_FILE = "metrics.jsonl"  # rank 0's per-step metrics (one JSON object a line), relayed to MLflow
SAVE_ERROR_FILE = "save_error.txt"  # why the final save failed, from rank 0 to the driver


@dataclass
@dataclass
class Job:
    """What one phase (SFT or PO) of ``train_loop`` needs besides the stage's config."""

    cfg: "object"             # train-policy's Config
    mode: str                 # "sft" or "po"
    model_path: str
    gguf_file: Optional[str]
    table: str                # train_pairs.parquet
    save_to: str
    lr: float
    warmup_steps: int
    plan: StepPlan
    metrics_file: str         # rank 0's metrics, relayed to MLflow by the driver
    reference_table: str

    @property
    def lengths(self):
        from cwpo_ray.logprobs import Lengths

        return Lengths(self.cfg.max_prompt_length, self.cfg.max_length, self.cfg.chat_template)

    def reference(self, precision: str = "fp32") -> ReferenceSpec:
        """Where the reference log-probs go; keyed by the start model as it is on disk when PO begins
        (after SFT, in the same Ray Train run, DIR/sft exists only then) and the precision they are
        computed in (the worker's, resolved)."""
        from cwpo_ray.models import ModelSource

        key = reference_key(ModelSource(self.model_path, self.gguf_file), self.cfg, precision)
        return ReferenceSpec(self.reference_table, self.lengths, self.cfg.ref_batch_size, self.cfg.reference_cache,
                             key, self.cfg.resolved_packing())


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: each phase of ``jobs`` in order (SFT, then PO), with checkpoints
    and resume. A restarted worker group skips a phase whose model is saved (the folder appears only
    once complete: ``save_final_model``), and a phase resumes only from its own checkpoints."""
    from cwpo_ray.distributed import barrier

    jobs: list[Job] = loop_config["jobs"]
    for i, job in enumerate(jobs):
        last = i == len(jobs) - 1
        if not last and Path(job.save_to).exists():
            continue
        if not train_phase(job, loop_config["dist"]):
            return  # the save failed: the driver reports it
        if not last:
            barrier()  # rank 0 has saved the model the next phase starts from


def train_phase(job: Job, dist) -> bool:
    """One phase on this worker: load the start, (PO) reference pass, steps with checkpoints, final
    save. False when the final save failed (every worker returns it)."""
    import gc

    import torch
    from transformers import get_cosine_schedule_with_warmup

    from cwpo_ray.distributed import RankZeroLogger, device_for, die_once_at, mean_over_workers, report, resume, world
    from cwpo_ray.engines import adamw, parameters_held, partitioned_init, setup_engine
    from cwpo_ray.models import (ModelSource, enable_gradient_checkpointing, load_causal_lm, load_tokenizer,
                                own_trainable_weights)

    cfg, plan = job.cfg, job.plan
    rank, world_size = world()
    device = device_for(dist)
    source = ModelSource(job.model_path, job.gguf_file)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(source)
    with partitioned_init(dist, plan.batch_size, plan.accumulation):  # ZeRO-3: each worker loads its shard
        model = load_causal_lm(source, attn_implementation=cfg.attn_implementation)
    held, total = parameters_held(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = with_lora(model, cfg)
    if held == total:  # ZeRO-3's partitions are already where DeepSpeed put them
        model = model.to(device)
        if device.type == "cpu":
            model = own_trainable_weights(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, job.lr, cfg.weight_decay)
    engine = setup_engine(model, optimizer, lambda opt: get_cosine_schedule_with_warmup(
        opt, job.warmup_steps, plan.total_steps), dist, micro_batch_size=plan.batch_size,
        accumulation_steps=plan.accumulation)
    start = (resume(engine, job.mode) or {}).get("step", 0)
    logger = RankZeroLogger(job.metrics_file)
    if start == 0:
        logger.log_metrics({f"{job.mode}/parameters": total, f"{job.mode}/parameters_on_rank0": held}, step=0)
    else:  # a restarted worker group (a lost worker or node, a rerun): where it picked up, for the run's record
        logger.log_metrics({f"{job.mode}/resumed_at_step": start}, step=start)
    if job.mode == "po":
        t0 = time.perf_counter()
        figures = ensure_reference(engine, tokenizer, job.table, job.reference(engine.precision), rank, world_size)
        if start == 0:  # the pass's cost and the cache's size and reading (None: the table was there)
            logger.log_metrics({"reference/seconds": time.perf_counter() - t0,
                                **{f"reference/{k}": v for k, v in (figures or {}).items() if k != "seconds"}}, step=0)
    batches = BatchReader(job.table, job.reference_table if job.mode == "po" else None)
    prefix = "sft/" if job.mode == "sft" else ""

    engine.train()
    bar = _progress_bar(job, rank, start)
    loop_start = time.perf_counter()
    for step in range(start, plan.total_steps):
        if job.mode == "po":  # testing hook: the last worker dies once at this step
            die_once_at(step, job.cfg.fail_at_step, Path(job.save_to).parent / f".failed-at-{step}")
        t0 = time.perf_counter()
        metrics = {}
        for micro in plan.rows(step, rank):
            loss, micro_metrics = step_loss(engine, tokenizer, batches.take(micro), job)
            engine.backward_and_step(loss)  # steps the optimizer after the last micro-batch
            for k, v in micro_metrics.items():  # token counts summed, the rest averaged
                metrics[k] = metrics.get(k, 0.0) + (v if k == "tokens" else v / plan.accumulation)
        metrics = mean_over_workers(metrics, device, summed=("tokens",))
        seconds = time.perf_counter() - t0
        metrics.update({"pairs_per_s": plan.global_batch / seconds, "tokens_per_s": metrics.pop("tokens") / seconds,
                        "learning_rate": engine.scheduler.get_last_lr()[0], "epoch": (step + 1) / plan.steps_per_epoch})
        logger.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            report({**metrics, "step": step + 1}, engine, {"step": step + 1}, phase=job.mode)
        elif step + 1 == plan.total_steps:
            # No checkpoint at the end: the final model is saved next, and a model + AdamW state
            # written only to be deleted would cost every run a checkpoint's time.
            report({**metrics, "step": step + 1})
    if bar is not None:
        bar.close()
    # Whole-loop time (logging and checkpoints included), what a trainer's "runtime" reports.
    logger.log_metrics({prefix + "loop_seconds": time.perf_counter() - loop_start}, step=plan.total_steps)
    saved = _save_or_keep_state(engine, tokenizer, source, job, rank, device)
    del engine, model, optimizer, params
    gc.collect()  # the next phase loads its own model: this one's memory goes first
    return saved


def _save_or_keep_state(engine, tokenizer, source, job: Job, rank: int, device) -> bool:
    """``save_final_model``; if it fails on any worker, the trained state goes into a checkpoint instead
    (so a rerun saves without training again) and rank 0 leaves the error for the driver. An error
    here is not raised: Ray Train would restart the workers, train the whole phase again and fail the
    same way (a save fails for a reason a retry does not fix: the model, the disk, the code)."""
    import traceback

    from cwpo_ray.distributed import max_over_workers, report

    error = ""
    try:
        save_final_model(engine, tokenizer, source, job, rank)
    except Exception:  # noqa: BLE001 - handed to the driver, which raises it
        error = traceback.format_exc()
    if not max_over_workers([1.0 if error else 0.0], device)[0]:
        return True
    steps = job.plan.total_steps
    report({"step": steps, "save_failed": 1.0}, engine, {"step": steps}, phase=job.mode)
    if rank == 0 or error:
        Path(job.save_to).parent.joinpath(SAVE_ERROR_FILE).write_text(error or "failed on another worker\n")
    return False


def step_loss(engine, tokenizer, batch: dict, job: Job):
    """The loss of one worker's micro-batch (its columns, ``BatchReader.take``) and its metrics
    (token count as 'tokens', summed later)."""
    from cwpo_ray import logprobs

    lengths = job.lengths
    if job.mode == "sft":
        tokens = logprobs.sft_batch(tokenizer, batch["prompt"], batch["chosen"], lengths)
        loss, count = logprobs.sft_loss(engine, tokens)
        return loss, {"loss": float(loss.detach()), "tokens": float(count)}
    tokens = logprobs.pair_batch(tokenizer, batch["prompt"], batch["chosen"], batch["rejected"], lengths,
                                 packing=job.cfg.resolved_packing())
    return logprobs.po_loss(engine, tokens, batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["weight"],
                            loss_type=job.cfg.loss, beta=job.cfg.beta, epsilon=job.cfg.epsilon)


def save_final_model(engine, tokenizer, source, job: Job, rank: int) -> None:
    """save_pretrained (+ tokenizer) from rank 0, LoRA merged, fp32, published atomically.

    Rank 0 holds the whole trained model (DDP, ZeRO 0-2): it is saved as it is, LoRA merged into
    it in place (training is over), without loading the start model again. Under ZeRO-3 the
    module's weights are shards, so the gathered weights go into a fresh copy of the start model.
    """
    from cwpo_ray.tables import atomic_path

    if getattr(engine, "zero_stage", None) == 3:
        state = engine.full_state_dict()  # collective: every rank calls it
        if rank != 0:
            return
        model = _fresh_copy_with(state, source, job.cfg)
    else:
        if rank != 0:
            return
        model = engine.module.float()  # bf16 under DeepSpeed's mixed precision; saved in fp32, as the start model
    if job.cfg.lora:
        model = model.merge_and_unload()
    with atomic_path(job.save_to) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _fresh_copy_with(state: dict, source, cfg):
    """The start model (LoRA-wrapped as in training) with ``state``'s weights."""
    from cwpo_ray.models import load_causal_lm

    model = with_lora(load_causal_lm(source), cfg)
    missing, unexpected = model.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) | {"lm_head.weight"}
    if unexpected or any(not any(k.endswith(t) for t in tied) for k in missing):
        raise RuntimeError(f"final weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def with_lora(model, cfg):
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
