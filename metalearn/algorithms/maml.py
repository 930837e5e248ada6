"""MAML (Finn et al. 2017) and its first-order approximation, batched over tasks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.checkpointed import checkpointed_sgd_steps
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.inner_loop import inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss
from metalearn.data.task_batch import TaskBatch


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning with exact second-order meta-gradients.

    The inner loop takes ``inner_steps`` SGD steps on each task's support set,
    ``phi <- phi - alpha * grad L_support(phi)`` from ``phi = theta``; the outer objective
    is the mean query loss at the adapted weights, and :meth:`step` backpropagates through
    the inner loop, accumulating the meta-gradient into ``p.grad`` like ``backward()``.
    All tasks of a batch run as one ``torch.func.vmap`` computation.

    Args:
        model: any ``nn.Module``; BatchNorm layers use the current batch's statistics.
        inner_lr: step size of the inner SGD (alpha).
        inner_steps: inner SGD steps during meta-training (0 gives joint training).
        first_order: treat inner gradients as constants (FOMAML).
        memory_saving: keep only each inner step's fast weights, not its activations, and
            recompute one step's activations at a time in the outer backward
            (:mod:`metalearn.algorithms.checkpointed`). The same exact second-order
            meta-gradient (to rounding) with memory nearly flat in ``inner_steps``, for
            about one more inner forward and backward per step. Needs
            ``first_order=False``. With dropout the masks are reproduced by restoring the
            RNG state. :meth:`adapt` and :meth:`predict` are unaffected.
        loss: the task losses, a :class:`~metalearn.algorithms.losses.TaskLoss`; or give
            its options instead:
        **loss_options: ``loss_fn`` (a per-example loss of your own, ``loss_fn(outputs,
            targets) -> (n,)``, for the inner and the outer loss; default cross-entropy
            for integer labels, MSE for float targets), ``inner_flood`` (flood level b of
            the support loss; ``None`` or 0 is off), ``outer_flood`` (of the query loss),
            ``flood_mode`` (``"batch"``: flooding, Ishida et al. 2020; ``"instance"``:
            iFlood, Xie et al. 2022) and ``label_smoothing``.

    Example:
        >>> import torch
        >>> from metalearn import MAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> maml = MAML(model, inner_lr=0.01, inner_steps=1)
        >>> opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
        >>> tasks = SineTasks(shots=10, seed=0)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     metrics = maml.step(tasks.sample(25))
        ...     opt.step()
        >>> sorted(metrics)
        ['loss']
        >>> saving = MAML(model, inner_lr=0.01, inner_steps=5, memory_saving=True)
        >>> sorted(saving.step(tasks.sample(25)))
        ['loss']
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int,
                 first_order: bool = False, memory_saving: bool = False,
                 loss: TaskLoss | None = None, **loss_options: Any) -> None:
        super().__init__(model, inner_lr, inner_steps, first_order, loss, **loss_options)
        self.memory_saving = memory_saving

    @property
    def memory_saving(self) -> bool:
        """Whether :meth:`meta_loss` recomputes inner-step activations in the backward."""
        return self._memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        if value:
            self._check_second_order()
        self._memory_saving = bool(value)

    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool, trajectory: bool = False):
        def loss(p: Params, step: int, order: int) -> torch.Tensor:
            return self.support_loss(p, x, y, order)

        return inner_loop(loss, params, steps, sgd(self.inner_lr), first_order=first_order,
                          trajectory=trajectory)

    def _meta_objective(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.memory_saving:
            return super()._meta_objective(batch)
        self._check_second_order()  # first_order may have been set since
        self._check_batch(batch)
        params, path = self.fmodel.params(), []
        fast = checkpointed_sgd_steps(self._batched_support_grad, params, self.inner_lr,
                                      self.inner_steps, batch.support_x, batch.support_y, path)
        inner = {}
        if self.loss.inner_flood is not None and self.inner_steps > 0:
            tasks = len(batch.support_x)
            theta = {n: p.detach().expand(tasks, *p.shape) for n, p in params.items()}
            inner["inner_flood_active"] = vmap(self._inner_flood_active, randomness="different")(
                [theta, *path[:-1]], batch.support_x, batch.support_y).mean()
        losses, metric, stats = vmap(self._query_terms,
                                     in_dims=(0 if self.inner_steps else None, 0, 0),
                                     randomness="different")(fast, batch.query_x, batch.query_y)
        self._flood_stats = {**inner, **{k: v.mean() for k, v in stats.items()}}
        return losses.mean(), metric

    def step(self, batch: TaskBatch, shard: tuple[int, int] | None = None) -> dict[str, float]:
        if not (self.first_order and self.fmodel.compiling() and torch.is_grad_enabled()
                and self.loss.inner_flood is None and not self.memory_saving):
            return super().step(batch, shard)
        # First order, the meta-gradient is each task's query gradient at its adapted
        # weights (the inner steps are constants): no graph, so one compiled region.
        self._check_batch(batch)
        params = self.fmodel.params()
        with torch.no_grad():
            grads, losses, metric, stats = self.fmodel.run_compiled(
                self, "first_order_step", self._first_order_region, params, batch.support_x,
                batch.support_y, batch.query_x, batch.query_y, self.inner_steps,
                steps=self.inner_steps)
        self._flood_stats = {}
        grads, loss = self._flooded_grads(grads, losses.mean(), shard, len(batch))
        self._accumulate(grads)
        metrics = {"loss": loss.item()}
        if batch.is_classification:
            metrics["accuracy"] = metric.mean().item()
        metrics.update({k: v.mean().item() for k, v in {**stats, **self._flood_stats}.items()})
        self._flood_stats = {}
        return metrics

    def _first_order_region(self, params: Params, support_x: torch.Tensor,
                            support_y: torch.Tensor, query_x: torch.Tensor,
                            query_y: torch.Tensor, steps: int):
        """Per-task first-order meta-gradients (their mean over tasks), query losses,
        metrics and outer-flood statistics."""
        def query(fast: Params, qx: torch.Tensor, qy: torch.Tensor):
            loss, metric, stats = self._query_terms(fast, qx, qy, order=0)
            return loss, (loss, metric, stats)

        def task(sx, sy, qx, qy):
            fast = self.adapt_task(params, sx, sy, steps, True)
            return grad(query, has_aux=True)(fast, qx, qy)

        grads, (losses, metric, stats) = vmap(task, randomness="different")(
            support_x, support_y, query_x, query_y)
        return {n: g.mean(0) for n, g in grads.items()}, losses, metric, stats

    def _check_second_order(self) -> None:
        if self.first_order:
            raise ValueError(
                "memory_saving=True needs second-order MAML (first_order=False): first-order "
                "MAML keeps no inner graph, so its memory is already flat in inner_steps")

    def _batched_support_grad(self, params: Params, x: torch.Tensor, y: torch.Tensor,
                              shared: bool) -> Params:
        """Every task's support-loss gradient; ``shared``: ``params`` are theta, not per task."""
        return vmap(grad(self.support_loss), in_dims=(None if shared else 0, 0, 0),
                    randomness="different")(params, x, y)


class FOMAML(MAML):
    """First-order MAML: :class:`MAML` with ``first_order=True``.

    The meta-gradient is the query-loss gradient at the adapted weights, as if the inner
    updates did not depend on the initialisation. Memory stays flat in ``inner_steps``.

    Args:
        model, inner_lr, inner_steps: as for :class:`MAML`.
        **kwargs: MAML's other arguments: ``memory_saving`` (which needs second order, so
            raises here), ``loss`` and its options.

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
