"""One run per output folder (cwpo_ray/out_lock.py), with real `cwpo` processes: a second run into
the OUT of a live one is refused with one line and the first completes; a SIGKILLed run leaves no
stuck lock; within one process (the pipeline's stages) the lock is reentrant."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwpo_ray.annotation.outputs import published_report
from cwpo_ray.annotator import new_annotator, save_annotator
from cwpo_ray.cli import main
from cwpo_ray.models import ModelSource
from cwpo_ray.out_lock import LOCK_NAME, OutInUse, held_by_another, hold_out
from cwpo_ray.tables import read_table
from fixtures_data import write_jsonl
from test_annotate_scale import BAD_LINES, pairs

REPO = Path(__file__).resolve().parent.parent
ROWS = 1200


@pytest.fixture(scope="module")
def job(ray_cluster, tiny_encoder, tmp_path_factory):
    """A small input, an untrained tiny annotator, and the environment a `cwpo` child process joins
    the test's Ray cluster with."""
    root = tmp_path_factory.mktemp("out-lock")
    annotator = save_annotator(new_annotator(ModelSource(str(tiny_encoder)), max_length=32), root / "annotator")
    data = write_jsonl(root / "unlabeled.jsonl", pairs(ROWS), raw_lines=BAD_LINES)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    return {"data": data, "annotator": annotator, "env": env}


def annotate_cmd(job: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "cwpo_ray", "annotate", "--data", str(job["data"]), "--annotator",
            str(job["annotator"]), "--out", str(out), "--num-actors", "1", "--unit-rows", "300"]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until_it_holds(proc: subprocess.Popen, out: Path, log: Path) -> dict:
    """The lock file's note once it names ``proc`` (the run holds OUT from then on)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it held {out}: {log.read_text()[-2000:]}"
        try:
            note = json.loads((out / LOCK_NAME).read_text())
            if note["pid"] == proc.pid:
                return note
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"{out} was never locked by pid {proc.pid}")


def assert_complete(out: Path) -> None:
    """Every input row once: ROWS annotated + the bad lines quarantined, one run's report."""
    annotated, quarantine = read_table(out / "annotated.parquet"), read_table(out / "quarantine.parquet")
    ids = annotated["id"].to_pylist() + quarantine["id"].to_pylist()
    assert annotated.num_rows == ROWS and quarantine.num_rows == len(BAD_LINES) and len(set(ids)) == len(ids)
    report = published_report(out)
    assert report["annotated"] == ROWS and report["quarantined"] == len(BAD_LINES)
    assert not (out / LOCK_NAME).exists()  # a run that ends removes its lock file


def test_a_second_annotate_into_a_running_ones_out_is_refused(job, tmp_path):
    out = tmp_path / "out"
    first = start(annotate_cmd(job, out), job["env"], tmp_path / "first.log")
    try:
        note = wait_until_it_holds(first, out, tmp_path / "first.log")
        os.kill(first.pid, signal.SIGSTOP)  # paused while the second one tries: it is certainly alive
        try:
            started = time.monotonic()
            second = subprocess.run(annotate_cmd(job, out), env=job["env"], cwd=REPO, capture_output=True,
                                    text=True, timeout=120)
            refused_in = time.monotonic() - started
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stdout + second.stderr
    assert str(out.resolve()) in lines[0] and f"pid {first.pid} on {note['host']}" in lines[0]
    assert lines[0].startswith("cwpo annotate: error: ") and "`cwpo annotate`" in lines[0]
    assert_complete(out)  # the first run, undisturbed
    print(f"reliability: second annotate refused in {refused_in:.1f}s (exit 2): {lines[0]!r}; the first "
          f"completed: {ROWS} annotated + {len(BAD_LINES)} quarantined")


