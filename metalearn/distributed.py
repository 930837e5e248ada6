"""Meta-batches split across processes with torch.distributed (torchrun)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run.

    Every rank draws the full meta-batch from the same seeded sampler and keeps its own
    contiguous slice, so the union over ranks is exactly the single-process meta-batch;
    drawing the few extra episodes costs microseconds next to a meta-iteration. Validation
    tasks are split the same way, and their per-task results gathered.

    Example:
        >>> from metalearn.distributed import DistContext
        >>> DistContext(rank=1, world_size=3, device=torch.device("cpu")).shard(10)
        (4, 3)
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # Whether from_env started the process group (and so close() ends it).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | torch.device) -> DistContext:
        """Join the process group that torchrun describes in the environment, if any."""
        device = torch.device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, owns)

    def close(self) -> None:
        """After a run that completed: wait for every rank, then end the process group if
        :meth:`from_env` started it. A rank that exits with the group still up can abort
        in gloo's teardown ("terminate called without an active exception")."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def shard(self, tasks: int, what: str = "meta_batch") -> tuple[int, int]:
        """(offset, count) of this rank's share of ``tasks`` tasks; the first ranks take one
        extra if uneven. ``what`` names the setting in the error when there are too few."""
        if tasks < self.world_size:
            raise ValueError(f"{what}={tasks} is smaller than the {self.world_size} "
                             f"processes; give every process at least one task (raise {what})")
        base, extra = divmod(tasks, self.world_size)
        count = base + (self.rank < extra)
        return self.rank * base + min(self.rank, extra), count

    def gather_tasks(self, rows: torch.Tensor, tasks: int) -> torch.Tensor:
        """Every rank's ``rows`` (one per task of its :meth:`shard` of ``tasks``), in task
        order: the table one process would have computed alone."""
        if self.world_size == 1:
            return rows
        # all_gather takes equal sizes: pad to the largest share, then trim each part.
        size = -(-tasks // self.world_size)
        padded = rows.new_zeros(size, *rows.shape[1:], device=self.device)
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        counts = [DistContext(r, self.world_size, self.device).shard(tasks)[1]
                  for r in range(self.world_size)]
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(rows.device)

    def reduce_gradients(self, params: Iterable[torch.Tensor], weight: float) -> None:
        """Turn each rank's mean over its tasks into the mean over the whole meta-batch."""
        if self.world_size == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad.mul_(weight)
                dist.all_reduce(p.grad)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (on one process: ``flag``)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def reduce_metrics(self, metrics: dict[str, float], weight: float) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        values = torch.tensor([v * weight for v in metrics.values()], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(values)
        return dict(zip(metrics, values.tolist()))
