"""The pipeline's terminal: one line per stage there, everything else (child processes too) in the log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cwpo_ray import console


def test_output_goes_to_the_log_and_stage_lines_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "pipeline.log"
    with console.log_to(log):
        print("a transformers warning")
        subprocess.run([sys.executable, "-c", "import sys; print('a worker line'); print('stderr', file=sys.stderr)"],
                       check=True)
        os.write(2, b"C-level output\n")
        with console.timed_stage("annotate") as done:
            done({"rows": 685, "metrics": {"annotator.mean_confidence": 0.357}})
        with console.timed_stage("annotate-ensemble") as done:  # data with a gold judge: its agreement too
            done({"rows": 611, "metrics": {"annotator_ensemble.gold_accuracy": 0.64}})
        console.stage_line("data", "done already, reusing", fingerprint="0123")
    terminal = capfd.readouterr()
    assert terminal.out.splitlines() == ["  annotate               done in 0 s: 685 pairs annotated, mean confidence 0.357",
                                         "  annotate-ensemble      done in 0 s: 611 pairs annotated, agreement with the "
                                         "gold judge 0.640",
                                         "  data                   done already, reusing (fingerprint 0123)"]
    assert terminal.err == ""
    text = log.read_text()
    for line in ("a transformers warning", "a worker line", "stderr", "C-level output", "685 pairs annotated"):
        assert line in text


def test_an_error_reaches_the_terminal_in_full(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="boom"):
        with console.log_to(tmp_path / "pipeline.log"):
            print("noise")
            raise RuntimeError("boom")
    print("after the block")  # the descriptors are back: this reaches the terminal
    assert capfd.readouterr().out == "after the block\n"


def test_the_terminal_gets_the_main_tables_and_the_file_keeps_every_judge(tmp_path, capsys):
    md = tmp_path / "compare.md"
    long_prose = "across judges: " + "a definition " * 20
    md.write_text("### exp / run\n\n| arm | GRA |\n|---|---|\n| cw | 0.6 |\n\n### GRA under every judge\n\n"
                  "| arm | judge |\n|---|---|\n| cw | textblob |\n\n### Paired GRA differences\n\n| a | b |\n"
                  f"|---|---|\n\n{long_prose}\n")
    console.show_file(md, skip_sections=("GRA under every judge",), max_line=160)
    out = capsys.readouterr().out
    assert "| cw | 0.6 |" in out and "### Paired GRA differences" in out
    assert "textblob" not in out and "a definition" not in out and str(md) in out.splitlines()[-1]


def test_the_local_cluster_hook_quiets_loggers_that_exist_in_this_ray():
    """The worker setup hook names Ray Train's loggers by module path; if Ray moves a module, the name
    would silence nothing and its per-fit warnings (and tracebacks) would come back: check each is the
    module's own logger, and that the hook leaves it at errors only."""
    import importlib
    import logging

    from cwpo_ray.ray_env import LOCAL_CLUSTER_QUIET_LOGGERS, quiet_local_cluster_loggers

    for name in LOCAL_CLUSTER_QUIET_LOGGERS:
        assert importlib.import_module(name).logger is logging.getLogger(name), name
    quiet_local_cluster_loggers()
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.ERROR for n in LOCAL_CLUSTER_QUIET_LOGGERS)


def test_a_local_node_skips_ray_trains_cluster_only_helpers(tmp_path):
    """On a node init_ray started itself, before a fit: Ray Train's preemption watcher is off through
    its own switch (the name checked against this Ray: a renamed switch would leave it on) and Ray
    Data's autoscaling coordinator, which every controller waits on, already exists. No idle worker
    processes are started for the driver (none could serve our runtime env). What the caller does
    meanwhile runs on another thread while Ray starts, and its error is raised once Ray is up. In a
    fresh process, as a `cwpo train-policy` command starts."""
    script = """
import os, threading, time, psutil, ray
from cwpo_ray import ray_env
from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR
ray_env.before_train_on_local_node()
assert ENABLE_PREEMPTION_WATCHER_ENV_VAR not in os.environ  # not a local node of ours yet: nothing done
seen = {}
def meanwhile():
    seen["thread"] = threading.current_thread() is not threading.main_thread()
    seen["ray_up_yet"] = ray.is_initialized()
    raise KeyError("from meanwhile")
try:
    ray_env.init_ray(num_cpus=1, meanwhile=meanwhile)
except KeyError as e:
    print(e.args[0].replace(" ", "_"), ray.is_initialized(), seen["thread"], seen["ray_up_yet"])
time.sleep(3)  # Ray's prestart happens right after the driver connects
workers = [p for p in psutil.Process().children(recursive=True) if p.cmdline()[:1] == ["ray::IDLE"]]
print("idle_workers", len(workers))
ray_env.before_train_on_local_node()
print(os.environ[ENABLE_PREEMPTION_WATCHER_ENV_VAR])
ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
print("coordinator up")
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_prestart_worker_first_driver")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["from_meanwhile", "True", "True", "False", "idle_workers", "0",
                                  "0", "coordinator", "up"], out.stdout
