"""Results over seeds: the hierarchical bootstrap (seeds, then prompts within a seed) in gra.py, and
`cwpo compare` on a pipeline parent whose arm runs span several seeds (real MLflow server)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cwpo_ray import cli
from cwpo_ray.gra import (bootstrap_ci, gra_over_seeds, gra_with_ci, hierarchical_bootstrap, paired_difference,
                          paired_difference_over_seeds)
from cwpo_ray.tables import write_table


# ----------------------------------------------------------------------------- the bootstrap (pure)

def outcomes(n: int, p_win: float, p_tie: float, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).random(n)
    return np.where(u < p_win, 1.0, np.where(u < p_win + p_tie, 0.5, 0.0))


def test_one_seed_is_the_plain_bootstrap_over_prompts():
    w = outcomes(150, 0.5, 0.2, seed=1)
    for s in (0, 7):
        h = hierarchical_bootstrap([w], seed=s)
        assert (h["lo"], h["hi"]) == bootstrap_ci(w, seed=s)  # draw for draw, not approximately
        assert h["mean"] == pytest.approx(w.mean()) and h["per_seed"] == [pytest.approx(w.mean())]
    g, plain = gra_over_seeds([w]), gra_with_ci(w, np.full(w.size, 0.5))  # wins of w against a constant 0.5
    # (w vs 0.5 gives 1 / 0.5 / 0 exactly where w is 1 / 0.5 / 0)
    for k in ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi"):
        assert g[k] == pytest.approx(plain[k], abs=1e-12), k
    b = outcomes(150, 0.4, 0.2, seed=2)
    d, p = paired_difference_over_seeds([w], [b]), paired_difference(w, b)
    assert (d["diff"], d["lo"], d["hi"]) == pytest.approx((p["diff"], p["lo"], p["hi"]), abs=1e-12)
    assert d["n_seeds"] == 1 and d["n"] == [150]


def test_point_estimate_is_the_mean_of_the_seeds_and_seeded():
    seeds = [outcomes(200, 0.6, 0.1, 0), outcomes(120, 0.5, 0.1, 1), outcomes(80, 0.45, 0.3, 2)]
    g = gra_over_seeds(seeds)
    per = [float(x.mean()) for x in seeds]
    assert g["gra_per_seed"] == pytest.approx(per) and g["gra"] == pytest.approx(np.mean(per))
    # Each seed weighs the same, whatever its number of prompts: not the pooled mean over all prompts.
    assert g["gra"] != pytest.approx(np.concatenate(seeds).mean())
    assert g["gra_lo"] < g["gra"] < g["gra_hi"] and g["gra_strict_lo"] < g["gra_strict"] < g["gra_strict_hi"]
    assert g["gra_strict_per_seed"] == pytest.approx([float((x == 1).mean()) for x in seeds])
    assert gra_over_seeds(seeds) == g and gra_over_seeds(seeds, seed=1) != g
    assert g["n_seeds"] == 3 and g["n"] == [200, 120, 80]


def test_more_spread_between_seeds_widens_the_interval():
    """Same prompt noise within each seed; the seeds' own GRAs 0.5/0.5/0.5 vs 0.3/0.5/0.7."""
    def seed_values(p: float, s: int) -> np.ndarray:  # exactly p wins, shuffled
        x = np.zeros(200)
        x[: int(p * 200)] = 1.0
        return np.random.default_rng(s).permutation(x)

    close = hierarchical_bootstrap([seed_values(0.5, s) for s in range(3)])
    apart = hierarchical_bootstrap([seed_values(p, s) for s, p in enumerate((0.3, 0.5, 0.7))])
    assert close["mean"] == pytest.approx(0.5) and apart["mean"] == pytest.approx(0.5)
    assert apart["hi"] - apart["lo"] > 2 * (close["hi"] - close["lo"])
    # The seed level alone (no prompt noise): the interval follows how the seeds' values spread.
    const = hierarchical_bootstrap([np.full(50, v) for v in (0.3, 0.5, 0.7)])
    assert 0.3 - 1e-9 <= const["lo"] < 0.4 and 0.6 < const["hi"] <= 0.7 + 1e-9
    assert hierarchical_bootstrap([np.full(50, 0.6)] * 3)["lo"] == pytest.approx(0.6)


def test_paired_difference_over_seeds_pairs_prompts_within_each_seed():
    a0, b0 = outcomes(100, 0.5, 0.2, 0), outcomes(100, 0.5, 0.2, 1)
    # Arm a = arm b plus exactly 10 more wins per seed: every resample shows a ahead by 0.1.
    bs = [outcomes(100, 0.5, 0.0, s) for s in range(3)]
    as_ = []
    for b in bs:
        a = b.copy()
        a[np.flatnonzero(b == 0)[:10]] = 1.0
        as_.append(a)
    d = paired_difference_over_seeds(as_, bs)
    assert d["diff"] == pytest.approx(0.1) and d["per_seed"] == pytest.approx([0.1] * 3)
    assert 0 < d["lo"] <= 0.1 <= d["hi"]
    with pytest.raises(ValueError, match="different prompts"):
        paired_difference_over_seeds([a0, a0], [b0, b0[:50]])
    with pytest.raises(ValueError, match="different seeds"):
        paired_difference_over_seeds([a0], [b0, b0])


def test_empty_seed_gives_nan_not_a_crash():
    h = hierarchical_bootstrap([[1.0, 0.0], []])
    assert np.isnan(h["mean"]) and np.isnan(h["lo"]) and h["n"] == [2, 0]
    assert np.isnan(hierarchical_bootstrap([])["mean"])
