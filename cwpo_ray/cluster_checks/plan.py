"""What a pipeline config asks of a cluster, worked out on the driver: the paths it writes, the
inputs it reads, the GPUs it requests, the disk its checkpoints need; and a check's result row."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from cwpo_ray.arms import needs_ensemble, reads_weak_labels
from cwpo_ray.disk_space import checkpoint_bytes, model_bytes, start_model_bytes
from cwpo_ray.orchestration import stages
from cwpo_ray.recipes import pipeline




MODULES = ("torch", "transformers", "ray", "deepspeed", "mlflow", "pyarrow")
URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
GB = 1e9



@dataclass
class Row:
    check: str
    node: str
    status: str  # ok, FAIL, warn, skip
    result: str
    fix: str = ""


@dataclass
class Plan:
    """What the node tasks check: plain values, sent to every node."""

    versions: dict                                # module -> the driver's version; cwpo_ray -> code hash
    tracking_uri: str
    nodes: int
    reads: list                                   # (key, kind: model / judge / path, spec, gguf file)
    disk: dict                                    # local folder -> (bytes needed, of what)
    gpu_precisions: list                          # (key, bf16 or auto) of the GPU stages
    tokens: dict = field(default_factory=dict)    # probe file -> (token, keys written there)


def is_uri(path: str) -> bool:
    return path.startswith(URI_SCHEMES)


def local_path(path: str) -> str:
    """Absolute, symlinks kept (as every node names it); a file:// URI as its path."""
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def trains_annotator(cfg: pipeline.Config) -> bool:
    return any(reads_weak_labels(arm) for arm in cfg.arms)  # as the pipeline decides it


def written_paths(cfg: pipeline.Config, artifact_location: str | None) -> dict[str, str]:
    """key -> where the pipeline writes (an empty storage_path is a folder under out)."""
    out = local_path(cfg.out)
    paths = {"out": out, "policy.reference_cache": os.path.join(out, "reference_cache")}
    if cfg.annotator.storage_path and trains_annotator(cfg):
        paths["annotator.storage_path"] = cfg.annotator.storage_path
    if cfg.policy.storage_path:
        paths["policy.storage_path"] = cfg.policy.storage_path
    if artifact_location:
        paths["mlflow artifacts"] = artifact_location
    return {k: v if is_uri(v) else local_path(v) for k, v in paths.items()}


def read_inputs(cfg: pipeline.Config) -> list[tuple]:
    """(key, kind, spec, gguf file) of what the stages read on the nodes."""
    reads = [("policy.model", "model", cfg.policy.model, cfg.policy.gguf_file)]
    if trains_annotator(cfg):
        reads.append(("annotator.model", "model", cfg.annotator.model, cfg.annotator.gguf_file))
    for i, judge in enumerate([cfg.evaluate.judge, *cfg.evaluate.extra_judges]):
        reads.append(("evaluate.judge" if i == 0 else f"evaluate.extra_judges[{i - 1}]", "judge", judge, None))
    if cfg.test:
        reads.append(("test", "path", local_path(cfg.test), None))
    return reads


def gpu_requests(cfg: pipeline.Config) -> list[tuple[str, float, float, str]]:
    """(stage, GPUs in all, GPUs of its largest task, the key that runs it on CPUs)."""
    out, annotated = [], trains_annotator(cfg)
    if cfg.annotator.use_gpu and annotated:
        out.append(("annotator", cfg.annotator.num_workers, 1.0, "annotator.use_gpu=false"))
    if cfg.annotate.gpus_per_actor > 0 and annotated:
        actors = cfg.annotate.min_actors or cfg.annotate.num_actors
        out.append(("annotate", cfg.annotate.gpus_per_actor * actors, cfg.annotate.gpus_per_actor,
                    "annotate.gpus_per_actor=0"))
    if cfg.policy.use_gpu:
        out.append(("policy", cfg.policy.num_workers, 1.0, "policy.use_gpu=false"))
    if cfg.evaluate.num_gpus > 0:
        out.append(("evaluate", cfg.evaluate.num_gpus, cfg.evaluate.num_gpus, "evaluate.num_gpus=0"))
    return out


def gpu_precisions(cfg: pipeline.Config) -> list[tuple[str, str]]:
    annotated = trains_annotator(cfg)
    out = [("policy.mixed_precision", cfg.policy.mixed_precision, cfg.policy.use_gpu),
           ("annotator.mixed_precision", cfg.annotator.mixed_precision, cfg.annotator.use_gpu and annotated),
           ("annotate.precision", cfg.annotate.precision, cfg.annotate.gpus_per_actor > 0 and annotated)]
    return [(k, v) for k, v, on_gpu in out if on_gpu and v in ("bf16", "auto")]


def disk_needs(cfg: pipeline.Config) -> dict[str, tuple[int, str]]:
    """Rough bytes each local folder receives: the saved models; Ray Train's checkpoints of one training
    run at their peak (disk_space.checkpoint_bytes, the estimate the pipeline checks each stage by); the
    tables (~4x a local source a seed)."""
    from cwpo_ray.fingerprints import files_of

    policy = model_bytes(cfg.policy.model, cfg.policy.gguf_file)[0]
    annotator = model_bytes(cfg.annotator.model, cfg.annotator.gguf_file)[0] if trains_annotator(cfg) else 0
    seeds = len(cfg.seed_list())
    runs = len(cfg.arms) * len(cfg.losses) * (2 if cfg.sft == "per-arm" else 1) + (cfg.sft == "shared")
    saved = policy * runs * seeds + annotator * seeds + start_model_bytes(cfg.policy.model, cfg.policy.gguf_file)
    if any(needs_ensemble(arm) for arm in cfg.arms):  # keep_fold_models: k kept a seed, k x epochs at the peak
        saved += annotator * cfg.annotator.folds * (seeds + cfg.annotator.epochs)
    tables = 4 * seeds * sum(size for _, size, _ in files_of(stages.resolve_source(cfg.source).partition(":")[2]))
    out = local_path(cfg.out)
    needs = {out: [saved + tables, f"{saved / GB:.2f} GB of models, {tables / GB:.2f} GB of tables"]}
    checkpoints = {"policy": checkpoint_bytes(policy, cfg.policy.lora), "annotator": checkpoint_bytes(annotator)}
    for key, ckpt in checkpoints.items():
        where = getattr(cfg, key).storage_path or out
        if ckpt and not is_uri(where):
            entry = needs.setdefault(local_path(where), [0, ""])
            entry[0] += ckpt
            entry[1] = ", ".join(filter(None, [entry[1], f"{ckpt / GB:.2f} GB of {key} checkpoints"]))
    return {k: (int(n), what) for k, (n, what) in needs.items()}


def tracking_uri() -> str:
    """The URI the pipeline logs to (tracking.tracking_uri, without creating the default store)."""
    from cwpo_ray import tracking

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tracking.DEFAULT_STORE.resolve() / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where the driver writes the experiment's artifacts, if not through the tracking server (None:
    served by it, or the experiment is not created yet)."""
    if uri.startswith(("http://", "https://")):
        query = urllib.parse.urlencode({"experiment_name": experiment})
        try:
            with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=5) as r:
                location = json.load(r)["experiment"]["artifact_location"]
        except Exception:  # noqa: BLE001 - not created yet, or unreachable (the mlflow rows say which)
            return None
    elif uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        from cwpo_ray import tracking

        location = str((tracking.DEFAULT_STORE / "artifacts").resolve())
    else:
        return None
    return None if location.startswith("mlflow-artifacts:") else location


