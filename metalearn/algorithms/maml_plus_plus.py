"""MAML++ (Antoniou, Edwards and Storkey 2019): MAML with the fixes that stabilise it."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from metalearn.algorithms.base import MetaLearner, check_steps
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.inner_loop import inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss
from metalearn.algorithms.meta_sgd import param_key
from metalearn.data.task_batch import TaskBatch


def msl_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """Weights of the query losses after inner steps 1..``steps`` in the multi-step loss.

    The reference code's schedule with the epoch count replaced by the fraction
    ``t = iteration / anneal_iterations``: every non-final weight is ``max((1 - t) / N,
    0.03 / N)``, the final one ``min((1 + t (N - 1)) / N, 1 - 0.03 (N - 1) / N)``, so the
    weights start uniform and anneal towards the last step. From ``anneal_iterations`` on,
    only the final loss counts (weight 1), as in the reference code.

    Example:
        >>> from metalearn.algorithms.maml_plus_plus import msl_weights
        >>> msl_weights(4, 0, 100), msl_weights(4, 100, 100)
        ([0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0])
    """
    if steps == 0:
        return []
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    t, floor = iteration / anneal_iterations, 0.03 / steps
    last = min((1.0 + t * (steps - 1)) / steps, 1.0 - (steps - 1) * floor)
    return [max((1.0 - t) / steps, floor)] * (steps - 1) + [last]


def batch_norm_parameters(model: nn.Module) -> tuple[str, ...]:
    """Names of the trainable affine weights and biases of the model's BatchNorm layers."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = []
    for prefix, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            names += [f"{prefix}.{n}" if prefix else n for n in ("weight", "bias")]
    return tuple(n for n in names if n in trainable)


