"""The annotator's epoch count chosen by k-fold cross-validation, and its calibrated confidence."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from cwpo_ray import calibration
from cwpo_ray.annotator import load_annotator
from cwpo_ray.cli import main
from cwpo_ray.annotator_training.rounds import chosen_epochs, plan_rounds
from cwpo_ray.config import ConfigError
from cwpo_ray.recipes.train_annotator import Settings
from cwpo_ray.tables import write_table


def overconfident(n: int, temperature: float, seed: int = 0) -> np.ndarray:
    """Margins of an annotator whose true odds are sigma(|m| / temperature): over-confident for T > 1."""
    rng = np.random.default_rng(seed)
    m = np.abs(rng.normal(0, 3, n))
    right = rng.random(n) < calibration.sigmoid(m / temperature)
    return np.where(right, m, -m)


def test_temperature_scaling_lowers_ece_of_an_overconfident_annotator():
    margins = overconfident(4000, temperature=3.0)
    t = calibration.fit_temperature(margins)
    assert 2.5 < t < 3.5
    assert calibration.ece(margins / t) < calibration.ece(margins) / 3
    assert calibration.bt_loss(margins / t) < calibration.bt_loss(margins)
    # a calibrated annotator is left (nearly) alone
    assert 0.85 < calibration.fit_temperature(overconfident(4000, temperature=1.0, seed=1)) < 1.15


def test_temperature_never_changes_which_response_is_chosen():
    margins = overconfident(500, temperature=2.0)
    for t in (0.3, 1.0, 2.7):
        conf = calibration.calibrated_confidence(margins, t)
        assert np.all((conf >= 0) & (conf <= 1))
        # the same order of confidence, so topk:F keeps the same pairs, and the call is the margin's sign
        assert np.array_equal(np.argsort(np.abs(margins), kind="stable"), np.argsort(conf, kind="stable"))
    assert np.allclose(calibration.calibrated_confidence(margins, 1.0), calibration.confidence_of(margins))


def test_accuracy_interval_says_when_an_annotator_has_not_learned():
    lo, hi = calibration.wilson_interval(16, 28)  # 57% on 28 held-out pairs: not distinguishable from chance
    assert lo < 0.5 < hi
    lo, hi = calibration.wilson_interval(190, 300)  # 63% on 300 out-of-fold pairs: it has
    assert lo > 0.5


def test_folds_hold_every_pair_out_exactly_once():
    rows = [{"id": f"p{i}"} for i in range(200)]
    rounds = plan_rounds(rows, Settings(folds=5, epochs=3), seed=0)
    assert [r.name for r in rounds] == ["fold-0", "fold-1", "fold-2", "fold-3", "fold-4", "refit"]
    held = sorted(i for r in rounds[:-1] for i in r.heldout)
    assert held == list(range(200))
    for r in rounds[:-1]:
        assert not set(r.train) & set(r.heldout) and len(r.train) + len(r.heldout) == 200
    assert rounds[-1].train == list(range(200)) and rounds[-1].saves and not rounds[-1].heldout
    # the epoch count with the lowest pooled out-of-fold loss: epoch 2 here
    oof = {"fold-0": [[0.1, -0.2], [1.0, 0.5], [2.0, -3.0]], "fold-1": [[0.0], [0.8], [0.9]]}
    assert chosen_epochs(oof) == 2
    # Epoch 2 is right on 4 of 5 pairs but overconfident: the raw loss prefers epoch 1 (3 of 5, timid),
    # the loss after a fitted temperature (what calibration leaves of it) prefers epoch 2.
    oof = {"fold-0": [[0.3, 0.3, 0.3, -0.3, -0.3], [8.0, 8.0, 8.0, 8.0, -8.0]]}
    assert chosen_epochs(oof) == 1 and chosen_epochs(oof, calibrated=True) == 2


def test_a_round_smaller_than_one_batch_is_refused_before_training():
    """An epoch drops its incomplete global batch (step_plan): a fold with fewer training pairs than
    batch_size would train nothing, so the plan refuses it, naming the round, before any worker starts."""
    rows = [{"id": f"p{i}"} for i in range(40)]
    assert plan_rounds(rows, Settings(folds=5, batch_size=16), seed=0)  # ~32 training pairs per fold
    with pytest.raises(ConfigError, match=r"round fold-\d has \d+ training pairs, fewer than one batch of 48"):
        plan_rounds(rows, Settings(folds=5, batch_size=48), seed=0)


def test_kfold_training_chooses_epochs_refits_calibrates_and_resumes(ray_cluster, mlflow_server, tiny_decoder,
                                                                     tmp_path):
    """k-fold under DeepSpeed ZeRO-2 on two workers with a decoder backbone (last-token pooling), one
    worker killed in fold 0: the annotator's DeepSpeed path, its restart, the epoch choice and the fold
    models kept for the ensemble in one run (the learning bar is the DDP test's, in test_annotator.py)."""
    from test_annotator import close_pairs
    from tiny_models import synthetic_pairs

    data = tmp_path / "labeled.parquet"
    rows = synthetic_pairs(60, seed=1) + close_pairs(60, seed=2)
    # one label in six flipped, as human labels are noisy: no annotator gets every held-out call right,
    # so the temperature has a finite optimum to fit
    rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 6 == 0 else r for i, r in enumerate(rows)]
    write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "annotator"
    assert main(["train-annotator", "--data", str(data), "--model", str(tiny_decoder), "--out", str(out),
                 "--lr", "2e-3", "--batch-size", "16", "--num-workers", "2", "--strategy", "deepspeed",
                 "--zero-stage", "2", "--epochs", "2", "--folds", "3", "--storage-path", str(tmp_path / "ray"),
                 "--no-progress", "--run-name", "kfold-test", "--keep-fold-models",
                 "fail_at_epoch=1"]) == 0  # a worker dies once, in the middle of fold 0
    report = json.loads((out / "eval.json").read_text())
    rounds = [(h["round"], h["epoch"]) for h in report["history"]]
    folds = [(f"fold-{f}", e) for f in range(3) for e in (1, 2)]
    assert rounds[:6] == folds, rounds
    best = report["best"]
    assert rounds[6:] == [("refit", e) for e in range(1, best["epoch"] + 1)]
    assert best["n"] == len(rows)  # every labeled pair scored out of fold
    pooled = {e: [h["heldout_bt_loss"] for h in report["history"] if h["round"] != "refit" and h["epoch"] == e]
              for e in (1, 2)}
    assert best["epoch"] in (1, 2) and best["accuracy_lo"] <= best["accuracy"] <= best["accuracy_hi"]
    cal = report["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] != 1.0 and cal["pairs"] == len(rows)
    assert calibration.fit_temperature(report["heldout_margins"]) == pytest.approx(cal["temperature"])
    annotator = load_annotator(out)
    assert annotator.meta.temperature == pytest.approx(cal["temperature"]) and annotator.meta.pooling == "last"
    rewards, _ = annotator.score(["Tell me about cats."] * 2, ["cats are great.", "cats are awful."])
    assert all(np.isfinite(rewards))
    assert (out / "reliability_calibrated.png").stat().st_size > 1000
    assert pooled[1] and pooled[2]
    # the worker failure was recovered from fold 0's epoch-1 checkpoint, and MLflow says so
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("cwpo").experiment_id],
                                "tags.mlflow.runName = 'kfold-test'")
    assert run.data.metrics["resumed_after_epoch"] == 1
    # the fold models kept for `confidence: ensemble`, saved under ZeRO-2 and through the restart
    from test_ensemble_confidence import check_kept_fold_models

    check_kept_fold_models(out, rows, 3, client, run)


