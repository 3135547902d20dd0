"""A full disk (ENOSPC): a stage stops with one line naming the folder, the space it was estimated to need
and the space free, publishes nothing half-written and leaves no temporaries; the same command completes
once space is freed. The pipeline refuses a stage whose estimate does not fit, before starting it; so does
a standalone annotate.

Real disks: each test's `cwpo` commands write to a small tmpfs of their own, mounted in a user + mount
namespace (`unshare -rm`, as tests/test_preflight.py gives a driver a disk of its own; no root needed
where user namespaces are allowed). A process holding the namespace keeps the tmpfs; every command
enters it with `nsenter`, and the test reads the tmpfs from outside through /proc/PID/root. A filler
file leaves a command too little room; deleting it frees the space for the rerun. Ray started outside
the namespace cannot see the tmpfs, so each command starts its own local Ray inside it (no RAY_ADDRESS).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cwpo_ray import disk_space
from cwpo_ray.annotation import units as work_units
from cwpo_ray.checkpoint_guard import SNAPSHOT, drop_torn_checkpoint_list, remove_copied
from cwpo_ray.cluster_checks import plan
from cwpo_ray.tables import read_table, table_files
from fixtures_data import write_jsonl

REPO = Path(__file__).resolve().parent.parent
ONE_LINE = re.compile(r"^cwpo (\S+): error: no space left on (\S+) \(needs ~([\d.]+ [KMG]B), ([\d.]+ [KMG]B) free\): "
                      r"free space or give another out$")


# ----------------------------------------------------------------------------- no disk needed

def test_the_estimates_are_the_documented_sums(tiny_decoder, tmp_path):
    assert disk_space.checkpoint_bytes(100) == 900  # (2 kept + 1 being written) x 3x the model
    assert disk_space.checkpoint_bytes(100, lora=True) == 300
    assert disk_space.training_bytes(100, saves=2, table=10) == 900 + 200 + 10
    assert disk_space.training_bytes(100, saves=2, table=10, checkpoints=False) == 210  # checkpoints elsewhere
    assert disk_space.tables_bytes(5) == 10
    model = disk_space.model_bytes(str(tiny_decoder), None)[0]
    table = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"x": ["a"] * 100}), table)
    assert model > 0 and disk_space.policy_bytes(str(tiny_decoder), None, False, True, str(table)) == \
        9 * model + 2 * model + table.stat().st_size
    assert plan.checkpoint_bytes is disk_space.checkpoint_bytes  # preflight counts checkpoints the same way
    assert [disk_space.human(n) for n in (1_500_000_000, 12_340_000, 640_000)] == ["1.50 GB", "12.3 MB", "640 KB"]


def test_a_gzipped_input_counts_at_the_text_it_holds(tmp_path):
    """annotate's unit files and its final table coexist, so its need must cover twice the Parquet of the
    rows; a .jsonl.gz of them is smaller than that Parquet (the built-in benchmark's pairs: real text)."""
    import gzip

    rows = pq.read_table(REPO / "cwpo_ray" / "benchmark_data" / "pairs.parquet").to_pylist()
    packed = tmp_path / "pairs.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    table = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    assert disk_space.tables_bytes(disk_space.input_bytes(packed)) >= 2 * table.stat().st_size
    # What a folder takes on disk is its files' sizes, compressed or not (a work folder's committed units).
    assert disk_space.folder_bytes(tmp_path) == packed.stat().st_size + table.stat().st_size


def test_a_full_disk_is_found_however_it_is_wrapped(tmp_path):
    """The errno where an OSError kept it, else the text (the messages as pyarrow, safetensors and a Ray
    Train worker's traceback word them), through chained errors and a Ray task's ``cause``."""
    named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "ray" / "sft-po"))
    assert disk_space.full_disk(named) == (True, str(tmp_path / "out" / "ray" / "sft-po"))
    pyarrow_text = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    try:
        try:
            raise pyarrow_text
        except OSError as e:
            raise RuntimeError("Training failed due to controller error") from e
    except RuntimeError as wrapped:
        assert disk_space.full_disk(wrapped) == (True, "")
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    quoted = RuntimeError("worker failed:\nOSError: [Errno 28] No space left on device (a checkpoint of 426 KB and "
                          f"1.0 MB to spare, 12 KB free): '{tmp_path}/out/ray/sft-po'")
    assert disk_space.full_disk(rust) == (True, "")
    assert disk_space.full_disk(quoted) == (True, f"{tmp_path}/out/ray/sft-po")
    task = RuntimeError("ray task failed")
    task.cause = named  # a Ray task error's cause
    assert disk_space.full_disk(task)[0] and not disk_space.full_disk(OSError(errno.EACCES, "denied"))[0]
    # the folder named: OUT for a path under it (what the user gave), else the path's own folder
    assert disk_space.shown_folder(str(tmp_path / "out" / "x" / "y.parquet"), tmp_path / "out") == \
        (str(tmp_path / "out"), True)
    assert disk_space.shown_folder(str(tmp_path / "y.parquet"), tmp_path / "out") == (str(tmp_path), False)
    error = disk_space.no_space_error(quoted, tmp_path / "out", 10**15)
    assert str(error).startswith(f"no space left on {tmp_path / 'out'} (needs ~1000000.00 GB, ")
    assert str(disk_space.NotEnoughSpace("/x", 1000, 5000)) == \
        "no space left on /x (needs more than the ~1 KB estimated, 5 KB free): free space or give another out"
    assert str(disk_space.NotEnoughSpace("/tmp", 0, 5000, under_out=False)) == "no space left on /tmp (5 KB free): " \
        "free space there"


