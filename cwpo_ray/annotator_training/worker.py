"""What runs on every Ray Train worker of train-annotator: the rounds of ``rounds.plan_rounds``
one after the other, each from a fresh model, with held-out scoring, the best epoch kept, and a
checkpoint every epoch to resume from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from cwpo_ray.annotator_training.fold_models import save_fold_epoch
from cwpo_ray.annotator_training.rounds import Round, chosen_epochs, encode_pairs, plan_rounds


def heldout_margins(engine, chosen, rejected, pad_id: int, batch_size: int) -> list[float]:
    """r(chosen) - r(rejected) of every held-out pair; sequences sorted by length to cut padding.

    Every rank scores the whole held-out set in lockstep (forward passes are collective under ZeRO-3).
    """
    import torch

    from cwpo_ray.annotator import collate

    seqs = chosen + rejected
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    rewards = [0.0] * len(seqs)
    engine.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            out = engine(**collate([seqs[i] for i in idx], pad_id)).float().tolist()
            for i, r in zip(idx, out):
                rewards[i] = r
    engine.train()
    n = len(chosen)
    return [rewards[i] - rewards[n + i] for i in range(n)]


def train_loop(config: dict) -> None:
    """The Ray Train loop: the same code for DDP and DeepSpeed, resumable from any epoch's checkpoint.

    Runs the rounds of ``plan_rounds`` one after the other, each from a fresh model; the state
    (round, epoch, out-of-fold margins) rides in every checkpoint, so a restarted worker group
    continues the round it was in.
    """
    import ray
    from tqdm import tqdm

    from cwpo_ray import calibration
    from cwpo_ray import distributed as D

    cfg = config["cfg"]  # train-annotator's Config
    dist: D.DistributedConfig = config["dist"]
    rank, world = D.world()
    D.device_for(dist)
    rows = ray.get(config["rows_ref"])
    rounds = plan_rounds(rows, cfg, cfg.seed)
    annotator, engine = _fresh(cfg, dist, world, config)
    chosen, rejected = encode_pairs(annotator.tokenizer, annotator.meta, rows)
    resumed = D.resume(engine)
    state = resumed or {"round": 0, "epoch": -1, "step": 0, "best_loss": float("inf"), "best_epoch": None,
                        "history": [], "oof": {}}
    logger = D.RankZeroLogger(config["metrics_file"])
    if resumed:  # recorded, so a restart after a worker failure is visible in the run
        logger.log_metrics({"resumed_after_epoch": state["epoch"] + 1}, step=state["step"])
    total_epochs = sum(r.epochs for r in rounds) + (cfg.epochs if cfg.folds > 1 else 0)  # the refit at most
    bar = tqdm(total=total_epochs, initial=len(state["history"]), disable=rank != 0 or not cfg.progress, desc="train-annotator",
               unit="epoch", mininterval=2)
    r, fresh = state["round"], False
    if resumed and state["epoch"] + 1 >= _epochs(rounds[r], state, cfg):
        r, fresh = r + 1, True  # the checkpoint closed its round: the next one starts from a fresh model
    while r < len(rounds):
        spec = rounds[r]
        spec.epochs = _epochs(spec, state, cfg)
        if fresh:
            annotator, engine = _fresh(cfg, dist, world, config)
            state.update(round=r, epoch=-1, best_loss=float("inf"), best_epoch=None)
        for epoch in range(state["epoch"] + 1, spec.epochs):
            staging = Path(config["staging"])  # testing hook: the last worker dies once after fail_at_epoch epochs
            D.die_once_at(epoch, cfg.fail_at_epoch, staging.with_name(staging.name + ".failed-once"))
            train_loss = _train_epoch(engine, chosen, rejected, spec.train, cfg, world, rank,
                                      annotator.tokenizer.pad_token_id, state, logger, seed=cfg.seed + epoch)
            row = {"round": spec.name, "epoch": epoch + 1, "train_loss": train_loss}
            if spec.heldout:
                margins = heldout_margins(engine, [chosen[i] for i in spec.heldout],
                                          [rejected[i] for i in spec.heldout], annotator.tokenizer.pad_token_id,
                                          cfg.eval_batch_size)
                row.update({f"heldout_{k}": v for k, v in calibration.summarize(margins).items() if k != "n"})
                state["oof"].setdefault(spec.name, []).append(margins)
                if config.get("fold_models") and spec.is_fold:  # keep_fold_models: every epoch, E not known yet
                    save_fold_epoch(engine, annotator, spec.name, epoch + 1, [rows[i]["id"] for i in spec.heldout],
                                    margins, rank, config["fold_models"])
            state["history"].append(row)
            if spec.saves:
                _maybe_save(spec, epoch, row, state, engine, annotator, rank, config)
            prefix = "" if spec.name in ("heldout", "refit") else f"{spec.name}/"
            logger.log_metrics({prefix + k: v for k, v in row.items() if k not in ("round", "epoch")},
                               step=len(state["history"]))
            state["epoch"] = epoch
            bar.update(1)
            bar.set_postfix(round=spec.name, epoch=epoch + 1, loss=f"{train_loss:.3f}")
            D.report({k: v for k, v in row.items() if k != "round"}, engine, client_state=dict(state))
        r, fresh = r + 1, True
    bar.close()


def _epochs(spec: Round, state: dict, cfg) -> int:
    """A round's epoch count; the refit's is chosen from the folds' out-of-fold losses."""
    return (chosen_epochs(state["oof"], cfg.select_by == "calibrated_bt_loss") if spec.name == "refit"
            else spec.epochs)


