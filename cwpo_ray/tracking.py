"""MLflow: where runs go, and what every run carries (params, config file, git commit).

Every command logs to ``MLFLOW_TRACKING_URI`` when set, else to a local SQLite store
under ``./mlflow/store`` (git-ignored). Ray Train's rank 0 appends its metrics to a file in the
stage's folder and the driver relays them to its run while training runs (``relay_metrics``):
Ray Train V2 has no MLflow callback, and a worker without an MLflow client starts sooner and needs no
route to the tracking server.

A tracking server that stops answering when a stage ends (its last metrics, its run's end) is waited
for (``when_reachable``, up to ``CWPO_TRACKING_WAIT_S`` seconds) rather than failing a command whose
work is done: the MLflow client's own retries last a few minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_STORE = Path("mlflow") / "store"
WAIT_ENV = "CWPO_TRACKING_WAIT_S"
DEFAULT_WAIT_S = 1800.0
RECHECK_S = 5.0


def tracking_uri() -> str:
    """The tracking URI in force, made absolute so Ray workers with another cwd agree."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = DEFAULT_STORE.resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _local_artifact_root() -> str | None:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the server decides
    root = (DEFAULT_STORE / "artifacts").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


def set_experiment(name: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        mlflow.create_experiment(name, artifact_location=_local_artifact_root())
    return mlflow.set_experiment(name)


def git_commit() -> str:
    """The code's commit; ``CWPO_GIT_COMMIT`` wins (Ray jobs run from a copy without .git)."""
    if os.environ.get("CWPO_GIT_COMMIT"):
        return os.environ["CWPO_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def start_run(experiment: str, run_name: str | None = None, *, run_id: str | None = None,
              parent_run_id: str | None = None, tags: dict[str, str] | None = None):
    """An MLflow run in ``experiment``; ``run_id`` resumes one (a restarted worker keeps its run).

    Ended FINISHED when the body returns, waiting out a tracking server that does not answer
    (``when_reachable``); FAILED when it raises, tried once (the body's error is what the user needs).
    """
    import mlflow

    set_experiment(experiment)
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                           tags=None if run_id else all_tags)
    try:
        if run_id and parent_run_id:  # resumed under a new parent (a pipeline rerun with other settings)
            mlflow.set_tag("mlflow.parentRunId", parent_run_id)
        yield run
    except BaseException:
        try:
            _end_run(run.info.run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - the body's error is the one to raise
            print(f"MLflow: run {run.info.run_id} could not be marked FAILED: {type(e).__name__}: {e}",
                  file=sys.stderr)
        raise
    when_reachable(lambda: _end_run(run.info.run_id, "FINISHED"), f"ending MLflow run {run.info.run_id}")


def _end_run(run_id: str, status: str) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        # mlflow.end_run forgets the run before it tells the server: after a failed attempt the
        # server is told directly.
        MlflowClient(tracking_uri()).set_terminated(run_id, status)


def _server_answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return True
    except urllib.error.HTTPError as e:  # it answers (401 behind an auth proxy), unless a proxy says it is down
        return e.code < 500
    except OSError:  # refused, unreachable, timed out
        return False


def when_reachable(call, what: str, wait_s: float | None = None):
    """``call()``; when it fails while the tracking server does not answer, wait for the server (checked
    every few seconds, up to ``wait_s``, default ``CWPO_TRACKING_WAIT_S`` or 30 min) and call again.

    An error while the server answers is raised after one more try: it is not an outage (a deleted
    run, a bad value). A local store (``sqlite:``, a folder) has no outage to wait for.
    """
    wait_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    said, failed_while_up = False, False
    while True:
        try:
            return call()
        except Exception as e:
            uri = tracking_uri()
            if not uri.startswith(("http://", "https://")):
                raise
            if _server_answers(uri):
                if failed_while_up:
                    raise
                failed_while_up = True
                continue
            failed_while_up = False
            if time.monotonic() >= deadline:
                raise
            if not said:
                print(f"MLflow: {what} failed, the tracking server at {uri} does not answer "
                      f"({type(e).__name__}); waiting for it, up to {wait_s:g} s ({WAIT_ENV})", file=sys.stderr)
                said = True
            time.sleep(RECHECK_S)


def log_config(cfg: Any, name: str = "config.yaml") -> None:
    """Params (flattened, MLflow's 500-char limit respected) and the whole config as a YAML artifact."""
    import mlflow

    from cwpo_ray.config import flatten, to_dict

    d = to_dict(cfg)
    mlflow.log_params({k: str(v)[:500] for k, v in flatten(d).items()})
    mlflow.log_dict(d, name)


@contextlib.contextmanager
def relay_metrics(path: str | Path, run_id: str, interval_s: float = 1.0):
    """While the body runs (a Ray Train fit), log to MLflow run ``run_id`` what rank 0 appends to
    ``path`` (``distributed.RankZeroLogger``: one JSON line per call), every ``interval_s`` from a
    thread, and what is left when the body ends.

    How far it got is kept next to the file (``<path>.relayed``: the byte offset and each metric's
    last step), so a rerun into the same folder continues there and each line is logged once,
    barring an MLflow error between two batches of one read (then those are logged again). A metric
    at or below the last step logged for it is a step trained again after a resume from an earlier
    checkpoint (a lost worker or node): the run keeps the first value, so each step has one. A
    line that does not parse (a worker killed mid-write, on storage without atomic appends) is
    skipped with a message on stderr.
    """
    relay = MetricsRelay(Path(path), run_id)
    stop = threading.Event()

    def tick():
        said = None
        while not stop.wait(interval_s):
            try:
                relay.drain()
                said = None
            except Exception as e:  # noqa: BLE001 - the tracking server may be back at the next tick
                message = f"metrics relay: {type(e).__name__}: {e} (retrying every {interval_s:g} s)"
                if message != said:  # once per outage, not every second
                    print(message, file=sys.stderr)
                said = message

    thread = threading.Thread(target=tick, name="cwpo-metrics-relay", daemon=True)
    thread.start()
    failed = True
    try:
        yield relay
        failed = False
    finally:
        stop.set()
        thread.join()
        if not failed:
            when_reachable(relay.drain, "logging the last metrics")
        else:  # the body's error is the one to raise: one try
            try:
                relay.drain()
            except Exception as e:  # noqa: BLE001
                print(f"metrics relay: the last metrics were not logged: {type(e).__name__}: {e}", file=sys.stderr)


def relay_mark(path: str | Path) -> Path:
    """Where ``relay_metrics`` keeps how far into ``path`` it has logged (a byte offset)."""
    path = Path(path)
    return path.with_name(path.name + ".relayed")


class MetricsRelay:
    """The JSON lines of ``path`` from the last relayed offset on, logged to MLflow run ``run_id``."""

    MAX_PER_BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, path: Path, run_id: str):
        from mlflow.tracking import MlflowClient

        self.path, self.run_id = path, run_id
        self.mark = relay_mark(path)
        mark = json.loads(self.mark.read_text() or "0") if self.mark.exists() else 0
        if isinstance(mark, int):  # the mark of earlier versions: the offset alone
            mark = {"offset": mark, "last_step": {}}
        self.offset, self.last_step = mark["offset"], mark["last_step"]
        self.client = MlflowClient(tracking_uri())
        self.lines = self.skipped = self.retrained = 0

    def drain(self) -> int:
        """Log the complete lines written since the last call; the number of metrics logged."""
        from mlflow.entities import Metric

        from cwpo_ray.tables import atomic_path

        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) < self.offset:
                    self.offset = 0  # a new file in place of the one the mark was for
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        metrics, bad, last_step = [], [], dict(self.last_step)
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
                step = int(row["step"])
                new = [Metric(k, float(v), int(row["timestamp"]), step) for k, v in row["metrics"].items()]
            except (ValueError, KeyError, TypeError, AttributeError):
                bad.append(line)
                continue
            for m in new:
                if m.step > last_step.get(m.key, -1):
                    metrics.append(m)
                    last_step[m.key] = m.step
                else:
                    self.retrained += 1
        for i in range(0, len(metrics), self.MAX_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.MAX_PER_BATCH])
        for line in bad:  # said once: after a failed log_batch the same lines are read again
            print(f"metrics relay: skipped a line of {self.path} that does not parse: {line[:200]!r}",
                  file=sys.stderr)
        if end:
            self.offset += end
            self.last_step = last_step
            with atomic_path(self.mark) as tmp:  # a torn mark would stop the rerun's relay
                tmp.write_text(json.dumps({"offset": self.offset, "last_step": last_step}))
        self.skipped += len(bad)
        self.lines += data[:end].count(b"\n") - len(bad)
        return len(metrics)
