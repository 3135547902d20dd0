"""Gold reward accuracy (GRA), bootstrap intervals, paired differences, implicit-reward accuracy: pure numpy.

GRA (gold reward accuracy) is the paper's headline number: the fraction of test prompts on
which the gold judge scores the aligned policy's response above its SFT start's. Ties count
half, so two identical models score exactly 0.5.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def wins(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 if the policy's response scores higher, 0.5 on a tie, 0 if lower."""
    p = np.asarray(policy_scores, dtype=float)
    r = np.asarray(reference_scores, dtype=float)
    if p.shape != r.shape:
        raise ValueError(f"policy and reference scores differ in length: {p.shape} vs {r.shape}")
    return (p > r).astype(float) + 0.5 * (p == r)


def gra(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    w = wins(policy_scores, reference_scores)
    return float(w.mean()) if w.size else float("nan")


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over resampled ``values`` (seeded)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    if statistic is np.mean:
        stats = x[idx].mean(axis=1)  # vectorized common case
    else:
        stats = np.array([statistic(x[i]) for i in idx])
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def gra_with_ci(policy_scores, reference_scores, n_boot: int = 2000, level: float = 0.95,
                seed: int = 0) -> dict[str, float]:
    w = wins(policy_scores, reference_scores)
    lo, hi = bootstrap_ci(w, n_boot=n_boot, level=level, seed=seed)
    return {"gra": float(w.mean()) if w.size else float("nan"), "gra_lo": lo, "gra_hi": hi, "n": int(w.size)}


def paired_difference(wins_a, wins_b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """GRA(a) - GRA(b) over the same prompts, with a percentile bootstrap that resamples prompts.

    Two arms judged on the same prompts against the same start responses share most of their
    noise (a prompt the start answers well is hard for both), so resampling the per-prompt
    differences gives a narrower interval than two independent GRA intervals would.
    """
    a, b = np.asarray(wins_a, dtype=float), np.asarray(wins_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"the two arms were judged on different prompts: {a.shape} vs {b.shape}")
    lo, hi = bootstrap_ci(a - b, n_boot=n_boot, level=level, seed=seed)
    return {"diff": float((a - b).mean()) if a.size else float("nan"), "lo": lo, "hi": hi, "n": int(a.size)}


def implicit_reward_accuracy(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> float:
    """Fraction of pairs where the policy's implicit reward margin
    ``(logp_pi(c) - logp_ref(c)) - (logp_pi(r) - logp_ref(r))`` is positive (ties count half)."""
    margin = (np.asarray(policy_chosen, float) - np.asarray(ref_chosen, float)) - (
        np.asarray(policy_rejected, float) - np.asarray(ref_rejected, float))
    if margin.size == 0:
        return float("nan")
    return float(np.mean((margin > 0) + 0.5 * (margin == 0)))