class MAMLPlusPlus(MetaLearner):
    """MAML++: MAML with each of the paper's ingredients switchable on its own.

    * ``lslr``: per-layer, per-step learnable inner learning rates (one scalar per
      parameter tensor and inner step, initialised to ``inner_lr``).
    * ``multi_step_loss``: the outer loss is the weighted sum of the query losses after
      every inner step, annealed towards the last step over ``msl_iterations``
      (:func:`msl_weights`); afterwards only the last step counts.
    * ``first_order_iterations``: derivative-order annealing; first order while
      ``learner.iteration < first_order_iterations``, then second order.
    * ``per_step_bn``: BatchNorm weights and biases per inner step (step ``k``'s support
      forward and the query forward after update ``k`` use row ``k``). They are learned
      in the outer loop only, not adapted in the inner loop, as in the reference code;
      the model's own BatchNorm affine parameters are then unused.
    * Cosine annealing of the meta learning rate is the training loop's
      ``schedule="cosine"`` (``--schedule cosine``).

    The per-step tensors have ``max(inner_steps, 1)`` rows; adapting for more steps (as
    evaluation may) reuses the last row. ``learner.iteration`` counts :meth:`step` calls
    and is part of :meth:`state_dict`, so annealing resumes where it stopped. With every
    ingredient off this is exactly :class:`~metalearn.MAML`. Optimise
    ``learner.parameters()``; ``learner.state_dict()`` holds the learned state with the model.

    Args:
        model: any ``nn.Module``.
        inner_lr: the inner learning rate (the LSLR rates' initial value).
        inner_steps: inner steps during meta-training (the paper uses 5).
        first_order: always first order (overrides the annealing).
        lslr: learn per-layer, per-step inner learning rates.
        multi_step_loss: use the annealed multi-step loss.
        msl_iterations: iterations over which the multi-step loss anneals (the reference
            code: 10 epochs of 500 iterations).
        first_order_iterations: iterations trained first order before switching to second
            order (0: second order from the start).
        per_step_bn: per-step BatchNorm weights and biases.
        loss: as for :class:`~metalearn.MAML`.
        **loss_options: as for :class:`~metalearn.MAML`.

    Example:
        >>> import torch
        >>> from metalearn import MAMLPlusPlus
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> learner = MAMLPlusPlus(MLP(), inner_lr=0.01, inner_steps=3, msl_iterations=100)
        >>> opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
        >>> for _ in range(2):
        ...     opt.zero_grad()
        ...     metrics = learner.step(SineTasks(seed=0).sample(4))
        ...     opt.step()
        >>> learner.iteration, tuple(learner.learned.lrs["0-weight"].shape)
        (2, (3,))
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        lslr: bool = True,
        multi_step_loss: bool = True,
        msl_iterations: int = 5000,
        first_order_iterations: int = 0,
        per_step_bn: bool = True,
        loss: TaskLoss | None = None,
        **loss_options: Any,
    ) -> None:
        super().__init__(model, inner_lr, inner_steps, first_order, loss, **loss_options)
        if check_steps("msl_iterations", msl_iterations) < 1:
            raise ValueError(f"msl_iterations must be >= 1, got {msl_iterations}")
        self.first_order_iterations = check_steps("first_order_iterations",
                                                  first_order_iterations)
        self.lslr, self.multi_step_loss, self.per_step_bn = lslr, multi_step_loss, per_step_bn
        self.msl_iterations = msl_iterations
        params = self.fmodel.params()
        self.bn_names = batch_norm_parameters(model) if per_step_bn else ()
        rows = max(self.inner_steps, 1)
        learned = nn.Module()
        learned.lrs = nn.ParameterDict({
            param_key(n): nn.Parameter(torch.full((rows,), self.inner_lr, dtype=p.dtype,
                                                  device=p.device))
            for n, p in params.items() if lslr and n not in self.bn_names
        })
        learned.bn = nn.ParameterDict({
            param_key(n): nn.Parameter(params[n].detach().expand(rows, -1).clone())
            for n in self.bn_names
        })
        learned.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.learned = learned

    @property
    def iteration(self) -> int:
        """Meta-iterations taken so far (:meth:`step` calls); drives the annealing."""
        return int(self.learned.iteration)

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.learned.iteration.fill_(check_steps("iteration", value))

    # -- the inner loop -----------------------------------------------------------------
    def _lr(self, name: str, k: int) -> torch.Tensor | float:
        if not self.lslr:
            return self.inner_lr
        table = self.learned.lrs[param_key(name)]
        return table[min(k, len(table) - 1)]

    def _bn_at(self, k: int) -> Params:
        rows = {n: self.learned.bn[param_key(n)] for n in self.bn_names}
        return {n: t[min(k, len(t) - 1)] for n, t in rows.items()}

    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool, trajectory: bool = False):
        # The per-step BatchNorm rows are learned in the outer loop only: not adapted.
        adapted = {n: v for n, v in params.items() if n not in self.bn_names}

        def loss(p: Params, step: int, order: int) -> torch.Tensor:
            return self.support_loss({**p, **self._bn_at(step)}, x, y, order)

        def with_bn(p: Params, k: int) -> Params:
            merged = {**p, **self._bn_at(k)}
            return {n: merged[n] for n in params}

        fast, path = inner_loop(loss, adapted, steps, sgd(self._lr), first_order=first_order,
                                trajectory=True)
        fast = with_bn(fast, max(steps - 1, 0))
        return (fast, [with_bn(p, k) for k, p in enumerate(path)]) if trajectory else fast

    def _start_of_trajectory(self, start: Params) -> Params:
        # Before any update the weights are theta with step 0's BatchNorm row.
        return {**start, **{n: row.expand_as(start[n]).clone()
                            for n, row in self._bn_at(0).items()}}

    def outer_first_order(self) -> bool:
        """First order if ``first_order``, or while ``iteration < first_order_iterations``."""
        return self.first_order or self.iteration < self.first_order_iterations

    # -- the outer objective ------------------------------------------------------------
    def _task_objective(self, params: Params, sx: torch.Tensor, sy: torch.Tensor,
                        qx: torch.Tensor, qy: torch.Tensor, weights: list[float],
                        first_order: bool):
        fast, path = self.adapt_task(params, sx, sy, self.inner_steps, first_order,
                                     trajectory=True)
        terms = [(w, *self.query_loss(f, qx, qy)) for w, f in zip(weights, path) if w != 0.0]
        if not terms:  # no inner steps: the query loss at theta
            terms = [(1.0, *self.query_loss(fast, qx, qy))]
        objective = sum(w * loss for w, loss, _ in terms)
        return objective, terms[-1][1].detach(), terms[-1][2]

    def _meta_terms(self, batch: TaskBatch) -> tuple[torch.Tensor, ...]:
        self._check_batch(batch)
        steps, it = self.inner_steps, self.iteration
        weights = (msl_weights(steps, it, self.msl_iterations) if self.multi_step_loss
                   else [0.0] * max(steps - 1, 0) + [1.0])
        first_order = self.outer_first_order()
        task = partial(self._task_objective, weights=weights, first_order=first_order)
        objective, final, metric = vmap(task, in_dims=(None, 0, 0, 0, 0),
                                        randomness="different")(
            self.fmodel.params(), batch.support_x, batch.support_y, batch.query_x,
            batch.query_y)
        return objective.mean(), final.mean(), metric

    def _meta_objective(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The (multi-step) outer objective with its graph, and the per-task final metric;
        :meth:`meta_loss` floods it (``outer_flood``, batch mode)."""
        objective, _, metric = self._meta_terms(batch)
        return objective, metric

    def step(self, batch: TaskBatch, shard: tuple[int, int] | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient into ``.grad`` of the learner's parameters, advance
        ``iteration``; ``loss`` is the final step's query loss, ``objective`` the
        differentiated (multi-step) loss, flooded over the meta-batch by a batch-mode
        ``outer_flood`` (then also ``outer_flood_active``, as in
        :meth:`MetaLearner.step`)."""
        self._flood_stats = {}
        objective, final, metric = self._meta_terms(batch)
        objective = self._flood_meta_batch(objective, shard, len(batch))
        objective.backward()
        self.iteration = self.iteration + 1
        metrics = {"loss": final.item(), "objective": objective.item()}
        if batch.is_classification:
            metrics["accuracy"] = metric.mean().item()
        metrics.update({k: v.item() for k, v in self._flood_stats.items()})
        self._flood_stats = {}
        return metrics
