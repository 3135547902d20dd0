"""Results over seeds: the hierarchical bootstrap (seeds, then prompts within a seed) in gra.py, compare's one
path for any number of seeds (one seed: the numbers the single-seed tables always showed), and `cwpo compare`
on a pipeline parent whose arm runs span several seeds (real MLflow server)."""

from __future__ import annotations

import json
import re
import time
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


# ----------------------------------------------------------------------------- cwpo compare over seeds (MLflow)

def scores(wins_: int, ties: int, n: int = 100) -> list[float]:
    """Policy scores against a reference of 0: ``wins_`` prompts won, then ``ties`` tied, the rest lost."""
    return [1.0] * wins_ + [0.0] * ties + [-1.0] * (n - wins_ - ties)


def log_arm(client, exp_id: str, parent: str, arm: str, seed, vader: list[float], tmp: Path,
            split: str = "test", run_id: str = "") -> str:
    """An arm's child run as the pipeline leaves it for one seed: tags, eval/* metrics (also under a second
    judge, textblob, which ties everything) and responses.parquet at the run's root; for the validation
    split validation/* metrics and validation/responses.parquet (into ``run_id`` when given)."""
    from types import SimpleNamespace

    from mlflow.entities import Metric

    from cwpo_ray.evaluation.scoring import judge_metrics

    n = len(vader)
    prefix = "eval" if split == "test" else split
    tags = {"mlflow.parentRunId": parent, "stage": "arm", "arm": arm, "loss": "dpo", f"{prefix}/judge": "vader",
            **({} if seed is None else {"seed": str(seed)})}
    if run_id:
        client.set_tag(run_id, f"{prefix}/judge", "vader")
    else:
        run_id = client.create_run(exp_id, run_name=f"{arm}-dpo-seed{seed}", tags=tags).info.run_id
    ref, flat = [0.0] * n, [0.0] * n
    cfg = SimpleNamespace(n_boot=500, seed=0)
    metrics = judge_metrics(vader, ref, cfg)
    metrics.update({f"textblob.{k}": v for k, v in judge_metrics(flat, ref, cfg).items() if k != "n"})
    metrics["human_labels_used"] = 300.0 if arm == "human" else 0.0
    now = int(time.time() * 1000)  # one request per run: the server is slow on a loaded machine
    client.log_batch(run_id, metrics=[Metric(k if k == "human_labels_used" else f"{prefix}/{k}", float(v), now, 0)
                                      for k, v in metrics.items()])
    rows = [{"id": f"s{seed}p{i:03d}", "prompt": f"q{i}", "policy_response": "x", "reference_response": "y",
             "policy_score": vader[i], "reference_score": 0.0, "policy_score_vader": vader[i],
             "reference_score_vader": 0.0, "policy_score_textblob": 0.0, "reference_score_textblob": 0.0}
            for i in range(n)]
    folder = tmp / f"{arm}-{seed}-{split}"
    folder.mkdir()
    write_table(pa.Table.from_pylist(rows), folder / "responses.parquet")
    client.log_artifact(run_id, str(folder / "responses.parquet"), None if split == "test" else split)
    return run_id


def line_of(table: str, start: str) -> str:
    found = [l for l in table.splitlines() if l.startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]


def interval(line: str, col: int) -> tuple[float, float]:
    lo, hi = re.fullmatch(r"\[([-+0-9.]+), ([-+0-9.]+)\]", line.split("|")[col].strip()).groups()
    return float(lo), float(hi)


SEEDED = {  # arm -> seed -> (wins, ties) out of 100 prompts; cw's wins include human's and cw_raw's
    "human": {0: (40, 0), 1: (50, 0)},
    "cw": {0: (60, 20), 1: (60, 0)},
    "cw_raw": {0: (55, 0), 1: (50, 0)},
}


