"""Ray Train plumbing shared by the annotator and policy trainers.

``run_trainer`` launches a TorchTrainer; inside the train loop ``engines.setup_engine`` wraps a
model + optimizer for DDP or DeepSpeed behind one small interface, so a training loop
is written once. Checkpoints go through ``ray.train.report`` (Ray's own storage and
failure handling); rank 0 appends its metrics to a file the driver relays to its MLflow run
(Ray Train V2 has no MLflow callback; ``RankZeroLogger``), so a restarted worker keeps logging to it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from cwpo_ray.config import option

STRATEGIES = ("ddp", "deepspeed")
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")


@dataclass
class DistributedConfig:
    """How a Ray Train stage is placed and how its model trains (precision, activation memory);
    train-annotator's and train-policy's settings inherit it."""

    # One worker by default: it runs on any machine, a laptop included; on a cluster set it to the
    # GPUs (or CPU slots) a stage should use.
    num_workers: int = option(1, "Ray Train workers (processes)")
    # DDP: a model that fits one GPU is launch-bound there, so DeepSpeed's extra optimizer work only
    # slows it (bench/RESULTS.md, GPU figures), and on CPU DDP is the only sensible choice;
    # DeepSpeed is for models that do not fit.
    strategy: str = option("ddp", "ddp or deepspeed", choices=STRATEGIES)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage 0-3")
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer state on the CPU")
    use_gpu: bool = option(False, "one GPU per worker")
    mixed_precision: str = option("auto", "bf16 or fp16 autocast over fp32 master weights (fp16 with a loss "
                                          "scaler), or no (fp32); auto: bf16 on GPUs that support it, else fp32",
                                  choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass instead of keeping "
                                                 "them: less memory for about a third more compute")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker (also its torch threads on CPU)")
    max_failures: int = option(2, "worker failures to recover from (from the last checkpoint)")
    storage_path: str = option("", "where Ray Train keeps checkpoints: a folder or s3:// / gs:// URI "
                                   "(empty: OUT/ray beside the stage's output)")

    def validate(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, "
                             f"got {self.mixed_precision!r}")

    def placement(self) -> "DistributedConfig":
        """Just these fields (a stage's config inherits them), for the train loop."""
        return DistributedConfig(**{f.name: getattr(self, f.name) for f in fields(DistributedConfig)})


# glibc settings of a CPU training worker (the driver's own values win). Every step allocates and
# frees the same activations and gradients; by default glibc hands large blocks back to the kernel
# (munmap, heap trimming), so the next step faults them in again page by page, and on a VM a page
# that went back can cost several times a warm one: kernel time that made a worker's steps slower
# than a plain process's (bench/notes/history.md, policy run 6). One arena, no separately mapped
# blocks, no trimming: freed memory is reused, and the worker's RSS stays at its peak instead of
# following each step. GPU workers keep the default (their step's memory is on the device). The one
# place these are set; the driver's values win.
CPU_WORKER_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def storage_uri(path: str) -> str:
    """Local folders made absolute (workers may have another cwd); URIs as given."""
    return path if "://" in path else str(Path(path).resolve())


def prepare_train_driver(experiment: str) -> None:
    """What a training stage's driver needs once Ray is up, done while it starts (``init_ray``'s
    meanwhile, as Ray's start mostly waits on its processes): the MLflow store (created and migrated
    on a first run), then Ray Train's modules. Ray's own start imports Ray modules too; should the two
    threads' imports ever collide (Python then hands one a half-initialized module), the error is
    dropped here and ``run_trainer``'s own import, on the main thread, is the one that counts."""
    from cwpo_ray import tracking

    tracking.set_experiment(experiment)
    try:
        import ray.train.torch  # noqa: F401
    except (ImportError, AttributeError):
        pass


def run_trainer(loop_fn: Callable[[dict], None], loop_config: dict, dist: DistributedConfig, name: str,
                default_storage: str):
    """Run ``loop_fn`` on ``dist.num_workers`` Ray Train workers; raise if training failed for good.

    ``loop_config`` holds typed objects (the stage's config among them), not settings by string key.
    Checkpoints go to ``dist.storage_path``, or to ``default_storage`` when that is empty.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cwpo_ray.checkpoint_guard import drop_torn_checkpoint_list
    from cwpo_ray.disk_space import CHECKPOINTS_KEPT
    from cwpo_ray.ray_env import before_train_on_local_node, init_ray
    from cwpo_ray.torch_loopback import LoopbackTorchConfig

    init_ray()
    before_train_on_local_node()
    storage = storage_uri(dist.storage_path or default_storage)
    if "://" not in storage:  # a list a full disk cut short would stop this run from ever starting
        drop_torn_checkpoint_list(Path(storage) / name)
    # Ray Train's controller sees that the workers finished (or failed) on its next poll, every 2 s
    # by default: on average 1 s of every stage's wall time. Ray passes this on to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    env = {"DS_ACCELERATOR": "cuda" if dist.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # No MLFLOW_TRACKING_URI: workers leave MLflow to the driver (RankZeroLogger).
    for key in ("HF_HUB_OFFLINE", "PYTHONPATH", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    if not dist.use_gpu:
        env.update({key: os.environ.get(key, value) for key, value in CPU_WORKER_MALLOC.items()})
    trainer = TorchTrainer(
        loop_fn,
        train_loop_config={**loop_config, "dist": dist.placement()},
        # Ray's TorchConfig, but on a local run nothing of the process group listens beyond loopback.
        torch_config=LoopbackTorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                     resources_per_worker={"CPU": dist.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def world() -> tuple[int, int]:
    """(rank, world size) inside a Ray Train worker; (0, 1) outside one."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # noqa: BLE001 — outside Ray Train there is no context
        return 0, 1


def device_for(dist: DistributedConfig) -> torch.device:
    if dist.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(dist.cpus_per_worker)))
    return torch.device("cpu")