def test_a_torn_checkpoint_list_is_dropped_and_a_failed_upload_undone(tmp_path, capsys):
    """Ray Train rewrites its checkpoint list in place: one cut short by a full disk (seen as an empty file
    on the tmpfs of test_train_policy_...) would stop every later run of the stage; it is dropped with
    the run's checkpoints. A whole list is kept."""
    run = tmp_path / "ray" / "sft-po"
    (run / "checkpoint_1").mkdir(parents=True)
    (run / SNAPSHOT).write_text('{"checkpoint_results": []}')
    assert not drop_torn_checkpoint_list(run) and (run / "checkpoint_1").exists()
    (run / SNAPSHOT).write_text("")
    assert drop_torn_checkpoint_list(run) and not run.exists()
    assert "cut short" in capsys.readouterr().out
    assert not drop_torn_checkpoint_list(run)  # none: Ray's fresh start
    source, dest = tmp_path / "local", tmp_path / "ray" / "checkpoint_2"
    (source / "sub").mkdir(parents=True)
    for name in ("state.pt", "sub/part"):
        (source / name).write_text("x")
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text("half")
    remove_copied(source, dest)
    assert not dest.exists()


# ----------------------------------------------------------------------------- a small tmpfs of its own

def namespaces_work() -> bool:
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"], capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not namespaces_work(), reason="needs `unshare -rm` (user + mount namespaces) "
                                                                   "and nsenter to give the commands a small disk")


class Tmpfs:
    """A tmpfs of ``size`` over the empty folder ``mount``, in a mount namespace held by a sleeping process."""

    def __init__(self, mount: Path, size: str):
        mount.mkdir(parents=True, exist_ok=True)
        self.mount = mount
        self.holder = subprocess.Popen(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size="$1" none "$0" && '
                                        'echo mounted && exec sleep 3600', str(mount), size],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = self.holder.stdout.readline()
        assert first.strip() == "mounted", first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.holder.terminate()  # the tmpfs goes with the last process in its namespace
        self.holder.wait(timeout=30)

    def seen(self, path: Path) -> Path:
        """``path`` as the namespace sees it, from outside."""
        return Path(f"/proc/{self.holder.pid}/root") / path.relative_to("/")

    def free(self) -> int:
        return shutil.disk_usage(self.seen(self.mount)).free

    def fill(self, leave: int) -> None:
        """A filler file leaving ``leave`` bytes free (tmpfs counts whole pages)."""
        with open(self.seen(self.mount / "filler"), "wb") as f:
            f.write(b"\0" * (self.free() - leave))
        assert abs(self.free() - leave) <= 8192

    def unfill(self) -> None:
        self.seen(self.mount / "filler").unlink()

    def enter(self) -> list[str]:
        return ["nsenter", "--preserve-credentials", "-t", str(self.holder.pid), "-U", "-m", "--"]

    def run(self, cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.enter() + cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def start(self, cmd: list[str], env: dict, logs: Path) -> subprocess.Popen:
        """``cmd`` started in the namespace, its stdout and stderr to files in ``logs`` (``finished`` waits)."""
        logs.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(self.enter() + cmd, env=env, cwd=REPO, stdout=open(logs / "stdout", "w"),
                                stderr=open(logs / "stderr", "w"), text=True)


def finished(proc: subprocess.Popen, logs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, (logs / "stdout").read_text(),
                                       (logs / "stderr").read_text())


def command_env() -> dict:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)  # the command starts its own Ray, inside the namespace
    return env


