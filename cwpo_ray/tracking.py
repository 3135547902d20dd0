"""MLflow: where runs go, and what every run carries (params, config file, git commit).

Every command logs to ``MLFLOW_TRACKING_URI`` when set, else to a local SQLite store
under ``./mlflow/store`` (git-ignored). Ray Train workers log from rank 0 with the
tracking URI and run id handed to them, since Ray Train V2 has no MLflow callback.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_STORE = Path("mlflow") / "store"


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
    """An MLflow run in ``experiment``; ``run_id`` resumes one (a restarted worker keeps its run)."""
    import mlflow

    set_experiment(experiment)
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                          tags=None if run_id else all_tags) as run:
        if run_id and parent_run_id:  # resumed under a new parent (a pipeline rerun with other settings)
            mlflow.set_tag("mlflow.parentRunId", parent_run_id)
        yield run


def log_config(cfg: Any, name: str = "config.yaml") -> None:
    """Params (flattened, MLflow's 500-char limit respected) and the whole config as a YAML artifact."""
    import mlflow

    from cwpo_ray.config import flatten, to_dict

    d = to_dict(cfg)
    mlflow.log_params({k: str(v)[:500] for k, v in flatten(d).items()})
    mlflow.log_dict(d, name)