def _fresh(cfg, dist, world: int, config: dict):
    """A new annotator (the same initial weights on every rank and in every round) and its engine."""
    import torch

    from cwpo_ray.annotator import new_annotator
    from cwpo_ray.engines import adamw, setup_engine
    from cwpo_ray.models import enable_gradient_checkpointing, resolve_model

    torch.manual_seed(cfg.seed)
    annotator = new_annotator(resolve_model(cfg.model, cfg.gguf_file), cfg.pooling or None, cfg.max_length)
    annotator.meta.data_fingerprint = config["fingerprint"]
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(annotator.model)
    optimizer = adamw(annotator.model.parameters(), cfg.lr, cfg.weight_decay)
    engine = setup_engine(annotator.model, optimizer, None, dist, micro_batch_size=cfg.batch_size // world,
                          max_grad_norm=cfg.max_grad_norm or None)
    return annotator, engine


def _train_epoch(engine, chosen, rejected, rows: list[int], cfg, world: int, rank: int, pad_id: int,
                 state: dict, logger, seed: int) -> float:
    from cwpo_ray.annotator import collate
    from cwpo_ray.distributed import mean_over_workers
    from cwpo_ray.losses import bt_loss
    from cwpo_ray.step_plan import StepPlan

    engine.train()
    loss_sum, loss_n = 0.0, 0
    plan = StepPlan(len(rows), cfg.batch_size // world, world, epochs=1, seed=seed)
    for step in range(plan.total_steps):
        [idx] = plan.rows(step, rank)
        idx = [rows[i] for i in idx]
        batch = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id)
        rewards = engine(**batch).float()  # the loss in fp32 under mixed precision
        loss = bt_loss(rewards[: len(idx)], rewards[len(idx):])
        engine.backward_and_step(loss)
        loss_sum, loss_n, state["step"] = loss_sum + loss.item(), loss_n + 1, state["step"] + 1
        if state["step"] % cfg.log_every == 0:
            logger.log_metrics({"train_loss_step": loss.item()}, step=state["step"])
    return mean_over_workers({"loss": loss_sum / max(loss_n, 1)})["loss"]


def _maybe_save(spec: Round, epoch: int, row: dict, state: dict, engine, annotator, rank: int, config: dict):
    """folds 1: the epoch with the lowest held-out BT loss so far; the refit: its last epoch."""
    if spec.heldout:
        is_best = row["heldout_bt_loss"] < state["best_loss"]  # identical on every rank: same weights, same data
    else:
        is_best = epoch + 1 == spec.epochs
    full = engine.full_state_dict() if is_best else None  # collective under ZeRO-3: every rank calls it
    if not is_best:
        return
    state["best_epoch"] = epoch + 1
    if spec.heldout:
        state["best_loss"] = row["heldout_bt_loss"]
    if rank == 0:
        save_best(annotator, full, Path(config["staging"]), epoch + 1, state)


def save_best(annotator, state_dict, staging: Path, epoch: int, state: dict) -> None:
    """Replace the staged annotator (only rank 0 calls this). Its held-out figures: the held-out split's
    at that epoch (folds 1) or every fold's held-out pairs pooled at the chosen epoch count."""
    from cwpo_ray import calibration
    from cwpo_ray.annotator import save_annotator

    oof = state["oof"]
    if "heldout" in oof:
        margins = oof["heldout"][epoch - 1]
    else:
        margins = [m for v in oof.values() for m in v[epoch - 1]]
    annotator.meta.metrics = {**calibration.summarize(margins), "epoch": epoch}
    tmp = staging.with_name(staging.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_annotator(annotator, tmp, state_dict=state_dict)
    (tmp / "eval.json").write_text(json.dumps({"best": annotator.meta.metrics, "history": state["history"],
                                               "heldout_margins": margins}, indent=1))
    shutil.rmtree(staging, ignore_errors=True)
    tmp.rename(staging)


