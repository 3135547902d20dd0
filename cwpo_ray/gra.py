"""Gold reward accuracy (GRA), bootstrap intervals, paired differences, implicit-reward accuracy: pure numpy.

GRA (gold reward accuracy) is the paper's headline number: the fraction of test prompts on
which the gold judge scores the aligned policy's response above its SFT start's. ``gra`` counts
ties half, so two identical models score exactly 0.5; ``gra_strict`` is the paper's definition
("scores higher", ties count 0), reported beside it because a lexicon judge such as VADER ties
often (two responses without a sentiment word both score 0): the two differ by half the tie rate.
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


def strict_wins(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 if the policy's response scores strictly higher, else 0 (the paper's win)."""
    return (wins(policy_scores, reference_scores) == 1.0).astype(float)


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
    """GRA (ties half) and strict GRA (ties 0), each with its percentile bootstrap interval, the tie
    rate and the number of prompts. Both intervals resample the same prompts (same seed)."""
    w = wins(policy_scores, reference_scores)
    s = (w == 1.0).astype(float)
    lo, hi = bootstrap_ci(w, n_boot=n_boot, level=level, seed=seed)
    s_lo, s_hi = bootstrap_ci(s, n_boot=n_boot, level=level, seed=seed)
    nan = float("nan")
    return {"gra": float(w.mean()) if w.size else nan, "gra_lo": lo, "gra_hi": hi,
            "gra_strict": float(s.mean()) if s.size else nan, "gra_strict_lo": s_lo, "gra_strict_hi": s_hi,
            "ties": float((w == 0.5).mean()) if w.size else nan, "n": int(w.size)}


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


def excludes_zero(lo: float, hi: float) -> bool:
    """Whether a difference's interval lies wholly on one side of 0 (NaN bounds: no)."""
    return bool(lo > 0 or hi < 0)


def across_judges(intervals: Sequence[tuple[float, float]]) -> str:
    """How one paired difference (an arm contrast) reads under several gold judges, from its
    interval ``(lo, hi)`` under each:

    - ``"all judges"``: every interval excludes 0, all on the same side;
    - ``"judge-specific"``: at least one interval excludes 0 and at least one does not, so the
      gain (or loss) shows under some judges only and may be an artifact of their scoring;
    - ``"judges disagree"``: every interval excludes 0 but on opposite sides;
    - ``"none"``: no interval excludes 0;
    - ``""``: fewer than two judges, nothing to compare.
    """
    if len(intervals) < 2:
        return ""
    sides = [(1 if lo > 0 else -1) if excludes_zero(lo, hi) else 0 for lo, hi in intervals]
    if all(s == 0 for s in sides):
        return "none"
    if any(s == 0 for s in sides):
        return "judge-specific"
    return "all judges" if len(set(sides)) == 1 else "judges disagree"
