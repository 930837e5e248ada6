"""Meta-SGD (Li et al. 2017): MAML with a learned inner learning rate per weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.inner_loop import inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss


def param_key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (which may not contain dots)."""
    return name.replace(".", "-")


class MetaSGD(MetaLearner):
    """Meta-SGD: every weight has its own inner learning rate, meta-learned with theta.

    The inner update is ``phi <- phi - lr ⊙ grad L_support(phi)`` with ``lr`` a tensor
    shaped like each parameter (sign included: a learned rate may turn negative, as in the
    paper). The rates are ``learner.learned`` (an ``nn.ParameterDict`` keyed by parameter
    name with dots as dashes); :meth:`step` accumulates their meta-gradient like the
    model's, so optimise ``learner.parameters()``; ``learner.state_dict()`` holds them.

    Args:
        model: any ``nn.Module``.
        inner_lr: initial value of every per-element learning rate.
        inner_steps: inner steps during meta-training (the paper uses 1).
        first_order: treat inner gradients as constants (the rates still get a gradient).
        loss: as for :class:`~metalearn.MAML`.
        **loss_options: as for :class:`~metalearn.MAML`.

    Example:
        >>> import torch
        >>> from metalearn import MetaSGD
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> learner = MetaSGD(MLP(), inner_lr=0.01, inner_steps=1)
        >>> opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
        >>> opt.zero_grad()
        >>> metrics = learner.step(SineTasks(seed=0).sample(4))
        >>> opt.step()
        >>> learner.learned["0-weight"].shape, bool((learner.learned["0-weight"] != 0.01).any())
        (torch.Size([40, 1]), True)
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int,
                 first_order: bool = False, loss: TaskLoss | None = None,
                 **loss_options: Any) -> None:
        super().__init__(model, inner_lr, inner_steps, first_order, loss, **loss_options)
        self.learned = nn.ParameterDict({
            param_key(n): nn.Parameter(torch.full_like(p.detach(), self.inner_lr))
            for n, p in self.fmodel.params().items()
        })

    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool, trajectory: bool = False):
        def loss(p: Params, step: int, order: int) -> torch.Tensor:
            return self.support_loss(p, x, y, order)

        rates = sgd(lambda name, step: self.learned[param_key(name)])
        return inner_loop(loss, params, steps, rates, first_order=first_order,
                          trajectory=trajectory)
