"""Gold reward accuracy (GRA) of an aligned policy against its SFT start.

For every test prompt, one response is sampled from the policy and one from the reference
(its SFT start) with the same seed, so two identical models produce identical responses and
score exactly 0.5. The gold judge scores both; GRA is the fraction of prompts where the
policy's response scores higher (ties count half), with a 95% percentile-bootstrap interval.
Also reported: the mean gold reward of each model and, on the test pairs (chosen / rejected),
the implicit-reward accuracy: how often the policy's log-prob margin over the reference
prefers the chosen response (pairs the gold judge ties are skipped when gold columns exist).

Writes OUT/eval.json and OUT/responses.parquet; logs eval/* metrics to the active MLflow
run, or to --run-id when given.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from cwpo_ray.config import option, to_dict

EPILOG = """examples:
  cwpo evaluate --policy runs/cw-dpo/policy --reference runs/cw-dpo/sft --prompts runs/data/bench/test.parquet --out runs/cw-dpo/eval
  cwpo evaluate --policy P --reference smollm2-135m --prompts test.parquet --judge my_rms:score --out E
"""


@dataclass
class Settings:
    """How a policy is evaluated: everything but the models, the prompts, the output and run bookkeeping.
    The pipeline's ``evaluate`` section is this class."""

    judge: str = option("vader", "gold judge: vader, module:function, an annotator folder or a reward-model "
                                 "folder / hub id")
    temperature: float = option(0.95, "sampling temperature (paper: 0.95)")
    max_new_tokens: int = option(64, "new tokens per response")
    max_prompts: Optional[int] = option(None, "evaluate only the first N test prompts")
    batch_size: int = option(16, "prompts per generation batch")
    engine: str = option("auto", "generation: auto (vLLM on a GPU, else transformers), vllm, transformers, ray",
                         choices=("auto", "vllm", "transformers", "ray"))
    pair_accuracy: bool = option(True, "also compute implicit-reward accuracy on the test pairs")
    max_length: int = option(256, "pair accuracy: max tokens of prompt + response (the pipeline uses the policy's)")
    max_prompt_length: int = option(128, "pair accuracy: max prompt tokens (the pipeline uses the policy's)")
    chat_template: bool = option(True, "pair accuracy: prompts in the model's chat format (as train-policy; the "
                                       "pipeline uses the policy's)")
    n_boot: int = option(2000, "bootstrap resamples of the GRA interval")
    num_cpus: float = option(1.0, "pipeline: CPUs of the Ray task that evaluates (also its torch threads)")
    num_gpus: float = option(0.0, "pipeline: GPUs of the Ray task that evaluates (1 on a GPU cluster)")

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be at least 1, got {self.max_prompts}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")


@dataclass(kw_only=True)
class Config(Settings):
    policy: str = option(help="aligned policy folder (or model alias / hub id)")
    reference: str = option(help="its SFT start: folder, model alias or hub id")
    prompts: str = option(help="test table: id, prompt (chosen, rejected for pair accuracy)", must_exist=True)
    out: str = option(help="output folder for eval.json and responses.parquet")
    seed: int = option(0, "sampling and bootstrap seed")
    experiment: str = option("cwpo", "MLflow experiment (used with --run-id)")
    run_id: str = option("", "MLflow run to log eval/* metrics to (default: the active run, if any)")
    cache_dir: str = option("", "reuse the reference's responses and log-probs across evaluations "
                                "(the pipeline's arms share one SFT start)")


def load_test(cfg: Config) -> list[dict]:
    from cwpo_ray.tables import read_table

    rows = read_table(cfg.prompts).to_pylist()
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{cfg.prompts}: a test table needs a prompt column")
    return rows[:cfg.max_prompts] if cfg.max_prompts else rows


def sample(cfg: Config, model: str, prompts: list[str]) -> list[str]:
    from cwpo_ray.generation import GenSettings, generate

    s = GenSettings(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, n=1,
                    batch_size=cfg.batch_size, seed=cfg.seed, engine=cfg.engine)
    return [r[0] for r in generate(model, prompts, s)]


