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
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cwpo_ray.config import ConfigError, option
from cwpo_ray.distributed import DistributedConfig, die_once

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
    heldout_fraction: float = option(0.1, "fraction of pairs held out for evaluation (hash of id)")
    log_every: int = option(10, "log the training loss every N steps")

    def validate(self) -> None:
        super().validate()
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be at least 1")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of num_workers {self.num_workers}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
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
    fail_at_epoch: Optional[int] = option(None, "testing: kill one worker once, after this many epochs",
                                          flag=False)

    def validate(self) -> None:
        super().validate()
        if not self.out.strip():
            raise ValueError("out: an output folder is required")


# ----------------------------------------------------------------------------- data

def is_heldout(pair_id: str, seed: int, fraction: float) -> bool:
    """A seeded hash of the id (the one `cwpo data` splits by): the same split everywhere, no shuffle."""
    from cwpo_ray.sources import _unit

    return _unit(f"{seed}:heldout:{pair_id}") < fraction


def load_pairs(path: str) -> list[dict]:
    """The labeled pairs, with rows that cannot be trained on (missing / empty / identical) refused loudly."""
    from cwpo_ray.tables import LABELED_COLUMNS, iter_rows, require_columns

    require_columns(path, LABELED_COLUMNS)
    rows, bad = [], 0
    for row in iter_rows(path, columns=None):
        ok = all(isinstance(row.get(c), str) and row[c].strip() for c in LABELED_COLUMNS)
        if ok and row["chosen"] != row["rejected"]:
            rows.append({c: row[c] for c in LABELED_COLUMNS})
        else:
            bad += 1
    if bad:
        print(f"train-annotator: skipped {bad} unusable rows of {path} (run `cwpo data` to quarantine them)")
    return rows


def split_pairs(rows: list[dict], seed: int, fraction: float) -> tuple[list[dict], list[dict]]:
    train = [r for r in rows if not is_heldout(r["id"], seed, fraction)]
    heldout = [r for r in rows if is_heldout(r["id"], seed, fraction)]
    if not train or not heldout:
        raise ConfigError(f"heldout_fraction {fraction} leaves {len(train)} training and {len(heldout)} "
                          f"held-out pairs of {len(rows)}; both must be non-empty")
    return train, heldout


def fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha1()
    for r in sorted(r["id"] for r in rows):
        h.update(r.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def epoch_batches(n: int, batch_size: int, world: int, rank: int, seed: int) -> list[list[int]]:
    """This rank's slice of every global batch of one epoch.

    Every rank gets the same number of steps (DDP and ZeRO hang otherwise): the last
    global batch is filled up by wrapping around to the start of the permutation.
    """
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    steps = -(-n // batch_size)
    micro = batch_size // world
    out = []
    for s in range(steps):
        idx = [perm[(s * batch_size + rank * micro + j) % n] for j in range(micro)]
        out.append(idx)
    return out


def encode_pairs(tokenizer, meta, rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    from cwpo_ray.annotator import encode

    prompts = [r["prompt"] for r in rows]
    chosen, _ = encode(tokenizer, prompts, [r["chosen"] for r in rows], meta.max_length, meta.separator)
    rejected, _ = encode(tokenizer, prompts, [r["rejected"] for r in rows], meta.max_length, meta.separator)
    return chosen, rejected


# ----------------------------------------------------------------------------- inside a Ray Train worker

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


def mean_over_workers(total: float, count: int) -> float:
    from cwpo_ray.distributed import sum_over_workers

    total, count = sum_over_workers([total, float(count)])
    return total / max(count, 1.0)


def train_loop(config: dict) -> None:
    """The Ray Train loop: the same code for DDP and DeepSpeed, resumable from any epoch's checkpoint."""
    import ray
    import torch
    from tqdm import tqdm

    from cwpo_ray import distributed as D
    from cwpo_ray import calibration
    from cwpo_ray.annotator import collate, new_annotator
    from cwpo_ray.losses import bt_loss
    from cwpo_ray.models import resolve_model

    cfg: Config = config["cfg"]
    dist: D.DistributedConfig = config["dist"]
    rank, world = D.world()
    D.device_for(dist)
    torch.manual_seed(cfg.seed)  # the same head init on every rank
    annotator = new_annotator(resolve_model(cfg.model, cfg.gguf_file), cfg.pooling or None, cfg.max_length)
    annotator.meta.data_fingerprint = config["fingerprint"]
    train_rows, heldout_rows = ray.get(config["train_ref"]), ray.get(config["heldout_ref"])
    train_c, train_r = encode_pairs(annotator.tokenizer, annotator.meta, train_rows)
    held_c, held_r = encode_pairs(annotator.tokenizer, annotator.meta, heldout_rows)
    pad_id = annotator.tokenizer.pad_token_id

    optimizer = D.adamw(annotator.model.parameters(), cfg.lr, cfg.weight_decay)
    engine = D.setup_engine(annotator.model, optimizer, None, dist, micro_batch_size=cfg.batch_size // world,
                            max_grad_norm=cfg.max_grad_norm or None)
    resumed = D.resume(engine)
    state = resumed or {"epoch": -1, "step": 0, "best_loss": float("inf"), "best_epoch": None, "history": []}
    logger = D.RankZeroLogger(config["tracking_uri"], config["run_id"])
    if resumed:  # recorded, so a restart after a worker failure is visible in the run
        logger.log_metrics({"resumed_after_epoch": state["epoch"] + 1}, step=state["step"])
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=steps_per_epoch * (state["epoch"] + 1),
               disable=rank != 0 or not cfg.progress, desc="train-annotator", mininterval=2)

    for epoch in range(state["epoch"] + 1, cfg.epochs):
        maybe_fail(cfg, epoch, Path(config["staging"]), rank, world)
        engine.train()
        loss_sum, loss_n = 0.0, 0
        for idx in epoch_batches(len(train_rows), cfg.batch_size, world, rank, cfg.seed + epoch):
            batch = collate([train_c[i] for i in idx] + [train_r[i] for i in idx], pad_id)
            rewards = engine(**batch)
            loss = bt_loss(rewards[: len(idx)], rewards[len(idx):])
            engine.backward_and_step(loss)
            loss_sum, loss_n, state["step"] = loss_sum + loss.item(), loss_n + 1, state["step"] + 1
            if state["step"] % cfg.log_every == 0:
                logger.log_metrics({"train_loss_step": loss.item()}, step=state["step"])
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")

        margins = heldout_margins(engine, held_c, held_r, pad_id, cfg.eval_batch_size)
        summary = calibration.summarize(margins)
        row = {"epoch": epoch + 1, "train_loss": mean_over_workers(loss_sum, loss_n),
               **{f"heldout_{k}": v for k, v in summary.items() if k != "n"}}
        state["history"].append(row)
        is_best = summary["bt_loss"] < state["best_loss"]  # identical on every rank: same weights, same data
        full = engine.full_state_dict() if is_best else None  # collective under ZeRO-3: every rank calls it
        if is_best:
            state["best_loss"], state["best_epoch"] = summary["bt_loss"], epoch + 1
            if rank == 0:
                annotator.meta.metrics = {**summary, "epoch": epoch + 1}
                save_best(annotator, full, Path(config["staging"]), margins, state["history"])
        logger.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        state["epoch"] = epoch
        D.report({**row, "best_epoch": state["best_epoch"]}, engine, client_state=dict(state))
    bar.close()


def save_best(annotator, state_dict, staging: Path, margins: list[float], history: list[dict]) -> None:
    """Replace the staged best annotator (only rank 0 calls this)."""
    from cwpo_ray.annotator import save_annotator

    tmp = staging.with_name(staging.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_annotator(annotator, tmp, state_dict=state_dict)
    (tmp / "eval.json").write_text(json.dumps({"best": annotator.meta.metrics, "history": history,
                                               "heldout_margins": margins}, indent=1))
    shutil.rmtree(staging, ignore_errors=True)
    tmp.rename(staging)


def maybe_fail(cfg: Config, epoch: int, staging: Path, rank: int, world: int) -> None:
    """Test hook: the last worker dies once, when ``fail_at_epoch`` epochs are done, so the run must resume."""
    if cfg.fail_at_epoch == epoch and rank == world - 1:
        die_once(staging.with_name(staging.name + ".failed-once"))


# ----------------------------------------------------------------------------- the recipe

def add_plots(folder: Path) -> dict:
    """Reliability diagram and confidence histogram of the best epoch's held-out pairs, into the folder."""
    from cwpo_ray import plots

    report = json.loads((folder / "eval.json").read_text())
    plots.reliability_diagram(report["heldout_margins"], folder / "reliability.png")
    plots.confidence_histogram(report["heldout_margins"], folder / "confidence_hist.png")
    return report


def log_results(out: Path, report: dict) -> None:
    """Best-epoch metrics, the plots and the whole annotator folder to the active MLflow run."""
    import mlflow

    best = report["best"]
    mlflow.log_metrics({f"best_heldout_{k}": float(v) for k, v in best.items() if k not in ("n", "epoch")})
    mlflow.log_metric("best_epoch", best["epoch"])
    mlflow.log_artifact(str(out / "reliability.png"))
    mlflow.log_artifact(str(out / "confidence_hist.png"))
    mlflow.log_artifacts(str(out), "annotator")


def run(cfg: Config) -> int:
    import ray

    from cwpo_ray import tracking
    from cwpo_ray.distributed import run_trainer
    from cwpo_ray.ray_env import init_ray
    from cwpo_ray.tables import atomic_path

    rows = load_pairs(cfg.data)
    train, heldout = split_pairs(rows, cfg.seed, cfg.heldout_fraction)
    print(f"train-annotator: {len(train)} training pairs, {len(heldout)} held out; "
          f"{cfg.num_workers} {cfg.strategy} workers")
    out = Path(cfg.out).resolve()
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    init_ray()
    with tracking.start_run(cfg.experiment, cfg.run_name, parent_run_id=cfg.parent_run_id or None,
                            tags={"stage": "train-annotator"}) as run_:
        tracking.log_config(cfg)
        loop_config = {
            "cfg": cfg, "fingerprint": fingerprint(rows), "staging": str(staging),
            "train_ref": ray.put(train), "heldout_ref": ray.put(heldout),
            "tracking_uri": tracking.tracking_uri(), "run_id": run_.info.run_id,
        }
        try:
            run_trainer(train_loop, loop_config, cfg, name=f"train-annotator-{uuid.uuid4().hex[:8]}",
                        default_storage=str(out.parent / "ray"))
            report = add_plots(staging)
            with atomic_path(out) as tmp:
                staging.rename(tmp)
        finally:
            for leftover in (staging, staging.with_name(staging.name + ".tmp"),
                             staging.with_name(staging.name + ".failed-once")):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        log_results(out, report)
    best = report["best"]
    print(f"best epoch {best['epoch']}: held-out BT loss {best['bt_loss']:.4f}, accuracy {best['accuracy']:.3f}, "
          f"ECE {best['ece']:.3f}, mean confidence {best['mean_confidence']:.3f}")
    print(f"wrote {out}")
    return 0
