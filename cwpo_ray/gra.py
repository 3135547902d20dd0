"""Gold reward accuracy (GRA), bootstrap intervals (over prompts, and hierarchical over seeds and prompts),
paired differences, implicit-reward accuracy: pure numpy.

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


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> dict:
    """Mean over seeds of each seed's mean, with a two-level percentile bootstrap.

    ``groups`` holds one array per seed (its per-prompt values: wins, or paired differences of
    wins). The point estimate weighs every seed equally, whatever its number of prompts. Each
    resample draws as many seeds as there are, with replacement, then, within every drawn seed,
    as many of its prompts as it has, with replacement, and takes the mean over the drawn seeds of
    their resampled means: the interval carries both the between-seed spread (split, annotator,
    training) and each seed's prompt noise. With one seed it is ``bootstrap_ci`` draw for draw.
    With 2-3 seeds the between-seed part rests on very few values, so the interval is a rough one
    (a percentile bootstrap over k values undercovers for small k); the per-seed values are
    returned so a reader can see them.

    Returns mean, lo, hi, per_seed (each seed's mean), n_seeds and n (prompts per seed).
    """
    xs = [np.asarray(g, dtype=float) for g in groups]
    nan = float("nan")
    if not xs or any(x.size == 0 for x in xs):
        return {"mean": nan, "lo": nan, "hi": nan, "per_seed": [float(x.mean()) if x.size else nan for x in xs],
                "n_seeds": len(xs), "n": [int(x.size) for x in xs]}
    k = len(xs)
    # Two generators: the prompts come from default_rng(seed) in the order bootstrap_ci draws them,
    # so one seed reproduces it exactly; the seed picks come from a separate stream.
    prompt_rng = np.random.default_rng(seed)
    picks = np.random.default_rng([seed, 1]).integers(0, k, size=(n_boot, k)) if k > 1 else np.zeros((n_boot, 1), int)
    means = np.empty((n_boot, k))
    for s, x in enumerate(xs):
        chosen = picks == s
        m = int(chosen.sum())
        if m:  # every slot that drew seed s gets its own resample of s's prompts (row-major order)
            means[chosen] = x[prompt_rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    stats = means.mean(axis=1)
    alpha = (1.0 - level) / 2.0
    per_seed = [float(x.mean()) for x in xs]
    return {"mean": float(np.mean(per_seed)), "lo": float(np.quantile(stats, alpha)),
            "hi": float(np.quantile(stats, 1.0 - alpha)), "per_seed": per_seed, "n_seeds": k,
            "n": [int(x.size) for x in xs]}


def gra_over_seeds(per_seed_wins: Sequence[Sequence[float]], n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> dict:
    """GRA (ties half) and strict GRA (ties 0) as means over seeds, each with its hierarchical
    interval and per-seed values, from every seed's per-prompt wins (1 / 0.5 / 0). Both resample
    the same seeds and prompts (same seed). One seed: the numbers of ``gra_with_ci``."""
    w = [np.asarray(x, dtype=float) for x in per_seed_wins]
    g = hierarchical_bootstrap(w, n_boot=n_boot, level=level, seed=seed)
    s = hierarchical_bootstrap([(x == 1.0).astype(float) for x in w], n_boot=n_boot, level=level, seed=seed)
    return {"gra": g["mean"], "gra_lo": g["lo"], "gra_hi": g["hi"], "gra_per_seed": g["per_seed"],
            "gra_strict": s["mean"], "gra_strict_lo": s["lo"], "gra_strict_hi": s["hi"],
            "gra_strict_per_seed": s["per_seed"], "n_seeds": g["n_seeds"], "n": g["n"]}


def paired_difference_over_seeds(per_seed_a: Sequence[Sequence[float]], per_seed_b: Sequence[Sequence[float]],
                                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """GRA(a) - GRA(b) as a mean over seeds: within each seed the two arms were judged on the same
    prompts, so each seed contributes its per-prompt differences of wins, and the hierarchical
    bootstrap resamples seeds, then prompts (both arms' outcomes of a prompt together). One seed:
    the numbers of ``paired_difference``. Returns diff, lo, hi, per_seed, n_seeds, n."""
    if len(per_seed_a) != len(per_seed_b):
        raise ValueError(f"the two arms cover different seeds: {len(per_seed_a)} vs {len(per_seed_b)}")
    diffs = []
    for i, (a, b) in enumerate(zip(per_seed_a, per_seed_b)):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape:
            raise ValueError(f"seed #{i}: the two arms were judged on different prompts: {a.shape} vs {b.shape}")
        diffs.append(a - b)
    h = hierarchical_bootstrap(diffs, n_boot=n_boot, level=level, seed=seed)
    return {"diff": h["mean"], "lo": h["lo"], "hi": h["hi"], "per_seed": h["per_seed"], "n_seeds": h["n_seeds"],
            "n": h["n"]}


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
