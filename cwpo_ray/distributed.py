"""Ray Train plumbing shared by the annotator and policy trainers.

``run_trainer`` launches a TorchTrainer; inside the train loop ``setup_engine`` wraps a
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
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from cwpo_ray.config import option

STRATEGIES = ("ddp", "deepspeed")


@dataclass
class DistributedConfig:
    """How a Ray Train stage is placed; train-annotator's and train-policy's settings inherit it."""

    # One worker by default: it runs on any machine, a laptop included; on a cluster set it to the
    # GPUs (or CPU slots) a stage should use.
    num_workers: int = option(1, "Ray Train workers (processes)")
    # DDP: measured 2x faster than DeepSpeed ZeRO-2 bf16 on one H100 at 135M parameters and the
    # only sensible choice on CPU (bench/RESULTS.md); DeepSpeed is for models that do not fit.
    strategy: str = option("ddp", "ddp or deepspeed", choices=STRATEGIES)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage 0-3")
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer state on the CPU")
    use_gpu: bool = option(False, "one GPU per worker; bf16 under DeepSpeed")
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

    def placement(self) -> "DistributedConfig":
        """Just these fields (a stage's config inherits them), for the train loop."""
        return DistributedConfig(**{f.name: getattr(self, f.name) for f in fields(DistributedConfig)})


# glibc settings of a CPU training worker (the driver's own values win). Every step allocates and
# frees the same activations and gradients; by default glibc hands large blocks back to the kernel
# (munmap, heap trimming), so the next step faults them in again page by page, and on a VM a page
# that went back can cost several times a warm one. Measured in a Ray Train worker, 8 SmolLM2-135M
# steps: 17.5 s (8.4 s of it kernel time) -> 13.7 s, and 13.9 -> 11.8 s for the next 8
# (bench/RESULTS.md). One arena, no separately mapped blocks, no trimming: freed memory is reused,
# and the worker's RSS stays at its peak instead of following each step. GPU workers keep the default.
CPU_WORKER_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def prefault_heap(nbytes: Callable[[], int], workers: int = 1) -> threading.Thread | None:
    """Write ``nbytes()`` bytes of new heap on a background thread and free them again; None when
    this process's glibc would not keep them.

    A fresh CPU worker's first steps fault in their gradients, AdamW state and activations page by
    page (~2.2 GB, 560k faults, for SmolLM2-135M), and on a VM whose host takes freed guest memory
    back each fault costs several times a warm one: there a SmolLM2-135M epoch (reference pass and 8
    steps) took 18.7 s instead of 15.0 s, and the command 1.1 s longer (bench/RESULTS.md). Under
    ``CPU_WORKER_MALLOC`` (in this process's environment, as run_trainer sets it for CPU workers)
    glibc keeps the freed block, and those tensors later land on pages already there. The caller
    runs this beside its start-up (the tokenizer and model loads), which leaves a core idle.
    ``nbytes`` is computed on the thread too (it may read file headers); at most half the available
    memory, shared by ``workers`` (those that may run here at once), is touched.
    """
    kept = int(os.environ.get("MALLOC_TRIM_THRESHOLD_") or 0)  # what glibc keeps of a freed heap top
    if os.environ.get("MALLOC_MMAP_MAX_") != "0" or kept < 2**30:
        return None

    def touch():
        import ctypes

        try:
            size = min(nbytes(), kept, _available_memory() // (2 * workers))
        except Exception:  # noqa: BLE001 - only a speed-up: the model load reports what is wrong with the files
            return
        if size < 2**20:
            return
        block = torch.empty(size, dtype=torch.uint8)  # glibc's heap: no mmap under CPU_WORKER_MALLOC
        ctypes.memset(block.data_ptr(), 0, size)  # ctypes lets go of the GIL; one thread, not torch's pool
        del block

    thread = threading.Thread(target=touch, name="cwpo-prefault", daemon=True)
    thread.start()
    return thread


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where there is none: nothing is prefaulted)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def storage_uri(path: str) -> str:
    """Local folders made absolute (workers may have another cwd); URIs as given."""
    return path if "://" in path else str(Path(path).resolve())


def prepare_train_driver(experiment: str) -> None:
    """What a training stage's driver needs once Ray is up, done while it starts (``init_ray``'s
    meanwhile): the MLflow store (created and migrated on a first run, ~2 s here), then Ray Train's
    modules (2-3 s). Ray's own start imports Ray modules too; should the two threads' imports ever
    collide (Python then hands one a half-initialized module), the error is dropped here and
    ``run_trainer``'s own import, on the main thread, is the one that counts."""
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
    from ray.train.torch import TorchConfig, TorchTrainer

    from cwpo_ray.ray_env import before_train_on_local_node, init_ray

    init_ray()
    before_train_on_local_node()
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
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                     resources_per_worker={"CPU": dist.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage_uri(dist.storage_path or default_storage),
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
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


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass per tensor instead of a dozen foreach ops): for 128M
    fp32 parameters on 2 CPU cores 0.08 s per step instead of 0.52 s. transformers' Trainer (and so
    TRL) uses it by default on torch >= 2.8."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def step_with_clipping(optimizer: torch.optim.Optimizer, parameters, max_norm: float | None) -> None:
    """``optimizer.step()`` on gradients scaled to a total norm of at most ``max_norm``, as
    ``clip_grad_norm_`` then ``step()`` do (the same coefficient, min(max_norm / (norm + 1e-6), 1)).

    A fused optimizer takes the scale into its step: its kernel divides every gradient by
    ``grad_scale`` (the attribute torch's GradScaler sets to unscale fp16 gradients), so the
    separate in-place multiply of every gradient goes: one pass over 4 bytes per weight fewer,
    ~2% of a SmolLM2-135M step on 2 CPU cores (bench/RESULTS.md). Other optimizers clip first.
    """
    if max_norm:
        with_grad = [p for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        fused = all(group.get("fused") for group in optimizer.param_groups)
        if fused and getattr(optimizer, "grad_scale", None) is None:
            optimizer.grad_scale = (1.0 / torch.clamp(max_norm / (total + 1e-6), max=1.0)).float()
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale
            return
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    optimizer.step()


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


class DDPEngine:
    """DistributedDataParallel with gradient accumulation, clipping and a scheduler."""

    def __init__(self, model, optimizer, make_scheduler, accumulation_steps: int = 1,
                 max_grad_norm: float | None = 1.0):
        import ray.train.torch

        self.module = model
        self.wrapped = ray.train.torch.prepare_model(model) if world()[1] > 1 else model
        self.optimizer = optimizer
        self.scheduler = make_scheduler(optimizer) if make_scheduler else None
        self.accumulation_steps, self.max_grad_norm = accumulation_steps, max_grad_norm
        self._micro = 0

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def train(self):
        self.wrapped.train()

    def eval(self):
        self.wrapped.eval()

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        """Backward one micro-batch; step the optimizer every ``accumulation_steps``. True when it stepped."""
        (loss / self.accumulation_steps).backward()
        self._micro += 1
        if self._micro % self.accumulation_steps:
            return False
        step_with_clipping(self.optimizer, self.module.parameters(), self.max_grad_norm)
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save_checkpoint(self, directory: str, client_state: dict) -> None:
        if world()[0] == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                        "client_state": client_state}, Path(directory) / "state.pt")

    def load_checkpoint(self, directory: str) -> dict:
        state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        return state["client_state"]

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict() if world()[0] == 0 else None


