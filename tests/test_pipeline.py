"""Judges, evaluation metrics, the benchmark builder, `cwpo evaluate`, and the whole pipeline on
tiny models (real Ray cluster, real MLflow server), then `cwpo compare` from its MLflow run."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cwpo_ray import cli
from cwpo_ray.gra import (bootstrap_ci, gra, gra_with_ci, implicit_reward_accuracy, paired_difference,
                                   wins)
from cwpo_ray.judges import load_judge
from cwpo_ray.recipes import build_benchmark as bb
from cwpo_ray.tables import read_table, write_table


REPO = Path(__file__).resolve().parent.parent


def length_judge(pairs):
    """A judge for load_judge("test_pipeline:length_judge"): longer responses are better."""
    return [float(len(r)) for _, r in pairs]


# ----------------------------------------------------------------------------- judges

def test_vader_judge_hand_values():
    judge = load_judge("vader")
    scores = judge([("q", "good"), ("q", "This is terrible."), ("q", "The table is in the room.")])
    assert scores[0] == pytest.approx(0.4404)  # VADER's published compound score of "good"
    assert scores[1] < 0
    assert scores[2] == 0.0


def test_load_judge_callable_and_errors():
    judge = load_judge("test_pipeline:length_judge")
    assert judge([("p", "abc"), ("p", "")]) == [3.0, 0.0]
    with pytest.raises(ModuleNotFoundError):
        load_judge("no_such_module_xyz:fn")


def test_reward_model_judge_reads_logit_zero(tiny_encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=1)
    model.save_pretrained(tmp_path)
    for f in tiny_encoder.glob("*token*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    scores = load_judge(str(tmp_path))([("tell me about cats", "cats are great"), ("hi", "bad")])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]


# ----------------------------------------------------------------------------- metrics

def test_gra_ties_count_half():
    assert wins([1, 2, 3], [0, 2, 4]).tolist() == [1.0, 0.5, 0.0]
    assert gra([1, 2, 3], [0, 2, 4]) == 0.5
    assert gra([1, 1], [0, 0]) == 1.0
    with pytest.raises(ValueError):
        gra([1], [1, 2])


def test_bootstrap_ci_hand_values():
    assert bootstrap_ci([0.7] * 50) == pytest.approx((0.7, 0.7))  # no spread, no interval
    lo, hi = bootstrap_ci([0, 1] * 100, seed=1)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(200), abs=0.03)
    assert bootstrap_ci([0, 1] * 100, seed=1) == (lo, hi)  # seeded
    r = gra_with_ci([1, 0, 1, 1], [0, 0, 0, 0])
    assert r["gra"] == 0.875 and r["n"] == 4 and r["gra_lo"] <= 0.875 <= r["gra_hi"]


def test_paired_difference_resamples_prompts_together():
    same = paired_difference([1, 0, 0.5, 1], [1, 0, 0.5, 1])
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 4}  # same outcomes: no difference, no spread
    assert paired_difference([1, 1, 0, 0.5], [0, 1, 0, 0.5])["diff"] == 0.25
    # Arm a wins exactly where b wins, plus 20 prompts more: every resample shows a ahead, although
    # a's and b's own intervals (about +-0.07 each at n=200) overlap.
    rng = np.random.default_rng(0)
    b = (rng.random(200) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:20]] = 1.0
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx(0.1) and 0 < d["lo"] <= 0.1 <= d["hi"]
    assert gra_with_ci(a, np.zeros(200) + 0.5)["gra_lo"] < gra_with_ci(b, np.zeros(200) + 0.5)["gra_hi"]
    with pytest.raises(ValueError, match="different prompts"):
        paired_difference([1, 0], [1])


def test_implicit_reward_accuracy():
    # margins: (0-(-1)) - (0-0) = 1 > 0; (0-0) - (0-0) = 0 -> half; (-2-0) - (0-0) < 0
    assert implicit_reward_accuracy([0, 0, -2], [0, 0, 0], [-1, 0, 0], [0, 0, 0]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- benchmark builder

def test_prompts_are_distinct_and_seeded():
    a = bb.make_prompts(500, seed=3)
    assert len(set(a)) == 500 and a == bb.make_prompts(500, seed=3) and a != bb.make_prompts(500, seed=4)


def test_human_noise_is_tuned_to_the_target():
    rng = np.random.default_rng(0)
    ga, gb = rng.uniform(-1, 1, 2000), rng.uniform(-1, 1, 2000)
    u = rng.random(2000)
    t = bb.tune_temperature(ga, gb, u, 0.675)
    assert bb.agreement(ga, gb, u, t) == pytest.approx(0.675, abs=2 / 2000)
    assert bb.agreement(ga, gb, u, t / 10) > bb.agreement(ga, gb, u, t * 10)  # more noise, less agreement
    choices = bb.human_choices(ga, gb, u, 1e-6)  # no noise: humans follow gold
    assert all((c == "a") == (x > y) for c, x, y in zip(choices, ga, gb))


def test_build_benchmark_tiny(tiny_decoder, tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["build-benchmark", "--out", str(out), "--model", str(tiny_decoder), "--num-prompts", "16",
                     "--test-prompts", "4", "--max-new-tokens", "8", "--batch-size", "8"]) == 0
    pairs, test = read_table(out / "pairs.parquet").to_pylist(), read_table(out / "test.parquet").to_pylist()
    report = json.loads((out / "_benchmark.json").read_text())
    assert len(test) == 4 and len(pairs) == report["train_pairs"] >= 8
    assert set(pairs[0]) == {"id", "prompt", "response_a", "response_b", "human_choice", "gold_a", "gold_b"}
    assert all(r["gold_chosen"] >= r["gold_rejected"] for r in test)
    assert not (out / "_generations.jsonl").exists()
    # `cwpo data` reads the folder: pairs -> labeled/unlabeled, test.parquet -> test
    assert cli.main(["data", "--source", f"pairs:{out}", "--out", str(tmp_path / "data")]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["counts"]["test"] == 4 and manifest["counts"]["quarantined"] == 0


# ----------------------------------------------------------------------------- evaluate

def synthetic_benchmark(folder, n_train: int = 48, n_test: int = 12, seed: int = 0):
    """A pairs: table with hidden human labels and gold scores, and a test table."""
    from tiny_models import synthetic_pairs

    judge = load_judge("vader")
    rng = random.Random(seed)
    rows = []
    for r in synthetic_pairs(n_train, seed=seed):
        a, b = (r["chosen"], r["rejected"]) if rng.random() < 0.5 else (r["rejected"], r["chosen"])
        ga, gb = judge([(r["prompt"], a), (r["prompt"], b)])
        human = ("a" if ga > gb else "b") if rng.random() < 0.8 else ("b" if ga > gb else "a")
        rows.append({"id": r["id"], "prompt": r["prompt"], "response_a": a, "response_b": b, "human_choice": human,
                     "gold_a": ga, "gold_b": gb})
    folder.mkdir(parents=True, exist_ok=True)
    write_table(pa.Table.from_pylist(rows), folder / "pairs.parquet")
    test = [dict(r, id=f"t-{r['id']}") for r in synthetic_pairs(n_test, seed=seed + 100)]
    write_table(pa.Table.from_pylist(test), folder / "test.parquet")
    return folder


def test_evaluate_policy_against_itself_is_exactly_half(tiny_decoder, tmp_path):
    bench = synthetic_benchmark(tmp_path / "bench", n_train=4, n_test=10)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--policy", str(tiny_decoder), "--reference", str(tiny_decoder),
                     "--prompts", str(bench / "test.parquet"), "--out", str(out), "--max-new-tokens", "6",
                     "--batch-size", "4", "--engine", "transformers"]) == 0
    m = json.loads((out / "eval.json").read_text())["metrics"]
    # Same model, same seed: identical responses, every prompt a tie; identical log-probs, every margin 0.
    assert m["gra"] == 0.5 and m["gra_lo"] == m["gra_hi"] == 0.5 and m["n"] == 10
    assert m["gold_policy"] == m["gold_reference"]
    assert m["pair_accuracy"] == 0.5 and m["n_pairs"] == 10
    responses = read_table(out / "responses.parquet").to_pylist()
    assert len(responses) == 10 and all(r["policy_response"] == r["reference_response"] for r in responses)


# ----------------------------------------------------------------------------- the pipeline

def tiny_preset(tmp_path, bench, tiny_encoder, tiny_decoder) -> dict:
    """The GPU cluster preset (jobs/configs/hh_pipeline_gpu.yaml) with its GPU keys off, tiny models and
    the synthetic benchmark: the same stages, placement and options (DeepSpeed ZeRO-3, LoRA, an actor
    pool, evaluation as a Ray task) at a size a 2-core machine runs in minutes."""
    import yaml

    preset = yaml.safe_load((REPO / "jobs" / "configs" / "hh_pipeline_gpu.yaml").read_text())
    gpu_off = {"annotator": {"use_gpu": False, "cpus_per_worker": 1, "storage_path": ""},
               "annotate": {"gpus_per_actor": 0.0, "num_actors": 1, "min_actors": 1, "cpus_per_actor": 0.5},
               "policy": {"use_gpu": False, "cpus_per_worker": 1, "num_workers": 1},
               "evaluate": {"num_gpus": 0.0, "num_cpus": 1, "engine": "transformers", "judge": "vader"}}
    tiny = {"annotator": {"model": str(tiny_encoder), "epochs": 2, "lr": 1e-3, "batch_size": 8, "max_length": 32,
                          "num_workers": 1},
            "policy": {"model": str(tiny_decoder), "sft_epochs": 1, "epochs": 1, "lr": 1e-3, "warmup_steps": 0,
                       "batch_size": 4, "grad_accumulation": 1, "max_length": 32, "max_prompt_length": 16},
            "evaluate": {"max_new_tokens": 6, "batch_size": 6},
            "data": {"labeled_fraction": 0.4}}
    for changes in (gpu_off, tiny):
        for section, values in changes.items():
            preset[section].update(values)
    preset.update({"out": str(tmp_path / "run"), "source": f"pairs:{bench}", "test": str(bench / "test.parquet"),
                   "experiment": "cwpo-tiny", "run_name": "tiny", "arms": ["human", "human_labeled_only", "ws", "cw"],
                   "losses": ["dpo"]})
    return preset


def test_a_stage_that_dies_midway_is_rerun_not_reused(tmp_path):
    """The result goes into the marker last: partial output is never taken as done."""
    from cwpo_ray.orchestration.markers import stage

    folder = tmp_path / "annotate"
    calls = []

    def dies_midway():
        (folder / "annotated.parquet").write_text("half")
        raise KeyboardInterrupt  # as a Ctrl-C or a lost driver would stop it

    def works():
        calls.append(1)
        (folder / "annotated.parquet").write_text("whole")
        return {"pairs": 3}

    with pytest.raises(KeyboardInterrupt):
        stage(folder, "fp1", dies_midway)
    assert "result" not in json.loads((folder / ".stage.json").read_text())  # started, never done
    assert stage(folder, "fp1", works) == {"pairs": 3} and calls == [1]  # rerun, not reused
    assert stage(folder, "fp1", dies_midway) == {"pairs": 3}  # done: reused, work not called
    assert stage(folder, "fp2", works) == {"pairs": 3} and calls == [1, 1]  # another config: redone
    assert (folder / "annotated.parquet").read_text() == "whole"


def test_a_stage_killed_midway_resumes_only_under_the_same_settings(tmp_path):
    """Half-done work is kept for a rerun with the same fingerprint (train-policy resumes from its
    checkpoints) and cleared before a rerun with other settings (it would resume stale work)."""
    from cwpo_ray.orchestration.markers import stage

    folder = tmp_path / "arm"
    seen = []

    def dies_midway():
        (folder / "checkpoint").write_text("step 40")
        raise KeyboardInterrupt

    def finishes():
        seen.append((folder / "checkpoint").read_text() if (folder / "checkpoint").exists() else None)
        return {"gra": 0.6}

    with pytest.raises(KeyboardInterrupt):
        stage(folder, "lr=1e-4", dies_midway)
    assert stage(folder, "lr=1e-4", finishes) == {"gra": 0.6} and seen == ["step 40"]  # resumed
    with pytest.raises(KeyboardInterrupt):
        stage(folder, "lr=1e-3", dies_midway)  # done stage, other settings: cleared, then killed
    assert stage(folder, "lr=3e-4", finishes) == {"gra": 0.6} and seen == ["step 40", None]  # not resumed


def test_every_arm_trains_on_its_table_with_its_weighting():
    """What makes one arm differ from another: the table it trains on, its weighting, the human labels it
    used (the end-to-end runs take three of the arms: human in the two-seed test below,
    human_labeled_only and cw in tests/test_cluster.py)."""
    from cwpo_ray.recipes.pipeline import Config
    from cwpo_ray.orchestration.stages import arm_inputs, human_labels_used
    from cwpo_ray.arms import reads_weak_labels

    tables = {"unlabeled_human": "H", "labeled": "L", "annotated": "A", "unlabeled_gold": "G",
              "n_labeled": 30, "n_unlabeled": 70}
    arms = ("human", "human_labeled_only", "ws", "cw", "cw_raw", "gold", "topk:0.3")
    assert [arm_inputs(arm, tables) for arm in arms] == [
        ("H", "none"), ("L", "none"), ("A", "none"), ("A", "confidence"), ("A", "confidence_raw"), ("G", "none"),
        ("A", "topk:0.3")]
    # Exactly the arms on the annotated table read weak labels (no annotator is trained for the others).
    assert [reads_weak_labels(arm) for arm in arms] == [arm_inputs(arm, tables)[0] == "A" for arm in arms]
    shared, no_sft = Config(sft="shared"), Config(sft="none")
    assert [human_labels_used(arm, shared, tables) for arm in arms] == [100, 30, 30, 30, 30, 30, 30]
    assert [human_labels_used(arm, no_sft, tables) for arm in arms] == [70, 30, 30, 30, 30, 0, 30]


def test_a_pipeline_stopped_by_sigterm_says_so_and_how_to_go_on(tmp_path):
    """A SIGTERM (a cluster's job stop, a session's end) reaches the driver as a sys.exit, which prints
    no traceback: the pipeline's last line says what stopped it and that a rerun continues. The signal
    goes to Python's handler, not first to the absl crash handler Ray's core worker installs (a stack
    dump, after which a driver once ended without Python's exit running: no message)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, log = tmp_path / "run", tmp_path / "stdout"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "cwpo_ray", "pipeline", "--config", "cwpo_ray/configs/quick.yaml",
                             f"out={out}"], cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "preflight:" not in log.read_text():  # Ray is up and its driver's SIGTERM handler set
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "pipeline: stopped by a signal or exit (code " in err, err[-3000:]
    assert f"rerun the same command to continue from them. Every stage's own output is in {out / 'pipeline.log'}" in err
    assert "stopped by the error below" not in err
    assert "SIGTERM received" not in (out / "pipeline.log").read_text() + err  # absl's dump


