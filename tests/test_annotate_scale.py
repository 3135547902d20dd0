"""`cwpo annotate` at scale: a driver killed mid-run resumes, work units cover every row once,
output files keep their limits, statistics stay fixed-size."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cwpo_ray import calibration
from cwpo_ray.annotator import new_annotator, resolve_precision, save_annotator
from cwpo_ray.config import ConfigError, load_config
from cwpo_ray.models import ModelSource
from cwpo_ray.recipes import annotate
from cwpo_ray.annotation import outputs, stats as annotation_stats, units as work_units
from cwpo_ray.tables import QUARANTINE_SCHEMA, read_table, table_files
from fixtures_data import write_jsonl

REPO = Path(__file__).resolve().parent.parent
BAD_LINES = ['{"prompt": "p", "response_a": "x"', '{"prompt": "p", "response_a": "x", "response_b": "x"}',
             '[1, 2]', '{"prompt": "", "response_a": "x", "response_b": "y"}']


def pairs(n: int, seed: int = 0, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "good bad kind rude clear vague honest wrong useful boring".split()
    return [{"id": f"p{i}", "prompt": f"q{i} " + " ".join(rng.choices(words, k=4)),
             "response_a": " ".join(rng.choices(words, k=5)), "response_b": " ".join(rng.choices(words, k=5)) + f" {i}",
             "human_choice": rng.choice("ab")} for i in range(start, start + n)]


# ----------------------------------------------------------------------------- pure parts

def test_settings_and_config_split():
    fields = set(annotate.Settings.__dataclass_fields__)
    assert {"data", "annotator", "out"}.isdisjoint(fields)
    assert {"unit_rows", "max_rows_per_file", "max_bytes_per_file", "export_uncertain"} <= fields
    settings = annotate.Settings(num_actors=3, max_rows_per_file=10)
    settings.validate()
    from dataclasses import asdict
    cfg = annotate.Config(**asdict(settings), data="d", annotator="a", out="o")
    assert cfg.num_actors == 3 and cfg.max_rows_per_file == 10 and cfg.out == "o"
    with pytest.raises(ValueError, match="unit_rows"):
        annotate.Settings(unit_rows=0).validate()
    with pytest.raises(ConfigError, match="out"):
        load_config(annotate.Config, None, {"data": str(REPO), "annotator": str(REPO), "out": " "})


def test_parquet_units_cover_every_row_once(tmp_path):
    rows = pairs(1000)
    path = tmp_path / "u.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=70)  # row groups smaller than a unit
    big = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:900]), big)  # one row group, larger than a unit: cut
    for unit_rows in (1, 64, 150, 333, 5000):
        units = work_units.plan_units([path, big], unit_rows)
        got = [r["id"] for u in units for b in work_units.iter_unit_rows(u, 37) for r in b]
        assert got == [r["id"] for r in rows] + [r["id"] for r in rows[:900]], unit_rows
        assert len({u["key"] for u in units}) == len(units)
        assert units == work_units.plan_units([path, big], unit_rows)  # deterministic
    assert work_units.parquet_ranges([70] * 10, 150) == [(0, 140), (140, 280), (280, 420), (420, 560), (560, 700)]
    assert work_units.parquet_ranges([900], 400) == [(0, 300), (300, 600), (600, 900)]


def test_a_small_input_is_cut_into_enough_units_for_every_actor(tmp_path):
    """One 10k-row file in one row group was one unit under the default unit_rows: one actor
    labeled it all. It is now 16 units, each row in exactly one, in input order; a large input
    keeps unit_rows; the plan does not depend on the actor count."""
    rows = pairs(10_000)
    path = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10_000)
    units = work_units.plan_units([path], annotate.Settings().unit_rows)
    assert len(units) == work_units.MIN_UNITS
    got = [r["id"] for u in units for b in work_units.iter_unit_rows(u, 512) for r in b]
    assert got == [r["id"] for r in rows]
    jsonl = tmp_path / "one.jsonl"
    write_jsonl(jsonl, rows)
    units = work_units.plan_units([jsonl], 20_000)
    assert work_units.MIN_UNITS - 2 <= len(units) <= work_units.MIN_UNITS + 2  # rows estimated from the first MiB
    assert [r["id"] for u in units for b in work_units.iter_unit_rows(u, 512) for r in b] == [r["id"] for r in rows]
    assert work_units.balanced_unit_rows(10_000_000, 20_000) == 20_000
    assert work_units.balanced_unit_rows(100, 20_000) == work_units.MIN_UNIT_ROWS
    assert work_units.balanced_unit_rows(100, 10) == 10  # never above what was asked for


def test_jsonl_byte_ranges_cover_every_line_once(tmp_path):
    rng = random.Random(3)
    rows = pairs(700)
    for r in rows:
        r["prompt"] += " x" * rng.randint(0, 60)  # uneven line lengths: ranges cut lines anywhere
    path = write_jsonl(tmp_path / "u.jsonl", rows[:400], raw_lines=["", "   "] + BAD_LINES)
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\r\n" for r in rows[400:]))
        fh.write(json.dumps({"id": "last", "prompt": "p", "response_a": "a", "response_b": "b"}))  # no newline
    gz = write_jsonl(tmp_path / "v.jsonl.gz", rows[:10])
    expect = [r["id"] for r in rows[:400]] + [None] * len(BAD_LINES) + [r["id"] for r in rows[400:]] + ["last"] \
        + [r["id"] for r in rows[:10]]
    for unit_rows in (1, 7, 100, 10_000):
        units = work_units.plan_units([path, gz], unit_rows)
        got = [r.get("id") if isinstance(r, dict) else None for u in units for b in work_units.iter_unit_rows(u, 16)
               for r in b]
        assert got == expect, unit_rows
    # a .gz input is cut into ranges of lines like any other (gzip cannot seek: each unit skips to its start)
    big = write_jsonl(tmp_path / "w.jsonl.gz", rows, raw_lines=BAD_LINES)
    units = work_units.plan_units([big], 256)
    assert [u["kind"] for u in units] == ["jsonl.gz"] * 3 and [(u["start"], u["end"]) for u in units] == [
        (0, 256), (256, 512), (512, 700 + len(BAD_LINES))]
    got = [r.get("id") if isinstance(r, dict) else None for u in units for b in work_units.iter_unit_rows(u, 16)
           for r in b]
    assert got == [r["id"] for r in rows] + [None] * len(BAD_LINES)


def test_output_files_keep_their_limits(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)  # text that does not compress away, so bytes follow rows
    rows = [{"id": f"i{k}", "reason": "r" * (k % 50), "raw": "%032x" % rng.getrandbits(128)} for k in range(10_000)]
    sources = []
    for j in range(5):
        sources.append(str(src / f"{j}.parquet"))
        pq.write_table(pa.Table.from_pylist(rows[j * 2000:(j + 1) * 2000], schema=QUARANTINE_SCHEMA),
                       sources[-1], row_group_size=300)
    out = tmp_path / "out"
    out.mkdir()
    counts = outputs.write_files(sources, str(out), "part", QUARANTINE_SCHEMA, 3000, 10**9)
    assert counts == [3000, 3000, 3000, 1000]
    assert pq.read_table(out).column("id").to_pylist() == [r["id"] for r in rows]
    small = tmp_path / "small"
    small.mkdir()
    max_bytes = 80_000
    counts = outputs.write_files(sources, str(small), "part", QUARANTINE_SCHEMA, 10**6, max_bytes)
    assert sum(counts) == 10_000 and len(counts) > 1
    sizes = [f.stat().st_size for f in small.glob("*.parquet")]
    assert max(sizes) <= max_bytes * 1.1, sizes  # "about": judged from the bytes per row so far
    assert outputs.plan_files([(5, 1), (5, 1), (5, 1), (20, 1), (1, 1)], 10, 100) == [[0, 1], [2], [3], [4]]
    assert outputs.plan_files([(1, 60), (1, 60), (1, 30)], 10, 100) == [[0], [1, 2]]


def test_histogram_deciles_match_the_exact_ones_closely():
    rng = np.random.default_rng(0)
    conf = rng.beta(0.7, 3, size=20_000)
    right = (rng.random(20_000) < 0.45 + 0.5 * conf).astype(np.int64)
    stats = annotation_stats.new_stats()
    for lo in range(0, 20_000, 3000):  # folded in batches, merged through a sidecar's JSON
        part = annotation_stats.new_stats()
        annotation_stats.add_stats(part, conf[lo:lo + 3000], [], right[lo:lo + 3000], conf[lo:lo + 3000])
        annotation_stats.merge_stats(stats, annotation_stats.stats_from_json(json.loads(json.dumps(annotation_stats.stats_to_json(part)))))
    approx = annotation_stats.deciles_from_histogram(stats["agree_n"], stats["agree_right"], stats["agree_sum"],
                                             stats["agree_min"], stats["agree_max"])
    exact = calibration.accuracy_by_decile(conf, right)
    assert sum(d["count"] for d in approx) == 20_000 and len(approx) == 10
    for a, e in zip(approx, exact):
        assert abs(a["count"] - e["count"]) < 200 and abs(a["accuracy"] - e["accuracy"]) < 0.03
        assert abs(a["mean_confidence"] - e["mean_confidence"]) < 0.01
    assert approx[0]["conf_min"] == conf.min() and approx[-1]["conf_max"] == conf.max()
    assert stats["annotated"] == 20_000 and stats["agree_right"].sum() == right.sum()


def test_work_folder_is_kept_only_for_the_same_fingerprint(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, pairs(5))
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "model.safetensors").write_bytes(b"0" * 10)
    cfg = annotate.Config(data=str(data), annotator=str(ann), out=str(tmp_path / "out"))
    out = Path(cfg.out)
    out.mkdir()
    (out / ".annotate-staging-1234").mkdir()  # what the old layout could leave behind
    work, note = work_units.prepare_work(out, work_units.fingerprint(cfg, [data]))
    assert note == "fresh" and not (out / ".annotate-staging-1234").exists()
    (work / "units" / "u.json").write_text("{}")
    (work / "tmp").mkdir()
    (work / "tmp" / "half.parquet").write_text("partial")
    work, note = work_units.prepare_work(out, work_units.fingerprint(cfg, [data]))
    assert note == "resume" and (work / "units" / "u.json").exists() and not (work / "tmp").exists()
    cfg.batch_size = 7  # changes how, not what: still resumes
    assert work_units.prepare_work(out, work_units.fingerprint(cfg, [data]))[1] == "resume"
    cfg.precision = "bf16"  # changes the labels' last digits: starts over
    assert work_units.prepare_work(out, work_units.fingerprint(cfg, [data]))[1].startswith("starting over")
    # auto is fingerprinted as what it resolves to: it resumes the run of that precision, and only that one
    cfg.precision = "auto"
    resolved = resolve_precision("auto", "cpu")
    assert annotate.actor_precision(cfg) == resolved
    cfg = replace(cfg, precision=annotate.actor_precision(cfg))  # as run() does before fingerprinting
    assert work_units.fingerprint(cfg, [data])["settings"].get("precision", "fp32") == resolved
    # fp32 adds no key: the work folder of a run from before the setting existed (fp32) still resumes
    assert "precision" not in work_units.fingerprint(replace(cfg, precision="fp32"), [data])["settings"]
    note = work_units.prepare_work(out, work_units.fingerprint(cfg, [data]))[1]  # after the bf16 run
    assert note == "resume" if resolved == "bf16" else note.startswith("starting over")
    cfg.precision = "fp32"
    work, note = work_units.prepare_work(out, work_units.fingerprint(cfg, [data]))
    assert note == "resume" if resolved == "fp32" else note.startswith("starting over")
    for change in ("settings", "input", "annotator"):
        (work / "units" / "u.json").write_text("{}")
        if change == "settings":
            cfg.export_uncertain = 3
        elif change == "input":
            os.utime(data, ns=(1, 1))
        else:
            (ann / "model.safetensors").write_bytes(b"1" * 11)
        work, note = work_units.prepare_work(out, work_units.fingerprint(cfg, [data]))
        assert note.startswith("starting over") and change in note and not list((work / "units").iterdir())


# ----------------------------------------------------------------------------- the whole job, killed

def test_annotate_resumes_after_the_driver_is_killed(ray_cluster, tiny_encoder, tmp_path):
    """SIGKILL the `cwpo annotate` driver's process group once some units are committed; the same
    command again labels only the rest and every input id ends up exactly once."""
    annotator = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), tmp_path / "annotator")
    rows = pairs(26_000)  # 22 units of 1,250 rows and 3 output files of at most 10,000: the paths, not a scale
    data = tmp_path / "unlabeled"
    write_jsonl(data / "part-0.jsonl", rows[:13_000], raw_lines=BAD_LINES[:2])
    write_jsonl(data / "part-1.jsonl", rows[13_000:], raw_lines=BAD_LINES[2:])
    total = len(rows) + len(BAD_LINES)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cwpo_ray", "annotate", "--data", str(data), "--annotator", str(annotator),
           "--out", str(out), "--num-actors", "2", "--unit-rows", "1250", "--max-rows-per-file", "10000",
           "--export-uncertain", "25", "--precision", "auto"]
    units = len(work_units.plan_units(table_files(data), 1250))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}

    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sidecars = out / ".annotate-work" / "units"
    deadline = time.monotonic() + 900
    while first.poll() is None and time.monotonic() < deadline and len(list(sidecars.glob("*.json"))) < units // 4:
        time.sleep(0.1)
    assert first.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = len(list(sidecars.glob("*.json")))
    assert 0 < done_before < units
    assert not (out / "annotated.parquet").exists()  # nothing published by the killed run

    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout

    annotated, quarantine = read_table(out / "annotated.parquet"), read_table(out / "quarantine.parquet")
    ids = annotated["id"].to_pylist() + quarantine["id"].to_pylist()
    assert len(ids) == len(set(ids)) == total
    assert set(annotated["id"].to_pylist()) == {r["id"] for r in rows} and quarantine.num_rows == len(BAD_LINES)
    report = json.loads((out / "report.json").read_text())
    assert report["input_rows"] == total and report["annotated"] == len(rows)
    assert report["quarantined"] == len(BAD_LINES) and sum(report["quarantine_reasons"].values()) == len(BAD_LINES)
    assert report["resumed_units"] >= done_before and report["units"] == units
    assert report["annotated_this_run"] < len(rows)  # the killed run's units were not labeled again
    # both runs resolved auto alike (else the rerun starts over), and the report records the resolved precision
    assert report["precision"] == report["settings"]["precision"] == resolve_precision("auto", "cpu")
    assert report["human_agreement"]["pairs"] == len(rows) and report["human_agreement"]["deciles_approximate"]
    files = sorted((out / "annotated.parquet").glob("*.parquet"))
    assert all(pq.ParquetFile(f).metadata.num_rows <= 10_000 for f in files) and len(files) >= 3
    uncertain = read_table(out / "uncertain.parquet")  # the 25 least confident of all rows, both runs'
    order = np.lexsort((np.array(annotated["id"].to_pylist()), annotated["confidence"].to_numpy()))
    assert set(uncertain["id"].to_pylist()) == set(np.array(annotated["id"].to_pylist())[order[:25]])
    assert not (out / ".annotate-work").exists() and not list(out.glob(".*"))
    print(f"reliability: annotate driver killed with {done_before}/{units} units committed; the rerun labeled "
          f"{report['annotated_this_run']} of {len(rows)} pairs; input {total} = annotated {annotated.num_rows} + "
          f"quarantined {quarantine.num_rows}, {len(set(ids))} distinct ids, {len(files)} annotated files")
