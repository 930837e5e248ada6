"""The inner loop, once for every algorithm: gradient steps on a task's loss, and the update
rules that turn a gradient into a step.

A learner writes its inner loop as ``inner_loop(loss, params, steps, update)`` for one task
and ``vmap``\\ s it over tasks. ``loss(params, step, order)`` is the task's loss at inner
step ``step``, with ``order`` passed on to the functional model (how the forward will be
differentiated, :mod:`metalearn.kernels`). An update rule is a function
``update(step, params, grads, state) -> (params, state)``; ``state`` starts as ``None``
unless the loop is given one (Reptile's inner Adam carried across tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad

from metalearn.algorithms.functional_model import Params

Loss = Callable[[Params, int, int], torch.Tensor]
Update = Callable[[int, Params, Params, Any], tuple[Params, Any]]
Rate = float | Callable[[str, int], "torch.Tensor | float"]


def inner_loop(loss: Loss, params: Params, steps: int, update: Update, *,
               first_order: bool = False, trajectory: bool = False, state: Any = None,
               return_state: bool = False) -> Params | tuple[Any, ...]:
    """Take ``steps`` steps of ``update`` on the gradient of ``loss``, from ``params``.

    Args:
        loss: ``loss(params, step, order)``, the task's inner loss at inner step ``step``.
        params: the weights to adapt (a dict of tensors; any subset of the model's, such as
            ANIL's head).
        steps: the number of inner steps.
        update: the update rule, e.g. :func:`sgd` or :func:`adam`.
        first_order: take each inner gradient as a constant (no graph through it: FOMAML,
            Reptile, evaluation). Otherwise the result stays differentiable in ``params``
            through every inner gradient, to second order (MAML).
        trajectory: also return the weights after each step.
        state: the update rule's state to start from (``None``: its fresh state).
        return_state: also return the update rule's state after the last step.

    Returns:
        The adapted weights, or ``(adapted, [weights after step 1, ..., after step K])``
        with ``trajectory=True``; with ``return_state=True``, a tuple of those and the
        final state.

    Example:
        >>> import torch
        >>> from metalearn.algorithms.inner_loop import inner_loop, sgd
        >>> loss = lambda p, step, order: (p["w"] - 3.0).pow(2).sum()
        >>> w = inner_loop(loss, {"w": torch.zeros(())}, 2, sgd(0.25))["w"]
        >>> float(w)                 # 0 -> 1.5 -> 2.25: half the way each step
        2.25
    """
    path = []
    for step in range(steps):
        if first_order:
            with torch.no_grad():
                g = grad(loss)(params, step, 0)
        else:
            g = grad(loss)(params, step, 2)
        params, state = update(step, params, g, state)
        if trajectory:
            path.append(params)
    out = (params, path) if trajectory else params
    return (out, state) if return_state else out


def sgd(lr: Rate) -> Update:
    """``phi - lr * grad``; ``lr`` a number, or ``lr(name, step)`` for learned rates (a
    tensor per weight for Meta-SGD, a scalar per layer and step for MAML++).

    Example:
        >>> import torch
        >>> from metalearn.algorithms import sgd
        >>> update = sgd(lambda name, step: 0.1 * (step + 1))   # a rate per step
        >>> w = {"w": torch.tensor(1.0)}
        >>> new, _ = update(1, w, {"w": torch.tensor(2.0)}, None)
        >>> round(float(new["w"]), 6)    # 1 - 0.2 * 2
        0.6
    """
    def rate(name: str, step: int):
        return lr(name, step) if callable(lr) else lr

    def update(step: int, params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        return {n: params[n] - rate(n, step) * grads[n] for n in params}, state

    return update


def adam(lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> Update:
    """Adam with bias correction (the Reptile reference code's inner optimiser, with
    ``beta1 = 0``).

    Its state is ``(m, v, t)``: the two moments (dicts like the weights) and the number of
    steps taken, which the bias correction uses. Fresh, the moments are zero and ``t`` is
    0; :func:`inner_loop` can start it from a given state instead, as Reptile does to carry
    the moments across tasks (``t`` may then be a tensor).

    Example: bias-corrected, Adam's first step moves each weight by ``lr`` against the sign
    of its gradient, whatever the gradient's size.

        >>> import torch
        >>> from metalearn.algorithms import adam
        >>> update = adam(lr=0.1)
        >>> new, (m, v, t) = update(0, {"w": torch.tensor([1.0, 1.0])},
        ...                         {"w": torch.tensor([5.0, -0.01])}, None)
        >>> [round(x, 4) for x in new["w"].tolist()], t
        ([0.9, 1.1], 1)
    """
    b1, b2 = betas

    def update(step: int, params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        if state is None:
            state = ({n: torch.zeros_like(p) for n, p in params.items()},
                     {n: torch.zeros_like(p) for n, p in params.items()}, 0)
        m, v, t = state
        t = t + 1
        m = {n: b1 * m[n] + (1 - b1) * grads[n] for n in params}
        v = {n: b2 * v[n] + (1 - b2) * grads[n] * grads[n] for n in params}
        new = {}
        for n in params:
            m_hat = m[n] / (1 - b1 ** t)
            v_hat = v[n] / (1 - b2 ** t)
            new[n] = params[n] - lr * m_hat / (v_hat.sqrt() + eps)
        return new, (m, v, t)

    return update
