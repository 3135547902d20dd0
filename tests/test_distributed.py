"""The shared Ray Train plumbing: DDP and DeepSpeed behind one interface, checkpoints, resume."""

from __future__ import annotations

import pytest
import torch

from cwpo_ray.distributed import DistributedConfig, report, resume, run_trainer, setup_engine, world


def regression_loop(config: dict) -> None:
    dist = DistributedConfig(**config["dist"])
    rank, size = world()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = setup_engine(model, optimizer, None, dist, micro_batch_size=8)
    state = resume(engine) or {"step": 0}
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    for step in range(state["step"], config["steps"]):
        shard = slice(rank * 8 + 16 * (step % 4), rank * 8 + 16 * (step % 4) + 8)  # each rank its own 8 rows
        loss = torch.nn.functional.mse_loss(engine(x[shard]), y[shard])
        engine.backward_and_step(loss)
        report({"step": step + 1, "loss": loss.item()}, engine, {"step": step + 1})


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_two_workers_train_and_checkpoint(ray_cluster, tmp_path, strategy):
    dist = DistributedConfig(num_workers=2, strategy=strategy, zero_stage=2, cpus_per_worker=0.5,
                             storage_path=str(tmp_path), max_failures=0)
    result = run_trainer(regression_loop, {"steps": 6}, dist, name=f"reg-{strategy}")
    assert result.metrics["step"] == 6
    assert result.checkpoint is not None
    # a second run with the same name and storage resumes from the saved step and does nothing more
    again = run_trainer(regression_loop, {"steps": 6}, dist, name=f"reg-{strategy}")
    assert again.metrics.get("step", 6) == 6