class DeepSpeedEngine:
    """deepspeed.initialize called by us (not prepare_model), as DeepSpeed under Ray Train needs."""

    TAG = "ckpt"
    CLIENT_KEY = "cwpo"

    def __init__(self, model, optimizer, make_scheduler, dist: DistributedConfig, micro_batch_size: int,
                 accumulation_steps: int = 1, max_grad_norm: float | None = 1.0):
        import deepspeed

        skip_shm_comm_build()
        config = deepspeed_config(dist, micro_batch_size, accumulation_steps, max_grad_norm, optimizer)
        if "optimizer" in config:
            optimizer = None  # DeepSpeed builds its fused CPU Adam from the config
        # The schedule is built on the optimizer DeepSpeed really steps (a factory, not an object
        # made on ours: under offload that one would never be stepped and the LR would stay flat).
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.module = self.engine.module
        self.zero_stage = dist.zero_stage

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def save_checkpoint(self, directory: str, client_state: dict) -> None:
        # Ours under one key: DeepSpeed hands its own metadata back among the loaded client state
        # (checkpoint_parallel_dimensions, ...) and refuses those keys on the next save. Every rank saves.
        self.engine.save_checkpoint(directory, tag=self.TAG, client_state={self.CLIENT_KEY: client_state})

    def load_checkpoint(self, directory: str) -> dict:
        _, client_state = self.engine.load_checkpoint(directory, tag=self.TAG)
        return (client_state or {}).get(self.CLIENT_KEY, {})

    def full_state_dict(self) -> dict | None:
        """Collective under ZeRO-3 (every rank must call); the full weights on rank 0."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict() if world()[0] == 0 else None


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op when it sets up its comm backend.

    DeepSpeed builds that C++ op on every first init in a new environment (30-100 s on 2 cores, a
    compiler and a lock in ~/.cache/torch_extensions that a worker killed mid-build leaves behind),
    and uses it only for DeepSpeed inference's ``inference_all_reduce``, never in training. DeepSpeed
    keeps its op-compatibility table as one module-level dict whose edits persist (its own comment in
    ``deepspeed.ops``); an op marked incompatible there is not built and DeepSpeed falls back to the
    process group's all-reduce.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def deepspeed_config(dist: DistributedConfig, micro_batch_size: int, accumulation_steps: int,
                     max_grad_norm: float | None, optimizer: torch.optim.Optimizer) -> dict:
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(dist.use_gpu)},  # fp32 on CPU
        "steps_per_print": 10**9,
        # Our own torch optimizer is passed in; DeepSpeed only "tests" its own under ZeRO.
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if max_grad_norm:
        config["gradient_clipping"] = max_grad_norm
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        # Our torch AdamW steps the CPU copy as is on CPU workers. On GPUs, DeepSpeed's fused CPU
        # Adam (the same AdamW math, built as a C++ op) is much faster at that, so it gets the job.
        config["zero_force_ds_cpu_optimizer"] = False
        if dist.use_gpu:
            group = optimizer.param_groups[0]
            config["optimizer"] = {"type": "AdamW", "params": {
                "lr": group["lr"], "weight_decay": group.get("weight_decay", 0.0),
                "betas": list(group.get("betas", (0.9, 0.999))), "eps": group.get("eps", 1e-8)}}
    return config


def setup_engine(model, optimizer, make_scheduler, dist: DistributedConfig, micro_batch_size: int,
                 accumulation_steps: int = 1, max_grad_norm: float | None = 1.0):
    """The model ready to train under ``dist.strategy``; the same interface either way.

    ``make_scheduler(optimizer)`` builds the LR schedule (or is None) on whichever optimizer
    ends up stepping. ``engine.scheduler`` and ``engine.optimizer`` are the live ones.
    """
    if dist.strategy == "deepspeed":
        return DeepSpeedEngine(model, optimizer, make_scheduler, dist, micro_batch_size, accumulation_steps,
                               max_grad_norm)
    return DDPEngine(model, optimizer, make_scheduler, accumulation_steps, max_grad_norm)


def report(metrics: dict, engine=None, client_state: dict | None = None, phase: str = "") -> None:
    """``ray.train.report`` from every worker (it is a barrier), with a checkpoint when ``engine`` is given.

    ``phase`` names what the checkpoint belongs to when one Ray Train run trains in several phases
    (SFT then PO): it goes into the checkpoint's metadata, and ``resume`` of another phase ignores it.
    """
    import ray.train

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
        ray.train.report(metrics, checkpoint=checkpoint)
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

    Why not MLflow from the worker: its client cost every stage ~2.8 s of the worker's start on the
    critical path (importing MLflow and, for a local store, SQLAlchemy and the schema check;
    bench/RESULTS.md), and every worker node would need the tracking server. The driver has both already.
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