def test_a_stage_run_again_says_whether_code_or_settings_changed(tmp_path, capsys):
    import json

    from cwpo_ray.fingerprints import code_version
    from cwpo_ray.orchestration.markers import stage

    folder = tmp_path / "annotator"
    stage(folder, "a", lambda: {"n": 1})
    stage(folder, "a", lambda: {"n": 2})
    assert "done already, reusing" in capsys.readouterr().out
    stage(folder, "b", lambda: {"n": 3})
    assert "annotator: its settings or inputs changed since the last run (fingerprint a -> b)" in capsys.readouterr().out
    marker = folder / ".stage.json"
    assert json.loads(marker.read_text())["code_version"] == code_version()
    marker.write_text(json.dumps({"fingerprint": "b", "code_version": "older", "result": {"n": 3}}))
    assert stage(folder, "c", lambda: {"n": 4}) == {"n": 4}
    assert "annotator: the code changed since the last run (fingerprint b -> c)" in capsys.readouterr().out


def test_gguf_start_model_is_dequantized_once_into_an_equal_folder(tmp_path):
    """The pipeline turns SmolLM2's GGUF into a plain folder that every stage then loads (instead of
    dequantizing per load): the same weights, the same tokenizer and the same chat format."""
    from pathlib import Path

    import torch

    from cwpo_ray.generation import chat_texts
    from cwpo_ray.models import ModelSource, load_causal_lm, load_tokenizer, resolve_model
    from cwpo_ray.orchestration.stages import run_start_model

    folder = Path(run_start_model("smollm2-135m", tmp_path)["model"])
    assert (folder / "config.json").exists() and not list(folder.glob("*.gguf"))
    gguf, plain = resolve_model("smollm2-135m"), ModelSource(str(folder))
    tok_gguf, tok_plain = load_tokenizer(gguf), load_tokenizer(plain)
    texts = chat_texts(tok_gguf, ["Is rain good for gardens?", "Tell me about chess, briefly."])
    assert "Is rain good for gardens?" in texts[0] and texts != ["Is rain good for gardens?"]  # a chat format
    assert chat_texts(tok_plain, ["Is rain good for gardens?", "Tell me about chess, briefly."]) == texts
    assert tok_plain(texts)["input_ids"] == tok_gguf(texts)["input_ids"]
    # The weights, against the GGUF file read independently (gguf's reader and dequantizer, not a
    # second transformers load: that took ~20 s): every tensor is there, and those that no
    # renaming or permutation touches are bit-equal, from the first layer to the last.
    from gguf import GGUFReader, dequantize

    saved = load_causal_lm(plain).state_dict()
    raw = {t.name: t for t in GGUFReader(str(Path(gguf.path) / gguf.gguf_file)).tensors}
    layers = sum(name.endswith(".attn_v.weight") for name in raw)
    assert sum(k.startswith("model.") for k in saved) == len(raw)  # lm_head is tied to the embeddings
    for g, h in {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
                 f"blk.{layers - 1}.attn_v.weight": f"model.layers.{layers - 1}.self_attn.v_proj.weight",
                 f"blk.{layers - 1}.attn_norm.weight": f"model.layers.{layers - 1}.input_layernorm.weight"}.items():
        expected = torch.from_numpy(dequantize(raw[g].data, raw[g].tensor_type).copy()).reshape(saved[h].shape)
        assert torch.equal(saved[h], expected.to(saved[h].dtype)), h
    assert run_start_model(str(folder), tmp_path / "again") == {"model": str(folder)}  # not GGUF: used as is
    # The stage's disk need (checked before it runs): what it wrote, give or take the tokenizer's files; 0 for a folder.
    from cwpo_ray.disk_space import folder_bytes, start_model_bytes

    written = folder_bytes(folder)
    assert 0.9 * written <= start_model_bytes("smollm2-135m", None) <= 1.5 * written, (written, start_model_bytes("smollm2-135m", None))
    assert start_model_bytes(str(folder), None) == 0


