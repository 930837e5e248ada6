"""Second-order MAML's inner loop with activation checkpointing across inner steps.

The unrolled inner loop keeps every step's activations for the outer backward, so its
memory grows with the inner steps. Here each step is one autograd node for the whole batch
of tasks that keeps only its input weights; the outer backward recomputes one step's graph
at a time to get ``v - lr * H v`` (Chen et al. 2016's checkpointing, applied across inner
steps). The meta-gradient is the same exact second-order one, to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.autograd.function import once_differentiable
from torch.func import vjp

from metalearn.algorithms.functional_model import Params

# grads(params, x, y, shared) -> every task's inner-loss gradient (vmapped over tasks).
BatchedGrad = Callable[[Params, torch.Tensor, torch.Tensor, bool], Params]


def checkpointed_sgd_steps(batched_grad: BatchedGrad, params: Params, lr: float, steps: int,
                           x: torch.Tensor, y: torch.Tensor,
                           path: list[Params] | None = None) -> Params:
    """``steps`` inner SGD steps of every task, ``fast - lr * grad``, keeping no activations.

    Args:
        batched_grad: the tasks' inner-loss gradients at per-task weights (``shared=False``,
            ``[T, ...]`` each) or at the shared initial weights (``shared=True``).
        params: the initial weights theta (shared by the tasks).
        lr: the inner learning rate.
        steps: the inner steps.
        x, y: the support sets, ``[T, n, ...]``.
        path: a list to append the weights after each step to, detached (``[T, ...]``).

    Returns:
        The adapted weights ``[T, ...]`` (theta itself when ``steps == 0``), differentiable
        in theta to second order.
    """
    names = tuple(params)
    fast = tuple(params.values())
    for k in range(steps):
        fast = _InnerStep.apply(batched_grad, lr, names, k == 0, x, y, *fast)
        fast = (fast,) if isinstance(fast, torch.Tensor) else fast
        if path is not None:
            path.append({n: f.detach() for n, f in zip(names, fast)})
    return dict(zip(names, fast))


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device
                  ) -> Iterator[None]:
    """Run with the RNG state ``state`` (from :func:`_rng_state`), then restore the current one."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _InnerStep(torch.autograd.Function):
    """One inner SGD step of every task, ``fast - lr * grad``, keeping no activations.

    Applied outside ``vmap`` to the batched fast weights (``[T, ...]`` each; theta itself
    when ``shared``, for the first step). The forward saves only its inputs; the backward
    recomputes the step's graph once to get ``v - lr * H v`` with ``H`` each task's
    inner-loss Hessian: a vector-Jacobian product of the vmapped inner gradient.
    """

    @staticmethod
    def forward(ctx, batched_grad: BatchedGrad, lr: float, names: tuple[str, ...],
                shared: bool, x: torch.Tensor, y: torch.Tensor, *fast: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        ctx.batched_grad, ctx.lr, ctx.names, ctx.shared = batched_grad, lr, names, shared
        # Dropout in the recomputation must draw the masks of this forward.
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x, y, *fast)
        # torch.func.grad ignores the no_grad that autograd.Function runs forward under.
        g = batched_grad(dict(zip(names, fast)), x, y, shared)
        return tuple(p - lr * g[n] for n, p in zip(names, fast))

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, y, *fast = ctx.saved_tensors
        names, shared, lr = ctx.names, ctx.shared, ctx.lr

        def inner_grad(params: Params) -> Params:
            return ctx.batched_grad(params, x, y, shared)

        with _replayed_rng(ctx.rng, x.device):
            _, hvp = vjp(inner_grad, dict(zip(names, fast)))
        v = dict(zip(names, cotangents))
        (hv,) = hvp(v)
        # With shared theta the vjp already sums H_t v_t over tasks; so must the identity.
        grads = [(v[n].sum(0) if shared else v[n]) - lr * hv[n] for n in names]
        return (None, None, None, None, None, None, *grads)
