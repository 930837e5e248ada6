"""The implicit meta-gradient (Rajeswaran et al. 2019): conjugate gradient on Hessian-vector
products, with no graph through the inner loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad

from metalearn.algorithms.functional_model import Params


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
        >>> from metalearn.algorithms.implicit import conjugate_gradient
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


def implicit_meta_gradient(support_loss: Callable[[Params], torch.Tensor], phi: Params,
                           query_grad: Params, lam: float, cg_steps: int,
                           damping: float = 0.0) -> Params:
    """``(I + H / lam)^-1 query_grad``, with ``H`` the Hessian of ``support_loss`` at ``phi``.

    At the solution ``phi`` of the proximal inner problem ``min L_support(phi) + (lam / 2)
    ||phi - theta||^2``, the implicit function theorem gives ``d phi / d theta =
    (I + H / lam)^-1``, so this is the task's meta-gradient. It is solved with
    ``cg_steps`` iterations of :func:`conjugate_gradient` on Hessian-vector products
    (reverse over reverse); ``cg_steps == 0`` returns ``query_grad`` (first order).
    ``damping`` adds ``damping * I`` to the matrix, as the reference code's ``cg_damping``.
    """
    if cg_steps == 0:
        return query_grad

    def support_grad_dot(p: Params, t: Params) -> torch.Tensor:
        return _dot(grad(support_loss)(p), t)

    def matvec(t: Params) -> Params:
        hvp = grad(support_grad_dot)(phi, t)  # H t
        return {k: (1.0 + damping) * t[k] + hvp[k] / lam for k in t}

    return conjugate_gradient(matvec, query_grad, cg_steps)