def learned_test_power():
    """bench/learned_test_power.py, whose noise model (labels 67.5% right, the built-in benchmark's) the
    tests below share with the rates it publishes."""
    from conftest import bench_module

    return bench_module("learned_test_power")


def test_pipeline_says_learned_not_shown_or_warns_by_what_the_labeled_pairs_show(capsys):
    """A useful annotator scored against labels that are themselves ~67% right has plain accuracy near
    0.55 (its Wilson interval includes 0.5 at 280 pairs), yet it is right more often where it is sure:
    "learned". One whose test misses (seed 3 of the six-seed run: p = 0.115, yet 0.66 against the gold
    judge) gets a note, not the warning. One whose calls lean wrong gets the warning."""
    from cwpo_ray.orchestration.stages import warn_if_annotator_did_not_learn

    noisy_label_margins = learned_test_power().noisy_label_margins
    rng = np.random.default_rng(0)
    summary = calibration.summarize(noisy_label_margins(rng, 0.35, 280))
    assert summary["accuracy_lo"] <= 0.5 < summary["accuracy"] < 0.6  # the first warning's case
    assert summary["confident_third_accuracy"] > summary["other_accuracy"] and summary["learned_p"] < 0.05
    warn_if_annotator_did_not_learn({f"annotator.heldout_{k}": v for k, v in summary.items()}, seed=0)
    out = capsys.readouterr().out
    assert "WARNING" not in out and "annotator (seed 0) learned" in out

    seed3 = {"annotator.heldout_accuracy": 0.524, "annotator.heldout_confident_third_accuracy": 0.521,
             "annotator.heldout_other_accuracy": 0.526, "annotator.heldout_learned_p": 0.115, "annotator.heldout_n": 262}
    warn_if_annotator_did_not_learn(seed3, seed=3)
    out = capsys.readouterr().out
    assert "!!!" not in out and "WARNING" not in out
    assert "annotator (seed 3): its 262 labeled pairs do not show that it learned" in out and "p = 0.115" in out

    wrong = {f"annotator.heldout_{k}": v for k, v in calibration.summarize(noisy_label_margins(rng, -0.2, 280)).items()}
    assert wrong["annotator.heldout_learned_p"] >= calibration.LEANS_WRONG_P
    warn_if_annotator_did_not_learn(wrong, seed=1)
    out = capsys.readouterr().out
    assert "!!! WARNING (seed 1): no sign that the annotator learned" in out and "signed-rank p = " in out


