"""How many seeds would separate a paired GRA difference of a given size? A power estimate from the
per-seed differences already measured, before spending hours of CPU on more seeds.

Model: each seed's paired difference (e.g. GRA(cw) - GRA(ws) on the same prompts) is the true
difference plus noise of standard deviation s (prompt sampling within the seed and the seed's own
split, annotator and training together), s estimated from the seeds at hand (pooled over the
contrasts given, each about its own mean). The mean over n seeds is separated from 0 when its 95%
interval (t with n - 1 degrees of freedom, what the hierarchical bootstrap approaches) excludes 0.
Power for a true difference d: P(mean > t * s / sqrt(n)) = 1 - T_{n-1}(t - d sqrt(n) / s), the
noncentral t replaced by the shifted t (close enough for planning).

    .venv/bin/python bench/power.py --diffs -0.022,0.060,0.013 --diffs -0.033,0.052,-0.018 --effect 0.02

With --within-se SE (one seed's standard error of the paired difference from its prompts) it also
says what doubling the prompts per seed (test + test_unseen) buys: the within-seed part of s
shrinks by sqrt(2), the between-seed part stays.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats


def pooled_sd(groups: list[list[float]]) -> tuple[float, int]:
    """Standard deviation pooled over groups, each about its own mean, and its degrees of freedom."""
    ss = sum(float(((np.asarray(g) - np.mean(g)) ** 2).sum()) for g in groups)
    df = sum(len(g) - 1 for g in groups)
    return math.sqrt(ss / df), df


def power(effect: float, sd: float, n: int, level: float = 0.95) -> float:
    t = stats.t.ppf(1 - (1 - level) / 2, n - 1)
    return float(1 - stats.t.cdf(t - effect * math.sqrt(n) / sd, n - 1))


def seeds_for(effect: float, sd: float, target: float = 0.8, most: int = 400) -> int | None:
    return next((n for n in range(2, most + 1) if power(effect, sd, n) >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffs", action="append", required=True,
                        help="one contrast's per-seed paired differences, comma-separated (repeat per contrast)")
    parser.add_argument("--effect", type=float, action="append", help="true difference to detect (repeatable)")
    parser.add_argument("--within-se", type=float, default=None,
                        help="one seed's standard error of the paired difference from its prompts alone")
    parser.add_argument("--seeds", type=int, nargs="*", default=[3, 6, 10, 20, 30])
    args = parser.parse_args()
    groups = [[float(x) for x in d.split(",")] for d in args.diffs]
    effects = args.effect or [0.02]
    sd, df = pooled_sd(groups)
    rows = [("as measured", sd)]
    if args.within_se is not None:
        between2 = max(sd ** 2 - args.within_se ** 2, 0.0)
        rows.append(("prompts doubled", math.sqrt(between2 + args.within_se ** 2 / 2)))
        print(f"within-seed SE {args.within_se:.3f} -> between-seed sd {math.sqrt(between2):.3f}")
    print(f"per-seed sd of the paired difference: {sd:.4f} (pooled over {len(groups)} contrast(s), {df} df)")
    print("| per-seed sd | effect | " + " | ".join(f"power at {n} seeds" for n in args.seeds) + " | seeds for 80% |")
    print("|---|---:|" + "---:|" * len(args.seeds) + "---:|")
    for name, s in rows:
        for d in effects:
            cells = " | ".join(f"{power(d, s, n):.2f}" for n in args.seeds)
            need = seeds_for(d, s)
            print(f"| {name} {s:.3f} | {d:+.3f} | {cells} | {need if need else '> 400'} |")


if __name__ == "__main__":
    main()
