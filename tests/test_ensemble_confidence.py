"""confidence: ensemble -- the k fold models train-annotator keeps (keep_fold_models), labeling together in
`cwpo annotate`, and the cw_ens arm of the pipeline that trains on their labels."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from cwpo_ray.annotation.ensemble import ensemble_labels
from cwpo_ray.annotator import load_annotator, new_annotator, save_annotator
from cwpo_ray.cli import main
from cwpo_ray.models import ModelSource
from cwpo_ray.tables import read_table, write_table


# ----------------------------------------------------------------------------- the math (pure)

def test_ensemble_label_is_the_mean_fold_margin_calibrated_by_t():
    # 3 folds x 3 pairs. Fold margins ra - rb: pair 0 [2, 1, 3] (all for a), pair 1 [-1, -0.5, -2.5]
    # (all for b), pair 2 [1, -2, 1]: a mean of exactly 0, which goes to a, with one fold of three against.
    ra = np.array([[2.0, 0.0, 1.0], [1.0, 0.5, 0.0], [3.0, -2.0, 2.0]])
    rb = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.5, 1.0]])
    out = ensemble_labels(ra, rb, temperature=2.0)
    margin = np.array([2.0, -4 / 3, 0.0])
    assert out["reward_a"] == pytest.approx(ra.mean(axis=0)) and out["reward_b"] == pytest.approx(rb.mean(axis=0))
    assert np.subtract(out["reward_a"], out["reward_b"]) == pytest.approx(margin)
    assert out["preferred"] == ["a", "b", "a"]  # a tie goes to a, as a single annotator's does
    assert out["confidence"] == pytest.approx(2 * (1 / (1 + np.exp(-np.abs(margin) / 2.0)) - 0.5))
    assert out["confidence_raw"] == pytest.approx(np.tanh(np.abs(margin) / 2))
    assert out["fold_disagreement"] == pytest.approx([0.0, 0.0, 1 / 3])
    assert out["fold_margin_std"] == pytest.approx(np.std([[2, -1, 1], [1, -0.5, -2], [3, -2.5, 1]], axis=0))
    # one fold: the single annotator's label and confidence
    one = ensemble_labels(ra[:1], rb[:1], 2.0)
    assert one["preferred"] == ["a", "b", "a"] and one["fold_disagreement"] == [0.0, 0.0, 0.0]
    assert one["confidence"] == pytest.approx(np.tanh(np.abs(ra[0] - rb[0]) / 4))
    with pytest.raises(ValueError, match="k x n"):
        ensemble_labels(ra[0], rb[0], 1.0)


# ----------------------------------------------------------------------------- annotate --confidence ensemble

def fold_layout(tiny_encoder, root, k: int = 3, temperature: float = 2.5):
    """An annotator folder with k fold models as train-annotator leaves it, made by the same step that
    makes it there (fold_models.keep_chosen) from per-epoch folders of fresh annotators (random heads)."""
    from cwpo_ray.annotator_training.fold_models import epoch_dir, keep_chosen

    store, staging = root / "store", root / "annotator"
    for f in range(k):
        for epoch in (1, 2) if f == 0 else (2,):  # fold 0's epoch 1: a model that is not chosen
            torch.manual_seed(10 * f + epoch)
            ann = new_annotator(ModelSource(str(tiny_encoder)), max_length=32)
            with torch.no_grad():
                ann.model.head.weight.mul_(50)  # margins of a few hundredths, not a fresh head's ten-thousandths
            ann.meta.metrics = {"epoch": epoch}
            save_annotator(ann, epoch_dir(store, f"fold-{f}", epoch))
    torch.manual_seed(99)
    save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), staging)
    meta = json.loads((staging / "annotator.json").read_text())
    (staging / "annotator.json").write_text(json.dumps({**meta, "temperature": temperature}))
    (staging / "eval.json").write_text(json.dumps({"best": {"epoch": 2}, "heldout_margins": []}))
    keep_chosen(store, staging, k)
    return staging


def unlabeled(n: int) -> list[dict]:
    from tiny_models import NEGATIVE, POSITIVE, TOPICS

    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        rows.append({"id": f"u{i}", "prompt": f"Tell me about {t}.",
                     "response_a": f"{t} are {POSITIVE[i % 10]} {NEGATIVE[(i * 3) % 10]}.",
                     "response_b": f"{t} are {NEGATIVE[i % 10]} {POSITIVE[(i * 7) % 10]} {POSITIVE[(i + 1) % 10]}.",
                     "human_choice": "ab"[i % 2]})
    return rows


def test_annotate_ensemble_is_the_mean_of_the_fold_annotators(ray_cluster, tiny_encoder, tmp_path, capsys):
    from cwpo_ray.annotation.units import fingerprint, input_files, prepare_work
    from cwpo_ray.recipes import annotate

    folder = fold_layout(tiny_encoder, tmp_path)
    names = sorted(p.name for p in (folder / "folds").iterdir())
    assert names == ["fold-0", "fold-1", "fold-2"] and not (tmp_path / "store").exists()
    meta = json.loads((folder / "annotator.json").read_text())
    assert meta["fold_models"]["folds"] == names and meta["fold_models"]["epoch"] == 2
    members = [load_annotator(folder / "folds" / n) for n in names]
    assert all(m.meta.temperature == 2.5 and m.meta.metrics == {"epoch": 2} for m in members)

    rows = unlabeled(24)
    data = tmp_path / "unlabeled.parquet"
    write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "out"
    assert main(["annotate", "--data", str(data), "--annotator", str(folder), "--out", str(out), "--num-actors", "1",
                 "--confidence", "ensemble"]) == 0
    got = {r["id"]: r for r in read_table(out / "annotated.parquet").to_pylist()}
    assert len(got) == len(rows)

    # the same pairs scored here, fold by fold, with load_annotator (both responses in one call, as the
    # actor batches them: other batches pad otherwise, which moves the last float digits)
    prompts, n = [r["prompt"] for r in rows], len(rows)
    both = np.array([m.score(prompts * 2, [r["response_a"] for r in rows] + [r["response_b"] for r in rows])[0]
                     for m in members])
    ra, rb = both[:, :n], both[:, n:]
    margin = (ra - rb).mean(axis=0)
    clear = np.abs(margin) > 1e-4  # a near-tie's label may flip with float rounding: its margin is checked
    assert clear.sum() >= n - 2
    for r, m, a, b, sure in zip(rows, margin, ra.mean(axis=0), rb.mean(axis=0), clear):
        g = got[r["id"]]
        if not sure:
            assert g["reward_chosen"] - g["reward_rejected"] == pytest.approx(abs(m), abs=1e-5)
            continue
        assert g["chosen"] == (r["response_a"] if m >= 0 else r["response_b"])
        assert g["reward_chosen"] - g["reward_rejected"] == pytest.approx(abs(m), abs=1e-5)
        assert (g["reward_chosen"], g["reward_rejected"]) == pytest.approx((a, b) if m >= 0 else (b, a), abs=1e-5)
        assert g["confidence"] == pytest.approx(2 * (1 / (1 + np.exp(-abs(m) / 2.5)) - 0.5), abs=1e-5)
        assert g["confidence_raw"] == pytest.approx(np.tanh(abs(m) / 2), abs=1e-5)
        assert "ensemble" in g["annotator"] and str(folder.resolve()) in g["annotator"]
    report = json.loads((out / "report.json").read_text())
    fold = ra - rb
    chose_a = np.array([got[r["id"]]["chosen"] == r["response_a"] for r in rows])  # the actor's call, near-ties too
    against = np.where(chose_a, fold < 0, fold > 0).mean(axis=0)
    assert report["confidence"] == "ensemble" and report["ensemble"]["pairs"] == len(rows)
    assert report["ensemble"]["mean_fold_disagreement"] == pytest.approx(against.mean(), abs=1e-6)
    assert report["ensemble"]["unanimous_share"] == pytest.approx((against == 0).mean(), abs=1e-6)
    assert report["ensemble"]["mean_fold_margin_std"] == pytest.approx(fold.std(axis=0).mean(), abs=1e-5)
    assert "human_agreement" in report

    # the confidence is in the run's fingerprint: a work folder of a single run is not resumed by an
    # ensemble run (nor the other way); a single run's fingerprint is what it was before the option
    files = input_files(str(data))
    single = annotate.Config(data=str(data), annotator=str(folder), out=str(tmp_path / "fp"))
    ens = annotate.Config(data=str(data), annotator=str(folder), out=str(tmp_path / "fp"), confidence="ensemble")
    assert annotate.run_fingerprint(single, files) == fingerprint(single, files)
    assert annotate.run_fingerprint(ens, files)["settings"]["confidence"] == "ensemble"
    assert prepare_work(tmp_path / "fp", annotate.run_fingerprint(single, files))[1] == "fresh"
    assert prepare_work(tmp_path / "fp", annotate.run_fingerprint(ens, files))[1].startswith("starting over")

    # an annotator without fold models: refused in one line that says what to do
    plain = tmp_path / "plain"
    save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), plain)
    capsys.readouterr()
    assert main(["annotate", "--data", str(data), "--annotator", str(plain), "--out", str(tmp_path / "o2"),
                 "--confidence", "ensemble"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no fold models" in err and "--keep-fold-models" in err
    assert not (tmp_path / "o2").exists()


def test_keep_fold_models_needs_folds():
    from cwpo_ray.recipes.train_annotator import Config

    with pytest.raises(ValueError, match="keep_fold_models needs folds > 1"):
        Config(data="d", out="o", folds=1, keep_fold_models=True).validate()


# ----------------------------------------------------------------------------- train-annotator --keep-fold-models

def check_kept_fold_models(out, rows: list[dict], k: int, client, run) -> None:
    """What train-annotator --keep-fold-models leaves (called by test_annotator_selection's k-fold test,
    whose one run under DeepSpeed with a killed worker covers this too): exactly k fold models, each at
    the chosen epoch count, each scoring its held-out fold as the out-of-fold margins that chose the
    epoch count and fit T recorded; the per-epoch store gone; MLflow gets the list, not the weights."""
    from cwpo_ray.annotator_training.rounds import plan_rounds
    from cwpo_ray.recipes.train_annotator import Settings

    report = json.loads((out / "eval.json").read_text())
    epoch, t = report["best"]["epoch"], report["calibration"]["temperature"]
    names = [f"fold-{f}" for f in range(k)]
    assert sorted(p.name for p in (out / "folds").iterdir()) == names
    assert not list(out.parent.glob(".annotator.staging-*"))  # the per-epoch store is gone
    meta = json.loads((out / "annotator.json").read_text())
    assert meta["fold_models"] == report["fold_models"]
    assert meta["fold_models"]["folds"] == names and meta["fold_models"]["epoch"] == epoch

    heldout = [spec.heldout for spec in plan_rounds(rows, Settings(folds=k), seed=0)[:k]]
    pooled, start = report["heldout_margins"], 0  # fold 0's held-out pairs, then fold 1's, ...
    for f, idx in enumerate(heldout):
        folder = out / "folds" / f"fold-{f}"
        fold_eval = json.loads((folder / "eval.json").read_text())
        assert fold_eval["epoch"] == epoch and fold_eval["heldout_ids"] == [rows[i]["id"] for i in idx]
        ann = load_annotator(folder)
        assert ann.meta.temperature == pytest.approx(t) and ann.meta.metrics["epoch"] == epoch
        assert ann.meta.metrics["n"] == len(idx)
        prompts = [rows[i]["prompt"] for i in idx]
        chosen, _ = ann.score(prompts, [rows[i]["chosen"] for i in idx])
        rejected, _ = ann.score(prompts, [rows[i]["rejected"] for i in idx])
        margins = np.subtract(chosen, rejected)
        assert margins == pytest.approx(pooled[start: start + len(idx)], abs=1e-5)
        assert margins == pytest.approx(fold_eval["heldout_margins"], abs=1e-5)
        start += len(idx)
    assert start == len(pooled) == len(rows)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "annotator")}
    assert "annotator/fold_models.json" in logged and "annotator/folds" not in logged


# ----------------------------------------------------------------------------- the pipeline's wiring

def test_the_pipeline_runs_annotate_ensemble_only_for_cw_ens(tmp_path, monkeypatch):
    """Which annotator and annotate stages a pipeline runs, with what, for which arms (the stages' own
    work recorded, not run: each is tested above and in test_annotator.py)."""
    from cwpo_ray import arms
    from cwpo_ray.config import to_dict
    from cwpo_ray.fingerprints import fingerprint
    from cwpo_ray.orchestration.stages import arm_inputs
    from cwpo_ray.recipes import pipeline

    calls = []

    def run_annotator(cfg, labeled, out, parent_run_id, keep_fold_models=False):
        calls.append(("annotator", keep_fold_models))
        return {"annotator": str(out), "metrics": {}}

    def run_annotate(cfg, unlabeled, annotator, out, confidence="single"):
        calls.append((out.name, confidence))
        return {"annotated": str(out / "annotated.parquet"), "metrics": {f"{out.name}.m": 1.0}}

    monkeypatch.setattr(pipeline, "run_annotator", run_annotator)
    monkeypatch.setattr(pipeline, "run_annotate", run_annotate)
    tables = {"labeled": "L", "unlabeled": "U"}

    def stages(arm_list, out):
        calls.clear()
        cfg = pipeline.Config(arms=arm_list)
        return pipeline.run_weak_label_stages(cfg, tmp_path / out, tables, "fp-data", "parent"), calls[:]

    (t_cw, fps_cw, _), called = stages(["human", "cw"], "a")
    assert called == [("annotator", False), ("annotate", "single")]
    # without cw_ens the annotator's fingerprint is what it was before the ensemble existed: runs reuse it
    cfg = pipeline.Config()
    fp_ann = fingerprint("annotator", "fp-data", to_dict(cfg.annotator))
    marker = json.loads((tmp_path / "a" / "annotator" / ".stage.json").read_text())
    assert marker["fingerprint"] == fp_ann
    assert fps_cw == {arms.WEAK_LABELS: fingerprint("annotate", fp_ann, to_dict(cfg.annotate))}

    (t_both, fps_both, metrics), called = stages(["cw", "cw_ens"], "b")
    assert called == [("annotator", True), ("annotate", "single"), ("annotate-ensemble", "ensemble")]
    assert set(fps_both) == {arms.WEAK_LABELS, arms.ENSEMBLE_LABELS} and fps_both[arms.WEAK_LABELS] != fps_cw[
        arms.WEAK_LABELS]  # the annotator keeps its folds now: a new one, so cw's labels are new too
    assert arm_inputs("cw_ens", t_both) == (str(tmp_path / "b" / "annotate-ensemble" / "annotated.parquet"),
                                            "confidence")
    assert arm_inputs("cw", t_both) == (str(tmp_path / "b" / "annotate" / "annotated.parquet"), "confidence")
    assert metrics == {"annotate.m": 1.0, "annotate-ensemble.m": 1.0}

    _, called = stages(["cw_ens"], "c")
    assert called == [("annotator", True), ("annotate-ensemble", "ensemble")]
    _, called = stages(["cw", "cw_ens"], "b")  # done already: both stages reused
    assert called == []


def test_compare_shows_cw_ens_against_cw(tmp_path, mlflow_server):
    """cw_ens - cw among compare's paired differences, and beside each arm the accuracy of the labels it
    read (the ensemble's for cw_ens)."""
    from mlflow.tracking import MlflowClient
    from test_compare_seeds import line_of, log_arm, scores

    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment("cwpo-compare-ens")
    parent = client.create_run(exp_id, run_name="pipeline", tags={"stage": "pipeline"}).info.run_id
    client.log_metric(parent, "annotator.gold_accuracy", 0.6)
    client.log_metric(parent, "annotator_ensemble.gold_accuracy", 0.7)
    log_arm(client, exp_id, parent, "cw", 0, scores(50, 0), tmp_path)
    log_arm(client, exp_id, parent, "cw_ens", 0, scores(60, 0), tmp_path)
    assert main(["compare", "--experiment", "cwpo-compare-ens", "--parent-run-id", parent,
                 "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    line = line_of(table, "| dpo | cw_ens - cw | vader |")
    assert float(line.split("|")[4]) == pytest.approx(0.1)
    header = line_of(table, "| arm | loss | GRA |").split("|")
    col = [c.strip() for c in header].index("annotator acc.")
    assert line_of(table, "| cw | dpo | 0.500 |").split("|")[col].strip() == "0.600"
    assert line_of(table, "| cw_ens | dpo | 0.600 |").split("|")[col].strip() == "0.700"
