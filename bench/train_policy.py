"""Seconds per DPO epoch: `cwpo train-policy` (Ray Train, precomputed reference) vs TRL's DPOTrainer.

Same policy, same pairs, same batch size, same sequences (short enough that neither side
truncates), same optimizer settings (AdamW with the fused kernel on both sides: TRL's default
optim on torch >= 2.8, printed below; lr, cosine schedule, weight decay 0.05, beta 0.5,
grad clipping 1.0), plain DPO with uniform weights so the losses are comparable. Both run
in this one process's machine on the CPU, one after the other.

    python bench/train_policy.py [--models tiny,smollm2-135m] [--pairs 64] [--smollm-pairs 16]
        [--variants default,packing=separate,gradient_checkpointing=true]

TRL is only needed here: install it beside the project without touching torch/transformers,
e.g. `pip install --no-deps --target /work/bench-trl trl` and run with
PYTHONPATH=/work/bench-trl. Prints a Markdown table (and JSON with --json FILE).

Timings: "ours epoch" is the PO loop's logged wall time (steps, metric all-reduce, MLflow logging,
checkpoints) plus the logged time of the one reference pass (at our default `--ref-batch-size`,
as a user runs it; TRL's precompute pass at the train batch size, 8, its default); "ours wall" is
the whole `run(cfg)`, Ray start-up and model loading included. "TRL epoch" is
`trainer.train()`'s train_runtime (it computes the reference forward inside each step);
"TRL wall" adds trainer construction (tokenization, model copy for the reference).
Repeat r starts with side r (mod the number of sides), so no side always runs first. Each of our
``--variants`` is one more side (train-policy settings over the default: packing, mixed precision,
gradient checkpointing), with its own ratio to TRL's run of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TOPICS = ["cats", "rivers", "bread", "music", "trains", "gardens", "the moon", "chess", "rain", "books"]
GOOD = ["clear", "kind", "useful", "honest", "warm", "careful", "bright", "calm", "friendly", "helpful"]
BAD = ["rude", "vague", "wrong", "boring", "cold", "sloppy", "dull", "harsh", "useless", "confusing"]


def make_pairs(n: int, words: int, seed: int = 0) -> list[dict]:
    """Pairs whose responses start with a space (TRL joins prompt + response without one)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        good = " ".join(rng.choice(GOOD) for _ in range(words))
        bad = " ".join(rng.choice(BAD) for _ in range(words))
        rows.append({"id": f"b{i}", "prompt": f"Question: what do you think about {topic}? Answer:",
                     "chosen": f" I find {topic} {good}.", "rejected": f" I find {topic} {bad}."})
    return rows


def model_folder(name: str, work: Path):
    """(model spec for our recipe, ModelSource for TRL)."""
    from cwpo_ray.models import resolve_model

    if name == "tiny":
        from tiny_models import build_tiny_decoder

        folder = build_tiny_decoder(work / "tiny")
        return str(folder), resolve_model(str(folder))
    # Dequantize once and save a plain fp32 folder: both trainers then load the very same weights,
    # and TRL refuses a model that still carries GGUF's quantizer ("purely quantized models").
    from cwpo_ray.models import load_causal_lm, load_tokenizer

    folder = work / name
    source = resolve_model(name)
    load_causal_lm(source).save_pretrained(folder)
    load_tokenizer(source).save_pretrained(folder)
    return str(folder), resolve_model(str(folder))


OURS = "cwpo train-policy"


def variant_settings(variant: str) -> dict:
    """``default`` or ``key=value+key=value`` (train-policy settings) -> the overrides."""
    if variant == "default":
        return {}
    return dict(kv.split("=", 1) for kv in variant.split("+"))


