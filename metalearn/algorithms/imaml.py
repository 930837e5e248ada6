"""Implicit MAML (Rajeswaran et al. 2019): meta-gradients by the implicit function theorem."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from metalearn.algorithms.base import MetaLearner, check_lr, check_steps
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.implicit import conjugate_gradient, implicit_meta_gradient
from metalearn.algorithms.inner_loop import inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss
from metalearn.data.task_batch import TaskBatch

__all__ = ["IMAML", "conjugate_gradient"]

INNER_SOLVES = ("proximal", "pullback")


def check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class IMAML(MetaLearner):
    """Implicit MAML: a proximal inner problem and an implicit meta-gradient.

    Each task solves ``min_phi L_support(phi) + (lam / 2) ||phi - theta||^2`` approximately
    with ``inner_steps`` gradient steps from ``theta``, without any outer graph. At the
    solution the implicit function theorem gives ``d phi / d theta = (I + H / lam)^-1``
    with ``H`` the Hessian of the support loss at ``phi``, so the task's meta-gradient is
    ``g = (I + H / lam)^-1 grad L_query(phi)``; :meth:`step` solves for it with
    ``cg_steps`` conjugate-gradient iterations on Hessian-vector products (grad of grad),
    vmapped over tasks, and accumulates the task mean into ``p.grad``. Memory does not
    grow with ``inner_steps``. The gradient is exact only at a converged inner solution
    and a positive definite ``I + H / lam``: use enough inner steps, a step size at which
    they converge, and a ``lam`` large enough. Where ``I + H / lam`` is not positive
    definite, CG stops at the first direction of non-positive curvature
    (:func:`~metalearn.algorithms.implicit.conjugate_gradient`).

    ``inner_solve="pullback"`` with ``cg_damping`` and ``lam_damping`` is the protocol of
    the paper's reference code (aravindr93/imaml_dev, ``examples/omniglot_implicit_maml.py``),
    which differs from the paper's formulas: the inner loop takes ``inner_steps`` plain
    gradient steps on the support loss, then one step on ``(lam / 2) ||phi - theta||^2``
    alone (``phi <- phi - inner_lr * lam * (phi - theta)``), and CG solves
    ``((1 + cg_damping) I + H / (lam + lam_damping)) g = grad L_query(phi)`` (the reference
    runs lam 2, cg_damping 1, lam_damping 10, inner_lr 0.1, and tests with lam 0).

    Args:
        model: any ``nn.Module``.
        inner_lr: step size of the inner gradient descent on the proximal objective.
        inner_steps: inner steps (the reference code uses 16 for Omniglot).
        lam: the proximal strength lambda (> 0; with ``inner_solve="pullback"`` 0 is allowed
            and means no pull-back); large values keep phi near theta.
        cg_steps: conjugate-gradient iterations; 0 skips the solve and uses the
            first-order gradient ``grad L_query(phi)``.
        inner_solve: ``"proximal"`` (the paper: gradient descent on the proximal objective)
            or ``"pullback"`` (the reference code: plain steps, then one pull-back step).
        cg_damping: the reference code's ``cg_damping`` (0 = the paper's matrix).
        lam_damping: the reference code's ``lam_damping`` (0 = the paper's matrix).
        loss: as for :class:`~metalearn.MAML`.
        **loss_options: as for :class:`~metalearn.MAML`.

    Example:
        >>> import torch
        >>> from metalearn import IMAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> imaml = IMAML(model, inner_lr=0.01, inner_steps=10, lam=1.0, cg_steps=5)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> opt.zero_grad()
        >>> metrics = imaml.step(SineTasks(seed=0).sample(4))
        >>> opt.step()
        >>> sorted(metrics)
        ['loss']
    """

    _no_differentiable_adapt = (
        "iMAML's meta-gradient is implicit (the inverse-Hessian solve of step() and "
        "meta_gradient()), not backpropagated through the adapted weights, so "
        "adapt(differentiable=True) cannot give it; use step() or meta_gradient()")

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int, lam: float = 1.0,
                 cg_steps: int = 5, loss: TaskLoss | None = None, *,
                 inner_solve: str = "proximal", cg_damping: float = 0.0,
                 lam_damping: float = 0.0, **loss_options: Any) -> None:
        super().__init__(model, inner_lr, inner_steps, loss=loss, **loss_options)
        if inner_solve not in INNER_SOLVES:
            raise ValueError(f"inner_solve must be one of {INNER_SOLVES}, got {inner_solve!r}")
        self.inner_solve = inner_solve
        self.cg_steps = check_steps("cg_steps", cg_steps)
        self.cg_damping = check_non_negative("cg_damping", cg_damping)
        self.lam_damping = check_non_negative("lam_damping", lam_damping)
        if inner_solve == "proximal":
            self.lam = check_lr("lam", lam)
        else:
            self.lam = check_non_negative("lam", lam)
            if self.cg_steps and self.lam + self.lam_damping == 0:
                raise ValueError("lam + lam_damping must be > 0 for the conjugate-gradient "
                                 "solve; raise lam or lam_damping, or set cg_steps=0")

    def proximal_loss(self, phi: Params, theta: Params, x: torch.Tensor, y: torch.Tensor,
                      order: int = 0) -> torch.Tensor:
        """The inner objective: support loss plus ``(lam / 2) ||phi - theta||^2``."""
        distance = sum((phi[k] - theta[k]).pow(2).sum() for k in phi)
        return self.support_loss(phi, x, y, order) + 0.5 * self.lam * distance

    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool, trajectory: bool = False):
        if self.inner_solve == "pullback":
            return self._adapt_with_pullback(params, x, y, steps, trajectory)

        def loss(phi: Params, step: int, order: int) -> torch.Tensor:
            return self.proximal_loss(phi, params, x, y, order)

        # No graph through the solve: the meta-gradient is implicit.
        return inner_loop(loss, params, steps, sgd(self.inner_lr), first_order=True,
                          trajectory=trajectory)

    def _adapt_with_pullback(self, params: Params, x: torch.Tensor, y: torch.Tensor,
                             steps: int, trajectory: bool):
        """The reference code's inner loop: plain steps, then one step on the proximal term."""
        def loss(phi: Params, step: int, order: int) -> torch.Tensor:
            return self.support_loss(phi, x, y, order)

        fast, path = inner_loop(loss, params, steps, sgd(self.inner_lr), first_order=True,
                                trajectory=True)
        shrink = self.inner_lr * self.lam
        fast = {k: v - shrink * (v - params[k]) for k, v in fast.items()}
        return (fast, path[:-1] + [fast]) if trajectory else fast

    def _task_meta_grad(self, theta: Params, sx: torch.Tensor, sy: torch.Tensor,
                        qx: torch.Tensor, qy: torch.Tensor):
        phi = self.adapt_task(theta, sx, sy, self.inner_steps, True)

        def query(p: Params):
            loss, metric = self.query_loss(p, qx, qy, order=0)
            return loss, (loss.detach(), metric.detach())

        v, (loss, metric) = grad(query, has_aux=True)(phi)
        g = implicit_meta_gradient(lambda p: self.support_loss(p, sx, sy, 2), phi, v,
                                   self.lam + self.lam_damping, self.cg_steps,
                                   damping=self.cg_damping)
        return g, loss, metric

    def meta_gradient(self, batch: TaskBatch) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """Per-task implicit meta-gradients ``(B, ...)`` by name, query losses and metrics."""
        self._check_batch(batch)
        theta = {k: v.detach() for k, v in self.fmodel.params().items()}
        # No outer graph: every inner and CG graph is freed as soon as it is used.
        with torch.no_grad():
            return vmap(self._task_meta_grad, in_dims=(None, 0, 0, 0, 0),
                        randomness="different")(theta, batch.support_x, batch.support_y,
                                                batch.query_x, batch.query_y)

    def meta_loss(self, batch: TaskBatch):
        raise NotImplementedError("iMAML's meta-gradient is implicit, not the gradient of a "
                                  "loss with a graph: use step() or meta_gradient()")

    def step(self, batch: TaskBatch, shard: tuple[int, int] | None = None) -> dict[str, float]:
        """Accumulate the mean implicit meta-gradient into ``p.grad``; return query metrics
        at the adapted weights (with a batch-mode ``outer_flood``, ``loss`` is the flooded
        mean, ``query_loss`` the mean before it, and the gradient's sign is the flood's)."""
        grads, loss, metric = self.meta_gradient(batch)
        self._flood_stats = {}
        mean, value = self._flooded_grads({k: g.mean(0) for k, g in grads.items()},
                                          loss.mean(), shard, len(batch))
        self._accumulate(mean)
        metrics = {"loss": value.item()}
        if batch.is_classification:
            metrics["accuracy"] = metric.mean().item()
        if self.loss.meta_batch_level is not None:
            metrics["query_loss"] = loss.mean().item()
        metrics.update({k: v.item() for k, v in self._flood_stats.items()})
        self._flood_stats = {}
        return metrics