def test_a_resumed_run_moves_under_its_new_parent(mlflow_server):
    """A pipeline rerun with other settings gets a new parent run; a training run it resumes
    (same folder, same settings) must show up under that parent, not the abandoned one."""
    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking

    with tracking.start_run("cwpo-resume", "pipeline-a") as old_parent:
        pass
    with tracking.start_run("cwpo-resume", "pipeline-b") as new_parent:
        pass
    with tracking.start_run("cwpo-resume", "train", parent_run_id=old_parent.info.run_id) as train:
        pass
    with tracking.start_run("cwpo-resume", run_id=train.info.run_id, parent_run_id=new_parent.info.run_id):
        pass
    tags = MlflowClient(mlflow_server).get_run(train.info.run_id).data.tags
    assert tags["mlflow.parentRunId"] == new_parent.info.run_id and tags["mlflow.runName"] == "train"


def test_gold_arm_table_follows_the_gold_scores(tmp_path):
    """The gold arm's pairs: chosen is the response with the higher gold score, ties left out,
    and a source without gold scores is refused with a clear error, not trained on."""
    from cwpo_ray.recipes.pipeline import Config
    from cwpo_ray.orchestration.arm_tables import gold_table

    bench = synthetic_benchmark(tmp_path / "bench", n_train=40)
    pairs = read_table(bench / "pairs.parquet").to_pylist()
    pairs[0]["gold_b"] = pairs[0]["gold_a"]  # a tie
    write_table(pa.Table.from_pylist(pairs), bench / "pairs.parquet")
    n = gold_table(bench / "pairs.parquet", f"pairs:{bench}", tmp_path / "gold.parquet")
    rows = read_table(tmp_path / "gold.parquet").to_pylist()
    ties = sum(r["gold_a"] == r["gold_b"] for r in pairs)
    assert n == len(rows) == 40 - ties and ties >= 1
    gold = {(r["prompt"], r["response_a"]): r["gold_a"] for r in pairs} | {
        (r["prompt"], r["response_b"]): r["gold_b"] for r in pairs}
    assert all(gold[(r["prompt"], r["chosen"])] > gold[(r["prompt"], r["rejected"])] for r in rows)
    # Simulated humans (80% right here) disagree with gold on some pairs: the two arms differ.
    assert any(r["human_choice"] != ("a" if r["gold_a"] > r["gold_b"] else "b") for r in pairs[1:])

    plain = tmp_path / "plain"
    plain.mkdir()
    write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("gold")} for r in pairs]),
                plain / "pairs.parquet")
    with pytest.raises(ValueError, match="gold_a / gold_b"):
        gold_table(plain / "pairs.parquet", f"pairs:{plain}", tmp_path / "none.parquet")
    Config(arms=["human", "gold"]).validate()
    with pytest.raises(ValueError, match="unknown arm 'golden'"):
        Config(arms=["golden"]).validate()


