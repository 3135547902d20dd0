"""`cwpo annotate` against crashes and power loss at each step of its commits: a unit's sidecar
never names an incomplete file, and report.json never stands beside another run's outputs.

Crashes are injected at each rename / fsync (in-process for a unit, whose commit has no cleanup
code that an exception would run; ``os._exit`` in a child process for the publication). A power
loss cannot be staged in a test: what it needs, each file on disk before the name that points at
it, is checked on the order of the real fsync and rename calls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cwpo_ray.annotation import outputs, units as work_units
from cwpo_ray.annotation.labeling import LabelUnits, annotate_unit
from cwpo_ray.annotator import new_annotator, save_annotator
from cwpo_ray.models import ModelSource
from cwpo_ray.tables import ANNOTATED_SCHEMA, QUARANTINE_SCHEMA, UNLABELED_SCHEMA, read_table
from fixtures_data import write_jsonl
from test_annotate_scale import BAD_LINES, pairs

REPO = Path(__file__).resolve().parent.parent


class Crash(BaseException):
    """What a kill does to annotate_unit: it stops there (BaseException: nothing catches it)."""


def traced(monkeypatch, events: list, crash_at: int = 0) -> None:
    """Record the real os.fsync / rename / replace / unlink calls, paths resolved, in order; raise
    Crash instead of the ``crash_at``-th one. (shutil.rmtree's walk, by descriptor, is left out.)"""
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace", "unlink")}

    def wrap(name):
        def call(*args, **kwargs):
            if kwargs.get("dir_fd") is None:
                if len(events) + 1 == crash_at:
                    raise Crash
                paths = ([os.readlink(f"/proc/self/fd/{args[0]}")] if name == "fsync"
                         else [os.path.realpath(a) for a in args[:2]])
                events.append((name, *paths))
            return real[name](*args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(os, name, wrap(name))


def assert_sidecars_name_complete_files(work: Path) -> int:
    """Every committed sidecar's files exist with the bytes and rows it records; returns the sidecars."""
    n = 0
    for side in work_units.committed(work):
        n += 1
        for f in side["files"].values():
            path = work / "units" / f["path"]
            assert path.stat().st_size == f["bytes"] and pq.ParquetFile(path).metadata.num_rows == f["rows"]
    return n


@pytest.fixture(scope="module")
def labeler(tiny_encoder, tmp_path_factory):
    annotator = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32),
                               tmp_path_factory.mktemp("durability") / "annotator")
    return LabelUnits(str(annotator), work="unused", batch_size=64, model_batch_size=64, threads=1,
                      use_gpu=False, keep_uncertain=5)


def test_a_unit_commits_only_complete_files_whatever_step_it_dies_at(labeler, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "u.jsonl", pairs(150), raw_lines=BAD_LINES)
    unit = {**work_units.plan_units([data], 10_000)[0], "end": data.stat().st_size}  # the whole file: one unit
    work = tmp_path / "work"

    def label_unit(crash_at: int = 0) -> list:
        events: list = []
        with monkeypatch.context() as m:
            traced(m, events, crash_at)
            annotate_unit(unit, work, labeler.label, 64, keep_uncertain=5)
        return events

    events = label_unit()  # a clean run: the order of its calls
    units_dir = os.path.realpath(work / "units")
    (side,) = list(work_units.committed(work))
    commit = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith(".json"))
    for f in side["files"].values():
        dst = os.path.join(units_dir, f["path"])
        r = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == dst)
        assert ("fsync", events[r][1]) in events[:r]  # the file's content before its name
        assert ("fsync", units_dir) in events[r + 1:commit]  # its name before the sidecar
    assert ("fsync", events[commit][1]) in events[:commit] and ("fsync", units_dir) in events[commit + 1:]
    assert set(side["files"]) == {"annotated", "quarantine", "uncertain"}
    rows = {k: f["rows"] for k, f in side["files"].items()}
    assert rows == {"annotated": 150, "quarantine": len(BAD_LINES), "uncertain": 5}

    # Killed before each of those calls in turn; then the retry Ray makes of the unit.
    committed_states = []
    for k in range(1, len(events) + 1):
        shutil.rmtree(work)
        with pytest.raises(Crash):
            label_unit(crash_at=k)
        committed_states.append(assert_sidecars_name_complete_files(work))
        label_unit()
        assert assert_sidecars_name_complete_files(work) == 1
        assert {k: f["rows"] for k, f in next(work_units.committed(work))["files"].items()} == rows
    assert committed_states == [0] * (len(events) - 1) + [1]  # only the last step (the folder's fsync) follows the commit
    print(f"reliability: a unit killed at each of its {len(events)} fsync/rename steps: {len(events) - 1} left "
          f"no sidecar, 1 (after the commit's rename) a sidecar naming complete files; each retry committed "
          f"{rows['annotated']} annotated + {rows['quarantine']} quarantined + {rows['uncertain']} uncertain")


# ----------------------------------------------------------------------------- the publication

