"""The tracking server goes away in the middle of a run and comes back: training goes on (its workers
never talk to MLflow), the driver's relay waits the outage out, and every step's metrics reach the run
once. A real `cwpo train-policy` process on the test's Ray cluster, a real MLflow server stopped
(SIGTERM) and started again on the same port and store."""

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
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri}
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
        # training goes on without it: steps are trained (and written for the relay) while it is down; on a
        # busy machine the last step may come first (the driver then waits in its final drain)
        wait_for("20 steps more while the server is down, or the last one",
                 lambda: len(steps_written(metrics)) >= min(down_at + 20, steps), train, log)
        # The driver's relay is inside the MLflow client's retries (or says "metrics relay: ..." and retries
        # each second); it logs what it holds once the server is back.
        server = start_server(root, port)
        during = len(steps_written(metrics)) - down_at  # written while it was down (and starting again)
        assert train.wait(timeout=600) == 0, log.read_text()[-3000:]
        run_id = (out / "mlflow_run_id").read_text().strip()
        logged = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "loss"))
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
    print(f"\nreliability: tracking server stopped after step {down_at}, {during} steps trained while it was "
          f"down, restarted; {len(logged)} of {len(expected)} steps logged, each once")
