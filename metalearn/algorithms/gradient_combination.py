"""Sums of inner-loop mini-batch gradients: Reptile, FOMAML and joint training in one learner.

Nichol, Achiam and Schulman (2018), "On First-Order Meta-Learning Algorithms"
(arXiv:1803.02999), write the inner loop of a task as k mini-batch gradients
``g_i = L_i'(phi_{i-1})`` taken at the successive iterates (``phi_0 = theta``,
``phi_i = phi_{i-1} - alpha g_i`` for SGD). With SGD, Reptile's direction
``(theta - phi_k) / alpha`` is ``g_1 + ... + g_k``, FOMAML's is ``g_k`` and joint training's
is ``g_1``. The paper's experiments section compares such combinations on 5-shot 5-way
Omniglot ("Comparing Different Inner-Loop Gradient Combinations", its Figure 4) and the
overlap of FOMAML's final mini-batch with the earlier ones ("shared tail" versus "separate
tail", cycling versus sampling with replacement, its Figure 5). :class:`GradientCombination`
runs any of these as one vmapped computation over tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.inner_loop import inner_loop
from metalearn.algorithms.reptile import Reptile
from metalearn.data.task_batch import TaskBatch

TAILS = ("shared", "separate")


def parse_use(use: str | Iterable[int], inner_steps: int) -> tuple[int, ...]:
    """The sorted 1-based indices of the gradients to sum, checked against ``inner_steps``.

    ``"all"`` is ``1..inner_steps`` (Reptile with SGD); ``"last"`` is ``(inner_steps,)``
    (FOMAML).

    Example:
        >>> from metalearn.algorithms.gradient_combination import parse_use
        >>> parse_use("all", 3), parse_use("last", 3), parse_use([2, 1], 3)
        ((1, 2, 3), (3,), (1, 2))
    """
    if isinstance(use, str):
        if use == "all":
            return tuple(range(1, inner_steps + 1))
        if use == "last":
            return (inner_steps,)
        raise ValueError(f"unknown use {use!r}; give 'all', 'last' or gradient indices like (1, 2)")
    try:
        indices = list(use)
    except TypeError:
        raise ValueError(
            f"use must be 'all', 'last' or an iterable of indices, got {use!r}") from None
    if not indices:
        raise ValueError("use is empty: name at least one gradient, e.g. use=(1,) or 'all'")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"use holds {i!r}; gradient indices are integers 1..{inner_steps}")
        if not 1 <= i <= inner_steps:
            raise ValueError(f"use holds g_{i} but the inner loop has inner_steps={inner_steps} "
                             f"gradients; indices must be in 1..{inner_steps} (1-based)")
    if len(set(indices)) != len(indices):
        raise ValueError(f"use repeats an index: {tuple(indices)}")
    return tuple(sorted(indices))


class GradientCombination(Reptile):
    """The outer direction ``sum_{i in use} g_i`` of the inner-loop mini-batch gradients.

    Every task runs ``inner_steps`` = k inner iterations; iteration i evaluates the
    mini-batch gradient ``g_i`` at the current iterate ``phi_{i-1}`` (``phi_0 = theta``)
    and then steps with SGD (or Adam with beta1 = 0, as :class:`~metalearn.Reptile`).
    :meth:`step` accumulates the mean over tasks of ``sum_{i in use} g_i`` into ``p.grad``,
    so an outer SGD with learning rate eta moves ``theta -= eta * sum g_i``. With SGD,
    ``use="all"`` equals Reptile's direction divided by ``inner_lr``, ``use=(1,)`` is the
    joint-training gradient of one mini-batch and ``use="last"`` is first-order MAML.

    What the task's sets mean:

    - ``support`` is the inner loop's data: its mini-batches of ``inner_batch`` examples
      are drawn by cycling through fresh permutations (``sampling="cycle"``) or
      independently (``"replacement"``), as :func:`~metalearn.algorithms.reptile.
      minibatch_indices` does for Reptile.
    - ``tail="shared"``: all k mini-batches come from the support set, so the last one can
      overlap the earlier ones. The query set is only scored for the metrics, at
      ``phi_k``.
    - ``tail="separate"``: the first k − 1 mini-batches come from the support set and the
      k-th gradient is taken on the whole query set, held out from the inner loop (the
      reference code's ``FOML(tail_shots=...)``). Metrics are the query loss at
      ``phi_{k-1}``, where ``g_k`` is taken. With ``use="last"`` and ``inner_batch=None``
      this is exactly :class:`~metalearn.FOMAML` with ``inner_steps = k − 1``.

    The direction is a plain sum, as in the paper's g_1 + g_2 (the reference README scales
    the meta step instead, e.g. ``half_g1_g2``): to average, divide the outer learning
    rate by ``len(use)``. Inner steps after the last used gradient are not needed for the
    direction; they only move the weights the metrics are taken at.

    Sources: arXiv:1803.02999 §§5-6 (the gradient notation and the Figure 4/5 studies);
    openai/supervised-reptile ``supervised_reptile/reptile.py`` (``FOML``: "the gradient
    from the last mini-batch as the update direction"; ``tail_shots`` reserves a final
    mini-batch that "is guaranteed not to overlap with the training mini-batches") and its
    README section "Comparing different inner-loop gradient combinations".

    Args:
        model: any ``nn.Module``.
        inner_lr: inner learning rate alpha.
        inner_steps: k, the number of inner gradients (>= 1).
        inner_batch: examples per support mini-batch; ``None`` uses the whole support set.
        use: ``"all"``, ``"last"`` or 1-based indices, e.g. ``(1, 2)`` for g_1 + g_2.
        tail: ``"shared"`` or ``"separate"`` (see above).
        inner_optimizer: ``"sgd"`` or ``"adam"``; the g_i are always the raw mini-batch
            gradients, only the iterates they are taken at depend on the optimiser.
        sampling: ``"cycle"`` or ``"replacement"``.
        **kwargs: ``adam_betas``, ``adam_eps``, ``inner_flood``, ``flood_mode``,
            ``label_smoothing``, ``generator``: as for :class:`~metalearn.Reptile`. Its inner
            Adam starts fresh for every task (Reptile's ``adam_state="task"``).

    :meth:`adapt` (and so :func:`metalearn.evaluate`) is Reptile's: mini-batch SGD/Adam on
    the support set.

    Example:
        >>> import torch
        >>> from metalearn import GradientCombination
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> g1_g2 = GradientCombination(model, inner_lr=0.02, inner_steps=2, inner_batch=5,
        ...                             use=(1, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> opt.zero_grad()
        >>> metrics = g1_g2.step(SineTasks(shots=10, seed=0).sample(4))
        >>> opt.step()
        >>> sorted(metrics)
        ['loss']
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        inner_batch: int | None = None,
        use: str | Iterable[int] = "all",
        tail: str = "shared",
        inner_optimizer: str = "sgd",
        sampling: str = "cycle",
        **kwargs: Any,
    ) -> None:
        if "adam_state" in kwargs:
            raise TypeError("GradientCombination's inner Adam starts fresh for every task; "
                            "adam_state does not apply")
        super().__init__(model, inner_lr, inner_steps, inner_batch, inner_optimizer, sampling,
                         adam_state="task", **kwargs)
        if tail not in TAILS:
            raise ValueError(f"unknown tail {tail!r}; choose one of {TAILS}")
        self.use = parse_use(use, self.inner_steps)
        self.tail = tail

    def _task_direction(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, qx: torch.Tensor,
        qy: torch.Tensor, batches: torch.Tensor | None,
    ) -> tuple[Params, Params]:
        """One task: (sum of the used g_i, the weights its metrics are taken at)."""
        k, separate = self.inner_steps, self.tail == "separate"

        def loss(p: Params, step: int, order: int) -> torch.Tensor:
            if separate and step == k - 1:
                xb, yb = qx, qy  # the held-out tail
            elif batches is None:
                xb, yb = x, y
            else:
                xb, yb = x[batches[step]], y[batches[step]]
            return self.support_loss(p, xb, yb, order)

        rule, used = self.update_rule(), []

        def update(step: int, p: Params, g: Params, state):
            if step + 1 in self.use:
                used.append(g)
            if separate and step == k - 1:
                return p, state  # a step on the tail would leak the query set into the metrics
            return rule(step, p, g, state)

        fast = inner_loop(loss, params, k, update, first_order=True)
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for g in used:
            total = {n: total[n] + g[n] for n in total}
        return total, fast

    def directions(self, batch: TaskBatch, shard: tuple[int, int] | None = None
                   ) -> tuple[Params, Params]:
        """Per-task directions ``(B, ...)`` and the weights the metrics are taken at.

        :meth:`step` averages the first over tasks; exposed for analysis and tests.
        """
        self._check_batch(batch)
        support_steps = self.inner_steps - (self.tail == "separate")
        idx = (self._minibatches(len(batch), batch.num_support, support_steps, shard,
                                 batch.support_x.device) if support_steps > 0 else None)
        with torch.no_grad():
            return self.fmodel.run_compiled(self, "directions", self._directions_region,
                                            self.fmodel.params(), batch.support_x,
                                            batch.support_y, batch.query_x, batch.query_y, idx,
                                            steps=self.inner_steps)

    def _directions_region(self, params: Params, support_x: torch.Tensor,
                           support_y: torch.Tensor, query_x: torch.Tensor,
                           query_y: torch.Tensor, idx: torch.Tensor | None
                           ) -> tuple[Params, Params]:
        return vmap(self._task_direction, in_dims=(None, 0, 0, 0, 0, 0 if idx is not None
                                                   else None), randomness="different")(
            params, support_x, support_y, query_x, query_y, idx)

    def step(self, batch: TaskBatch, shard: tuple[int, int] | None = None) -> dict[str, float]:
        """Accumulate ``mean_tasks sum_{i in use} g_i`` into ``p.grad``; return query metrics."""
        per_task, fast = self.directions(batch, shard)
        self._accumulate({n: d.mean(0) for n, d in per_task.items()})
        return self._query_metrics(fast, batch)