def pair_logps(model_spec: str, rows: list[dict], cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of chosen and rejected under one model (logprobs.py's scorer)."""
    import torch

    from cwpo_ray.models import load_causal_lm, load_tokenizer, resolve_model
    from cwpo_ray.logprobs import Lengths, reference_logps

    source = resolve_model(model_spec)
    tok = load_tokenizer(source)
    model = load_causal_lm(source).eval()
    lengths = Lengths(cfg.max_prompt_length, cfg.max_length, cfg.chat_template)
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(rows), cfg.batch_size):
            b = rows[i:i + cfg.batch_size]
            out = reference_logps(model, tok, [r["prompt"] for r in b], [r["chosen"] for r in b],
                                  [r["rejected"] for r in b], lengths)
            chosen += out["ref_chosen_logps"]
            rejected += out["ref_rejected_logps"]
    return np.asarray(chosen), np.asarray(rejected)


def implicit_accuracy(cfg: Config, rows: list[dict]) -> tuple[float, int]:
    from cwpo_ray.gra import implicit_reward_accuracy

    pairs = [r for r in rows if r.get("chosen") and r.get("rejected") and r["chosen"] != r["rejected"]
             and r.get("gold_chosen", 1.0) != r.get("gold_rejected", 0.0)]
    if not pairs:
        return float("nan"), 0
    pc, pr = pair_logps(cfg.policy, pairs, cfg)
    rc, rr = cached(cfg, "logps", pairs, lambda: [x.tolist() for x in pair_logps(cfg.reference, pairs, cfg)])
    return implicit_reward_accuracy(pc, pr, rc, rr), len(pairs)


def cached(cfg: Config, what: str, rows: list, compute):
    """The reference's outputs, from cfg.cache_dir when the same model, rows and settings made them."""
    from cwpo_ray.fingerprints import path_fingerprint

    if not cfg.cache_dir:
        return compute()
    key = path_fingerprint(cfg.reference, what, [r.get("prompt") for r in rows], [r.get("chosen") for r in rows],
                           cfg.temperature, cfg.max_new_tokens, cfg.seed, cfg.batch_size, cfg.engine, cfg.max_length,
                           cfg.max_prompt_length, cfg.chat_template)
    path = Path(cfg.cache_dir) / f"{what}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    from cwpo_ray.tables import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value))
    return value


def log_to_mlflow(cfg: Config, metrics: dict, out: Path) -> Optional[str]:
    """The active run if there is one, else --run-id; nothing when neither."""
    import mlflow

    from cwpo_ray import tracking

    numeric = {f"eval/{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
    if mlflow.active_run() is not None:
        mlflow.log_metrics(numeric)
        mlflow.log_artifact(str(out / "eval.json"))
        return mlflow.active_run().info.run_id
    if cfg.run_id:
        with tracking.start_run(cfg.experiment, run_id=cfg.run_id) as run:
            mlflow.log_metrics(numeric)
            mlflow.log_artifact(str(out / "eval.json"))
            return run.info.run_id
    return None


def run(cfg: Config) -> int:
    from cwpo_ray.gra import gra_with_ci
    from cwpo_ray.judges import judge_name, load_judge
    from cwpo_ray.tables import atomic_path, write_table

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_test(cfg)
    prompts = [r["prompt"] for r in rows]

    # Same seed for both models: common random numbers make the comparison less noisy.
    policy_responses = sample(cfg, cfg.policy, prompts)
    reference_responses = cached(cfg, "responses", rows, lambda: sample(cfg, cfg.reference, prompts))
    gen_seconds = time.time() - t0

    judge = load_judge(cfg.judge)
    policy_scores = judge(list(zip(prompts, policy_responses)))
    reference_scores = judge(list(zip(prompts, reference_responses)))
    metrics = gra_with_ci(policy_scores, reference_scores, n_boot=cfg.n_boot, seed=cfg.seed)
    metrics.update(gold_policy=float(np.mean(policy_scores)), gold_reference=float(np.mean(reference_scores)))
    if cfg.pair_accuracy and rows and "chosen" in rows[0]:
        metrics["pair_accuracy"], metrics["n_pairs"] = implicit_accuracy(cfg, rows)
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics["generation_seconds"] = round(gen_seconds, 1)

    write_table(pa.Table.from_pylist([
        {"id": str(r.get("id", i)), "prompt": p, "policy_response": a, "reference_response": b,
         "policy_score": float(sa), "reference_score": float(sb)}
        for i, (r, p, a, b, sa, sb) in enumerate(zip(rows, prompts, policy_responses, reference_responses,
                                                       policy_scores, reference_scores))]),
        out / "responses.parquet")
    report = {"stage": "evaluate", "judge": judge_name(judge), "metrics": metrics, "config": to_dict(cfg)}
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    run_id = log_to_mlflow(cfg, metrics, out)
    pa_text = f", pair accuracy {metrics['pair_accuracy']:.3f}" if "pair_accuracy" in metrics else ""
    print(f"cwpo evaluate: GRA {metrics['gra']:.3f} [{metrics['gra_lo']:.3f}, {metrics['gra_hi']:.3f}] "
          f"on {metrics['n']} prompts; gold {metrics['gold_policy']:.3f} vs {metrics['gold_reference']:.3f} "
          f"(reference){pa_text}; {metrics['seconds']} s -> {out / 'eval.json'}"
          + (f" (MLflow run {run_id})" if run_id else ""), flush=True)
    return 0