def the_line(result: subprocess.CompletedProcess, command: str, out: Path, need: int) -> tuple[int, str]:
    """The one-line error (exit 2, the last line on stderr, no traceback of the command's own; Ray's logs of
    a failed worker, each line prefixed with the worker, may come before it): it names OUT and the
    stage's estimate; returns (the free space the line quotes, the line)."""
    assert result.returncode == 2, (result.stdout[-3000:], result.stderr[-5000:])
    line = result.stderr.strip().splitlines()[-1]
    assert not [x for x in result.stderr.splitlines() if x.startswith("Traceback")], result.stderr[-5000:]
    match = ONE_LINE.match(line)
    assert match and match.group(1) == command and match.group(2) == str(out), line
    assert match.group(3) == disk_space.human(need), line
    number, unit = match.group(4).split()
    return int(float(number) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]), line


def leftovers(folder: Path) -> list[str]:
    """Temporaries a write leaves (`.NAME.tmp-*`, `.NAME.old-*`, annotate's unit and publish scratch)."""
    found = [p for p in folder.rglob("*") if re.match(r"\..*\.(tmp|old)-", p.name) or p.name.startswith("publish-")]
    found += [p for p in folder.glob(".annotate-work/tmp/*")]
    return sorted(str(p.relative_to(folder)) for p in found)


@needs_namespaces
def test_data_on_a_full_disk_stops_in_one_line_and_completes_once_space_is_freed(tmp_path):
    from tiny_models import synthetic_pairs

    source = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20_000, seed=1))
    need = disk_space.tables_bytes(disk_space.input_bytes(source))
    with Tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk.mount / "out"
        cmd = [sys.executable, "-m", "cwpo_ray", "data", "--source", f"pairs:{source}", "--out", str(out),
               "--no-progress"]
        disk.fill(leave=200_000)
        t0 = time.monotonic()
        free, line = the_line(disk.run(cmd, command_env()), "data", out, need)
        seconds = time.monotonic() - t0
        assert free <= 210_000
        assert sorted(p.name for p in disk.seen(out).iterdir()) == []  # nothing published, no temporaries
        disk.unfill()
        again = disk.run(cmd, command_env())
        assert again.returncode == 0, again.stderr[-3000:]
        counts = json.loads(disk.seen(out / "manifest.json").read_text())["counts"]
        tables = {t: read_table(disk.seen(out / f"{t}.parquet")).num_rows for t in
                  ("labeled", "unlabeled", "validation", "quarantine")}
    assert counts["read"] == 20_000 == counts["kept"] + counts["quarantined"]
    assert tables["labeled"] + tables["unlabeled"] + tables["validation"] == counts["kept"]
    assert tables["quarantine"] == counts["quarantined"]
    print(f"\nreliability: data on a full disk: exit 2 in {seconds:.1f} s: {line}; after freeing: read "
          f"{counts['read']} = kept {counts['kept']} + quarantined {counts['quarantined']}, tables {tables}")


