"""Where an evaluation's figures go: metric and artifact names per split, logged to MLflow from the
process that holds the tracking URI (the stage itself, or the pipeline's driver after its task)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np




def metric_prefix(split: str) -> str:
    """``eval`` for the test split (what `cwpo compare` reports), else the split's name."""
    return "eval" if split == "test" else split


def artifact_dir(split: str) -> Optional[str]:
    """Where a split's eval.json and responses.parquet go in an arm's run: the root for the test split
    (what `cwpo compare` pairs by default), else a folder named after the split."""
    return None if split == "test" else split


def mlflow_record(split: str, metrics: dict, judges: list[str]) -> tuple[dict, dict, Optional[str]]:
    """What an evaluation logs to its run: the finite numeric metrics as ``eval/*`` (test split) or
    ``validation/*``, the tags naming the main and the extra judges (compare reads them), and the
    artifact folder of eval.json."""
    prefix = metric_prefix(split)
    numeric = {f"{prefix}/{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
    tags = {f"{prefix}/judge": judges[0], f"{prefix}/judges": ",".join(judges)}
    return numeric, tags, artifact_dir(split)


def log_to_mlflow(cfg, metrics: dict, out: Path, judges: list[str]) -> Optional[str]:
    """The active run if there is one, else --run-id; nothing when neither. A validation evaluation's
    metrics and eval.json go under ``validation/``, a test evaluation's under ``eval/`` and the root."""
    import mlflow

    from cwpo_ray import tracking

    numeric, tags, artifact_path = mlflow_record(cfg.split, metrics, judges)

    def log():
        mlflow.log_metrics(numeric)
        mlflow.set_tags(tags)
        mlflow.log_artifact(str(out / "eval.json"), artifact_path=artifact_path)

    if mlflow.active_run() is not None:
        log()
        return mlflow.active_run().info.run_id
    if cfg.run_id:
        with tracking.start_run(cfg.experiment, run_id=cfg.run_id) as run:
            log()
            return run.info.run_id
    return None


def log_report(run_id: str, report: dict, out: Path, tracking_uri: str, extra_tags: dict | None = None) -> None:
    """Log an evaluation's report (eval.json's content, as ``run`` wrote it) to MLflow run ``run_id``,
    from the process that holds the tracking URI: the pipeline's driver, after its evaluation task
    (on a GPU node) returned. That task logs nothing itself: with no MLFLOW_TRACKING_URI the driver's
    store is a SQLite file on the head node, which another node cannot open. Same metrics, tags and
    artifact as ``log_to_mlflow`` (and ``extra_tags``); eval.json from ``out`` when this process sees it,
    else from ``report``."""
    import time

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    numeric, tags, artifact_path = mlflow_record(report["split"], report["metrics"], report["judges"])
    tags.update(extra_tags or {})
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in numeric.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    eval_json = Path(out) / "eval.json"
    if eval_json.is_file():
        client.log_artifact(run_id, str(eval_json), artifact_path)
    else:
        client.log_dict(run_id, report, f"{artifact_path}/eval.json" if artifact_path else "eval.json")


