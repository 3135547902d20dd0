"""How often does the pipeline's "did the annotator learn?" reading (calibration.learned_verdict) say
learned / not shown / no sign, for annotators of known usefulness, at the labeled-set size and label
noise of the built-in benchmark?

Model (the one the tests use): an annotator's out-of-fold margins against the gold judge are N(shift, 1),
so its gold accuracy is Phi(shift); the human labels disagree with the gold judge on a fixed share of
pairs (the benchmark's simulated humans: 32.5%), which flips the margin's sign against the label there.
Each draw is one labeled set; the verdict comes from the signed-rank p-value of its margins.

    .venv/bin/python bench/learned_test_power.py --pairs 280 --draws 2000
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from cwpo_ray.calibration import learned_p_value, learned_verdict

VERDICTS = ("learned", "not shown", "no sign")


def noisy_label_margins(rng, shift: float, pairs: int, flip: float = 0.325) -> np.ndarray:
    """One labeled set's out-of-fold margins: N(shift, 1) against the gold judge, the sign flipped against
    the human label on the ``flip`` share of pairs where that label disagrees with gold."""
    gold = rng.normal(shift, 1.0, pairs)
    return np.where(rng.random(pairs) < flip, -gold, gold)


def verdict_rates(shift: float, pairs: int, flip: float, draws: int, rng) -> dict[str, float]:
    """The share of ``draws`` labeled sets that get each verdict."""
    counts = dict.fromkeys(VERDICTS, 0)
    for _ in range(draws):
        counts[learned_verdict(learned_p_value(noisy_label_margins(rng, shift, pairs, flip)))] += 1
    return {k: v / draws for k, v in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=280, help="labeled pairs (out-of-fold margins)")
    ap.add_argument("--flip", type=float, default=0.325, help="share of human labels that disagree with gold")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--gold-accuracy", default="0.5,0.55,0.6,0.64,0.66,0.7",
                    help="annotators' accuracies against the gold judge, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{args.pairs} labeled pairs, human labels {1 - args.flip:.3f} right, {args.draws} draws each\n")
    print("| gold accuracy | accuracy vs human labels (expected) | learned | not shown | no sign (warning) |")
    print("|---:|---:|---:|---:|---:|")
    for acc in (float(a) for a in args.gold_accuracy.split(",")):
        rates = verdict_rates(float(stats.norm.ppf(acc)), args.pairs, args.flip, args.draws, rng)
        expected = acc * (1 - args.flip) + (1 - acc) * args.flip
        print(f"| {acc:.2f} | {expected:.3f} | " + " | ".join(f"{rates[v]:.3f}" for v in VERDICTS) + " |")


if __name__ == "__main__":
    main()
