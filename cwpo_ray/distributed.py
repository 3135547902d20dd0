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
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

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


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """"bf16", "fp16" or "fp32": what a worker on ``device`` trains in. ``auto`` is bf16 on a GPU that
    supports it (Ampere and later) and fp32 elsewhere: older GPUs (V100, T4) have no bf16 (they take
    ``fp16``), and on CPUs bf16 matmuls exist only on some (AVX512-BF16, AMX), so fp32 stays the
    default there and ``bf16`` a choice."""
    if mixed_precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return "fp32" if mixed_precision == "no" else mixed_precision


def autocast(precision: str, device: torch.device):
    """The forward's autocast context for ``precision`` (weights and optimizer stay fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


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


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one pass over each tensor instead of a dozen foreach ops, which
    on CPU is most of the optimizer step's time. transformers' Trainer (and so TRL) uses it by
    default on torch >= 2.8."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


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


def to_device(inputs, device: torch.device):
    """``inputs`` (tensors in tuples, lists and dicts) with every tensor on ``device``: batches are built
    on the CPU, and the engine puts them where its model is."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


class DDPEngine:
    """DistributedDataParallel with mixed precision, gradient accumulation, clipping and a scheduler.

    The forward runs under autocast (``precision``); fp16 scales the loss (GradScaler) so small
    gradients do not underflow. Every micro-batch of an accumulated step but the last runs under
    DDP's ``no_sync``: gradients are all-reduced once per optimizer step, not once per micro-batch.
    """

    def __init__(self, model, optimizer, make_scheduler, accumulation_steps: int = 1,
                 max_grad_norm: float | None = 1.0, precision: str = "fp32"):
        self.module = model
        self.wrapped = model
        if world()[1] > 1:
            import ray.train.torch

            self.wrapped = ray.train.torch.prepare_model(model)
        self.optimizer = optimizer
        self.scheduler = make_scheduler(optimizer) if make_scheduler else None
        self.accumulation_steps, self.max_grad_norm = accumulation_steps, max_grad_norm
        self.device = next(model.parameters()).device
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._micro = 0

    def __call__(self, *args, **kwargs):
        args, kwargs = to_device((args, kwargs), self.device)
        # DDP decides in the forward whether the backward that follows all-reduces.
        last_micro = (self._micro + 1) % self.accumulation_steps == 0
        skip_sync = not last_micro and torch.is_grad_enabled() and hasattr(self.wrapped, "no_sync")
        with self.wrapped.no_sync() if skip_sync else nullcontext(), autocast(self.precision, self.device):
            return self.wrapped(*args, **kwargs)

    def train(self):
        self.wrapped.train()

    def eval(self):
        self.wrapped.eval()

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        """Backward one micro-batch; step the optimizer every ``accumulation_steps``. True when it stepped."""
        loss = loss / self.accumulation_steps
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._micro += 1
        if self._micro % self.accumulation_steps:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save_checkpoint(self, directory: str, client_state: dict) -> None:
        if world()[0] == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                        "scaler": self.scaler.state_dict() if self.scaler else None,
                        "client_state": client_state}, Path(directory) / "state.pt")

    def load_checkpoint(self, directory: str) -> dict:
        state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return state["client_state"]

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict() if world()[0] == 0 else None