def _reduce_over_workers(values: list[float], op: str, device=None) -> list[float]:
    """Element-wise ``op`` (a ``torch.distributed.ReduceOp`` name) over every worker of the process
    group, in float64; outside one, the values."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t, op=getattr(td.ReduceOp, op))
    return t.tolist()


def mean_over_workers(metrics: dict[str, float], device=None, summed: tuple[str, ...] = ()) -> dict[str, float]:
    """Each metric averaged over the workers (those named in ``summed`` added up): what rank 0
    logs is the global batch's. Every worker runs the same steps, so a mean of means is the mean."""
    keys = sorted(metrics)
    totals = sum_over_workers([metrics[k] for k in keys], device)
    n = world()[1]
    return {k: v if k in summed else v / n for k, v in zip(keys, totals)}


def sum_over_workers(values: list[float], device=None) -> list[float]:
    """Element-wise sums over every worker of the process group (float64); outside one, the values."""
    return _reduce_over_workers(values, "SUM", device)


def max_over_workers(values: list[float], device=None) -> list[float]:
    """Element-wise maxima over every worker of the process group; outside one, the values."""
    return _reduce_over_workers(values, "MAX", device)


def barrier() -> None:
    """Wait for every worker of the process group; outside one, return."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def die_once_at(now: int, at: int | None, marker: Path) -> None:
    """Testing hook of both trainers: the last worker dies once (``die_once``) when ``now == at``."""
    rank, size = world()
    if at is not None and now == at and rank == size - 1:
        die_once(marker)


def die_once(marker: Path) -> None:
    """Testing hook for worker failures: the calling process dies, the first time only (``marker``).

    It waits first: Ray Train's controller collects a reported checkpoint on its next poll
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and a checkpoint not yet collected is lost
    with the worker; four polls' worth. No exception and no cleanup (``os._exit``): as if the
    process were killed.
    """
    if marker.exists():
        return
    marker.write_text("injected failure\n")
    time.sleep(4 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    os._exit(1)


def report(metrics: dict, engine=None, client_state: dict | None = None, phase: str = "") -> None:
    """``ray.train.report`` from every worker (it is a barrier), with a checkpoint when ``engine`` is given.

    ``phase`` names what the checkpoint belongs to when one Ray Train run trains in several phases
    (SFT then PO): it goes into the checkpoint's metadata, and ``resume`` of another phase ignores it.
    """
    import ray.train

    from cwpo_ray.checkpoint_guard import upload_kwargs

    if engine is None:
        ray.train.report(metrics)
        return
    directory = tempfile.mkdtemp(prefix="cwpo-ckpt-")
    try:
        engine.save_checkpoint(directory, client_state or {})
        has_files = any(Path(directory).iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(directory) if has_files else None
        if checkpoint is not None and phase:
            checkpoint.set_metadata({"phase": phase})
        # a checkpoint is uploaded only where it fits, and undone if its copy fails (checkpoint_guard)
        ray.train.report(metrics, checkpoint=checkpoint, **(upload_kwargs() if checkpoint is not None else {}))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def resume(engine, phase: str = "") -> dict | None:
    """The client state of the latest checkpoint, loaded into ``engine``; None on a fresh start or
    when the latest checkpoint is another phase's (a checkpoint without a phase matches any)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or checkpoint.get_metadata().get("phase", phase) != phase:
        return None
    with checkpoint.as_directory() as directory:
        return engine.load_checkpoint(directory)


class RankZeroLogger:
    """Rank 0's metrics as JSON lines appended to ``path`` (in the stage's output folder, which every
    worker can write); the driver relays them to its MLflow run while training runs
    (``tracking.relay_metrics``). A no-op on other ranks, or without a path.

    Why not MLflow from the worker: its client (importing MLflow and, for a local store, SQLAlchemy and
    the schema check) sat on the critical path of every worker's start (bench/notes/history.md, fixed
    cost), and every worker node would need the tracking server. The driver has both already.
    """

    def __init__(self, path: str | None):
        self.path = path if path and world()[0] == 0 else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.path is None:
            return
        line = json.dumps({"step": step, "timestamp": int(time.time() * 1000),
                           "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n"
        # One write on an O_APPEND descriptor: a line is never interleaved with another.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
