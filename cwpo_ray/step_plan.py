"""Which rows each worker trains on at each optimizer step: the one data order of both trainers.

Pure: no Ray, no I/O. An epoch is a seeded permutation of the table's rows (``rowstore.permuted``,
computed for the positions a step asks for, so memory does not grow with the table), cut into global
batches of ``batch_size x accumulation x world`` rows; the last incomplete global batch is dropped, so
every worker runs the same number of steps (DDP and ZeRO collectives hang otherwise) and every row of
a step is a different row. Deterministic in (n, seed, epoch): a resumed run, on any worker, reads the
same rows at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class StepPlan:
    """``n`` rows, ``batch_size`` rows per micro-batch per worker, ``accumulation`` micro-batches per
    step, ``world`` workers; ``epochs`` passes, each in its own order; at most ``max_steps`` steps."""

    n: int
    batch_size: int
    world: int
    epochs: int
    seed: int
    max_steps: Optional[int] = None
    accumulation: int = 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def rows(self, step: int, rank: int) -> list[list[int]]:
        """This worker's micro-batches of optimizer step ``step`` (counted over all epochs): row
        indices at positions of the epoch's seeded permutation."""
        import numpy as np

        from cwpo_ray.rowstore import permuted

        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.n} rows is fewer than one global batch ({self.batch_size} x "
                             f"{self.accumulation} micro-batches x {self.world} workers)")
        epoch, i = divmod(step, self.steps_per_epoch)
        per_worker = self.batch_size * self.accumulation
        start = i * self.global_batch + rank * per_worker
        mine = permuted(np.arange(start, start + per_worker), self.n, self.seed * 1000 + epoch).tolist()
        return [mine[k:k + self.batch_size] for k in range(0, per_worker, self.batch_size)]