@needs_namespaces
@pytest.mark.slow
def test_annotate_on_a_full_disk_stops_in_one_line_and_resumes_once_space_is_freed(tiny_encoder, tmp_path):
    from cwpo_ray.annotator import new_annotator, save_annotator
    from cwpo_ray.models import ModelSource
    from test_annotate_scale import BAD_LINES, pairs

    annotator = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), tmp_path / "annotator")
    rows = pairs(3000)
    data = write_jsonl(tmp_path / "unlabeled.jsonl", rows, raw_lines=BAD_LINES)
    need = disk_space.tables_bytes(disk_space.input_bytes(data))
    units = len(work_units.plan_units(table_files(data), 300))
    with Tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk.mount / "out"
        cmd = [sys.executable, "-m", "cwpo_ray", "annotate", "--data", str(data), "--annotator", str(annotator),
               "--out", str(out), "--num-actors", "1", "--unit-rows", "300"]
        seen = disk.seen(out)
        t0 = time.monotonic()
        # The disk fills under a run that has started: with 150 KB free at the start it would be refused before
        # Ray (test_annotate_is_refused_before_it_starts_...). Filled once the work folder is made (after the
        # space check, before any actor has started: importing torch and loading the annotator take seconds).
        proc = disk.start(cmd, command_env(), tmp_path / "first")
        while not (seen / ".annotate-work" / "units").is_dir():
            assert proc.poll() is None, (tmp_path / "first" / "stderr").read_text()[-3000:]
            assert time.monotonic() - t0 < 120
            time.sleep(0.02)
        disk.fill(leave=150_000)
        free, line = the_line(finished(proc, tmp_path / "first"), "annotate", out, need)
        seconds = time.monotonic() - t0
        assert not [p.name for p in seen.iterdir() if not p.name.startswith(".")]  # nothing published
        assert leftovers(seen) == []  # the unit being written when the disk filled: removed
        committed = len(list(seen.glob(".annotate-work/units/*.json")))  # kept: the rerun resumes from them
        assert 0 < committed < units and free <= 160_000
        disk.unfill()
        again = disk.run(cmd, command_env())
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming: {committed} of {units} units already committed" in again.stdout
        annotated, quarantine = read_table(seen / "annotated.parquet"), read_table(seen / "quarantine.parquet")
        report = json.loads((seen / "report.json").read_text())
        assert leftovers(seen) == [] and not (seen / ".annotate-work").exists()
    ids = annotated["id"].to_pylist() + quarantine["id"].to_pylist()
    assert annotated.num_rows == len(rows) and quarantine.num_rows == len(BAD_LINES)
    assert len(set(ids)) == len(ids) == report["input_rows"] == len(rows) + len(BAD_LINES)
    assert report["resumed_units"] == committed and report["annotated_this_run"] < len(rows)
    print(f"\nreliability: annotate on a full disk: exit 2 in {seconds:.1f} s after {committed} of {units} units: "
          f"{line}; "
          f"after freeing: resumed, input {report['input_rows']} = annotated {annotated.num_rows} + quarantined "
          f"{quarantine.num_rows}, {len(set(ids))} distinct ids")


# `cwpo annotate` with Ray's start replaced by an exit 42: a run that passes the space check stops there.
UP_TO_RAY = ["-c", "import sys\nimport cwpo_ray.ray_env as ray_env\nfrom cwpo_ray.cli import main\n"
                   "def stop():\n    print('starting Ray', flush=True)\n    sys.exit(42)\n"
                   "ray_env.init_ray = stop\nsys.exit(main(sys.argv[1:]))"]


