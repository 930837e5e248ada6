"""Meta-SGD (Li et al. 2017): MAML with a learned inner learning rate per weight."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import grad

from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.norm_layers import differentiated_at_most_once
from metalearn.data.task_batch import TaskBatch


def param_key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (which may not contain dots)."""
    return name.replace(".", "-")


class LearnedState:
    """What a learner meta-learns besides the model, kept in the module ``self.learned``.

    Mixed into learners with learnable inner-loop state (Meta-SGD, MAML++). The outer
    optimizer must see :meth:`meta_parameters`, and a checkpoint must hold
    :meth:`state_dict` next to the model's.
    """

    learned: nn.Module

    def meta_parameters(self) -> list[nn.Parameter]:
        """Everything the outer optimizer updates: the model's trainable parameters, then
        ``self.learned``'s."""
        return [*self.fmodel.params().values(), *self.learned.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned inner-loop state (not the model): save it beside ``model.state_dict()``."""
        return self.learned.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.learned.load_state_dict(state)

    def _check_learned(self) -> None:
        ref = next(iter(self.fmodel.params().values()))
        for name, t in self.learned.named_parameters():
            if t.device != ref.device or t.dtype != ref.dtype:
                raise ValueError(
                    f"learned {name} is {t.dtype} on {t.device} but the model is {ref.dtype} on "
                    f"{ref.device}; build the learner after moving the model, or call "
                    f"learner.learned.to({str(ref.device)!r}, {ref.dtype})")


class MetaSGD(LearnedState, MAML):
    """Meta-SGD: every weight has its own inner learning rate, meta-learned with theta.

    The inner update is ``phi = phi - lr ⊙ grad`` with ``lr`` a tensor shaped like each
    parameter (sign included: a learned rate may turn negative, as in the paper). The
    rates live in ``learner.learned`` (an ``nn.ParameterDict``); :meth:`step` accumulates
    their meta-gradient into their ``.grad`` like the model's, so optimise
    ``learner.meta_parameters()`` and checkpoint ``learner.state_dict()``. Build the
    learner after moving the model to its device and dtype.

    Args:
        model: any ``nn.Module``.
        inner_lr: initial value of every per-element learning rate.
        inner_steps: inner steps during meta-training (the paper uses 1).
        first_order: treat inner gradients as constants (the rates still get a gradient).
        inner_flood, flood_mode, outer_flood, label_smoothing: as for :class:`MAML`.

    Example:
        >>> import torch
        >>> from metalearn import MetaSGD
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> learner = MetaSGD(MLP(), inner_lr=0.01, inner_steps=1)
        >>> opt = torch.optim.Adam(learner.meta_parameters(), lr=1e-3)
        >>> opt.zero_grad()
        >>> metrics = learner.step(SineTasks(seed=0).sample(4))
        >>> opt.step()
        >>> learner.learned["0-weight"].shape, bool((learner.learned["0-weight"] != 0.01).any())
        (torch.Size([40, 1]), True)
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
        super().__init__(model, inner_lr, inner_steps, first_order, inner_flood, flood_mode,
                         outer_flood, label_smoothing)
        self.learned = nn.ParameterDict({
            param_key(n): nn.Parameter(torch.full_like(p.detach(), self.inner_lr))
            for n, p in self.fmodel.params().items()
        })

    def _adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        inner_grad = grad(self.inner_loss)
        fast, path = params, []
        for _ in range(steps):
            if self.first_order:
                with torch.no_grad(), differentiated_at_most_once():
                    g = inner_grad(fast, x, y)
            else:
                g = inner_grad(fast, x, y)
            fast = {k: fast[k] - self.learned[param_key(k)] * g[k] for k in fast}
            self._track(fast, path)
        return self._finish(fast, path)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_learned()
        return super().meta_loss(batch)
