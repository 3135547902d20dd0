"""`cwpo data`: upstream formats -> labeled / unlabeled / test / quarantine tables.

Fixture files are written in each upstream format, the real CLI entry runs on them, and the
outputs are checked value by value: tricky rows, quarantine reasons, counts that add up, a split
that does not depend on input order or sharding, duplicates, reruns, errors, flat memory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cwpo_ray import sources
from cwpo_ray.cli import main
from cwpo_ray.sources import Pair, Unjudged, a_is_chosen, pair_id, split_of
from fixtures_data import (hh_row, read_rows, synthetic_pairs, tldr_row, uf_row, write_hh_volume, write_jsonl,
                           write_parquet)

REPO = Path(__file__).resolve().parent.parent
LABELED = ["id", "prompt", "chosen", "rejected"]
VALIDATION = LABELED + ["gold_chosen", "gold_rejected"]
UNLABELED = ["id", "prompt", "response_a", "response_b", "human_choice"]
QUARANTINE = ["id", "reason", "raw"]


def run_data(capsys, source: str, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["data", "--source", source, "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def outputs(out: Path) -> dict[str, list[dict]]:
    return {t: read_rows(out / f"{t}.parquet") for t in ("labeled", "unlabeled", "validation", "test", "quarantine")
            if (out / f"{t}.parquet").exists()}


def resolved(out: Path) -> dict[str, tuple[str, str, str, str]]:
    """id -> (table, prompt, chosen, rejected), the human choice of unlabeled pairs put back."""
    tables = outputs(out)
    got = {}
    for t in ("labeled", "validation", "test"):
        for r in tables.get(t, []):
            got[r["id"]] = (t, r["prompt"], r["chosen"], r["rejected"])
    for r in tables["unlabeled"]:
        if r["human_choice"] is None:
            got[r["id"]] = ("unlabeled?", r["prompt"], r["response_a"], r["response_b"])
        else:
            a_won = r["human_choice"] == "a"
            got[r["id"]] = ("unlabeled", r["prompt"], *((r["response_a"], r["response_b"]) if a_won
                                                       else (r["response_b"], r["response_a"])))
    return got


def check_counts(out: Path, stdout: str) -> dict:
    """read = kept + quarantined, in the manifest, the tables and the printed summary."""
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    tables = outputs(out)
    assert c["labeled"] == len(tables["labeled"]) and c["unlabeled"] == len(tables["unlabeled"])
    assert c["quarantined"] == len(tables["quarantine"])
    assert (c["test"] or 0) == len(tables.get("test", []))
    assert (c["validation"] or 0) == len(tables.get("validation", []))
    assert c["read"] == c["kept"] + c["quarantined"] == (c["labeled"] + c["unlabeled"] + (c["validation"] or 0)
                                                         + (c["test"] or 0) + c["quarantined"])
    assert c["read"] == c["read_train"] + c["read_test"]
    assert sum(c["quarantine_reasons"].values()) == c["quarantined"]
    assert c["duplicates"] == c["quarantine_reasons"].get("duplicate", 0) + c["quarantine_reasons"].get("duplicate id", 0)
    assert f"read {c['read']} = kept {c['kept']} + quarantined {c['quarantined']}" in stdout
    for t, cols in (("labeled", LABELED), ("unlabeled", UNLABELED), ("quarantine", QUARANTINE), ("test", LABELED),
                    ("validation", VALIDATION)):
        if t in tables:
            assert manifest["columns"][t] == cols
    ids = [r["id"] for t in ("labeled", "unlabeled", "validation", "test") for r in tables.get(t, [])]
    assert len(ids) == len(set(ids)), "an id appears twice across the kept tables"
    return manifest


# ----------------------------------------------------------------------------- pure functions

def test_hh_prompt_is_the_shared_prefix_through_the_last_assistant_marker():
    t = [("Hi there", "Hello! How can I help?"), ("Tell me a joke", None)]
    r = sources.normalize_hh(hh_row(t, " Why did the chicken cross the road?", " No."))
    assert r == Pair(r.id, "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:",
                     "Why did the chicken cross the road?", "No.")
    # The bare word "Assistant:" in a reply is not a turn marker.
    r = sources.normalize_hh(hh_row([("Who are you?", None)], " Assistant: that is my name.", " I am a bot."))
    assert r.prompt == "\n\nHuman: Who are you?\n\nAssistant:" and r.chosen == "Assistant: that is my name."
    # A marker inside only one reply is not shared, so the prompt stays the same.
    r = sources.normalize_hh(hh_row([("Q", None)], " One.\n\nAssistant: Two.", " Three."))
    assert (r.prompt, r.chosen, r.rejected) == ("\n\nHuman: Q\n\nAssistant:", "One.\n\nAssistant: Two.", "Three.")
    # Replies sharing their first words are cut at the marker, not where they diverge.
    r = sources.normalize_hh(hh_row([("Q", None)], " I think yes.", " I think no."))
    assert (r.chosen, r.rejected) == ("I think yes.", "I think no.")
    # A reply that is a prefix of the other.
    r = sources.normalize_hh(hh_row([("Q", None)], " Hello there", " Hello"))
    assert (r.chosen, r.rejected) == ("Hello there", "Hello")


@pytest.mark.parametrize("row, reason", [
    (hh_row([("Q", None)], " fine", "   "), "empty field: rejected"),
    (hh_row([("Q", None)], "", " fine"), "empty field: chosen"),
    (hh_row([("Q", None)], " same", " same"), "identical responses"),
    (hh_row([("Q", None)], " same", "  same"), "identical responses"),
    ({"chosen": "no markers here", "rejected": "none here either"}, "no separable prompt"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y",
      "rejected": "\n\nHuman: a\n\nAssistant: z\n\nHuman: b\n\nAssistant: y"},
     "no separable prompt (transcripts differ before the last turn)"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x"}, "missing field: rejected"),
    ({"chosen": None, "rejected": "x"}, "missing field: chosen"),
    ({"chosen": ["x"], "rejected": "y"}, "not a string: chosen (list)"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: \ud800", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "invalid unicode: chosen"),
    ({"__invalid_json__": "{not json"}, "invalid JSON"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y", "id": {"a": 1}},
     "bad id: id is a dict"),
])
def test_hh_bad_rows_get_a_reason(row, reason):
    assert sources.normalize_hh(row) == reason


def test_tldr_prompt_choice_and_bad_rows():
    r = sources.normalize_tldr(tldr_row("relationships", " My title ", "My post\n", [" first one\n", " second one"], 1))
    assert r == Pair(r.id, "SUBREDDIT: r/relationships\nTITLE: My title\nPOST: My post\nTL;DR:", "second one", "first one")
    assert r.id == pair_id(r.prompt, "first one", "second one")
    assert sources.normalize_tldr(tldr_row("a", "t", "p", ["x", "y"], 2)) == "choice out of range: 2"
    assert sources.normalize_tldr(tldr_row("a", "t", "p", ["x", "y"], True)) == "choice out of range: True"
    assert sources.normalize_tldr(tldr_row("a", "t", "p", ["x", "y"], None)) == "missing field: choice"
    assert sources.normalize_tldr(tldr_row("a", "t", "p", ["x", "y", "z"], 0)) == "summaries must be a list of 2"
    assert sources.normalize_tldr(tldr_row("a", "t", None, ["x", "y"], 0)) == "missing field: info.post"
    assert sources.normalize_tldr(tldr_row("a", "t", "p", ["x", 5], 0)) == "not a string: summaries[1].text (int)"
    assert sources.normalize_tldr({"summaries": []}) == "missing field: info"
    news = tldr_row(None, "Storm", None, ["Storm hits.", "Rain."], 0, article="A storm hit the coast.")
    assert sources.normalize_tldr(news) == "news article, not a reddit post (tldr_articles=false)"
    r = sources.normalize_tldr(news, articles=True)
    assert (r.prompt, r.chosen, r.rejected) == ("TITLE: Storm\nARTICLE: A storm hit the coast.\nTL;DR:",
                                                "Storm hits.", "Rain.")


def test_ultrafeedback_last_assistant_message_and_prompt_id():
    hist = [{"role": "assistant", "content": "earlier"}, {"role": "user", "content": "and now?"}]
    r = sources.normalize_ultrafeedback(uf_row("Write a haiku", "Autumn moon", "Moon", prompt_id="abc123", history=hist))
    assert r == Pair("abc123", "Write a haiku", "Autumn moon", "Moon")
    r = sources.normalize_ultrafeedback(uf_row("P", "x", "y"))
    assert r.id == pair_id("P", "x", "y")
    assert sources.normalize_ultrafeedback(uf_row("P", "x", None)) == "no assistant message: rejected"
    assert sources.normalize_ultrafeedback({**uf_row("P", "x", "y"), "chosen": 3}) == "not a message list: chosen (int)"
    assert sources.normalize_ultrafeedback({**uf_row("P", "x", "y"), "prompt": " "}) == "empty field: prompt"
    assert sources.normalize_ultrafeedback(uf_row("P", "x", "x")) == "identical responses"


def test_pairs_labeled_and_unlabeled_rows():
    assert sources.normalize_pairs({"id": 7, "prompt": "p", "chosen": "c", "rejected": "r"}) == Pair("7", "p", "c", "r")
    assert sources.normalize_pairs({"id": 7.0, "prompt": "p", "chosen": "c", "rejected": "r"}).id == "7"
    assert sources.normalize_pairs({"prompt": "p", "response_a": "a", "response_b": "b", "human_choice": "B"}) \
        == Pair(pair_id("p", "a", "b"), "p", "b", "a")
    assert sources.normalize_pairs({"prompt": "p", "response_a": "a", "response_b": "b"}) \
        == Unjudged(pair_id("p", "a", "b"), "p", "a", "b")
    assert sources.normalize_pairs({"prompt": "p", "response_a": "a", "response_b": "b", "human_choice": "c"}) \
        == "bad human_choice: 'c' (expected 'a' or 'b')"
    assert sources.normalize_pairs({"prompt": "p", "chosen": "c"}) == "missing field: rejected"
    assert sources.normalize_pairs({"prompt": "p"}) == "missing field: chosen/rejected or response_a/response_b"
    assert sources.normalize_pairs({"prompt": "p", "chosen": "c", "rejected": "r", "id": True}) == "bad id: id is a bool"
    assert sources.normalize_pairs("a string row") == "not a JSON object (str)"


def test_ids_hashes_and_split_are_stable():
    # The same pair has one id whichever response won; known values pin the hash across platforms.
    assert pair_id("p", "a", "b") == pair_id("p", "b", "a") == "26e2585fc0dc8a0e"
    assert split_of("x", 0, 0.3) == split_of("x", 0, 0.3)
    ids = [f"id{i}" for i in range(4000)]
    lab3 = {i for i in ids if split_of(i, 0, 0.3) == "labeled"}
    lab5 = {i for i in ids if split_of(i, 0, 0.5) == "labeled"}
    assert lab3 <= lab5 and abs(len(lab3) / 4000 - 0.3) < 0.03 and abs(len(lab5) / 4000 - 0.5) < 0.03
    assert {i for i in ids if split_of(i, 1, 0.3) == "labeled"} != lab3
    # Position is independent of the split: ~half of the unlabeled pairs show the human's choice first.
    unl = [i for i in ids if i not in lab3]
    assert abs(sum(a_is_chosen(i, 0) for i in unl) / len(unl) - 0.5) < 0.04
    # Pinned values: a change of hash would silently reshuffle every user's split.
    assert [split_of(f"id{i}", 0, 0.3) == "labeled" for i in range(8)] == [0, 0, 1, 1, 1, 1, 1, 0]
    assert [a_is_chosen(f"id{i}", 0) for i in range(8)] == [1, 0, 0, 1, 1, 0, 0, 0]
    # ... and the same in a fresh process with another PYTHONHASHSEED.
    code = ("from cwpo_ray.sources import split_of, a_is_chosen, pair_id;"
            "print([split_of(f'id{i}', 0, 0.3) for i in range(50)], [a_is_chosen(f'id{i}', 3) for i in range(50)],"
            " pair_id('p', 'a', 'b'))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    splits, coins = [split_of(f"id{i}", 0, 0.3) for i in range(50)], [a_is_chosen(f"id{i}", 3) for i in range(50)]
    here = f"{splits} {coins} {pair_id('p', 'a', 'b')}\n"
    assert other == here


# ----------------------------------------------------------------------------- the CLI on each format

def test_hh_folder_end_to_end(tmp_path, capsys):
    src = tmp_path / "hh"
    one = hh_row([("What is 2+2?", None)], " 4.", " 5.")
    multi = hh_row([("Hi", "Hello!"), ("Joke please", None)], " Knock knock.", " No jokes.")
    word = hh_row([("Who are you?", None)], " Assistant: that is my name.", " A bot.")
    uni = hh_row([("¿Qué tal? 你好 😀", None)], " Très bien 👍", " 不好")
    in_test = hh_row([("Capital of France?", None)], " Paris.", " Lyon.")
    rows = [one, multi, word, uni,
            hh_row([("Q", None)], " fine", " "),                      # empty reply
            hh_row([("Q", None)], " same", " same"),                  # identical
            {"chosen": 42, "rejected": "x"},                          # non-string
            {"chosen": "\n\nHuman: a\n\nAssistant: b"},               # missing field
            {"rejected": one["chosen"], "chosen": one["rejected"]},   # the same pair, labels swapped: duplicate
            in_test]                                                  # also in the test file: test wins
    write_jsonl(src / "train.jsonl", rows, raw_lines=['{"chosen": "unterminated', "[1, 2]"])
    write_jsonl(src / "test.jsonl.gz", [in_test, hh_row([("Color of sky?", None)], " Blue.", " Green.")])

    code, out, err = run_data(capsys, f"hh-rlhf:{src}", tmp_path / "out")
    assert code == 0, err
    manifest = check_counts(tmp_path / "out", out)
    c = manifest["counts"]
    assert (c["read"], c["read_train"], c["read_test"], c["test"], c["labeled"] + c["unlabeled"]) == (14, 12, 2, 2, 4)
    assert c["quarantine_reasons"] == {"duplicate": 2, "empty field: rejected": 1, "identical responses": 1,
                                       "invalid JSON": 2, "missing field: rejected": 1, "not a string: chosen (int)": 1}
    got = resolved(tmp_path / "out")
    by_prompt = {v[1]: v for v in got.values()}
    assert by_prompt["\n\nHuman: What is 2+2?\n\nAssistant:"][2:] == ("4.", "5.")
    assert by_prompt["\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke please\n\nAssistant:"][2:] == (
        "Knock knock.", "No jokes.")
    assert by_prompt["\n\nHuman: Who are you?\n\nAssistant:"][2:] == ("Assistant: that is my name.", "A bot.")
    assert by_prompt["\n\nHuman: ¿Qué tal? 你好 😀\n\nAssistant:"][2:] == ("Très bien 👍", "不好")
    assert by_prompt["\n\nHuman: Capital of France?\n\nAssistant:"][0] == "test"
    assert by_prompt["\n\nHuman: Color of sky?\n\nAssistant:"][0] == "test"
    quarantine = outputs(tmp_path / "out")["quarantine"]
    dup = [q for q in quarantine if q["reason"] == "duplicate"]
    assert {d["id"] for d in dup} == {pair_id("\n\nHuman: What is 2+2?\n\nAssistant:", "4.", "5."),
                                      pair_id("\n\nHuman: Capital of France?\n\nAssistant:", "Paris.", "Lyon.")}
    bad = {q["reason"]: q for q in quarantine}
    assert json.loads(bad["not a string: chosen (int)"]["raw"]) == {"chosen": 42, "rejected": "x"}
    assert sorted(q["raw"] for q in quarantine if q["reason"] == "invalid JSON") == ['[1, 2]', '{"chosen": "unterminated']
    assert all(len(q["id"]) > 0 for q in quarantine)
    assert manifest["config"]["labeled_fraction"] == 0.3 and manifest["splits"]["test"][0].endswith("test.jsonl.gz")


def test_tldr_folder_valid_file_is_the_test_split(tmp_path, capsys):
    src = tmp_path / "tldr"
    good = tldr_row("AskReddit", "Title A", "Post A", [" short one", " better one\n"], 1)
    news = tldr_row(None, "Storm", None, ["Storm hits.", "Rain."], 0, article="A storm hit the coast.")
    write_jsonl(src / "comparisons" / "batch1.jsonl", [good, news, tldr_row("x", "t", "p", ["a", "b"], 5)])
    write_jsonl(src / "comparisons" / "valid_batch.jsonl", [tldr_row("pets", "Dog", "My dog", ["Dog.", "Cat."], 0)])
    code, out, err = run_data(capsys, f"tldr:{src}", tmp_path / "out", "--labeled-fraction", "0.5")
    assert code == 0, err
    c = check_counts(tmp_path / "out", out)["counts"]
    assert c["quarantine_reasons"] == {"choice out of range: 5": 1,
                                       "news article, not a reddit post (tldr_articles=false)": 1}
    got = {v[1]: v for v in resolved(tmp_path / "out").values()}
    assert got["SUBREDDIT: r/pets\nTITLE: Dog\nPOST: My dog\nTL;DR:"][0] == "test"
    assert got["SUBREDDIT: r/AskReddit\nTITLE: Title A\nPOST: Post A\nTL;DR:"][2:] == ("better one", "short one")

    code, out, err = run_data(capsys, f"tldr:{src}", tmp_path / "out", "--tldr-articles")
    assert code == 0, err
    got = {v[1]: v for v in resolved(tmp_path / "out").values()}
    assert got["TITLE: Storm\nARTICLE: A storm hit the coast.\nTL;DR:"][2:] == ("Storm hits.", "Rain.")


def test_ultrafeedback_parquet_message_lists(tmp_path, capsys):
    src = tmp_path / "uf"
    hist = [{"role": "assistant", "content": "earlier"}, {"role": "user", "content": "and now?"}]
    write_parquet(src / "train_prefs-00000-of-00001.parquet", [
        uf_row("Write a haiku", "Autumn moon rises", "Moon", prompt_id="p1", history=hist),
        uf_row("Say hi", "Hi!", "Hi!", prompt_id="p2"),
        uf_row("Explain DPO", "A loss on pairs.", None, prompt_id="p3"),
        uf_row("Write a haiku", "Another answer", "Yet another", prompt_id="p1"),  # same prompt_id, other pair
    ])
    write_parquet(src / "test_prefs-00000-of-00001.parquet", [uf_row("Name a color", "Blue", "Zzz", prompt_id="p9")])
    code, out, err = run_data(capsys, f"ultrafeedback:{src}", tmp_path / "out")
    assert code == 0, err
    c = check_counts(tmp_path / "out", out)["counts"]
    assert c["quarantine_reasons"] == {"identical responses": 1, "no assistant message: rejected": 1, "duplicate id": 1}
    got = resolved(tmp_path / "out")
    assert got["p1"][1:] == ("Write a haiku", "Autumn moon rises", "Moon")
    assert got["p9"] == ("test", "Name a color", "Blue", "Zzz")
    assert {q["id"] for q in outputs(tmp_path / "out")["quarantine"]} == {"p1", "p2", "p3"}


def test_pairs_jsonl_and_parquet_folder(tmp_path, capsys):
    src = tmp_path / "pairs"
    write_jsonl(src / "labeled.jsonl", [
        {"id": 7, "prompt": "p7", "chosen": "good", "rejected": "bad"},
        {"id": "x1", "prompt": "px", "chosen": "c", "rejected": ""},
        {"prompt": "no id", "chosen": "yes", "rejected": "no"},
    ])
    write_parquet(src / "unlabeled.parquet", [
        {"id": "u1", "prompt": "pu1", "response_a": "A1", "response_b": "B1", "human_choice": "b"},
        {"id": "u2", "prompt": "pu2", "response_a": "A2", "response_b": "B2", "human_choice": None},
        {"id": "u3", "prompt": "pu3", "response_a": "A3", "response_b": "B3", "human_choice": "maybe"},
        {"id": "7", "prompt": "other", "response_a": "q", "response_b": "r", "human_choice": "a"},
    ])
    code, out, err = run_data(capsys, f"pairs:{src}", tmp_path / "out")
    assert code == 0, err
    c = check_counts(tmp_path / "out", out)["counts"]
    assert "test" not in outputs(tmp_path / "out") and c["test"] is None
    assert c["quarantine_reasons"] == {"empty field: rejected": 1, "bad human_choice: 'maybe' (expected 'a' or 'b')": 1,
                                       "duplicate id": 1}
    got = resolved(tmp_path / "out")
    assert got["7"][1:] == ("p7", "good", "bad")
    assert got["u1"][1:] == ("pu1", "B1", "A1")
    assert got["u2"] == ("unlabeled?", "pu2", "A2", "B2")  # no human choice: order kept, human_choice null
    assert got[pair_id("no id", "yes", "no")][1:] == ("no id", "yes", "no")


# ----------------------------------------------------------------------------- split, duplicates, reruns

def test_split_is_deterministic_and_independent_of_order_and_sharding(tmp_path, capsys):
    rows = synthetic_pairs(2000)
    write_jsonl(tmp_path / "one.jsonl", rows)
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    write_parquet(tmp_path / "shards" / "part-0.parquet", shuffled[:700])
    write_jsonl(tmp_path / "shards" / "part-1.jsonl.gz", shuffled[700:1300])
    write_parquet(tmp_path / "shards" / "part-2.parquet", shuffled[1300:])

    assert run_data(capsys, f"pairs:{tmp_path / 'one.jsonl'}", tmp_path / "a")[0] == 0
    code, out, err = run_data(capsys, f"pairs:{tmp_path / 'shards'}", tmp_path / "b", "--batch-size", "64")
    assert code == 0, err
    check_counts(tmp_path / "b", out)
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    key = lambda t: sorted(map(json.dumps, t))  # noqa: E731
    assert key(a["labeled"]) == key(b["labeled"]) and key(a["unlabeled"]) == key(b["unlabeled"])
    assert key(a["validation"]) == key(b["validation"])

    n_lab, n_unl, n_val = len(a["labeled"]), len(a["unlabeled"]), len(a["validation"])
    assert n_lab + n_unl + n_val == 2000 and abs(n_val / 2000 - 0.1) < 0.03
    assert abs(n_lab / (n_lab + n_unl) - 0.3) < 0.04
    assert abs(sum(r["human_choice"] == "a" for r in a["unlabeled"]) / n_unl - 0.5) < 0.05
    # Every pair keeps its human preference wherever it went.
    want = {pair_id(r["prompt"], r["chosen"], r["rejected"]): (r["chosen"], r["rejected"]) for r in rows}
    assert {k: v[2:] for k, v in resolved(tmp_path / "a").items()} == want

    assert run_data(capsys, f"pairs:{tmp_path / 'one.jsonl'}", tmp_path / "c", "--seed", "1",
                    "--labeled-fraction", "0.5")[0] == 0
    c = outputs(tmp_path / "c")
    assert abs(len(c["labeled"]) / (2000 - len(c["validation"])) - 0.5) < 0.04
    assert {r["id"] for r in a["labeled"]} != {r["id"] for r in c["labeled"]}

    assert run_data(capsys, f"pairs:{tmp_path / 'one.jsonl'}", tmp_path / "d", "max_rows=100")[0] == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["counts"]["read"] == 100


def test_duplicates_kept_once_and_rerun_replaces(tmp_path, capsys):
    base = synthetic_pairs(50, seed=3)
    swapped = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in base[:10]]
    unl = [{"prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"]} for r in base[10:15]]
    write_jsonl(tmp_path / "dups" / "train.jsonl", base + base[:5] + swapped + unl)
    write_jsonl(tmp_path / "dups" / "test.jsonl", base[40:])  # test is read first: these leave train
    code, out, err = run_data(capsys, f"pairs:{tmp_path / 'dups'}", tmp_path / "out")
    assert code == 0, err
    c = check_counts(tmp_path / "out", out)["counts"]
    assert (c["read"], c["test"], c["labeled"] + c["unlabeled"] + c["validation"], c["quarantine_reasons"]) == (
        80, 10, 40, {"duplicate": 30})
    assert "30  duplicate" in out
    first = resolved(tmp_path / "out")
    assert all(first[pair_id(r["prompt"], r["chosen"], r["rejected"])][2:] == (r["chosen"], r["rejected"]) for r in base)

    # A rerun on another source replaces everything: no test table from the first run, no temp files.
    write_jsonl(tmp_path / "small.jsonl", base[:3])
    code, out, err = run_data(capsys, f"pairs:{tmp_path / 'small.jsonl'}", tmp_path / "out")
    assert code == 0, err
    c = check_counts(tmp_path / "out", out)["counts"]
    assert c["read"] == 3 and c["quarantined"] == 0 and not (tmp_path / "out" / "test.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "labeled.parquet", "manifest.json", "quarantine.parquet", "unlabeled.parquet", "validation.parquet"]
    # validation_fraction 0: no validation split, and the previous run's table is gone.
    code, out, err = run_data(capsys, f"pairs:{tmp_path / 'small.jsonl'}", tmp_path / "out", "--validation-fraction", "0")
    assert code == 0, err
    c = check_counts(tmp_path / "out", out)["counts"]
    assert c["validation"] is None and c["labeled"] + c["unlabeled"] == 3
    assert not (tmp_path / "out" / "validation.parquet").exists()


def test_a_run_that_fails_midway_leaves_the_previous_tables(tmp_path, capsys, monkeypatch):
    from cwpo_ray.recipes import data as recipe

    write_jsonl(tmp_path / "x.jsonl", synthetic_pairs(300))
    assert run_data(capsys, f"pairs:{tmp_path / 'x.jsonl'}", tmp_path / "out")[0] == 0
    before = outputs(tmp_path / "out")
    add = recipe.DataStage.add

    def failing_add(self, row, split):
        if self.counts["read"] == 200:
            raise OSError("disk went away")
        add(self, row, split)

    monkeypatch.setattr(recipe.DataStage, "add", failing_add)
    with pytest.raises(OSError):
        main(["data", "--source", f"pairs:{tmp_path / 'x.jsonl'}", "--out", str(tmp_path / "out"), "--seed", "9",
              "--batch-size", "16"])
    assert outputs(tmp_path / "out") == before
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_help_describes_the_stage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "--labeled-fraction" in text and "hh-rlhf" in text and "quarantine" in text


@pytest.mark.parametrize("args, message", [
    (["--source", "bogus:x.jsonl"], "source: expected KIND:PATH_OR_HUB_ID with KIND one of hh-rlhf, tldr"),
    (["--source", "hh-rlhf"], "source: expected KIND:PATH_OR_HUB_ID"),
    (["--source", "hh-rlhf:"], "source: nothing after"),
    (["--source", "hh-rlhf:/no/such/file.jsonl"], "source: file not found: /no/such/file.jsonl"),
    (["--source", "pairs:{tmp}/missing.parquet"], "source: file not found:"),
    (["--source", "pairs:{tmp}/empty_dir"], "source: no .parquet or .jsonl files in"),
    (["--source", "pairs:{tmp}/x.jsonl", "--labeled-fraction", "1.5"], "labeled_fraction must be in (0, 1), got 1.5"),
    (["--source", "pairs:{tmp}/x.jsonl", "--labeled-fraction", "0"], "labeled_fraction must be in (0, 1), got 0.0"),
    (["--source", "pairs:{tmp}/x.jsonl", "--max-rows", "0"], "max_rows must be at least 1"),
    (["--source", "pairs:{tmp}/x.jsonl", "--seed", "one"], "seed: expected int, got 'one'"),
    (["--source", "hh-rlhf:nobody/no-such-dataset"], "source: cannot read hub dataset 'nobody/no-such-dataset'"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty_dir").mkdir()
    write_jsonl(tmp_path / "x.jsonl", synthetic_pairs(3))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["data", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("cwpo data:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cwpo data: error: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_missing_out_is_one_line_error(capsys, tmp_path):
    write_jsonl(tmp_path / "x.jsonl", synthetic_pairs(3))
    assert main(["data", "--source", f"pairs:{tmp_path / 'x.jsonl'}"]) == 2
    assert capsys.readouterr().err.strip() == "cwpo data: error: missing required setting out (flag --out)"


# ----------------------------------------------------------------------------- memory

PEAK_WRAPPER = """
import runpy, sys
sys.argv = ["cwpo"] + sys.argv[1:]
try:
    runpy.run_module("cwpo_ray.cli", run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print(f"PEAK_KB {hwm}", file=sys.stderr)
"""


def _peak_kb(source: Path, out: Path) -> int:
    """Peak RSS (VmHWM of the stage's own process, read just before it exits) of `cwpo data`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, "data", "--source", f"hh-rlhf:{source}", "--out", str(out),
                           "--batch-size", "1024"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stderr.strip().splitlines()[-1].split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_memory_stays_flat_as_the_input_grows(tmp_path):
    n = 15_000
    small = write_hh_volume(tmp_path / "small.jsonl", n)
    large = write_hh_volume(tmp_path / "large.jsonl", 4 * n)
    peak_small = _peak_kb(tmp_path / "small.jsonl", tmp_path / "out_small")
    peak_large = _peak_kb(tmp_path / "large.jsonl", tmp_path / "out_large")
    for out, rows in ((tmp_path / "out_small", n), (tmp_path / "out_large", 4 * n)):
        assert json.loads((out / "manifest.json").read_text())["counts"]["kept"] == rows
    added_kb = (large - small) / 1024
    growth_kb = peak_large - peak_small
    assert growth_kb < 0.25 * added_kb, (
        f"peak RSS grew {growth_kb / 1024:.1f} MiB for {added_kb / 1024:.1f} MiB more input "
        f"({peak_small / 1024:.0f} -> {peak_large / 1024:.0f} MiB)")


def test_a_killed_run_publishes_nothing_and_a_rerun_completes(tmp_path):
    """SIGKILL `cwpo data` while it writes: no table appears under its final name; the rerun counts add up."""
    import signal
    import time

    n = 30_000
    source = tmp_path / "hh.jsonl"
    write_hh_volume(source, n)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cwpo_ray.cli", "data", "--source", f"hh-rlhf:{source}", "--out", str(out),
           "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    time.sleep(0.5)  # well inside the writing
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # only hidden temporaries
    assert subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          timeout=300).returncode == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["read"] == n and counts["kept"] + counts["quarantined"] == n
