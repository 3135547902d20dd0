"""The tracking server goes away in the middle of a run and comes back only after training has ended:
training goes on (its workers never talk to MLflow), the driver waits for the server at the stage's end
(its last metrics, its run's end) rather than failing a trained stage, and every step's metrics reach
the run once. A real `cwpo train-policy` process on the test's Ray cluster, a real MLflow server killed
and started again on the same port and store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for_mlflow

REPO = Path(__file__).resolve().parent.parent


def start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_mlflow(f"http://127.0.0.1:{port}", proc, root / "server.log")
    return proc


def stop_server(proc: subprocess.Popen, signal: int = 15) -> None:
    os.killpg(proc.pid, signal)  # its own session: the server and its worker processes
    proc.wait(timeout=60)


def steps_written(metrics: Path) -> list[int]:
    """The steps rank 0 has appended to the run's metrics file (what the relay reads)."""
    if not metrics.exists():
        return []
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return [x["step"] for x in lines if "loss" in x["metrics"]]


def wait_for(what, check, proc: subprocess.Popen, log: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        assert proc.poll() is None, f"train-policy ended before {what}: {log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_the_tracking_server_lost_mid_training_loses_and_duplicates_no_metric(ray_cluster, tiny_decoder, tmp_path):
    from mlflow.tracking import MlflowClient

    from test_policy import _annotated_table

    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    data = tmp_path / "pairs.parquet"
    _annotated_table(data, n=96)
    out = tmp_path / "out"
    metrics = out / "metrics.jsonl"
    steps = 96 // 4 * 12  # pairs / batch size x epochs
    # The MLflow client's own retries (minutes by default) made one try: the outage outlasts them, as a
    # server restart or a network partition longer than a few minutes does.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    log = tmp_path / "train.log"
    train = subprocess.Popen(
        [sys.executable, "-m", "cwpo_ray", "train-policy", "--data", str(data), "--model", str(tiny_decoder),
         "--out", str(out), "--loss", "dpo", "--weighting", "confidence", "--batch-size", "4", "--num-workers", "1",
         "--cpus-per-worker", "1", "--max-length", "24", "--max-prompt-length", "8", "--lr", "2e-3",
         "--epochs", "12", "--sft-epochs", "0", "--warmup-steps", "0", "--checkpoint-every", "1000",
         "--no-progress", "--experiment", "test-outage"],
        env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the server goes away once training is under way (its first steps may be relayed already)
        wait_for("its third step", lambda: len(steps_written(metrics)) >= 3, train, log)
        stop_server(server, 9)  # gone at once, as a crashed or unreachable server is
        down_at = len(steps_written(metrics))
        # Training goes on without it to the end, and the driver then waits for the server instead of failing.
        wait_for("the driver to wait for the server at the stage's end",
                 lambda: "logging the last metrics failed, the tracking server" in log.read_text(), train, log)
        assert steps_written(metrics)[-1] == steps
        server = start_server(root, port)
        assert train.wait(timeout=600) == 0, log.read_text()[-3000:]
        run_id = (out / "mlflow_run_id").read_text().strip()
        client = MlflowClient(uri)
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        status = client.get_run(run_id).info.status
    finally:
        if train.poll() is None:
            os.killpg(train.pid, 9)
        if server.poll() is None:
            stop_server(server)
    written = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    expected = sorted((x["step"], x["metrics"]["loss"]) for x in written if "loss" in x["metrics"])
    assert [s for s, _ in expected] == list(range(1, steps + 1))  # each step once
    assert [s for s, _ in logged] == [s for s, _ in expected]  # none lost, none twice
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert status == "FINISHED"
    print(f"\nreliability: tracking server stopped after step {down_at}, the other {steps - down_at} steps "
          f"trained while it was down, restarted once training had ended; {len(logged)} of {len(expected)} "
          f"steps logged, each once; the run FINISHED")


def test_an_error_from_a_server_that_answers_is_not_waited_for(mlflow_server, monkeypatch):
    """A deleted run, a bad value: raised at once, not waited on as an outage is."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from cwpo_ray import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    calls = []

    def end_a_run_that_does_not_exist():
        calls.append(time.monotonic())
        MlflowClient(mlflow_server).set_terminated("0" * 32)

    with pytest.raises(MlflowException):
        tracking.when_reachable(end_a_run_that_does_not_exist, "ending a run", wait_s=600)
    assert len(calls) == 2 and calls[1] - calls[0] < tracking.RECHECK_S  # one more try, no wait
