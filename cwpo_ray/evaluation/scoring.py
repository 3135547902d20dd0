"""What an evaluation computes besides generation: implicit-reward pair accuracy from the policy's
and the reference's log-probs (the reference's cached by its inputs), and GRA under a judge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np




def pair_logps(model_spec: str, rows: list[dict], cfg) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs of chosen and rejected under one model (logprobs.py's scorer)."""
    import torch

    from cwpo_ray.models import load_causal_lm, load_tokenizer, resolve_model
    from cwpo_ray.logprobs import Lengths, reference_logps

    from cwpo_ray.judges import model_device

    source = resolve_model(model_spec)
    tok = load_tokenizer(source)
    model = load_causal_lm(source).to(model_device()).eval()  # the task's GPU when it holds one
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


def implicit_accuracy(cfg, rows: list[dict]) -> tuple[float, int]:
    from cwpo_ray.gra import implicit_reward_accuracy

    pairs = [r for r in rows if r.get("chosen") and r.get("rejected") and r["chosen"] != r["rejected"]
             and r.get("gold_chosen", 1.0) != r.get("gold_rejected", 0.0)]
    if not pairs:
        return float("nan"), 0
    pc, pr = pair_logps(cfg.policy, pairs, cfg)
    rc, rr = cached(cfg, "logps", pairs, lambda: [x.tolist() for x in pair_logps(cfg.reference, pairs, cfg)])
    return implicit_reward_accuracy(pc, pr, rc, rr), len(pairs)


def cached(cfg, what: str, rows: list, compute):
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



def judge_metrics(policy_scores, reference_scores, cfg) -> dict:
    """GRA, strict GRA (each with its interval), tie rate, n, and both models' mean gold reward."""
    from cwpo_ray.gra import gra_with_ci

    m = gra_with_ci(policy_scores, reference_scores, n_boot=cfg.n_boot, seed=cfg.seed)
    m.update(gold_policy=float(np.mean(policy_scores)) if len(policy_scores) else float("nan"),
             gold_reference=float(np.mean(reference_scores)) if len(reference_scores) else float("nan"))
    return m