@needs_namespaces
def test_annotate_is_refused_before_it_starts_when_its_disk_cannot_hold_it(tmp_path):
    """A standalone annotate needs 2x its input on OUT's disk (disk_space.tables_bytes: the unit files and
    the final files coexist): with less free it exits 2 with one line before Ray starts (no cluster in
    this test: none is reached). A resumed run's work folder counts toward the need (committed units are
    kept, the rest is removed before anything is written): with the same free space and 500 KB already
    there the run goes on (to Ray's start, replaced here by an exit)."""
    from test_annotate_scale import BAD_LINES, pairs

    data = write_jsonl(tmp_path / "unlabeled.jsonl", pairs(3000), raw_lines=BAD_LINES)
    annotator = tmp_path / "annotator"  # never loaded: nothing gets that far
    annotator.mkdir()
    need = disk_space.tables_bytes(disk_space.input_bytes(data))
    with Tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk.mount / "out"
        args = ["annotate", "--data", str(data), "--annotator", str(annotator), "--out", str(out)]
        disk.fill(leave=800_000)
        assert need > disk.free() + 100_000
        t0 = time.monotonic()
        refused = disk.run([sys.executable, *UP_TO_RAY, *args], command_env(), timeout=120)
        seconds = time.monotonic() - t0
        assert refused.returncode == 2 and "starting Ray" not in refused.stdout, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        match = re.match(r"^cwpo annotate: error: not enough space on (\S+) for annotate \(needs ~([\d.]+ [KMG]B), "
                         r"([\d.]+ [KMG]B) free\): free space or give another out$", lines[0])
        assert match and match.group(1) == str(out) and match.group(2) == disk_space.human(need), lines[0]
        assert list(disk.seen(out).iterdir()) == []  # nothing written, its lock file removed
        # A killed run's committed units (any bytes: the check only measures them), then the same free space
        units = disk.seen(out / ".annotate-work" / "units")
        units.mkdir(parents=True)
        (units / "00000-annotated.parquet").write_bytes(os.urandom(500_000))
        disk.unfill()
        disk.fill(leave=800_000)
        assert need - 500_000 < disk.free() < need
        resumed = disk.run([sys.executable, *UP_TO_RAY, *args], command_env(), timeout=120)
        assert resumed.returncode == 42 and "starting Ray" in resumed.stdout, resumed.stdout + resumed.stderr
    print(f"\nreliability: annotate refused before Ray in {seconds:.1f} s: {lines[0]}; with 500 KB of committed "
          f"units in its work folder and the same free space, it went on to start Ray")


def policy_pairs(path: Path, n: int = 32) -> Path:
    from tiny_models import synthetic_pairs

    pq.write_table(pa.Table.from_pylist(synthetic_pairs(n, seed=11)), path)  # labeled pairs: weights 1
    return path


@needs_namespaces
@pytest.mark.slow
def test_train_policy_on_a_full_disk_stops_in_one_line_and_completes_once_space_is_freed(mlflow_server, tiny_decoder,
                                                                                        tmp_path):
    """The first checkpoint does not fit: the worker's upload refuses it (ENOSPC, before Ray's checkpoint
    list could be cut short), Ray Train fails the run, and the driver finds the errno in the error Ray
    Train raises. No checkpoint folder, model, SFT model or manifest is left."""
    data = policy_pairs(tmp_path / "pairs.parquet")
    need = disk_space.policy_bytes(str(tiny_decoder), None, False, False, str(data))
    with Tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk.mount / "out"
        cmd = [sys.executable, "-m", "cwpo_ray", "train-policy", "--data", str(data), "--model", str(tiny_decoder),
               "--out", str(out), "--loss", "dpo", "--weighting", "none", "--batch-size", "4", "--max-length", "24",
               "--max-prompt-length", "8", "--epochs", "1", "--sft-epochs", "0", "--checkpoint-every", "2",
               "--max-failures", "0", "--no-progress", "--experiment", "test-disk-full"]
        disk.fill(leave=1_200_000)  # the first checkpoint (~430 KB) fits, not with the 1 MiB to spare
        t0 = time.monotonic()
        free, line = the_line(disk.run(cmd, command_env()), "train-policy", out, need)
        seconds = time.monotonic() - t0
        seen = disk.seen(out)
        assert not [n for n in ("policy", "manifest.json") if (seen / n).exists()]
        assert leftovers(seen) == [] and not list(seen.glob("ray/*/checkpoint_*"))
        for snapshot in seen.glob(f"ray/*/{SNAPSHOT}"):
            json.loads(snapshot.read_text())  # whole
        disk.unfill()
        again = disk.run(cmd, command_env())
        assert again.returncode == 0, again.stderr[-3000:]
        manifest = json.loads((seen / "manifest.json").read_text())
        lines = [json.loads(x) for x in (seen / "metrics.jsonl").read_text().splitlines()]
        saved = sorted(p.name for p in (seen / "policy").iterdir())
        assert leftovers(seen) == [] and not (seen / "ray").exists()  # checkpoints removed after the final save
    po_steps = [x["step"] for x in lines if "loss" in x["metrics"]]
    assert manifest["pairs"] == 32 and "model.safetensors" in saved
    assert po_steps[-8:] == list(range(1, 9))  # the rerun's PO, every step once
    print(f"\nreliability: train-policy on a full disk: exit 2 in {seconds:.1f} s: {line}; after freeing: "
          f"{manifest['pairs']} pairs, PO steps {po_steps} (the first run's, then the rerun's)")


