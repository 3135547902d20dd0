"""The pipeline's MLflow runs: one parent run, one child run per seed x arm x loss, reused across
reruns of the same configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from cwpo_ray.config import to_dict
from cwpo_ray.fingerprints import fingerprint
from cwpo_ray.evaluation import reporting


class ArmRuns:
    """The pipeline's MLflow parent run and one child run per arm x loss.

    Runs are created and written with MlflowClient, never made "active" here, so the stage
    recipes can open their own runs (nested under these by ``parent_run_id``). Run ids are kept
    in OUT/mlflow_runs.json: a resumed pipeline logs to the same runs.
    """

    def __init__(self, cfg, out: Path):
        from mlflow.tracking import MlflowClient

        from cwpo_ray import tracking

        self.cfg, self.path = cfg, out / "mlflow_runs.json"
        self.client = MlflowClient(tracking.tracking_uri())
        self.experiment_id = tracking.set_experiment(cfg.experiment).experiment_id
        fp = fingerprint({k: v for k, v in to_dict(cfg).items() if k not in ("verbose", "preflight")})
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        if saved.get("fingerprint") != fp or not self._alive(saved.get("parent")):
            saved = {"fingerprint": fp, "parent": self._create(cfg.run_name, {"stage": "pipeline"}), "children": {}}
            self.state = saved
            self._log_params()
        self.state = saved
        self._save()

    @property
    def parent_id(self) -> str:
        return self.state["parent"]

    def _alive(self, run_id: Optional[str]) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except Exception:
            return False

    def _create(self, name: str, tags: dict, parent: Optional[str] = None) -> str:
        from cwpo_ray.tracking import git_commit

        tags = {"git_commit": git_commit(), **tags, **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def _save(self) -> None:
        # whole or not at all: a driver killed mid-write must not leave a file the rerun cannot read
        from cwpo_ray.tables import atomic_path

        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2))

    def _log_params(self) -> None:
        from mlflow.entities import Param

        from cwpo_ray.config import flatten

        params = [Param(k, str(v)[:500]) for k, v in flatten(to_dict(self.cfg)).items()]
        self.client.log_batch(self.parent_id, params=params)
        self.client.log_dict(self.parent_id, to_dict(self.cfg), "pipeline_config.yaml")

    def log_parent(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                self.client.log_metric(self.parent_id, k, float(v))

    def key(self, arm: str, loss: str, seed: int) -> str:
        """``arm/loss``, and ``seedS/arm/loss`` when the pipeline runs several seeds."""
        return f"seed{seed}/{arm}/{loss}" if len(self.cfg.seed_list()) > 1 else f"{arm}/{loss}"

    def child(self, arm: str, loss: str, seed: int, fp: str, human_labels: int) -> str:
        key = self.key(arm, loss, seed)
        saved = self.state["children"].get(key)
        if saved and saved["fingerprint"] == fp and self._alive(saved["run_id"]):
            return saved["run_id"]
        name = f"{arm}-{loss}" + (f"-seed{seed}" if key.startswith("seed") else "")
        run_id = self._create(name, {"stage": "arm", "arm": arm, "loss": loss, "seed": str(seed)},
                              parent=self.parent_id)
        for k, v in {"arm": arm, "loss": loss, "seed": seed, "human_labels_used": human_labels,
                     "sft": self.cfg.sft}.items():
            self.client.log_param(run_id, k, str(v))
        self.client.log_metric(run_id, "human_labels_used", float(human_labels))
        self.state["children"][key] = {"run_id": run_id, "fingerprint": fp}
        self._save()
        return run_id

    def finish_child(self, arm: str, loss: str, seed: int, metrics: dict, responses: Path, split: str) -> None:
        """Every arm's metrics on the parent too (ARM.LOSS.gra ..., ARM.LOSS.validation.gra ... for the
        validation split), so one run holds them all; its per-prompt responses and scores on its own
        run (test: at the root, for compare's paired differences; validation: under validation/)."""
        key = self.key(arm, loss, seed)
        run_id = self.state["children"][key]["run_id"]
        if responses.exists():
            self.client.log_artifact(run_id, str(responses), reporting.artifact_dir(split))
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        prefix = reporting.metric_prefix(split)
        for k, v in numeric.items():
            self.client.log_metric(run_id, f"{prefix}/{k}", v)  # idempotent with evaluate's own logging
        name = key.replace(":", "").replace("/", ".") + ("" if split == "test" else f".{split}")
        self.log_parent({f"{name}.{k}": v for k, v in numeric.items()})
        self.client.set_terminated(run_id)

    def close(self) -> None:
        self.client.set_terminated(self.parent_id)