class DeepSpeedEngine:
    """deepspeed.initialize called by us (not prepare_model), as DeepSpeed under Ray Train needs."""

    TAG = "ckpt"
    CLIENT_KEY = "cwpo"

    def __init__(self, model, optimizer, make_scheduler, dist: DistributedConfig, micro_batch_size: int,
                 accumulation_steps: int = 1, max_grad_norm: float | None = 1.0, precision: str = "fp32"):
        import deepspeed

        skip_shm_comm_build()
        config = deepspeed_config(dist, micro_batch_size, accumulation_steps, max_grad_norm, optimizer, precision)
        if "optimizer" in config:
            optimizer = None  # DeepSpeed builds its fused CPU Adam from the config
        # The schedule is built on the optimizer DeepSpeed really steps (a factory, not an object
        # made on ours: under offload that one would never be stepped and the LR would stay flat).
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.module = self.engine.module
        self.device = self.engine.device
        self.zero_stage = dist.zero_stage

    def __call__(self, *args, **kwargs):
        args, kwargs = to_device((args, kwargs), self.device)
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

    DeepSpeed builds that C++ op on every first init in a new environment (a C++ compile on the
    critical path, and a lock in ~/.cache/torch_extensions that a worker killed mid-build leaves behind),
    and uses it only for DeepSpeed inference's ``inference_all_reduce``, never in training. DeepSpeed
    keeps its op-compatibility table as one module-level dict whose edits persist (its own comment in
    ``deepspeed.ops``); an op marked incompatible there is not built and DeepSpeed falls back to the
    process group's all-reduce.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def deepspeed_config(dist: DistributedConfig, micro_batch_size: int, accumulation_steps: int,
                     max_grad_norm: float | None, optimizer: torch.optim.Optimizer | None,
                     precision: str = "fp32") -> dict:
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "zero_optimization": zero,
        # DeepSpeed's own mixed precision (fp32 master weights in its optimizer), from the same key as DDP's.
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},  # dynamic loss scaling by default
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
        if dist.use_gpu and optimizer is not None:
            group = optimizer.param_groups[0]
            config["optimizer"] = {"type": "AdamW", "params": {
                "lr": group["lr"], "weight_decay": group.get("weight_decay", 0.0),
                "betas": list(group.get("betas", (0.9, 0.999))), "eps": group.get("eps", 1e-8)}}
    return config


@contextmanager
def partitioned_init(dist: DistributedConfig, micro_batch_size: int, accumulation_steps: int = 1,
                     max_grad_norm: float | None = 1.0):
    """Build or load the model inside this: under DeepSpeed ZeRO-3, transformers then creates it
    under ``deepspeed.zero.Init`` (it checks for a live ``HfDeepSpeedConfig``) and each worker loads
    only its partition of the weights. Loading the whole model on every worker first, and sharding
    it in ``deepspeed.initialize``, would need the whole model to fit one device: what ZeRO-3 is for
    is the case where it does not. Elsewhere (DDP, ZeRO 0-2) nothing happens."""
    if dist.strategy != "deepspeed" or dist.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    skip_shm_comm_build()
    precision = resolve_precision(dist.mixed_precision, device_for(dist))
    # transformers keeps only a weak reference: the object must stay alive while models load, and
    # must be gone afterwards (a later load, e.g. the final save's copy, is an ordinary one).
    alive = HfDeepSpeedConfig(deepspeed_config(dist, micro_batch_size, accumulation_steps, max_grad_norm, None,
                                               precision))
    try:
        yield
    finally:
        del alive


def parameters_held(model) -> tuple[int, int]:
    """(parameters this process holds, parameters of the model): equal unless ZeRO-3 partitioned it."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # a ZeRO-3 parameter: its local partition, and the full size
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
        else:
            held, total = held + p.numel(), total + p.numel()
    return held, total


def setup_engine(model, optimizer, make_scheduler, dist: DistributedConfig, micro_batch_size: int,
                 accumulation_steps: int = 1, max_grad_norm: float | None = 1.0):
    """The model ready to train under ``dist.strategy``; the same interface either way.

    ``make_scheduler(optimizer)`` builds the LR schedule (or is None) on whichever optimizer
    ends up stepping. ``engine.scheduler`` and ``engine.optimizer`` are the live ones;
    ``engine.precision`` is ``dist.mixed_precision`` resolved on this worker's device.
    """
    device = device_for(dist)
    precision = resolve_precision(dist.mixed_precision, device)
    if dist.strategy == "deepspeed":
        engine = DeepSpeedEngine(model, optimizer, make_scheduler, dist, micro_batch_size, accumulation_steps,
                                 max_grad_norm, precision)
    else:
        # On the worker's device before DDP wraps it (prepare_model moves it too, but only with 2+ workers).
        engine = DDPEngine(model.to(device), optimizer, make_scheduler, accumulation_steps, max_grad_norm, precision)
    engine.precision = precision
    return engine


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