def stage_run(root: Path, run: str, annotated: int, quarantined: int, uncertain: int) -> Path:
    """What a run stages before outputs.publish: real Parquet tables whose ids name the run, and its report."""
    staging = root / f"publish-{run}"
    (staging / "annotated.parquet").mkdir(parents=True)
    (staging / "quarantine.parquet").mkdir()
    for i in range(0, annotated, 10):  # a file per 10 rows
        ids = [f"{run}-{j}" for j in range(i, min(i + 10, annotated))]
        table = pa.table({c: ids if c == "id" else ([0.5] * len(ids) if t == pa.float64() else ["x"] * len(ids))
                          for c, t in zip(ANNOTATED_SCHEMA.names, ANNOTATED_SCHEMA.types)}, schema=ANNOTATED_SCHEMA)
        pq.write_table(table, staging / "annotated.parquet" / f"part-{i:05d}-000.parquet")
    if quarantined:
        pq.write_table(pa.table({"id": [f"{run}-q{j}" for j in range(quarantined)], "reason": ["bad"] * quarantined,
                                 "raw": ["{}"] * quarantined}, schema=QUARANTINE_SCHEMA),
                       staging / "quarantine.parquet" / "part-00000-000.parquet")
    if uncertain:
        ids = [f"{run}-{j}" for j in range(uncertain)]
        pq.write_table(pa.table({c: ids if c == "id" else ["x"] * uncertain for c in UNLABELED_SCHEMA.names},
                                schema=UNLABELED_SCHEMA), staging / "uncertain.parquet")
    report = {"run": run, "annotated": annotated, "quarantined": quarantined,
              "settings": {"export_uncertain": uncertain}}
    (staging / "report.json").write_text(json.dumps(report))
    return staging


def published_run(out: Path) -> str | None:
    """The run whose report.json is in ``out``, after checking that every output there is that run's."""
    report = outputs.published_report(out)
    if report is None:
        return None
    run = report["run"]
    for name, n in (("annotated.parquet", report["annotated"]), ("quarantine.parquet", report["quarantined"]),
                    ("uncertain.parquet", report["settings"]["export_uncertain"])):
        if name == "uncertain.parquet" and not n:
            assert not (out / name).exists(), f"{name} of another run beside {run}'s report"
            continue
        ids = read_table(out / name)["id"].to_pylist()
        assert len(ids) == n and all(i.startswith(f"{run}-") for i in ids), f"{name} is not all {run}'s"
    return run


# A child that publishes and dies (os._exit: no cleanup, as a kill) before its K-th rename / replace /
# unlink of a name (shutil.rmtree's walk of an old folder, by descriptor, is not counted).
DYING_PUBLISH = r"""
import os, sys
from pathlib import Path
from cwpo_ray.annotation.outputs import publish
k, steps = int(sys.argv[3]), [0]
def dying(real):
    def call(*args, **kwargs):
        if kwargs.get("dir_fd") is None:
            steps[0] += 1
            if steps[0] == k:
                os._exit(17)
        return real(*args, **kwargs)
    return call
for name in ("rename", "replace", "unlink"):
    setattr(os, name, dying(getattr(os, name)))
publish(Path(sys.argv[2]), Path(sys.argv[1]))
"""


def test_a_publication_killed_at_any_step_never_mixes_two_runs(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    outputs.publish(stage_run(tmp_path / "a", "A", 30, 3, 5), base)
    assert published_run(base) == "A"
    seen = []
    for k in range(1, 100):
        out = tmp_path / f"out-{k}"
        shutil.copytree(base, out)
        staging = stage_run(tmp_path / f"b-{k}", "B", 20, 0, 0)  # no quarantine rows, no uncertain export
        child = subprocess.run([sys.executable, "-c", DYING_PUBLISH, str(out), str(staging), str(k)], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert child.returncode in (0, 17), child.stderr
        seen.append(published_run(out))  # None (no report: cut short), "A" or "B", never a mix
        if child.returncode == 0:
            break
        # The rerun: annotate's prepare_work clears what the killed one left, then it publishes again.
        work_units.prepare_work(out, {"input": "B"})
        outputs.publish(stage_run(tmp_path / f"b2-{k}", "B", 20, 0, 0), out)
        assert published_run(out) == "B"
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".annotate-work"]
    assert seen[0] == "A" and seen[-1] == "B" and set(seen[1:-1]) == {None}, seen
    print(f"reliability: a publication of run B over run A killed before each of its {len(seen) - 1} renames/"
          f"unlinks: report.json names {seen[0]} (killed before anything moved), then none "
          f"({seen.count(None)} states: outputs being replaced, no report), then B; every rerun published B whole")


def test_a_publication_puts_report_json_on_disk_after_every_table(tmp_path, monkeypatch):
    """The power-loss order: OUT's entries flushed after the old report goes and before the new comes."""
    out = tmp_path / "out"
    out.mkdir()
    outputs.publish(stage_run(tmp_path / "a", "A", 30, 3, 5), out)
    events = []
    with monkeypatch.context() as m:
        traced(m, events)
        outputs.publish(stage_run(tmp_path / "b", "B", 20, 0, 0), out)
    d, report = os.path.realpath(out), os.path.realpath(out / "report.json")
    gone = events.index(("unlink", report))
    came = max(i for i, e in enumerate(events) if e[0] == "replace" and e[-1] == report)
    # every other name that changes in OUT: the tables, their temporaries, the stale uncertain.parquet
    moves = [i for i, e in enumerate(events) if e[0] != "fsync" and os.path.dirname(e[-1]) == d
             and not os.path.basename(e[-1]).startswith((".report.json", "report.json"))]
    assert gone < min(moves) and max(moves) < came
    assert ("fsync", d) in events[gone + 1:min(moves)] and ("fsync", d) in events[max(moves) + 1:came]
    assert ("fsync", d) in events[came + 1:] and published_run(out) == "B"