@pytest.mark.slow
def test_pipeline_over_two_seeds_aggregates_in_compare(ray_cluster, mlflow_server, tiny_decoder, tmp_path):
    """`seeds=[0,1]` end to end on tiny models: one MLflow parent, a child run per seed x arm, and
    compare's table over seeds -- the mean of the seeds' GRAs, each seed's value, and the hierarchical
    interval -- recomputed here from the responses each seed's evaluation wrote. One arm (human), the
    cheapest run that has all of it: it reads no weak labels, so no seed trains an annotator (the
    weak-label arms' stages run end to end in tests/test_cluster.py); the length judge makes the GRAs
    differ from 0.5 (VADER scores the tiny model's word pieces 0, every prompt a tie)."""
    from mlflow.tracking import MlflowClient

    from cwpo_ray.gra import gra_over_seeds, wins

    bench = synthetic_benchmark(tmp_path / "bench", n_train=32, n_test=12)
    # A second test set of prompts alone (as the built-in test_unseen.parquet): ids that collide with the
    # test set's on purpose, which the pooled comparison must keep apart.
    test_ids = sorted(r["id"] for r in read_table(bench / "test.parquet").to_pylist())
    unseen = tmp_path / "unseen.parquet"
    write_table(pa.Table.from_pylist([{"id": test_ids[i], "prompt": f"Tell me about unseen topic {i}."}
                                      for i in range(8)]), unseen)
    out = tmp_path / "run"
    assert cli.main(["pipeline", f"out={out}", f"source=pairs:{bench}", f"test={bench / 'test.parquet'}",
                     f"evaluate.unseen_prompts={unseen}", "experiment=cwpo-two-seeds", "run_name=two-seeds", "seeds=[0,1]", "arms=[human]", "losses=[dpo]",
                     "sft=none", "data.labeled_fraction=0.4", "data.validation_fraction=0",
                     f"policy.model={tiny_decoder}", "policy.epochs=1", "policy.lr=5e-3", "policy.warmup_steps=0",
                     "policy.batch_size=4", "policy.max_length=32", "policy.max_prompt_length=16",
                     "policy.cpus_per_worker=1", "evaluate.judge=test_pipeline:length_judge",
                     "evaluate.extra_judges=[]", "evaluate.max_new_tokens=6", "evaluate.batch_size=6",
                     "evaluate.n_boot=500", "evaluate.engine=transformers"]) == 0

    # Each seed: its own split and arm, under OUT/seed-S; its wins from its responses.
    per_seed = {}
    for seed in (0, 1):
        rows = read_table(out / f"seed-{seed}" / "arms" / "human-dpo" / "eval" / "responses.parquet").to_pylist()
        rows.sort(key=lambda r: r["id"])  # compare orders a seed's prompts by id
        per_seed[seed] = wins([r["policy_score"] for r in rows], [r["reference_score"] for r in rows])
        assert len(rows) == 12
    assert (out / "seed-0" / "data" / "labeled.parquet").exists() and (out / "seed-1" / "data" / "labeled.parquet").exists()
    assert not any((out / f"seed-{s}" / name).exists() for s in (0, 1) for name in ("annotator", "annotate"))
    expected = gra_over_seeds([per_seed[0], per_seed[1]])
    gra0, gra1 = (float(np.mean(per_seed[s])) for s in (0, 1))
    assert gra0 != gra1 or gra0 != 0.5, "both seeds tie everywhere: the check below would show nothing"

    # MLflow: one parent, a child per seed (tagged, nested), each seed's eval/gra its own GRA.
    runs = json.loads((out / "mlflow_runs.json").read_text())
    assert set(runs["children"]) == {"seed0/human/dpo", "seed1/human/dpo"}
    client = MlflowClient(mlflow_server)
    parent = client.get_run(runs["parent"])
    assert parent.info.run_name == "two-seeds" and parent.info.status == "FINISHED"
    for seed, gra_s in ((0, gra0), (1, gra1)):
        child = client.get_run(runs["children"][f"seed{seed}/human/dpo"]["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.tags["seed"] == str(seed)
        assert child.info.run_name == f"human-dpo-seed{seed}"
        assert child.data.metrics["eval/gra"] == pytest.approx(gra_s)
        assert parent.data.metrics[f"seed{seed}.human.dpo.gra"] == pytest.approx(gra_s)
        assert parent.data.metrics[f"seed{seed}.pairs.labeled"] > 0  # a seed's own split, logged per seed
    pm = parent.data.metrics
    assert pm["seeds.human.dpo.n_seeds"] == 2
    assert pm["seeds.human.dpo.gra"] == pytest.approx((gra0 + gra1) / 2)
    assert (pm["seeds.human.dpo.gra_lo"], pm["seeds.human.dpo.gra_hi"]) == pytest.approx(
        (expected["gra_lo"], expected["gra_hi"]))
    assert {"compare.md", "compare.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # compare.md, the aggregated table: mean, hierarchical interval, each seed's value in seed order.
    table = (out / "compare" / "compare.md").read_text()
    assert "Over 2 seeds (0 / 1;" in table
    (line,) = [l for l in table.splitlines() if l.startswith("| human | dpo | 2 |")]
    cols = [c.strip() for c in line.split("|")]
    assert float(cols[4]) == pytest.approx((gra0 + gra1) / 2, abs=5e-4)
    assert cols[5] == f"[{expected['gra_lo']:.3f}, {expected['gra_hi']:.3f}]"
    assert cols[6] == f"{gra0:.3f} / {gra1:.3f}"
    assert expected["gra_lo"] <= expected["gra"] <= expected["gra_hi"]
    # Each seed's own numbers follow the aggregate.
    assert f"| human | dpo | 0 | {gra0:.3f} |" in table and f"| human | dpo | 1 | {gra1:.3f} |" in table

    # The second test set: each seed's policy evaluated on it too (test_unseen/* on the child), compared
    # alone and pooled with the test prompts (20 prompts a seed, the hierarchical interval over both).
    pooled = {}
    for seed in (0, 1):
        rows = read_table(out / f"seed-{seed}" / "arms" / "human-dpo" / "eval_test_unseen" / "responses.parquet")
        rows = sorted(rows.to_pylist(), key=lambda r: r["id"])
        assert len(rows) == 8
        won = wins([r["policy_score"] for r in rows], [r["reference_score"] for r in rows])
        child = client.get_run(runs["children"][f"seed{seed}/human/dpo"]["run_id"])
        assert child.data.metrics["test_unseen/gra"] == pytest.approx(float(np.mean(won)))
        assert child.data.metrics["eval/gra"] == pytest.approx((gra0, gra1)[seed])  # the test figure stays
        # compare orders the pooled prompts by "split:id"
        pooled[seed] = [*per_seed[seed], *won]
    assert (out / "compare" / "compare_test_unseen.md").exists()
    both = gra_over_seeds([pooled[0], pooled[1]])
    pm = client.get_run(runs["parent"]).data.metrics
    assert pm["seeds.test_and_test_unseen.human.dpo.gra"] == pytest.approx(both["gra"])
    assert (pm["seeds.test_and_test_unseen.human.dpo.gra_lo"], pm["seeds.test_and_test_unseen.human.dpo.gra_hi"]) \
        == pytest.approx((both["gra_lo"], both["gra_hi"]))
    pooled_md = (out / "compare" / "compare_test_and_test_unseen.md").read_text()
    assert "test+test_unseen prompts" in pooled_md
    for seed in (0, 1):  # each seed's own row: its 20 pooled prompts, not its test evaluation's logged figure
        own = gra_over_seeds([pooled[seed]])
        assert f"| human | dpo | {seed} | {own['gra']:.3f} | [{own['gra_lo']:.3f}, {own['gra_hi']:.3f}] |" in pooled_md