def test_the_warning_rarely_fires_on_a_useful_annotator_and_often_on_one_at_chance():
    """The rule's rates at the benchmark's size (280 labeled pairs, labels 67.5% right): an annotator 0.64
    right against the gold judge fails the p < 0.05 test about a third of the time (why that is not the
    warning), but gets the warning a few times in a hundred; one at chance gets it about half the time."""
    rates = learned_test_power().verdict_rates
    rng = np.random.default_rng(2)
    useful, chance = (rates(shift, 280, 0.325, 300, rng) for shift in (0.36, 0.0))  # gold accuracy 0.64, 0.5
    assert 0.2 < useful["not shown"] < 0.5  # the p < 0.05 test misses it often
    assert useful["no sign"] < 0.07
    assert chance["no sign"] > 0.4 and chance["learned"] < 0.09
    assert calibration.learned_verdict(float("nan")) == "no sign"  # too few pairs to test


def test_the_signed_rank_test_rejects_chance_at_its_nominal_rate():
    rng = np.random.default_rng(1)
    p = np.array([calibration.learned_p_value(rng.normal(0.0, 1.0, 200)) for _ in range(400)])
    assert 0.02 < (p < 0.05).mean() < 0.09
    assert np.isnan(calibration.learned_p_value([1.0, -1.0, 2.0]))


def test_the_cw_raw_arm_weighs_by_the_uncalibrated_confidence():
    from cwpo_ray.orchestration.stages import arm_inputs
    from cwpo_ray.weighting import confidence_column, pair_weights, parse_weighting

    tables = {"annotated": "A.parquet"}
    assert arm_inputs("cw", tables) == ("A.parquet", "confidence")
    assert arm_inputs("cw_raw", tables) == ("A.parquet", "confidence_raw")
    assert parse_weighting("confidence_raw") == ("confidence", None)
    assert confidence_column("confidence_raw") == "confidence_raw" and confidence_column("topk:0.3") == "confidence"
    assert pair_weights([0.2, 0.4], "confidence_raw", 2) == ([0, 1], [0.2, 0.4])
