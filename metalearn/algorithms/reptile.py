"""Reptile (Nichol, Achiam and Schulman 2018), batched over tasks."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import grad, vmap

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.losses import accuracy, per_example_loss
from metalearn.algorithms.norm_layers import differentiated_at_most_once
from metalearn.data.task_batch import TaskBatch

INNER_OPTIMIZERS = ("sgd", "adam")
SAMPLINGS = ("cycle", "replacement")


def minibatch_indices(
    num_tasks: int, size: int, batch: int, steps: int, sampling: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices ``(num_tasks, steps, batch)`` of each task's inner mini-batches.

    ``"cycle"`` walks through fresh permutations of the task's data, so a mini-batch may
    straddle two passes (as in the reference code); ``"replacement"`` draws every
    mini-batch independently, without repeats inside one mini-batch.
    """
    if sampling == "cycle":
        passes = math.ceil(steps * batch / size)
        perms = torch.rand(num_tasks, passes, size, generator=generator).argsort(-1)
        return perms.reshape(num_tasks, -1)[:, : steps * batch].reshape(num_tasks, steps, batch)
    if sampling == "replacement":
        draws = torch.rand(num_tasks, steps, size, generator=generator).argsort(-1)
        return draws[..., :batch]
    raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")


class Reptile(MetaLearner):
    """Reptile: move the initialisation towards the weights each task adapts to.

    Each task runs ``inner_steps`` steps of SGD (or Adam with beta1 = 0, as in the
    reference code) on mini-batches of its support set, giving phi_i. :meth:`step`
    accumulates ``theta - mean_i phi_i`` into ``p.grad``, so plain SGD with learning
    rate epsilon applies the Reptile update ``theta += epsilon * mean_i(phi_i - theta)``.
    The inner optimiser state starts fresh for every task.

    Args:
        model: any ``nn.Module``.
        inner_lr: inner learning rate.
        inner_steps: inner iterations k during meta-training.
        inner_batch: examples per inner mini-batch; ``None`` uses the whole support set.
        inner_optimizer: ``"sgd"`` or ``"adam"``.
        sampling: ``"cycle"`` through the data or draw with ``"replacement"``.
        adam_betas: Adam's (beta1, beta2); the paper's setting is beta1 = 0.
        adam_eps: Adam's epsilon.
        inner_flood, flood_mode, label_smoothing: as for :class:`~metalearn.MAML`.
        generator: random source of the mini-batches (default: torch's global one).

    Attributes:
        shard: ``(offset, total)`` when ``step`` sees tasks ``offset…`` of a meta-batch of
            ``total`` split across processes: the mini-batch draws are made for the whole
            meta-batch and sliced, so they match a single-process run exactly.

    Example:
        >>> import torch
        >>> from metalearn import Reptile
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> reptile = Reptile(model, inner_lr=0.02, inner_steps=5, inner_batch=5)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the meta step size epsilon
        >>> opt.zero_grad()
        >>> metrics = reptile.step(SineTasks(shots=10, seed=0).sample(5))
        >>> opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        inner_batch: int | None = None,
        inner_optimizer: str = "sgd",
        sampling: str = "cycle",
        adam_betas: tuple[float, float] = (0.0, 0.999),
        adam_eps: float = 1e-8,
        inner_flood: float | None = None,
        flood_mode: str = "batch",
        label_smoothing: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, inner_lr, inner_steps, inner_flood, flood_mode, None,
                         label_smoothing)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"unknown inner_optimizer {inner_optimizer!r}; choose one of {INNER_OPTIMIZERS}"
            )
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")
        if inner_batch is not None and (isinstance(inner_batch, bool) or inner_batch < 1):
            raise ValueError(f"inner_batch must be >= 1 or None, got {inner_batch!r}")
        b1, b2 = adam_betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or adam_eps <= 0:
            raise ValueError(f"adam_betas must lie in [0, 1) and adam_eps be > 0, got "
                             f"{adam_betas}, {adam_eps}")
        self.inner_batch = inner_batch
        self.inner_optimizer = inner_optimizer
        self.sampling = sampling
        self.adam_betas, self.adam_eps = (b1, b2), adam_eps
        self.generator = generator
        self.shard: tuple[int, int] | None = None

    def _adapt_task(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor | None
    ) -> Params:
        inner_grad = grad(self.inner_loss)
        steps = batches.shape[0] if batches is not None else self._steps
        adam = self.inner_optimizer == "adam"
        m = {k: torch.zeros_like(v) for k, v in params.items()} if adam else None
        v2 = {k: torch.zeros_like(v) for k, v in params.items()} if adam else None
        fast, path = params, []
        for t in range(steps):
            xb, yb = (x, y) if batches is None else (x[batches[t]], y[batches[t]])
            fast = self._inner_update(fast, inner_grad(fast, xb, yb), m, v2, t)
            self._track(fast, path)
        return self._finish(fast, path)

    def _inner_update(self, fast: Params, g: Params, m: Params | None, v: Params | None,
                      t: int) -> Params:
        """Inner step ``t``: SGD, or Adam when its moments ``m``, ``v`` are given (updated
        in place)."""
        if m is None or v is None:
            return {k: fast[k] - self.inner_lr * g[k] for k in fast}
        b1, b2 = self.adam_betas
        new = {}
        for k in fast:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k]
            m_hat = m[k] / (1 - b1 ** (t + 1))
            v_hat = v[k] / (1 - b2 ** (t + 1))
            new[k] = fast[k] - self.inner_lr * m_hat / (v_hat.sqrt() + self.adam_eps)
        return new

    def _query_metrics(self, fast: Params, batch: TaskBatch) -> dict[str, float]:
        """Query loss (and accuracy) at the per-task weights ``fast``."""
        with torch.no_grad(), differentiated_at_most_once():
            out = vmap(self.fmodel, randomness="different")(fast, batch.query_x)
            flat_out, flat_y = out.flatten(0, 1), batch.query_y.flatten(0, 1)
            metrics = {"loss": per_example_loss(flat_out, flat_y).mean().item()}
            if batch.is_classification:
                metrics["accuracy"] = accuracy(flat_out, flat_y).item()
        return metrics

    def _adapt_batch(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int,
        shard: tuple[int, int] | None = None,
    ) -> Params:
        size = support_x.shape[1]
        batch = self.inner_batch
        if batch is not None and batch > size:
            raise ValueError(
                f"inner_batch={batch} exceeds the {size} support examples per task; lower "
                "inner_batch or raise shots"
            )
        self._steps = steps
        if batch is None:
            return vmap(self._adapt_task, in_dims=(None, 0, 0, None), randomness="different")(
                params, support_x, support_y, None
            )
        offset, total = shard or (0, len(support_x))
        idx = minibatch_indices(total, size, batch, steps, self.sampling, self.generator)
        idx = idx[offset: offset + len(support_x)]
        return vmap(self._adapt_task, in_dims=(None, 0, 0, 0), randomness="different")(
            params, support_x, support_y, idx.to(support_x.device)
        )

    def step(self, batch: TaskBatch) -> dict[str, float]:
        """Accumulate ``theta - mean_i phi_i`` into ``p.grad``; return query metrics at phi."""
        self._check_batch(batch)
        params = self.fmodel.params()
        with torch.no_grad(), differentiated_at_most_once():
            fast = self._adapt_batch(params, batch.support_x, batch.support_y, self.inner_steps,
                                     self.shard)
            self._accumulate({k: params[k] - fast[k].mean(0) for k in params})
        return self._query_metrics(fast, batch)
