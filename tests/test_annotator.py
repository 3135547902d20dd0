"""The weak annotator: training on Ray Train, labeling with Ray Data, metrics, round trips."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cwpo_ray import calibration
from cwpo_ray.annotator import encode, load_annotator, new_annotator, save_annotator
from cwpo_ray.cli import main
from cwpo_ray.models import ModelSource
from cwpo_ray.tables import count_rows, read_table, write_table
from tiny_models import NEGATIVE, POSITIVE, TOPICS, synthetic_pairs


# ----------------------------------------------------------------------------- data

def words(rng, n_pos: int, n_neg: int) -> str:
    picked = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, n_neg)
    rng.shuffle(picked)
    return " ".join(picked)


def close_pairs(n: int, seed: int) -> list[dict]:
    """Harder labeled pairs: chosen has two positive words of three, rejected one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        rows.append({"id": f"close-{seed}-{i}", "prompt": f"Tell me about {t}.",
                     "chosen": f"{t} are {words(rng, 2, 1)}.", "rejected": f"{t} are {words(rng, 1, 2)}."})
    return rows


def eval_pairs(n: int, seed: int) -> list[dict]:
    """Unlabeled pairs with a hidden human choice: clear pairs (human picks the positive reply)
    and ambiguous ones (both replies alike, the human flips a coin)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        if i % 2:
            a, b, choice = f"{t} are {words(rng, 2, 1)}.", f"{t} are {words(rng, 2, 1)}.", rng.choice("ab")
        else:
            good, bad = f"{t} are {words(rng, 3, 0)}.", f"{t} are {words(rng, 0, 3)}."
            flip = rng.random() < 0.5
            a, b, choice = (bad, good, "b") if flip else (good, bad, "a")
        if a != b:
            rows.append({"id": f"u-{seed}-{i}", "prompt": f"Tell me about {t}.", "response_a": a, "response_b": b,
                         "human_choice": choice})
    return rows


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labeled") / "labeled.parquet"
    write_table(pa.Table.from_pylist(synthetic_pairs(160, seed=1) + close_pairs(160, seed=2)), path)
    return path


def train_args(data, model, out, tmp, *extra) -> list[str]:
    return ["train-annotator", "--data", str(data), "--model", str(model), "--out", str(out),
            "--lr", "2e-3", "--batch-size", "32", "--num-workers", "2", "--storage-path", str(tmp / "ray"),
            "--heldout-fraction", "0.2", "--folds", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def trained(ray_cluster, mlflow_server, tiny_encoder, labeled, tmp_path_factory):
    """DDP on 2 CPU workers. (A worker killed mid-run: the k-fold test in test_annotator_selection.py.)"""
    tmp = tmp_path_factory.mktemp("train-ddp")
    out = tmp / "annotator"
    assert main(train_args(labeled, tiny_encoder, out, tmp, "--epochs", "3", "--strategy", "ddp",
                           "--run-name", "ddp-test")) == 0
    return out


# ----------------------------------------------------------------------------- pure functions

def test_metrics_hand_values():
    margins = [2.0, 1.0, -1.0, 0.0]
    assert calibration.accuracy(margins) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert calibration.bt_loss([0.0]) == pytest.approx(np.log(2))
    assert calibration.confidence_of([2.0]) == pytest.approx(2 * (1 / (1 + np.exp(-2)) - 0.5))
    # one pair per bin, each right: ECE is the mean gap between 1 and its predicted probability
    probs = calibration.sigmoid(np.abs(margins[:2]))
    assert calibration.ece(margins[:2]) == pytest.approx(float(np.mean(1 - probs)))
    # calibrated by construction: labels drawn with the model's own probabilities
    rng = np.random.default_rng(0)
    m = rng.normal(0, 2, 20000)
    signs = np.where(rng.random(m.size) < calibration.sigmoid(np.abs(m)), 1, -1)
    assert calibration.ece(np.abs(m) * signs) < 0.02
    deciles = calibration.accuracy_by_decile(np.arange(100) / 100, (np.arange(100) >= 50).astype(float))
    assert [d["count"] for d in deciles] == [10] * 10
    assert [d["accuracy"] for d in deciles] == [0.0] * 5 + [1.0] * 5
    assert calibration.top_fraction_accuracy([0.1, 0.9, 0.8], [0, 1, 0], 1 / 3) == 1.0


def test_encode_cuts_prompt_from_the_left(tiny_encoder):
    tok = new_annotator(ModelSource(str(tiny_encoder)), max_length=16).tokenizer
    prompt = " ".join(["cats"] * 30) + " rivers"
    ids, cut = encode(tok, [prompt, "hi"], ["bread music", "rain"], max_length=16)
    assert cut == [True, False]
    assert len(ids[0]) == 16
    text = tok.decode(ids[0], skip_special_tokens=True)
    assert text.endswith("rivers bread music")  # the end of the prompt and the whole response survive
    long_response, _ = encode(tok, ["p"], [" ".join(["bees"] * 40)], max_length=16)
    assert len(long_response[0]) == 16


def test_annotate_bf16_precision_scores_like_fp32(tiny_encoder, tmp_path):
    """The bf16 setting runs the matmuls in bfloat16 (not a no-op) and labels as fp32 does where the
    rewards are not near-tied; a saved folder loads in either precision."""
    folder = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), tmp_path / "ann")
    fp32, bf16 = load_annotator(folder), load_annotator(folder, precision="bf16")
    rows = eval_pairs(200, seed=5)
    args = [r["prompt"] for r in rows], [r["response_a"] for r in rows], [r["response_b"] for r in rows]
    a, b = fp32.label_pairs(*args), bf16.label_pairs(*args)
    ra, rb = np.array(a["reward_a"] + a["reward_b"]), np.array(b["reward_a"] + b["reward_b"])
    assert 0 < np.abs(ra - rb).max() < 0.05 * max(1.0, np.abs(ra).max())
    # a pair whose fp32 margin exceeds twice the largest reward change cannot flip (the random tiny
    # model's margins are mostly smaller; the agreement on a real model is bench/annotate.py's)
    margin = np.abs(np.array(a["reward_a"]) - np.array(a["reward_b"]))
    clear = margin > 2 * np.abs(ra - rb).max()
    assert [p for p, c in zip(a["preferred"], clear) if c] == [p for p, c in zip(b["preferred"], clear) if c]
    assert np.abs(np.array(a["confidence"]) - np.array(b["confidence"])).max() < 0.05
    with pytest.raises(ValueError, match="precision"):
        load_annotator(folder, precision="fp16")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags as the Linux kernel reports them (None elsewhere): a source of its own,
    not the cpuinfo library torch.cpu.get_capabilities() reads."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_bf16_units(tiny_encoder, tmp_path):
    """auto resolves to bf16 on a CPU with AVX512-BF16 or AMX-BF16 (the kernel's flags say which), fp32
    elsewhere; an annotator loaded with auto holds the resolved precision and scores in it."""
    from cwpo_ray.annotator import PRECISION_CHOICES, fast_bf16, resolve_precision
    from cwpo_ray.recipes import annotate

    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to check the CPU's bf16 flags against")
    expected = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32"
    assert fast_bf16("cpu") == (expected == "bf16")
    assert resolve_precision("auto", "cpu") == resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") == "fp32"  # no GPU: nothing to run bf16 on
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")
    assert annotate.PRECISION_CHOICES == PRECISION_CHOICES  # the recipe's copy (no torch import there)

    folder = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), tmp_path / "ann")
    auto, explicit = load_annotator(folder, precision="auto"), load_annotator(folder, precision=expected)
    assert auto.precision == expected
    rows = eval_pairs(20, seed=3)
    args = [r["prompt"] for r in rows], [r["response_a"] for r in rows], [r["response_b"] for r in rows]
    assert auto.label_pairs(*args) == explicit.label_pairs(*args)


# ----------------------------------------------------------------------------- training

def test_ddp_training_learns_and_logs(trained, mlflow_server):
    from mlflow.tracking import MlflowClient

    report = json.loads((trained / "eval.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    best = report["best"]
    assert best["accuracy"] >= 0.9, report["history"]
    # the written epoch is the one with the lowest held-out BT loss
    assert best["bt_loss"] == pytest.approx(min(h["heldout_bt_loss"] for h in report["history"]))
    meta = json.loads((trained / "annotator.json").read_text())
    assert meta["metrics"]["epoch"] == best["epoch"] and meta["data_fingerprint"]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cwpo")
    run = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'ddp-test'")[0]
    data = run.data.metrics
    for key in ("train_loss", "heldout_accuracy", "heldout_ece", "best_heldout_accuracy"):
        assert key in data, sorted(data)
    assert len(client.get_metric_history(run.info.run_id, "heldout_bt_loss")) >= 3
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reliability.png", "confidence_hist.png", "annotator"} <= top
    inside = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "annotator")}
    assert {"annotator.json", "reward_head.pt", "eval.json"} <= inside


# ----------------------------------------------------------------------------- round trip

def test_saved_annotator_reloads_with_identical_scores(ray_cluster, tiny_decoder, tmp_path):
    torch.manual_seed(3)
    ann = new_annotator(ModelSource(str(tiny_decoder)), max_length=32)
    with torch.no_grad():
        ann.model.head.weight.add_(0.25)  # a head that differs from any fresh init (a decoder's HF score layer has no bias)
    prompts, responses = ["Tell me about rain."] * 3, ["rain is good.", "rain is bad and wet and cold.", "x"]
    before, _ = ann.score(prompts, responses)
    save_annotator(ann, tmp_path / "ann")
    after, _ = load_annotator(tmp_path / "ann").score(prompts, responses)
    assert after == before

    @ray_cluster.remote(num_cpus=0.5)
    def remote_scores(folder, p, r):
        from cwpo_ray.annotator import load_annotator

        return load_annotator(folder).score(p, r)[0]

    assert ray_cluster.get(remote_scores.remote(str(tmp_path / "ann"), prompts, responses)) == before


# ----------------------------------------------------------------------------- annotate

def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


BAD_ROWS = [
    "this is not json",
    {"id": "bad-missing", "prompt": "p", "response_a": "a"},
    {"id": "bad-type", "prompt": "p", "response_a": 7, "response_b": "b"},
    {"id": "bad-empty", "prompt": "   ", "response_a": "a", "response_b": "b"},
    {"id": "bad-same", "prompt": "p", "response_a": "same", "response_b": "same"},
    [1, 2, 3],
]


def test_annotate_cli_counts_quarantine_and_agreement(ray_cluster, trained, tmp_path):
    rows = eval_pairs(240, seed=5)
    shards = tmp_path / "unlabeled"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", rows[:120] + BAD_ROWS[:3])
    write_jsonl(shards / "part-1.jsonl", rows[120:] + BAD_ROWS[3:])
    out = tmp_path / "out"
    args = ["annotate", "--data", str(shards), "--annotator", str(trained), "--out", str(out), "--num-actors", "2",
            "--batch-size", "64", "--export-uncertain", "10", "--precision", "auto"]
    assert main(args) == 0

    annotated, quarantine = read_table(out / "annotated.parquet"), read_table(out / "quarantine.parquet")
    assert annotated.num_rows == len(rows) and quarantine.num_rows == len(BAD_ROWS)
    assert annotated.num_rows + quarantine.num_rows == count_rows(shards)
    ids = annotated["id"].to_pylist() + quarantine["id"].to_pylist()
    assert len(set(ids)) == len(ids) and set(annotated["id"].to_pylist()) == {r["id"] for r in rows}
    reasons = set(quarantine["reason"].to_pylist())
    assert {"invalid JSON", "missing field: response_b", "not a string: response_a (int)", "empty field: prompt",
            "identical responses", "not a JSON object (list)"} == reasons
    assert annotated.schema.names == ["id", "prompt", "chosen", "rejected", "reward_chosen", "reward_rejected",
                                      "confidence", "annotator", "confidence_raw"]
    table = annotated.to_pylist()
    assert all(r["reward_chosen"] >= r["reward_rejected"] and 0 <= r["confidence"] <= 1 for r in table)

    # confidence is higher where the annotator agrees with the human than where it does not
    human = {r["id"]: r for r in rows}
    right = np.array([(r["chosen"] == human[r["id"]]["response_a"]) == (human[r["id"]]["human_choice"] == "a")
                      for r in table])
    conf = np.array([r["confidence"] for r in table])
    assert 0 < right.sum() < len(right)
    assert conf[right].mean() > conf[~right].mean()
    report = json.loads((out / "report.json").read_text())
    assert report["annotated"] == len(rows) and report["quarantined"] == len(BAD_ROWS)
    # auto is recorded as what it resolved to on the actors' device (the CPU here)
    from cwpo_ray.annotator import resolve_precision

    assert report["precision_requested"] == "auto"
    assert report["precision"] == report["settings"]["precision"] == resolve_precision("auto", "cpu")
    agreement = report["human_agreement"]
    assert agreement["accuracy"] == pytest.approx(right.mean())
    assert agreement["by_confidence_decile"][-1]["accuracy"] >= agreement["by_confidence_decile"][0]["accuracy"]
    assert agreement["deciles_approximate"] and sum(d["count"] for d in agreement["by_confidence_decile"]) == len(rows)

    uncertain = read_table(out / "uncertain.parquet")
    assert uncertain.num_rows == 10
    # the 10 least confident (by value: bf16 rewards can tie, and a tie may go either way)
    by_id = {r["id"]: r["confidence"] for r in table}
    assert len(set(uncertain["id"].to_pylist())) == 10
    assert max(by_id[i] for i in uncertain["id"].to_pylist()) <= np.sort(conf)[9]

    # a rerun into the same OUT (Parquet input this time, no export, the default precision) replaces everything
    write_table(pa.Table.from_pylist(rows[:50]), tmp_path / "small.parquet")
    assert main(["annotate", "--data", str(tmp_path / "small.parquet"), "--annotator", str(trained),
                 "--out", str(out), "--num-actors", "1"]) == 0
    assert json.loads((out / "report.json").read_text())["precision"] == "fp32"  # the default
    assert count_rows(out / "annotated.parquet") == 50 and count_rows(out / "quarantine.parquet") == 0
    assert not (out / "uncertain.parquet").exists()
    # the scores of the Ray actors are those of the annotator loaded here (up to float rounding:
    # the batches, hence the padding, differ)
    again = {r["id"]: r for r in read_table(out / "annotated.parquet").to_pylist()}
    local, _ = load_annotator(trained).score([r["prompt"] for r in rows[:50]], [r["response_a"] for r in rows[:50]])
    for r, score in zip(rows[:50], local):
        got = again[r["id"]]
        assert score == pytest.approx(got["reward_chosen"] if got["chosen"] == r["response_a"]
                                      else got["reward_rejected"], rel=1e-5, abs=1e-5)


def _map_worker_pids() -> set[int]:
    from conftest import pids_running

    return pids_running("MapWorker(MapBatches(LabelUnits))")


def test_annotate_survives_a_killed_actor_with_exact_counts(ray_cluster, tiny_encoder, tmp_path):
    """SIGKILL the pool's only actor mid-job: Ray restarts it and retries its batch; nothing lost or doubled."""
    import os
    import signal
    import threading
    import time

    annotator = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), tmp_path / "annotator")
    rows = eval_pairs(6000, seed=11)
    shards = tmp_path / "unlabeled"
    shards.mkdir()
    for k in range(4):
        write_jsonl(shards / f"part-{k}.jsonl", rows[k::4] + BAD_ROWS[k::4])
    out = tmp_path / "out"
    result: list[int] = []
    job = threading.Thread(target=lambda: result.append(main([
        "annotate", "--data", str(shards), "--annotator", str(annotator), "--out", str(out),
        "--num-actors", "1", "--batch-size", "32"])))
    earlier = _map_worker_pids()  # idle actors of earlier jobs in this process are not this job's
    job.start()

    killed, seen = None, set()
    deadline = time.monotonic() + 300
    while job.is_alive() and time.monotonic() < deadline:
        seen |= _map_worker_pids() - earlier
        # a unit's annotated rows are streamed to .annotate-work/tmp/ batch by batch
        written = list(out.glob(".annotate-work/tmp/*.annotated.parquet"))
        if killed is None and seen and written:  # the actor has labeled batches already
            killed = next(iter(seen))
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    job.join(timeout=300)

    assert killed is not None, "the job finished before the actor could be killed; give it more rows"
    assert seen - {killed}, "no replacement actor was started"
    assert result == [0]
    annotated, quarantine = read_table(out / "annotated.parquet"), read_table(out / "quarantine.parquet")
    assert annotated.num_rows == len(rows) and quarantine.num_rows == len(BAD_ROWS)
    ids = annotated["id"].to_pylist() + quarantine["id"].to_pylist()
    assert len(ids) == len(set(ids)) == count_rows(shards)
    assert json.loads((out / "report.json").read_text())["input_rows"] == count_rows(shards)
    print(f"reliability: annotate, actor {killed} killed, replacement {sorted(seen - {killed})}: "
          f"input {count_rows(shards)} = annotated {annotated.num_rows} + quarantined {quarantine.num_rows}, "
          f"{len(set(ids))} distinct ids")