@needs_namespaces
@pytest.mark.slow
def test_the_pipeline_refuses_a_stage_that_cannot_fit(mlflow_server, tiny_decoder,
                                                                                     tmp_path):
    """Preflight off (it would refuse the whole pipeline first). 1) A GGUF start model: its dequantized fp32
    folder (disk_space.start_model_bytes) is refused before a byte of it is written. 2) The data stage fits
    and runs; the arm's training is estimated (disk_space.policy_bytes: its checkpoints at their peak, model,
    table) against the free space of its folder's disk and refused before its marker or any checkpoint is
    written. (A
    stage that starts and then meets a full disk, and its rerun once space is freed: the train-policy
    test above, through the same one-line error; a rerun reusing finished stages: test_pipeline.py.)"""
    import yaml

    from test_pipeline import synthetic_benchmark

    bench = synthetic_benchmark(tmp_path / "bench", n_train=16, n_test=4)
    with Tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk.mount / "run"
        train = out / "arms" / "human-dpo" / "train"
        config = tmp_path / "pipeline.yaml"
        config.write_text(yaml.safe_dump({
            "out": str(out), "source": f"pairs:{bench}", "test": str(bench / "test.parquet"), "arms": ["human"],
            "losses": ["dpo"], "sft": "none", "preflight": False, "experiment": "test-disk-full",
            "policy": {"model": str(tiny_decoder), "batch_size": 4, "max_length": 24, "max_prompt_length": 8,
                       "checkpoint_every": 1, "max_failures": 0, "warmup_steps": 0},
            "evaluate": {"max_new_tokens": 4, "batch_size": 4, "extra_judges": [], "engine": "transformers",
                         "n_boot": 100}}))
        cmd = [sys.executable, "-m", "cwpo_ray", "pipeline", "--config", str(config)]

        gguf = disk.run(cmd + ["policy.model=smollm2-135m"], command_env())
        start_line = the_pipeline_line(gguf, "not enough space on", out / "start",
                                       disk_space.start_model_bytes("smollm2-135m", None))
        assert not disk.seen(out / "start").exists() or not any(disk.seen(out / "start").iterdir())

        disk.fill(leave=700_000)
        t0 = time.monotonic()
        refused = disk.run(cmd, command_env())
        seconds = time.monotonic() - t0
        need = disk_space.policy_bytes(str(tiny_decoder), None, False, False,
                                       str(disk.seen(out / "data" / "unlabeled_human.parquet")))
        line = the_pipeline_line(refused, "not enough space on", train, need)
        assert "result" in json.loads(disk.seen(out / "data" / ".stage.json").read_text())
        assert not disk.seen(train).exists() or not any(disk.seen(train).iterdir())  # never started

    print(f"\nreliability: pipeline refused the GGUF start model's folder: {start_line}; "
          f"refused the arm's training in {seconds:.1f} s (the data stage done): {line}")


def the_pipeline_line(result: subprocess.CompletedProcess, what: str, folder: Path, need: int) -> str:
    """`cwpo pipeline`'s one-line error about ``folder`` (exit 2, last on stderr, no traceback)."""
    assert result.returncode == 2, (result.stdout[-3000:], result.stderr[-5000:])
    line = result.stderr.strip().splitlines()[-1]
    assert not [x for x in result.stderr.splitlines() if x.startswith("Traceback")], result.stderr[-5000:]
    match = re.match(rf"^cwpo pipeline: error: {what} (\S+) (for (?:start|human-dpo train) )?\(needs (?:more than the )?~"
                     r"([\d.]+ [KMG]B)(?: estimated)?, ([\d.]+ [KMG]B) free\): free space or give another out$", line)
    assert match and match.group(1) == str(folder) and match.group(3) == disk_space.human(need), line
    return line
