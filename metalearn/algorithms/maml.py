"""MAML (Finn et al. 2017) and its first-order approximation, batched over tasks."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad, vmap

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.losses import accuracy, flooded_mean, per_example_loss
from metalearn.data.task_batch import TaskBatch


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning with exact second-order meta-gradients.

    The inner loop takes ``inner_steps`` SGD steps on each task's support set; the outer
    objective is the mean query loss at the adapted weights. All tasks of a batch run as
    one ``torch.func.vmap`` computation, and :meth:`step` backpropagates through the inner
    loop, accumulating the meta-gradient into ``p.grad`` like ``backward()``.

    Args:
        model: any ``nn.Module``; BatchNorm layers use the current batch's statistics.
        inner_lr: step size of the inner SGD (alpha).
        inner_steps: inner SGD steps during meta-training (0 gives joint training).
        first_order: treat inner gradients as constants (FOMAML).
        inner_flood: flood level b of the inner (support) loss; ``None`` or 0 is off.
        flood_mode: ``"batch"`` (flooding, Ishida et al. 2020) or ``"instance"``
            (iFlood, Xie et al. 2022); applies to the inner and outer flood levels.
        outer_flood: flood level of the outer (query) loss; ``None`` or 0 is off.
        label_smoothing: label smoothing of the cross-entropy (classification only).

    Example:
        >>> import torch
        >>> from metalearn import MAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> maml = MAML(model, inner_lr=0.01, inner_steps=1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> tasks = SineTasks(shots=10, seed=0)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     metrics = maml.step(tasks.sample(25))
        ...     opt.step()
        >>> sorted(metrics)
        ['loss']
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        inner_flood: float | None = None,
        flood_mode: str = "batch",
        outer_flood: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            model, inner_lr, inner_steps, inner_flood, flood_mode, outer_flood, label_smoothing
        )
        self.first_order = bool(first_order)

    def _adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        inner_grad = grad(self.inner_loss)
        fast, path = params, []
        for _ in range(steps):
            if self.first_order:
                # The outer graph never sees the inner gradient: it is a constant shift.
                with torch.no_grad():
                    g = inner_grad(fast, x, y)
            else:
                g = inner_grad(fast, x, y)
            fast = {k: fast[k] - self.inner_lr * g[k] for k in fast}
            self._track(fast, path)
        return self._finish(fast, path)

    def _task_query_loss(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
        qy: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fast = self._adapt_task(params, sx, sy, self.inner_steps)
        out = self.fmodel(fast, qx)
        loss = flooded_mean(per_example_loss(out, qy, self.label_smoothing),
                            self.outer_flood, self.flood_mode)
        acc = accuracy(out, qy) if not qy.dtype.is_floating_point else loss.detach()
        return loss, acc

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The outer objective with its autograd graph, and the per-task query metric.

        ``step`` differentiates it; the memory profile measures the graph it keeps.
        """
        self._check_batch(batch)
        losses, metric = vmap(
            self._task_query_loss, in_dims=(None, 0, 0, 0, 0), randomness="different"
        )(self.fmodel.params(), batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return losses.mean(), metric

    def step(self, batch: TaskBatch) -> dict[str, float]:
        """Accumulate the meta-gradient of ``batch`` into ``p.grad``; return metrics."""
        loss, metric = self.meta_loss(batch)
        loss.backward()
        metrics = {"loss": loss.item()}
        if batch.is_classification:
            metrics["accuracy"] = metric.mean().item()
        return metrics


class FOMAML(MAML):
    """First-order MAML: :class:`MAML` with ``first_order=True``.

    The meta-gradient is the query-loss gradient at the adapted weights, as if the inner
    updates did not depend on the initialisation. Memory stays flat in ``inner_steps``.

    Args:
        model, inner_lr, inner_steps, inner_flood, flood_mode, outer_flood,
        label_smoothing: as for :class:`MAML`.

    Example:
        >>> import torch
        >>> from metalearn import FOMAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> fomaml = FOMAML(model, inner_lr=0.01, inner_steps=5)
        >>> metrics = fomaml.step(SineTasks(seed=0).sample(25))
        >>> model[0].weight.grad.shape
        torch.Size([40, 1])
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int, **kwargs) -> None:
        if "first_order" in kwargs:
            raise TypeError("FOMAML is first-order by definition; use MAML(first_order=...)")
        super().__init__(model, inner_lr, inner_steps, first_order=True, **kwargs)
