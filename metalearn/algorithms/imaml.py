"""Implicit MAML (Rajeswaran et al. 2019): meta-gradients by the implicit function theorem."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, vmap

from metalearn.algorithms.base import MetaLearner, check_lr, check_steps
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.losses import accuracy, flooded_mean, per_example_loss
from metalearn.algorithms.norm_layers import differentiated_at_most_once
from metalearn.data.task_batch import TaskBatch


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # Under vmap there is no early exit: a task whose residual already vanished must
    # keep taking steps of size 0 instead of producing 0/0.
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """``steps`` iterations of conjugate gradient on ``A x = b`` from ``x = 0``.

    ``A`` (given as ``matvec``) should be symmetric positive definite; ``b`` and ``x`` are
    parameter dicts. Written without data-dependent control flow, so it runs under vmap.
    If a search direction has non-positive curvature (``p^T A p <= 0``: ``A`` is not
    positive definite there), the iteration stops and keeps the iterate it has, as
    truncated CG does (Steihaug 1983); plain CG would divide by that curvature and could
    return a vector further from the solution than ``x = 0``. If that happens at the first
    step, the result is ``b`` itself.

    Example:
        >>> import torch
        >>> from metalearn.algorithms.imaml import conjugate_gradient
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x = conjugate_gradient(lambda v: {"v": A @ v["v"]}, {"v": torch.tensor([1.0, 2.0])}, 2)
        >>> torch.allclose(A @ x["v"], torch.tensor([1.0, 2.0]))
        True
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rs = _dot(r, r)
    active = torch.ones_like(rs, dtype=torch.bool)
    for step in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        # A zero residual gives zero curvature too: that is convergence, not a stop.
        active = active & ((curvature > 0) | (rs == 0))
        if step == 0:
            curved_at_start = active
        alpha = torch.where(active, _safe_div(rs, curvature), 0.0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        beta = _safe_div(rs_new, rs)
        p = {k: r[k] + beta * p[k] for k in r}
        rs = rs_new
    if steps == 0:
        return x
    return {k: torch.where(curved_at_start, x[k], b[k]) for k in x}


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
    (:func:`conjugate_gradient`).

    Args:
        model: any ``nn.Module``.
        inner_lr: step size of the inner gradient descent on the proximal objective.
        inner_steps: inner steps (the reference code uses 16 for Omniglot).
        lam: the proximal strength lambda (> 0); large values keep phi near theta.
        cg_steps: conjugate-gradient iterations; 0 skips the solve and uses the
            first-order gradient ``grad L_query(phi)``.
        inner_flood, flood_mode, outer_flood, label_smoothing: as for
            :class:`~metalearn.MAML`.

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

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        lam: float = 1.0,
        cg_steps: int = 5,
        inner_flood: float | None = None,
        flood_mode: str = "batch",
        outer_flood: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, inner_lr, inner_steps, inner_flood, flood_mode, outer_flood,
                         label_smoothing)
        self.lam = check_lr("lam", lam)
        self.cg_steps = check_steps("cg_steps", cg_steps)

    def proximal_loss(self, phi: Params, theta: Params, x: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        """The inner objective: support loss plus ``(lam / 2) ||phi - theta||^2``."""
        distance = sum((phi[k] - theta[k]).pow(2).sum() for k in phi)
        return self.inner_loss(phi, x, y) + 0.5 * self.lam * distance

    def _adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        prox_grad = grad(self.proximal_loss)
        fast, path = params, []
        for _ in range(steps):
            g = prox_grad(fast, params, x, y)
            fast = {k: fast[k] - self.inner_lr * g[k] for k in fast}
            self._track(fast, path)
        return self._finish(fast, path)

    def _query(self, phi: Params, x: torch.Tensor, y: torch.Tensor):
        with differentiated_at_most_once():
            out = self.fmodel(phi, x)
        loss = flooded_mean(per_example_loss(out, y, self.label_smoothing), self.outer_flood,
                            self.flood_mode)
        metric = accuracy(out, y) if not y.dtype.is_floating_point else loss
        return loss, (loss.detach(), metric.detach())

    def _task_meta_grad(self, theta: Params, sx: torch.Tensor, sy: torch.Tensor,
                        qx: torch.Tensor, qy: torch.Tensor):
        phi = self._adapt_task(theta, sx, sy, self.inner_steps)
        v, (loss, metric) = grad(self._query, has_aux=True)(phi, qx, qy)
        if self.cg_steps == 0:
            return v, loss, metric

        def support_grad_dot(p: Params, t: Params) -> torch.Tensor:
            return _dot(grad(self.inner_loss)(p, sx, sy), t)

        def matvec(t: Params) -> Params:
            hvp = grad(support_grad_dot)(phi, t)  # H t, reverse over reverse
            return {k: t[k] + hvp[k] / self.lam for k in t}

        return conjugate_gradient(matvec, v, self.cg_steps), loss, metric

    def meta_gradient(self, batch: TaskBatch) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """Per-task implicit meta-gradients ``(B, ...)`` by name, query losses and metrics."""
        self._check_batch(batch)
        theta = {k: v.detach() for k, v in self.fmodel.params().items()}
        # No outer graph: every inner and CG graph is freed as soon as it is used.
        with torch.no_grad():
            return vmap(self._task_meta_grad, in_dims=(None, 0, 0, 0, 0),
                        randomness="different")(theta, batch.support_x, batch.support_y,
                                                batch.query_x, batch.query_y)

    def step(self, batch: TaskBatch) -> dict[str, float]:
        """Accumulate the mean implicit meta-gradient into ``p.grad``; return query metrics
        at the adapted weights."""
        grads, loss, metric = self.meta_gradient(batch)
        self._accumulate({k: g.mean(0) for k, g in grads.items()})
        metrics = {"loss": loss.mean().item()}
        if batch.is_classification:
            metrics["accuracy"] = metric.mean().item()
        return metrics