def test_a_killed_run_leaves_no_stuck_lock(job, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "killed.log"
    killed = start(annotate_cmd(job, out), job["env"], log)
    wait_until_it_holds(killed, out, log)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == killed.pid  # its note stays, its lock does not
    again = subprocess.run(annotate_cmd(job, out), env=job["env"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_complete(out)
    print(f"reliability: annotate SIGKILLed while holding {LOCK_NAME} (pid {killed.pid}); the next run "
          f"took the lock and completed: {ROWS} annotated + {len(BAD_LINES)} quarantined")


def test_data_train_policy_and_pipeline_are_refused_too(tmp_path):
    """Held here (a cheaper holder); the refused processes are the real CLI, before they start Ray."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "1", "prompt": "p", "chosen": "a", "rejected": "b"}])
    for command, args in (("data", ["--source", f"pairs:{data}", "--out"]),
                          ("train-policy", ["--data", str(data), "--out"]),
                          ("pipeline", ["--out"])):
        out = tmp_path / command
        with hold_out(out, "annotate"):
            refused = subprocess.run([sys.executable, "-m", "cwpo_ray", command, *args, str(out)], cwd=REPO,
                                     capture_output=True, text=True, timeout=120)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stdout + refused.stderr
        assert lines[0].startswith(f"cwpo {command}: error: {out.resolve()} is in use by `cwpo annotate` "
                                   f"(pid {os.getpid()} on ")
        assert not any(out.iterdir())  # nothing written (no tables, no log), and the holder removed its lock file


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(job, tmp_path):
    """The pipeline's case: its driver holds OUT and runs a stage in-process into the same folder
    (here a real annotate); another process is refused all along; the lock goes with the outer hold."""
    out = tmp_path / "out"
    probe = [sys.executable, "-c", "import sys; from cwpo_ray.out_lock import hold_out, OutInUse\n"
             "try:\n  with hold_out(sys.argv[1], 'probe'): pass\nexcept OutInUse:\n  sys.exit(3)"]
    with hold_out(out, "pipeline"):
        assert main(["annotate", "--data", str(job["data"]), "--annotator", str(job["annotator"]), "--out",
                     str(out), "--num-actors", "1", "--unit-rows", "300"]) == 0
        assert (out / LOCK_NAME).exists()  # still the pipeline's
        assert subprocess.run(probe + [str(out)], cwd=REPO).returncode == 3
        with hold_out(out / "annotate", "annotate"):  # a stage's subfolder: its own lock
            assert subprocess.run(probe + [str(out / "annotate")], cwd=REPO).returncode == 3
    assert not (out / LOCK_NAME).exists() and subprocess.run(probe + [str(out)], cwd=REPO).returncode == 0
    assert_complete(out)
    with pytest.raises(OutInUse):  # and the same process is refused by another one's lock
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cwpo_ray.out_lock import hold_out\n"
                                   "with hold_out(sys.argv[1], 'annotate'):\n  print('held', flush=True); "
                                   "time.sleep(60)", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with hold_out(out, "pipeline"):
                pass
        finally:
            holder.kill()
            holder.wait()


def hold_in_another_process(folder: Path, stage: str) -> subprocess.Popen:
    """A live process holding ``folder`` as `cwpo STAGE` would (hold_out, the recipes' own lock), once it says so."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from cwpo_ray.out_lock import hold_out\n"
                             "with hold_out(sys.argv[1], sys.argv[2]):\n  print('held', flush=True); time.sleep(600)",
                             str(folder), stage], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def one_line(result: subprocess.CompletedProcess, command: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith(f"cwpo {command}: error: "), lines[0]
    return lines[0]


def test_a_run_inside_a_folder_another_process_holds_is_refused_until_the_holder_dies(job, tmp_path):
    """The pipeline's case (issue #36): a pipeline holds PIPE_OUT and its stages write PIPE_OUT/arms/ARM/annotate
    and .../train; a standalone annotate or train-policy into such a folder locks a lock file of its own there,
    so it is refused by the one above it. Once the holder is SIGKILLed the folder inside is free."""
    pipe_out = tmp_path / "run"
    inner = pipe_out / "arms" / "cw-dpo" / "annotate"
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "1", "prompt": "p", "chosen": "a", "rejected": "b"}])
    holder = hold_in_another_process(pipe_out, "pipeline")
    try:
        note = json.loads((pipe_out / LOCK_NAME).read_text())
        started = time.monotonic()
        refused = subprocess.run(annotate_cmd(job, inner), env=job["env"], cwd=REPO, capture_output=True, text=True,
                                 timeout=120)
        refused_in = time.monotonic() - started
        line = one_line(refused, "annotate")
        assert line == (f"cwpo annotate: error: {inner.resolve()} is inside {pipe_out.resolve()}, which is in use by "
                        f"`cwpo pipeline` (pid {holder.pid} on {note['host']}, since {note['since']}): wait for it "
                        "to end, or give an output folder outside it")
        train = pipe_out / "arms" / "cw-dpo" / "train"
        policy = subprocess.run([sys.executable, "-m", "cwpo_ray", "train-policy", "--data", str(data), "--out",
                                 str(train)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert f"is inside {pipe_out.resolve()}, which is in use by `cwpo pipeline` (pid {holder.pid} " in \
            one_line(policy, "train-policy")
        # refused before writing anything: their lock files gone, no work folder, no table
        assert sorted(p.name for p in pipe_out.rglob("*") if p.is_file()) == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock; the lock file (and its note) stays
        holder.wait()
    assert json.loads((pipe_out / LOCK_NAME).read_text())["pid"] == holder.pid
    # The holder dead, the folder inside is free (the lock file above stays, held by no one). That a run
    # then completes beside a dead holder's lock file: test_a_killed_run_leaves_no_stuck_lock.
    with hold_out(inner, "annotate"):
        assert held_by_another(pipe_out / LOCK_NAME) is None
    print(f"reliability: annotate and train-policy into folders inside a held pipeline OUT refused (exit 2) in "
          f"{refused_in:.1f}s: {line!r}; the holder SIGKILLed, the folder inside taken at once")


def test_a_pipeline_around_a_folder_another_process_holds_is_refused(tmp_path):
    """The other way round: a standalone annotate holds a folder inside the pipeline's OUT; the pipeline
    is refused before it clears anything (it would clear that stage's folder before the stage locks it).
    Within one process a folder above or below a held one is the same run's (the pipeline's stages)."""
    pipe_out = tmp_path / "run"
    inner = pipe_out / "arms" / "cw-dpo" / "annotate"
    (inner / "annotated.parquet").mkdir(parents=True)
    holder = hold_in_another_process(inner, "annotate")
    try:
        note = json.loads((inner / LOCK_NAME).read_text())
        refused = subprocess.run([sys.executable, "-m", "cwpo_ray", "pipeline", "--out", str(pipe_out)], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        assert one_line(refused, "pipeline") == (
            f"cwpo pipeline: error: {inner.resolve()}, inside {pipe_out.resolve()}, is in use by `cwpo annotate` "
            f"(pid {holder.pid} on {note['host']}, since {note['since']}): wait for it to end, or give another "
            "output folder")
        assert not (pipe_out / LOCK_NAME).exists() and not (pipe_out / "pipeline.log").exists()
        assert (inner / "annotated.parquet").is_dir()  # untouched
    finally:
        holder.kill()
        holder.wait()
    with hold_out(pipe_out, "pipeline"):  # the holder dead: the pipeline's OUT is free; its stages nest in it
        with hold_out(inner, "annotate"):
            with hold_out(pipe_out, "pipeline"):
                pass