def run_ours(spec: str, pairs_path: Path, out: Path, args, batch: int, n_pairs: int, variant: str = "default") -> dict:
    from mlflow.tracking import MlflowClient

    from cwpo_ray.config import load_config
    from cwpo_ray.recipes import train_policy
    from cwpo_ray.tracking import tracking_uri

    cfg = load_config(train_policy.Config, flags=dict(
        data=str(pairs_path), model=spec, out=str(out), loss="dpo", weighting="none", sft_epochs=0, epochs=1,
        lr=args.lr, warmup_steps=0, batch_size=batch, max_length=args.max_length,
        max_prompt_length=args.max_length // 2, num_workers=1, strategy="ddp", cpus_per_worker=float(os.cpu_count()),
        checkpoint_every=10**6, max_failures=0, progress=False, experiment="bench-train-policy",
        chat_template=False),  # TRL gets plain-text prompts too
        overrides=[f"{k}={v}" for k, v in variant_settings(variant).items()])
    t0 = time.perf_counter()
    train_policy.run(cfg)
    wall = time.perf_counter() - t0
    if args.fresh_ray:  # the next repeat starts Ray again, as a new `cwpo train-policy` command does
        import ray

        ray.shutdown()
    run_id = (out / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri())
    losses = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    loop_s = client.get_metric_history(run_id, "loop_seconds")[-1].value
    ref_s = client.get_metric_history(run_id, "reference/seconds")[0].value
    return {"epoch_s": loop_s + ref_s, "loop_s": loop_s, "ref_s": ref_s, "wall_s": wall,
            "mean_loss": sum(m.value for m in losses) / len(losses), "final_loss": losses[-1].value,
            "steps": len(losses), "pairs": n_pairs, "losses": [m.value for m in losses]}


def in_our_order(rows: list[dict]) -> list[dict]:
    """``rows`` arranged so that TRL's shuffled epoch visits them in our first epoch's order, so the
    two trainers see the same pairs at every step and their losses compare step by step. TRL's
    sampler visits row ``trl[k]`` at position k (transformers' RandomSampler with the Trainer's seed
    0: torch.randperm with a generator seeded 0); ours visits row ``ours[k]`` (step_plan's seeded
    permutation); so row ``trl[k]`` of TRL's table is our row ``ours[k]``."""
    import numpy as np
    import torch

    from cwpo_ray.rowstore import permuted

    n = len(rows)
    trl = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    ours = permuted(np.arange(n), n, 0).tolist()  # StepPlan's epoch 0 with seed 0
    arranged = [None] * n
    for k in range(n):
        arranged[trl[k]] = rows[ours[k]]
    return arranged


def run_trl(source, rows: list[dict], out: Path, args, batch: int, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig

    _TimedDPOTrainer = _timed_trainer_class()

    from cwpo_ray.models import load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_causal_lm(source), load_tokenizer(source)
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
                       learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.05,
                       beta=0.5, loss_type=["sigmoid"], max_length=args.max_length, max_grad_norm=1.0,
                       precompute_ref_log_probs=precompute, precompute_ref_batch_size=batch,
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=args.trl_bf16,
                       dataloader_drop_last=True, disable_tqdm=True, seed=0)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in in_our_order(rows)])
    trainer = _TimedDPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    print(f"TRL optim: {config.optim}", flush=True)
    t1 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"epoch_s": result.metrics["train_runtime"], "wall_s": wall, "setup_s": t1 - t0,
            "ref_s": trainer.precompute_seconds, "mean_loss": result.training_loss,
            "final_loss": losses[-1] if losses else float("nan"), "steps": trainer.state.global_step,
            "pairs": len(rows), "losses": losses}


def _timed_trainer_class():
    """DPOTrainer that times its reference pass (with precompute_ref_log_probs, run in its constructor)."""
    from trl import DPOTrainer

    class Timed(DPOTrainer):
        precompute_seconds = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                self.precompute_seconds += time.perf_counter() - t0

    return Timed


