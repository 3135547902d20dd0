"""Selection on validation, reporting on test: the validation split of `cwpo data`, the built-in
benchmark's unseen-topic test table, strict GRA, the second gold judge (TextBlob) and how
`cwpo evaluate` and `cwpo compare` report every metric per judge."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from cwpo_ray import cli
from cwpo_ray.gra import across_judges, gra_with_ci, strict_wins
from cwpo_ray.judges import load_judge
from cwpo_ray.recipes import build_benchmark as bb
from cwpo_ray.recipes.evaluate import judge_key
from cwpo_ray.sources import is_validation
from cwpo_ray.tables import read_table, write_table
from fixtures_data import write_jsonl

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "cwpo_ray" / "benchmark_data"


def prompts_of(path: Path) -> set[str]:
    return {r["prompt"] for r in read_table(path).to_pylist()} if path.exists() else set()


def run_data(source: str, out: Path, *extra: str) -> dict:
    assert cli.main(["data", "--source", source, "--out", str(out), *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


# ----------------------------------------------------------------------------- the validation split

def multi_pair_source(folder: Path) -> tuple[list[dict], list[dict]]:
    """Train rows with 1-4 pairs per prompt (as HH-RLHF has), some prompts shared with the test file,
    and unjudged rows (no human choice)."""
    train, test = [], []
    for i in range(300):
        for j in range(1 + i % 4):
            train.append({"prompt": f"prompt {i}", "chosen": f"good {i}.{j}", "rejected": f"bad {i}.{j}"})
    for i in range(300, 340):
        train.append({"prompt": f"prompt {i}", "response_a": f"a {i}", "response_b": f"b {i}"})
    for i in range(0, 120, 2):  # every other of the first 120 train prompts is a test prompt too
        test.append({"prompt": f"prompt {i}", "chosen": f"test good {i}", "rejected": f"test bad {i}"})
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    return train, test


def test_validation_is_disjoint_by_prompt_from_test_labeled_and_unlabeled(tmp_path):
    train, test = multi_pair_source(tmp_path / "src")
    manifest = run_data(f"pairs:{tmp_path / 'src'}", tmp_path / "out", "--validation-fraction", "0.3")
    c, out = manifest["counts"], tmp_path / "out"
    val, tst = prompts_of(out / "validation.parquet"), prompts_of(out / "test.parquet")
    trained = prompts_of(out / "labeled.parquet") | prompts_of(out / "unlabeled.parquet")
    assert val and not val & tst and not val & trained
    # Counts add up, and match the tables.
    assert c["read"] == c["labeled"] + c["unlabeled"] + c["validation"] + c["test"] + c["quarantined"]
    assert c["validation"] == len(read_table(out / "validation.parquet"))
    # A prompt goes to validation with all its pairs: a prompt hashed in and not a test prompt.
    test_prompts = {r["prompt"] for r in test}
    want = [r for r in train if is_validation(r["prompt"], 0, 0.3) and r["prompt"] not in test_prompts]
    assert c["validation"] == len(want) and len({r["prompt"] for r in want}) < len(want)
    # The test prompts that hash into validation stayed train pairs, and are counted.
    shared = [r for r in train if r["prompt"] in test_prompts and is_validation(r["prompt"], 0, 0.3)]
    assert shared and c["validation_prompt_in_test"] == len(shared)
    # Test table columns; no gold in this source; unjudged pairs have no chosen / rejected.
    rows = read_table(out / "validation.parquet").to_pylist()
    assert manifest["columns"]["validation"] == ["id", "prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"]
    assert all(r["gold_chosen"] is None for r in rows)
    judged = [r for r in rows if r["chosen"] is not None]
    assert judged and all(r["chosen"].startswith("good") and r["rejected"].startswith("bad") for r in judged)
    assert all(r["rejected"] is None for r in rows if r["chosen"] is None)
    # A larger fraction only adds prompts.
    run_data(f"pairs:{tmp_path / 'src'}", tmp_path / "more", "--validation-fraction", "0.5")
    assert val < prompts_of(tmp_path / "more" / "validation.parquet")


HASH_SCRIPT = """
import json, sys
from cwpo_ray.sources import is_validation
print(json.dumps([is_validation(f"prompt {i}", 0, 0.1) for i in range(2000)]))
"""


def test_validation_split_is_the_same_in_every_process():
    """A pure hash of the prompt (blake2b): Python's salted str hash would differ between processes."""
    here = [is_validation(f"prompt {i}", 0, 0.1) for i in range(2000)]
    assert 150 < sum(here) < 250 and here != [is_validation(f"prompt {i}", 1, 0.1) for i in range(2000)]
    for hashseed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        got = subprocess.run([sys.executable, "-c", HASH_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
        assert json.loads(got) == here, hashseed
    # Pinned: the same prompts on every machine and Python version (blake2b of the UTF-8 bytes).
    assert [i for i in range(100) if here[i]] == [1, 10, 19, 32, 43, 67, 80, 91]


def test_builtin_benchmark_yields_a_validation_split_in_another_process(tmp_path):
    """`cwpo data` on the shipped benchmark: a validation split of held-out train prompts, gold-ordered
    like its test table; the unseen-topic table is skipped; the same tables from a second process."""
    manifest = run_data(f"pairs:{BENCH}", tmp_path / "a")
    c = manifest["counts"]
    assert (c["read"], c["test"], c["quarantined"]) == (1200, 200, 0)
    assert c["labeled"] + c["unlabeled"] + c["validation"] == 1000
    assert c["validation"] == 97  # pinned: 10% of the 1,000 train prompts by a hash of the prompt
    assert manifest["skipped_files"] == [str(BENCH / "test_unseen.parquet")]
    rows = read_table(tmp_path / "a" / "validation.parquet").to_pylist()
    assert all(r["gold_chosen"] >= r["gold_rejected"] for r in rows)
    pairs = {r["id"]: r for r in read_table(BENCH / "pairs.parquet").to_pylist()}
    for r in rows:  # chosen / rejected are the source's responses ordered by its gold scores
        src = pairs[r["id"]]
        gold = {src["response_a"]: src["gold_a"], src["response_b"]: src["gold_b"]}
        assert (gold[r["chosen"]], gold[r["rejected"]]) == (r["gold_chosen"], r["gold_rejected"])
    val = prompts_of(tmp_path / "a" / "validation.parquet")
    assert not val & prompts_of(BENCH / "test.parquet")
    assert not val & (prompts_of(tmp_path / "a" / "labeled.parquet") | prompts_of(tmp_path / "a" / "unlabeled.parquet"))

    env = {**os.environ, "PYTHONHASHSEED": "97"}
    subprocess.run([sys.executable, "-m", "cwpo_ray", "data", "--source", f"pairs:{BENCH}", "--out",
                    str(tmp_path / "b")], env=env, cwd=REPO, check=True, capture_output=True)
    for t in ("validation", "labeled", "unlabeled"):
        assert read_table(tmp_path / "a" / f"{t}.parquet").equals(read_table(tmp_path / "b" / f"{t}.parquet")), t


# ----------------------------------------------------------------------------- unseen topics

def occurs(phrase: str, text: str) -> bool:
    return re.search(r"\b" + re.escape(phrase.lower()) + r"\b", text.lower()) is not None


def template_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{t}"), ".+") + "$")


def test_unseen_test_table_shares_no_topic_or_template_with_the_shipped_prompts(tmp_path):
    unseen = read_table(BENCH / "test_unseen.parquet").to_pylist()
    shipped = prompts_of(BENCH / "pairs.parquet") | prompts_of(BENCH / "test.parquet")
    assert len(unseen) == 200 and len({r["prompt"] for r in unseen}) == 200 and len(shipped) == 1200
    assert set(unseen[0]) == {"id", "prompt", "topic", "template"}
    topics, templates = {r["topic"] for r in unseen}, {r["template"] for r in unseen}
    assert topics == set(bb.UNSEEN_TOPICS) and templates == set(bb.UNSEEN_TEMPLATES)
    for topic in topics:
        assert not [p for p in shipped if occurs(topic, p)], topic
    for template in templates:
        assert not [p for p in shipped if template_pattern(template).match(p)], template
    # ... and the other way round: no training topic or template in an unseen prompt.
    for r in unseen:
        assert r["prompt"] == r["template"].format(t=r["topic"])
        assert not [t for t in bb.TOPICS if occurs(t, r["prompt"])], r["prompt"]
        assert not [t for t in bb.TEMPLATES if template_pattern(t).match(r["prompt"])], r["prompt"]
    # The shipped table is what `cwpo build-benchmark --unseen-only` writes (no model needed).
    assert cli.main(["build-benchmark", "--out", str(tmp_path / "b"), "--unseen-only"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["test_unseen.parquet"]
    assert read_table(tmp_path / "b" / "test_unseen.parquet").equals(read_table(BENCH / "test_unseen.parquet"))
    assert bb.make_unseen_prompts(50, 0) == bb.make_unseen_prompts(200, 0)[:50]


# ----------------------------------------------------------------------------- strict GRA

def test_strict_gra_counts_ties_as_losses():
    # wins: higher, tie, lower, tie
    m = gra_with_ci([1, 2, 3, 5], [0, 2, 4, 5], n_boot=500)
    assert (m["gra"], m["gra_strict"], m["ties"], m["n"]) == (0.5, 0.25, 0.5, 4)
    assert m["gra_strict_lo"] <= 0.25 <= m["gra_strict_hi"] and m["gra_lo"] <= 0.5 <= m["gra_hi"]
    assert strict_wins([1, 2, 3], [0, 2, 4]).tolist() == [1.0, 0.0, 0.0]
    # Identical models: GRA 0.5 exactly, strict GRA 0 exactly (the paper's definition has no half wins).
    same = gra_with_ci([0.3] * 10, [0.3] * 10)
    assert (same["gra"], same["gra_strict"], same["gra_strict_lo"], same["gra_strict_hi"]) == (0.5, 0.0, 0.0, 0.0)
    rng = np.random.default_rng(0)
    p, r = rng.integers(0, 3, 300), rng.integers(0, 3, 300)  # many ties
    m = gra_with_ci(p, r)
    assert m["gra"] - m["gra_strict"] == pytest.approx(m["ties"] / 2)


def test_across_judges_definitions():
    assert across_judges([(0.1, 0.3)]) == ""
    assert across_judges([(0.1, 0.3), (0.02, 0.2)]) == "all judges"
    assert across_judges([(-0.3, -0.1), (-0.2, -0.01)]) == "all judges"
    assert across_judges([(0.1, 0.3), (-0.05, 0.2)]) == "judge-specific"
    assert across_judges([(0.0, 0.3), (-0.1, 0.1)]) == "none"  # an interval touching 0 does not exclude it
    assert across_judges([(0.1, 0.3), (-0.3, -0.1)]) == "judges disagree"


# ----------------------------------------------------------------------------- the second judge

def test_textblob_judge_scores_offline_and_is_not_vader(tmp_path):
    # No NLTK corpora: a fresh HOME and an empty NLTK_DATA in a new process (TextBlob's sentiment
    # lexicon ships inside the package; a missing corpus would raise, there is no network here).
    script = ("from cwpo_ray.judges import load_judge\n"
              "j = load_judge('textblob')\n"
              "print(j([('q', 'I love it, it is wonderful.'), ('q', 'This is terrible and boring.'), ('q', 'The box.')]))")
    env = {**os.environ, "HOME": str(tmp_path), "NLTK_DATA": str(tmp_path / "none")}
    pos, neg, neutral = json.loads(subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, check=True,
                                                  capture_output=True, text=True).stdout)
    assert pos > neutral > neg and neutral == 0.0 and -1 <= neg and pos <= 1

    textblob, vader = load_judge("textblob"), load_judge("vader")
    assert textblob.name == "textblob" and judge_key("textblob") == "textblob"
    # Independent of VADER: on this pair the two judges prefer opposite responses.
    a, b = "Not the worst thing ever.", "It is a great way to kill time."
    (va, vb), (ta, tb) = vader([("q", a), ("q", b)]), textblob([("q", a), ("q", b)])
    assert va > vb and ta < tb, (va, vb, ta, tb)  # VADER +0.51 vs -0.15; TextBlob -1.0 vs +0.8
    # On the shipped pairs: agreeing far from always on which response is better.
    rows = read_table(BENCH / "pairs.parquet").to_pylist()[:300]
    t = np.asarray(textblob([(r["prompt"], x) for r in rows for x in (r["response_a"], r["response_b"])])).reshape(-1, 2)
    g = np.asarray([(r["gold_a"], r["gold_b"]) for r in rows])
    dt, dg = np.sign(t[:, 0] - t[:, 1]), np.sign(g[:, 0] - g[:, 1])
    decided = (dt != 0) & (dg != 0)
    assert 0.5 < np.mean(dt[decided] == dg[decided]) < 0.8


# ----------------------------------------------------------------------------- evaluate under every judge

def test_evaluate_reports_every_metric_per_judge_on_a_prompts_only_table(tiny_decoder, tmp_path, mlflow_server):
    """The unseen-topic table has prompts only: pair accuracy is skipped; every judge's GRA, strict GRA and
    intervals are reported; a validation evaluation logs under validation/*, never eval/*."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cwpo-eval-judges") or client.get_experiment(
        client.create_experiment("cwpo-eval-judges"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--policy", str(tiny_decoder), "--reference", str(tiny_decoder),
                     "--prompts", str(BENCH / "test_unseen.parquet"), "--out", str(out), "--max-new-tokens", "4",
                     "--batch-size", "4", "--engine", "transformers", "--max-prompts", "6",
                     "--split", "validation", "--experiment", "cwpo-eval-judges", "--run-id", run_id]) == 0
    assert mlflow.active_run() is None
    report = json.loads((out / "eval.json").read_text())
    m = report["metrics"]
    assert report["judges"] == ["vader", "textblob"] and report["split"] == "validation"
    assert "pair_accuracy" not in m  # no chosen / rejected columns
    # Same model and seed: every prompt a tie under every judge.
    for prefix in ("", "textblob."):
        assert (m[prefix + "gra"], m[prefix + "gra_strict"], m[prefix + "ties"]) == (0.5, 0.0, 1.0)
        assert m[prefix + "gra_lo"] == m[prefix + "gra_hi"] == 0.5
        assert m[prefix + "gold_policy"] == m[prefix + "gold_reference"]
    rows = read_table(out / "responses.parquet").to_pylist()
    assert len(rows) == 6 and {"policy_score_vader", "reference_score_vader", "policy_score_textblob",
                               "reference_score_textblob"} <= set(rows[0])
    textblob = load_judge("textblob")
    assert [r["policy_score_textblob"] for r in rows] == textblob([(r["prompt"], r["policy_response"]) for r in rows])
    assert all(r["policy_score"] == r["policy_score_vader"] for r in rows)
    logged = client.get_run(run_id).data
    assert {"validation/gra", "validation/gra_strict", "validation/textblob.gra",
            "validation/textblob.gra_strict_hi"} <= set(logged.metrics)
    assert not [k for k in logged.metrics if k.startswith("eval/")]
    assert logged.tags["validation/judges"] == "vader,textblob"
    assert [a.path for a in client.list_artifacts(run_id, "validation")] == ["validation/eval.json"]


def test_extra_judges_settings():
    from cwpo_ray.config import ConfigError, load_config
    from cwpo_ray.recipes import evaluate

    base = ["policy=P", "reference=R", f"prompts={BENCH / 'test.parquet'}", "out=O"]
    assert load_config(evaluate.Config, overrides=base).extra_judges == ["textblob"]
    assert load_config(evaluate.Config, overrides=base + ["extra_judges=[]"]).extra_judges == []
    cfg = load_config(evaluate.Config, overrides=base + ["extra_judges=textblob,vader", "judge=vader"])
    assert evaluate.extra_judge_specs(cfg) == ["textblob"]  # the main judge is not run twice
    with pytest.raises(ConfigError, match="split"):
        load_config(evaluate.Config, overrides=base + ["split=train"])
    with pytest.raises(ConfigError, match="share a name"):
        load_config(evaluate.Config, overrides=base + ["extra_judges=a/rm,b/rm"])


# ----------------------------------------------------------------------------- compare under every judge

def log_arm(client, exp_id: str, parent: str, arm: str, policy_vader, policy_textblob, tmp: Path) -> None:
    """An arm's child run as the pipeline leaves it: eval/* metrics and responses.parquet."""
    from cwpo_ray.evaluation.scoring import judge_metrics

    n = len(policy_vader)
    ref = [0.0] * n
    run_id = client.create_run(exp_id, run_name=f"{arm}-dpo", tags={
        "mlflow.parentRunId": parent, "stage": "arm", "arm": arm, "loss": "dpo", "eval/judge": "vader"}).info.run_id
    cfg = SimpleNamespace(n_boot=500, seed=0)
    metrics = judge_metrics(policy_vader, ref, cfg)
    metrics.update({f"textblob.{k}": v for k, v in judge_metrics(policy_textblob, ref, cfg).items() if k != "n"})
    for k, v in metrics.items():
        client.log_metric(run_id, f"eval/{k}", float(v))
    rows = [{"id": f"p{i}", "prompt": f"q{i}", "policy_response": "x", "reference_response": "y",
             "policy_score": policy_vader[i], "reference_score": 0.0, "policy_score_vader": policy_vader[i],
             "reference_score_vader": 0.0, "policy_score_textblob": policy_textblob[i], "reference_score_textblob": 0.0}
            for i in range(n)]
    folder = tmp / arm
    folder.mkdir()
    write_table(pa.Table.from_pylist(rows), folder / "responses.parquet")
    client.log_artifact(run_id, str(folder / "responses.parquet"))


def test_compare_shows_every_judge_and_flags_a_judge_specific_gain(tmp_path, mlflow_server):
    """cw beats human by 0.4 under VADER (interval excludes 0) and ties it under TextBlob: judge-specific."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp_id = client.create_experiment("cwpo-compare-judges")
    parent = client.create_run(exp_id, run_name="pipeline", tags={"stage": "pipeline"}).info.run_id
    n = 100
    cw = [1.0 if i < 80 else -1.0 for i in range(n)]     # vader: 80 wins
    human = [1.0 if i < 40 else -1.0 for i in range(n)]  # vader: 40 wins
    same = [1.0 if i % 2 else 0.0 for i in range(n)]     # textblob: 50 wins, 50 ties for both arms
    log_arm(client, exp_id, parent, "cw", cw, same, tmp_path)
    log_arm(client, exp_id, parent, "human", human, same, tmp_path)
    assert cli.main(["compare", "--experiment", "cwpo-compare-judges", "--parent-run-id", parent,
                     "--out", str(tmp_path / "cmp"), "--no-log"]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| arm | loss | GRA | 95% CI | GRA strict | strict 95% CI |" in table
    assert "| cw | dpo | 0.800 |" in table and "| human | dpo | 0.400 |" in table
    # Under every judge: textblob GRA 0.75 (ties half), strict 0.5.
    assert "| cw | dpo | textblob | 0.750 |" in table and "| cw | dpo | vader | 0.800 |" in table
    line = next(l for l in table.splitlines() if l.startswith("| cw | dpo | textblob |"))
    assert "| 0.500 |" in line
    vader_line = next(l for l in table.splitlines() if l.startswith("| dpo | cw - human | vader |"))
    textblob_line = next(l for l in table.splitlines() if l.startswith("| dpo | cw - human | textblob |"))
    assert "+0.400" in vader_line and "| yes | judge-specific |" in vader_line
    assert "+0.000" in textblob_line and "| no | judge-specific |" in textblob_line
    assert "*judge-specific* = it excludes 0 under some judges" in table
    assert (tmp_path / "cmp" / "compare_paired.png").stat().st_size > 1000
