"""The training engines behind one small interface: DDP (``DDPEngine``) or DeepSpeed
(``DeepSpeedEngine``), chosen by ``setup_engine`` from a stage's ``DistributedConfig``. Each puts
batches on its device, runs the forward in the configured mixed precision, accumulates gradients,
clips, steps the optimizer and the schedule, and saves / loads its checkpoint state; a training loop
is written once for both. Plain torch and DeepSpeed: Ray only wraps the model for DDP with 2+ workers.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from cwpo_ray.distributed import DistributedConfig, device_for, world


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


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one pass over each tensor instead of a dozen foreach ops, which
    on CPU is most of the optimizer step's time. transformers' Trainer (and so TRL) uses it by
    default on torch >= 2.8."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


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
        self.precision = precision
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
    return engine