def bench_model(name: str, n_pairs: int, words: int, args, work: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_pairs(n_pairs, words)
    pairs_path = work / f"{name}-pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pairs_path)
    spec, source = model_folder(name, work)
    results = []
    variants = args.variants.split(",")
    for rep in range(args.repeats):
        sides = [] if args.no_trl else [("TRL DPOTrainer", lambda: run_trl(
            source, rows, work / f"trl-{name}-{rep}", args, args.batch_size, precompute=False))]
        if args.trl_precompute and not args.no_trl:
            sides.append(("TRL, precompute_ref_log_probs", lambda: run_trl(
                source, rows, work / f"trlpre-{name}-{rep}", args, args.batch_size, precompute=True)))
        for k, variant in enumerate(variants):
            who = OURS if variant == "default" else f"{OURS} [{variant}]"
            sides.append((who, lambda k=k, variant=variant: run_ours(
                spec, pairs_path, work / f"ours-{name}-{rep}-{k}", args, args.batch_size, n_pairs, variant)))
        # Each repeat starts with another side: what runs first in a fresh process finds the
        # machine's memory in another state than what runs after (bench/RESULTS.md, run 6).
        turn = rep % len(sides)
        for who, side in sides[turn:] + sides[:turn]:
            results.append({"model": name, "who": who, "repeat": rep, **side()})
    return results


def max_relative_difference(a: list[float], b: list[float]) -> float:
    """Largest |a - b| / |b| over the steps (nan when the step counts differ)."""
    if len(a) != len(b) or not a:
        return float("nan")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def ratios(results: list[dict]) -> str:
    """Per repeat and model: our epoch over TRL's default epoch, over TRL precompute's epoch plus its
    reference pass, and the largest per-step relative loss difference to each; then the medians."""
    from statistics import median

    lines = ["| model | ours | repeat | ours s | TRL s | ours / TRL | TRL precompute + ref s | "
             "ours / (TRL pre + ref) | max rel. loss diff vs TRL | vs TRL pre |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_model: dict[str, list] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        for variant in sorted({r["who"] for r in rs if r["who"].startswith(OURS)}):
            label = variant[len(OURS):].strip(" []") or "default"
            rows = []
            for rep in sorted({r["repeat"] for r in rs}):
                who = {r["who"]: r for r in rs if r["repeat"] == rep}
                ours, trl, pre = (who.get(k) for k in (variant, "TRL DPOTrainer", "TRL, precompute_ref_log_probs"))
                if not ours or not trl:
                    continue
                pre_s = pre["epoch_s"] + pre["ref_s"] if pre else float("nan")
                rows.append((ours["epoch_s"], trl["epoch_s"], ours["epoch_s"] / trl["epoch_s"], pre_s,
                             ours["epoch_s"] / pre_s,
                             max_relative_difference(ours["losses"], trl["losses"]),
                             max_relative_difference(ours["losses"], pre["losses"]) if pre else float("nan")))
                lines.append(f"| {model} | {label} | {rep + 1} | " + " | ".join(f"{v:.2f}" for v in rows[-1][:5])
                             + f" | {rows[-1][5]:.1e} | {rows[-1][6]:.1e} |")
            if len(rows) > 1:
                lines.append(f"| {model} | {label} | median | "
                             + " | ".join(f"{median(c):.2f}" for c in list(zip(*rows))[:5])
                             + f" | {max(r[5] for r in rows):.1e} (max) | {max(r[6] for r in rows):.1e} (max) |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| model | trainer | repeat | pairs | steps | s/epoch | reference pass s | wall s | mean loss | "
             "final loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:  # ours: s/epoch includes the reference pass; TRL precompute: it does not
        ref = f"{r['ref_s']:.2f}" if r.get("ref_s") else "-"
        lines.append(f"| {r['model']} | {r['who']} | {r.get('repeat', 0) + 1} | {r['pairs']} | {r['steps']} | "
                     f"{r['epoch_s']:.2f} | {ref} | {r['wall_s']:.1f} | {r['mean_loss']:.4f} | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2-135m")
    p.add_argument("--pairs", type=int, default=64, help="pairs for the tiny model")
    p.add_argument("--smollm-pairs", type=int, default=16, help="pairs for SmolLM2-135M")
    p.add_argument("--words", type=int, default=12, help="adjectives per response (sets the sequence length)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--trl-precompute", action="store_true", help="also time TRL with precompute_ref_log_probs")
    p.add_argument("--no-trl", action="store_true", help="time only our trainer")
    p.add_argument("--trl-bf16", action="store_true", help="TRL with bf16=True (autocast), to set beside our "
                                                            "mixed_precision=bf16 variant")
    p.add_argument("--variants", default="default",
                   help="our runs, comma-separated: default, or train-policy settings joined by + (e.g. "
                        "default,packing=separate,gradient_checkpointing=true+packing=separate)")
    p.add_argument("--fresh-ray", action="store_true", help="stop Ray after each of our runs (each pays ray.init)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        results = []
        for name in args.models.split(","):
            n = args.pairs if name == "tiny" else args.smollm_pairs
            results += bench_model(name, n, args.words, args, work)
            print(table(results), flush=True)
    print("\n" + table(results))
    print("\nRatios (epoch seconds; TRL precompute counted with its reference pass):\n" + ratios(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