def test_compare_over_two_seeds(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment("cwpo-compare-seeds")
    parent = client.create_run(exp_id, run_name="pipeline", tags={"stage": "pipeline"}).info.run_id
    client.log_metric(parent, "seed0.annotator.gold_accuracy", 0.6)
    client.log_metric(parent, "seed1.annotator.gold_accuracy", 0.7)
    for arm, by_seed in SEEDED.items():
        for seed, (w, t) in by_seed.items():
            log_arm(client, exp_id, parent, arm, seed, scores(w, t), tmp_path)
    assert cli.main(["compare", "--experiment", "cwpo-compare-seeds", "--parent-run-id", parent,
                     "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Over 2 seeds (0 / 1;" in table
    assert ("| arm | loss | seeds | GRA | 95% CI | GRA per seed | GRA strict | strict 95% CI | strict per seed |"
            in table)

    def wins_of(arm, seed):
        w, t = SEEDED[arm][seed]
        return np.array([1.0] * w + [0.5] * t + [0.0] * (100 - w - t))

    for arm, gra, per, strict, strict_per in [("human", 0.45, "0.400 / 0.500", 0.45, "0.400 / 0.500"),
                                              ("cw", 0.65, "0.700 / 0.600", 0.60, "0.600 / 0.600"),
                                              ("cw_raw", 0.525, "0.550 / 0.500", 0.525, "0.550 / 0.500")]:
        line = line_of(table, f"| {arm} | dpo | 2 |")
        cols = [c.strip() for c in line.split("|")]
        assert float(cols[4]) == pytest.approx(gra) and cols[6] == per  # the mean of the per-seed GRAs
        assert float(cols[7]) == pytest.approx(strict) and cols[9] == strict_per
        lo, hi = interval(line, 5)
        assert lo < gra < hi and interval(line, 8)[0] <= strict <= interval(line, 8)[1]
        expected = gra_over_seeds([wins_of(arm, 0), wins_of(arm, 1)])  # the prompts in id order, as compare reads them
        assert (lo, hi) == pytest.approx((expected["gra_lo"], expected["gra_hi"]), abs=5e-4)
        assert cols[15] == "100"  # test prompts: the same count for every seed
    assert line_of(table, "| cw | dpo | 2 |").split("|")[13].strip() == "0.650"  # annotator acc.: mean of 0.6, 0.7
    assert line_of(table, "| human | dpo | 2 |").split("|")[13].strip() == "-"
    # Under every judge: textblob ties everything, 0.5 for every arm and seed.
    assert "| cw | dpo | textblob | 2 | 0.500 | [0.500, 0.500] | 0.500 / 0.500 |" in table
    # Paired differences over seeds, per judge, with the per-seed differences.
    for contrast, diff, per in [("cw - human", 0.2, "+0.300 / +0.100"), ("cw - cw_raw", 0.125, "+0.150 / +0.100")]:
        line = line_of(table, f"| dpo | {contrast} | vader |")
        cols = [c.strip() for c in line.split("|")]
        assert float(cols[4]) == pytest.approx(diff) and cols[6] == per
        lo, hi = interval(line, 5)
        assert 0 < lo < diff < hi
        assert cols[7] == "yes" and cols[8] == "judge-specific" and cols[9] == "2" and cols[10] == "100"
        assert "| +0.000 | [+0.000, +0.000] | +0.000 / +0.000 | no | judge-specific |" in line_of(
            table, f"| dpo | {contrast} | textblob |")
    assert "| dpo | cw_raw - human |" not in table  # only the contrasts compare knows
    # Each seed's own numbers follow.
    assert "| cw | dpo | 0 | 0.700 |" in table and "| cw | dpo | 1 | 0.600 |" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "compare_paired.png").stat().st_size > 1000
    # Logged to the parent: the table, the charts, the aggregated numbers.
    assert {"compare.md", "compare.png", "compare_paired.png"} <= {a.path for a in client.list_artifacts(parent)}
    pm = client.get_run(parent).data.metrics
    assert pm["seeds.cw.dpo.gra"] == pytest.approx(0.65) and pm["seeds.cw.dpo.n_seeds"] == 2
    assert pm["seeds.cw-human.dpo.diff"] == pytest.approx(0.2)

    # One seed (tagged, or an older untagged run): the single-seed table, as before. For seed 3 the pipeline
    # first ran cw with other results, then reran it (a resume after a change): only the newer run counts.
    for seed in (3, None):
        one = client.create_run(exp_id, run_name="pipeline", tags={"stage": "pipeline"}).info.run_id
        (tmp_path / f"one-{seed}").mkdir()
        if seed == 3:
            (tmp_path / "replaced").mkdir()
            log_arm(client, exp_id, one, "cw", seed, scores(10, 0), tmp_path / "replaced")
            time.sleep(0.01)  # a later start time
        for arm in ("human", "cw"):
            log_arm(client, exp_id, one, arm, seed, scores(*SEEDED[arm][0]), tmp_path / f"one-{seed}")
        out = tmp_path / f"cmp-{seed}"
        assert cli.main(["compare", "--experiment", "cwpo-compare-seeds", "--parent-run-id", one,
                         "--out", str(out), "--no-log"]) == 0
        single = (out / "compare.md").read_text()
        assert "| arm | loss | GRA | 95% CI | GRA strict |" in single and "| seeds |" not in single
        assert single.count("| cw | dpo | 0.700 |") == 1 and "| cw | dpo | 0.100 |" not in single  # 0.1: the old run
        assert line_of(single, "| dpo | cw - human | vader |").startswith("| dpo | cw - human | vader | +0.300 |")
        assert ("1 older run(s) of an arm x loss x seed that a newer run replaced are left out" in single) == (seed == 3)


def test_over_seeds_tables_from_rows_keep_the_newest_run_and_show_missing_seeds():
    """Pure: rows as collect_rows reads them. An arm that ran on one seed only shows "-" for the other;
    an arm without responses.parquet falls back to the mean of its logged GRAs, with no interval; of two
    runs of the same arm x loss x seed (a resumed pipeline) only the newest counts."""
    from cwpo_ray.comparison import aggregate, collect, markdown

    def row(arm, seed, gra, start, run_id):
        return {"arm": arm, "loss": "dpo", "seed": seed, "run_id": run_id, "start_time": start, "gra": gra,
                "gra_lo": None, "gra_hi": None, "gra_strict": gra, "gra_strict_lo": None, "gra_strict_hi": None,
                "gold_policy": 0.0, "gold_reference": 0.0, "judge": "gold", "judges": {}, "n": 4.0,
                "pair_accuracy": None, "annotator_accuracy": None, "human_labels_used": 0.0}

    rows = [row("cw", "0", 0.75, 2, "new"), row("cw", "0", 0.0, 1, "old"), row("cw", "1", 0.5, 3, "c1"),
            row("human", "0", 0.5, 4, "h0"), row("ws", "0", 0.25, 5, "w0"), row("ws", "1", 0.75, 6, "w1")]
    wins_ = {"new": [1, 1, 0.5, 0.5], "c1": [1, 0, 0.5, 0.5], "h0": [1, 0, 0.5, 0.5], "old": [0, 0, 0, 0]}
    table = {r: {"gold": {f"p{i}": w for i, w in enumerate(v)}} for r, v in wins_.items()}
    kept = collect.latest_runs(rows)
    assert [r["run_id"] for r in kept] == ["new", "c1", "h0", "w0", "w1"]
    agg = {r["arm"]: r for r in aggregate.arm_rows(kept, lambda r: table.get(r["run_id"]))}
    assert agg["cw"]["gra"] == pytest.approx(0.625) and agg["cw"]["gra_lo"] <= 0.625 <= agg["cw"]["gra_hi"]
    assert agg["ws"]["gra"] == pytest.approx(0.5) and agg["ws"]["gra_lo"] is None  # no responses: no interval
    seeds = aggregate.seeds_of(kept)
    md = markdown.gra_table(list(agg.values()), seeds, "t")
    assert "| human | dpo | 1 | 0.500 |" in md and "| 0.500 / - |" in md
    assert "| ws | dpo | 2 | 0.500 | - | 0.250 / 0.750 |" in md
    pairs = aggregate.paired_rows(kept, lambda r: table.get(r["run_id"]))
    cw_h = next(p for p in pairs if (p["a"], p["b"]) == ("cw", "human"))
    assert cw_h["n_seeds"] == 1 and cw_h["diff"] == pytest.approx(0.25)  # only seed 0 has both
    assert not any(p["b"] == "ws" for p in pairs)  # ws left no responses: no paired difference
    assert "| +0.250 / - |" in markdown.paired_table(pairs, seeds)


# ----------------------------------------------------------------------------- one seed: the n = 1 case

def one_seed_runs(seed="0"):
    """Rows as collect_rows reads them for one seed, and each run's per-prompt wins under two judges (vader, the
    main one, and textblob); every run's logged eval/* interval is its evaluation's own (n_boot 500, seed 3)."""
    n = 80
    salt = int(seed) if seed and seed != "0" else 0  # another seed: other prompts won
    spec = {("human", "dpo"): (30, 10, 40), ("ws", "dpo"): (44, 6, 42), ("cw", "dpo"): (52, 8, 45),
            ("human", "ipo"): (35, 0, 38), ("cw", "ipo"): (47, 4, 41)}  # (vader wins, vader ties, textblob wins)
    rows, wins_ = [], {}
    for k, ((arm, loss), (w, t, tb)) in enumerate(spec.items()):
        rng = np.random.default_rng([k, salt] if salt else k)
        vader = rng.permutation(np.array([1.0] * w + [0.5] * t + [0.0] * (n - w - t)))
        textblob = rng.permutation(np.array([1.0] * tb + [0.5] * (n - tb)))

        def logged(x):  # what the evaluation logs: wins of x against a constant 0.5 give back x's 1 / 0.5 / 0
            m = gra_with_ci(x, np.full(n, 0.5), n_boot=500, seed=3)
            return {**{key: m[key] for key in ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo",
                                               "gra_strict_hi")}, "gold_policy": float(x.mean() - 0.1),
                    "gold_reference": 0.25}

        run_id = f"{arm}-{loss}" + (f"-{seed}" if salt else "")
        rows.append({"split": "test", "arm": arm, "loss": loss, "seed": seed, "run_id": run_id, "start_time": k,
                     **logged(vader), "judge": "vader", "judges": {"textblob": logged(textblob)}, "n": float(n),
                     "pair_accuracy": 0.6 + 0.01 * k, "annotator_accuracy": None if arm == "human" else 0.7,
                     "human_labels_used": 300.0 if arm == "human" else 90.0})
        ids = [f"p{i:03d}" for i in range(n)]
        wins_[run_id] = {"vader": dict(zip(ids, vader.tolist())), "textblob": dict(zip(ids, textblob.tolist()))}
    return sorted(rows, key=by_loss_arm_seed), wins_


def by_loss_arm_seed(row: dict) -> tuple:  # the order collect_rows gives
    from cwpo_ray.arms import display_key

    return row["loss"], display_key(row["arm"]), str(row["seed"])


# compare.md of one_seed_runs() as the single-seed code path rendered it before one path served every number of
# seeds (the intervals of the arms are their evaluations' own, the paired ones gra.paired_difference's).
ONE_SEED_MD = """\
### t

Gold judge: vader. GRA counts a tie half; GRA strict counts only a higher score (the paper's definition).

| arm | loss | GRA | 95% CI | GRA strict | strict 95% CI | gold (policy) | gold (SFT start) | pair acc. | annotator acc. | human labels | test prompts |
|---|---|---|---|---|---|---|---|---|---|---|---|
| human | dpo | 0.438 | [0.347, 0.537] | 0.375 | [0.275, 0.487] | 0.338 | 0.250 | 0.600 | - | 300 | 80 |
| ws | dpo | 0.588 | [0.478, 0.694] | 0.550 | [0.438, 0.662] | 0.488 | 0.250 | 0.610 | 0.700 | 90 | 80 |
| cw | dpo | 0.700 | [0.609, 0.787] | 0.650 | [0.543, 0.750] | 0.600 | 0.250 | 0.620 | 0.700 | 90 | 80 |
| human | ipo | 0.438 | [0.338, 0.550] | 0.438 | [0.338, 0.550] | 0.338 | 0.250 | 0.630 | - | 300 | 80 |
| cw | ipo | 0.613 | [0.506, 0.713] | 0.588 | [0.487, 0.688] | 0.513 | 0.250 | 0.640 | 0.700 | 90 | 80 |

### GRA under every judge

| arm | loss | judge | GRA | 95% CI | GRA strict | strict 95% CI | gold (policy) | gold (SFT start) |
|---|---|---|---|---|---|---|---|---|
| human | dpo | vader | 0.438 | [0.347, 0.537] | 0.375 | [0.275, 0.487] | 0.338 | 0.250 |
| human | dpo | textblob | 0.750 | [0.694, 0.806] | 0.500 | [0.388, 0.613] | 0.650 | 0.250 |
| ws | dpo | vader | 0.588 | [0.478, 0.694] | 0.550 | [0.438, 0.662] | 0.488 | 0.250 |
| ws | dpo | textblob | 0.762 | [0.713, 0.819] | 0.525 | [0.425, 0.637] | 0.662 | 0.250 |
| cw | dpo | vader | 0.700 | [0.609, 0.787] | 0.650 | [0.543, 0.750] | 0.600 | 0.250 |
| cw | dpo | textblob | 0.781 | [0.731, 0.831] | 0.562 | [0.463, 0.662] | 0.681 | 0.250 |
| human | ipo | vader | 0.438 | [0.338, 0.550] | 0.438 | [0.338, 0.550] | 0.338 | 0.250 |
| human | ipo | textblob | 0.738 | [0.681, 0.787] | 0.475 | [0.362, 0.575] | 0.638 | 0.250 |
| cw | ipo | vader | 0.613 | [0.506, 0.713] | 0.588 | [0.487, 0.688] | 0.513 | 0.250 |
| cw | ipo | textblob | 0.756 | [0.700, 0.812] | 0.512 | [0.400, 0.625] | 0.656 | 0.250 |

### Paired GRA differences (same prompts, same start responses; 95% bootstrap over prompts)

| loss | contrast | judge | difference | 95% CI | interval excludes 0 | across judges | prompts |
|---|---|---|---|---|---|---|---|
| dpo | cw - human | vader | +0.263 | [+0.125, +0.388] | yes | judge-specific | 80 |
| dpo | cw - human | textblob | +0.031 | [-0.050, +0.113] | no | judge-specific | 80 |
| dpo | cw - ws | vader | +0.113 | [-0.025, +0.244] | no | none | 80 |
| dpo | cw - ws | textblob | +0.019 | [-0.069, +0.106] | no | none | 80 |
| dpo | ws - human | vader | +0.150 | [+0.000, +0.300] | no | none | 80 |
| dpo | ws - human | textblob | +0.013 | [-0.069, +0.087] | no | none | 80 |
| ipo | cw - human | vader | +0.175 | [+0.025, +0.325] | yes | judge-specific | 80 |
| ipo | cw - human | textblob | +0.019 | [-0.075, +0.106] | no | judge-specific | 80 |

across judges: *all judges* = the interval excludes 0 on the same side under every judge; *judge-specific* = it excludes 0 under some judges and not under others (the difference may come from how one judge scores); *judges disagree* = it excludes 0 on opposite sides; *none* = under no judge.
"""


def one_path_document(rows, wins_, title="t"):
    from cwpo_ray.comparison import aggregate, markdown

    seeds = aggregate.seeds_of(rows)
    agg = aggregate.arm_rows(rows, lambda r: wins_.get(r["run_id"]))
    pairs = aggregate.paired_rows(rows, lambda r: wins_.get(r["run_id"]))
    return markdown.document(agg, pairs, rows, seeds, title), agg, pairs


@pytest.mark.parametrize("seed", ["0", None])  # a tagged seed, or an older pipeline's untagged runs
def test_one_seed_is_the_n_equals_1_case_with_the_single_seed_numbers(seed):
    rows, wins_ = one_seed_runs(seed)
    text, agg, pairs = one_path_document(rows, wins_)
    assert text == ONE_SEED_MD
    # The numbers, from gra.py: each arm shows its evaluation's own interval (a bootstrap over its prompts,
    # which is what the interval over seeds reduces to with one seed), not one recomputed here ...
    cw = next(r for r in rows if (r["arm"], r["loss"]) == ("cw", "dpo"))
    x = np.array([wins_["cw-dpo"]["vader"][i] for i in sorted(wins_["cw-dpo"]["vader"])])
    expected = gra_with_ci(x, np.full(x.size, 0.5), n_boot=500, seed=3)
    assert (cw["gra_lo"], cw["gra_hi"]) == (expected["gra_lo"], expected["gra_hi"])
    recomputed = gra_with_ci(x, np.full(x.size, 0.5))
    assert (expected["gra_lo"], expected["gra_hi"]) != (recomputed["gra_lo"], recomputed["gra_hi"]), \
        "the check below would not tell the logged interval from a recomputed one"
    (cw_agg,) = [r for r in agg if (r["arm"], r["loss"]) == ("cw", "dpo")]
    assert {k: cw_agg[k] for k in ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi")} == {
        k: expected[k] for k in ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi")}
    # ... and every paired difference is gra.paired_difference on the prompts both arms share.
    for p in pairs:
        a, b = (wins_[f"{arm}-{p['loss']}"][p["judge"]] for arm in (p["a"], p["b"]))
        ids = sorted(a.keys() & b.keys())
        plain = paired_difference([a[i] for i in ids], [b[i] for i in ids])
        assert (p["diff"], p["lo"], p["hi"]) == pytest.approx((plain["diff"], plain["lo"], plain["hi"]), abs=1e-12)
        assert p["n"] == {seed: plain["n"]} and p["n_seeds"] == 1


def test_an_arm_on_one_seed_of_several_shows_its_own_interval():
    """The n = 1 rule holds row by row: beside arms over two seeds, ws (seed 0 only) shows its evaluation's
    interval, the one its row in the every-seed table shows; the two-seed arms get the hierarchical one."""
    r0, w0 = one_seed_runs("0")
    r1, w1 = one_seed_runs("1")
    rows = sorted(r0 + [r for r in r1 if r["arm"] != "ws"], key=by_loss_arm_seed)
    text, agg, _ = one_path_document(rows, {**w0, **w1})
    ws = next(r for r in rows if r["arm"] == "ws")
    (ws_agg,) = [r for r in agg if r["arm"] == "ws"]
    assert (ws_agg["gra_lo"], ws_agg["gra_hi"]) == (ws["gra_lo"], ws["gra_hi"]) and ws_agg["seeds"] == ["0"]
    assert ws_agg["judges"]["textblob"]["gra_lo"] == ws["judges"]["textblob"]["gra_lo"]
    (cw_agg,) = [r for r in agg if (r["arm"], r["loss"]) == ("cw", "dpo")]
    expected = gra_over_seeds([[w[s][i] for i in sorted(w[s])] for w, s in ((w0["cw-dpo"], "vader"),
                                                                            (w1["cw-dpo-1"], "vader"))])
    assert (cw_agg["gra_lo"], cw_agg["gra_hi"]) == (expected["gra_lo"], expected["gra_hi"])
    assert "| ws | dpo | 1 | 0.588 | [0.478, 0.694] | 0.588 / - |" in text
    assert "| ws | dpo | 0 | 0.588 | [0.478, 0.694] |" in text  # its own row in the every-seed table


def test_pooled_splits_take_each_seeds_numbers_from_its_pooled_prompts():
    """test+test_unseen: no logged figure covers both sets' prompts. Each judge's gold rewards are the
    prompt-weighted mean of the two evaluations'; each seed's row in the every-seed table is computed from
    its pooled wins, not its test evaluation's logged GRA (which the pooled n would mislabel)."""
    from cwpo_ray.comparison.aggregate import each_seed
    from cwpo_ray.comparison.collect import pooled_logged

    m = {"eval/gra": 0.9, "eval/gra_lo": 0.8, "eval/n": 200, "eval/gold_policy": 0.5, "eval/gold_reference": 0.2,
         "eval/textblob.gra": 0.7, "eval/textblob.gold_policy": 0.3,
         "test_unseen/gra": 0.1, "test_unseen/n": 100, "test_unseen/gold_policy": 0.2,
         "test_unseen/gold_reference": 0.5, "test_unseen/textblob.gra": 0.4, "test_unseen/textblob.gold_policy": 0.6}
    main, extra = pooled_logged(m, ["eval", "test_unseen"])
    assert main["gold_policy"] == pytest.approx((0.5 * 200 + 0.2 * 100) / 300)
    assert main["gold_reference"] == pytest.approx((0.2 * 200 + 0.5 * 100) / 300)
    assert main["gra"] is None and main["gra_lo"] is None  # from the wins, never one part's figure
    assert extra["textblob"]["gold_policy"] == pytest.approx((0.3 * 200 + 0.6 * 100) / 300)

    test_part, unseen_part = outcomes(60, 0.7, 0.1, seed=3), outcomes(40, 0.2, 0.1, seed=4)
    wins = {"vader": {**{f"test:{i:03d}": w for i, w in enumerate(test_part)},
                      **{f"test_unseen:{i:03d}": w for i, w in enumerate(unseen_part)}}}
    row = {"arm": "cw", "loss": "dpo", "seed": "0", "split": "test+test_unseen", "judge": "vader", **main}
    (own,) = each_seed([row], lambda r: wins)
    expected = gra_over_seeds([np.concatenate([test_part, unseen_part])])
    for k in ("gra", "gra_lo", "gra_hi", "gra_strict", "gra_strict_lo", "gra_strict_hi"):
        assert own[k] == pytest.approx(expected[k], abs=1e-12), k
    assert own["gra"] == pytest.approx(np.concatenate([test_part, unseen_part]).mean())
    (missing,) = each_seed([row], lambda r: None)  # no responses: nothing to show, not a part's figure
    assert missing["gra"] is None
    logged = dict(row, split="test", gra=0.9)
    assert each_seed([logged], lambda r: wins) == [logged]  # one split: as its evaluation logged it


def test_compare_reads_the_split_it_is_asked_for(tmp_path, mlflow_server):
    """An arm evaluated on the validation prompts (while settings are chosen) and then on the test prompts
    keeps both in one run: compare reports the test evaluation by default and the validation one with
    --split validation, each into its own files; an arm not yet evaluated on the validation split is left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment("cwpo-compare-split")
    parent = client.create_run(exp_id, run_name="pipeline", tags={"stage": "pipeline"}).info.run_id
    human = log_arm(client, exp_id, parent, "human", 0, scores(30, 0), tmp_path, split="validation")
    log_arm(client, exp_id, parent, "human", 0, scores(45, 0), tmp_path, run_id=human)
    cw = log_arm(client, exp_id, parent, "cw", 0, scores(60, 0), tmp_path, split="validation")
    log_arm(client, exp_id, parent, "cw", 0, scores(70, 0), tmp_path, run_id=cw)
    log_arm(client, exp_id, parent, "ws", 0, scores(55, 0), tmp_path)  # test only
    args = ["compare", "--experiment", "cwpo-compare-split", "--parent-run-id", parent, "--out", str(tmp_path / "c")]
    assert cli.main(args) == 0 and cli.main(args + ["--split", "validation"]) == 0
    test, val = ((tmp_path / "c" / name).read_text() for name in ("compare.md", "compare_validation.md"))
    assert "| human | dpo | 0.450 |" in test and "| cw | dpo | 0.700 |" in test and "| ws | dpo | 0.550 |" in test
    assert "| human | dpo | 0.300 |" in val and "| cw | dpo | 0.600 |" in val and "| ws |" not in val
    assert "validation prompts" in val and "validation prompts" not in test
    assert "| validation prompts |" in val and "| test prompts |" in test
    # the paired difference from each split's own per-prompt responses
    assert line_of(test, "| dpo | cw - human | vader |").startswith("| dpo | cw - human | vader | +0.250 |")
    assert line_of(val, "| dpo | cw - human | vader |").startswith("| dpo | cw - human | vader | +0.300 |")
    assert {"compare.md", "compare_validation.md", "compare_validation.png"} <= {
        a.path for a in client.list_artifacts(parent)}


def test_label_budget_pairs_each_fraction_with_the_human_arm_on_shared_prompts():
    """bench/label_budget.py's table: per fraction each weak arm's GRA over seeds and its paired difference
    against the human arm of another pipeline run, on the prompt ids both were judged on."""
    from conftest import bench_module

    lb = bench_module("label_budget")

    # fraction -> seed -> arm -> prompt id -> win; the human arm judged one more prompt ("p9") than the others
    wins = {0.3: {"0": {"human": {"p1": 1.0, "p2": 0.0, "p3": 0.5, "p9": 1.0},
                        "cw": {"p1": 1.0, "p2": 1.0, "p3": 0.5}, "ws": {"p1": 0.0, "p2": 0.0, "p3": 0.0}},
                  "1": {"human": {"p1": 0.0, "p2": 0.0, "p3": 1.0, "p9": 1.0},
                        "cw": {"p1": 1.0, "p2": 0.0, "p3": 1.0}}}}  # ws misses seed 1: left out
    table = lb.budget_table(wins, ["0", "1"], 0.3)
    assert [(r["fraction"], r["arm"]) for r in table] == [(1.0, "human"), (0.3, "cw")]
    human, cw = table
    assert human["gra_per_seed"] == pytest.approx([2.5 / 4, 2 / 4])
    # paired on p1-p3 only: seed 0 cw - human = (0 + 1 + 0) / 3, seed 1 = (1 + 0 + 0) / 3
    assert cw["diff_per_seed"] == pytest.approx([1 / 3, 1 / 3]) and cw["diff"] == pytest.approx(1 / 3)
    assert cw["diff_lo"] <= cw["diff"] <= cw["diff_hi"]
    text = lb.markdown(table, ["0", "1"], "test", "dpo")
    assert "| 0.3 | cw | 0.750 |" in text and "+0.333" in text


def test_label_budget_export_keeps_each_split_and_judge_of_a_seed(tmp_path, mlflow_server):
    """export writes one file per seed of a pipeline run, each arm's wins on every evaluated split (not the
    first split's twice) under every judge; the table reads them back, pooled or per split."""
    from mlflow.tracking import MlflowClient

    from conftest import bench_module

    lb = bench_module("label_budget")
    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment("cwpo-label-budget-export")
    parent = client.create_run(exp_id, run_name="label-budget-0.3", tags={"stage": "pipeline"}).info.run_id
    client.log_metric(parent, "seed0.annotator.gold_accuracy", 0.6)
    client.log_metric(parent, "seed1.annotator.gold_accuracy", 0.7)
    for arm, test_wins, unseen_wins in (("human", 40, 20), ("cw", 70, 50)):
        run = log_arm(client, exp_id, parent, arm, 0, scores(test_wins, 0), tmp_path)
        log_arm(client, exp_id, parent, arm, 0, scores(unseen_wins, 0), tmp_path, split="test_unseen", run_id=run)
    (path,) = lb.export(client, "cwpo-label-budget-export", "label-budget-0.3", 0.3, ["0"], "dpo", tmp_path / "w")
    doc = json.loads(path.read_text())
    assert path.name == "fraction0.3-seed0.json" and doc["run"]["annotator.gold_accuracy"] == 0.6
    assert set(doc["arms"]) == {"human", "cw"} and set(doc["arms"]["cw"]["test"]) == {"vader", "textblob"}
    docs = lb.read_exported(tmp_path / "w", "dpo")
    test = lb.load_wins(docs, "test")[0.3]["0"]
    unseen = lb.load_wins(docs, "test_unseen")[0.3]["0"]
    assert sum(test["cw"].values()) == 70 and sum(unseen["cw"].values()) == 50
    both = lb.load_wins(docs, "test+test_unseen")[0.3]["0"]
    assert len(both["human"]) == 200 and sum(both["human"].values()) == 60
    assert set(lb.load_wins(docs, "test", "textblob")[0.3]["0"]["cw"].values()) == {0.5}
    (human, cw) = lb.budget_table(lb.load_wins(docs, "test+test_unseen"), ["0"], 0.3)
    assert cw["diff"] == pytest.approx((120 - 60) / 200)
    row = line_of(lb.per_seed_markdown(docs), "| 0 | 0.3 |")
    assert "| 0.600 (-) |" in row and row.endswith("| 0.400 / 0.200 |  | 0.700 / 0.500 |")  # no ws arm


def test_pooled_wins_keep_the_first_splits_judge_order():
    """The pooled tables list judges as each split's evaluation did (the main judge first): an order taken
    from a set varied with the hash seed from one `cwpo compare` to the next. Ids are prefixed by split."""
    from cwpo_ray.comparison.collect import pooled_wins

    judges = ["vader", "textblob", "j2", "j3", "j4", "j5", "j6", "j7"]
    test = {j: {"1": 1.0, "2": 0.0} for j in judges}
    unseen = {j: {"1": 0.5} for j in reversed(judges + ["only_unseen"])}
    pooled = pooled_wins(["test", "test_unseen"], [test, unseen])
    assert list(pooled) == judges
    assert pooled["vader"] == {"test:1": 1.0, "test:2": 0.0, "test_unseen:1": 0.5}
    assert pooled_wins(["test", "test_unseen"], [test, None]) is None
