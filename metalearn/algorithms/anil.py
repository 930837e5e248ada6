"""ANIL (Raghu et al. 2020): almost no inner loop, only the head adapts to each task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.inner_loop import inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss

InnerSelection = str | Sequence[str] | Callable[[str], bool] | None


def last_module_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters owned directly by the last module that has any."""
    names: list[str] = []
    for prefix, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            names = [f"{prefix}.{n}" if prefix else n for n in own]
    return names


def select_parameters(model: nn.Module, inner_params: InnerSelection) -> tuple[str, ...]:
    """The trainable parameter names that ``inner_params`` selects, in the model's order.

    ``inner_params`` is a name or prefix, a sequence of them, a predicate on names, or
    ``None`` for the last module's parameters. A prefix matches whole name components:
    ``"classifier"`` selects ``classifier.weight`` but not ``classifier2.weight``.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if inner_params is None:
        chosen = set(last_module_parameters(model))
    elif callable(inner_params):
        chosen = {n for n in trainable if inner_params(n)}
    else:
        prefixes = (inner_params,) if isinstance(inner_params, str) else tuple(inner_params)
        chosen = {n for n in trainable
                  if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)}
    names = tuple(n for n in trainable if n in chosen)
    if not names:
        raise ValueError(
            f"inner_params={inner_params!r} selects none of the model's trainable parameters "
            f"({', '.join(trainable)}); give names, prefixes such as the head module's name, "
            "or a predicate on names")
    return names


class ANIL(MetaLearner):
    """ANIL: the inner loop adapts only the head; the body is learned in the outer loop.

    The inner SGD steps update only the selected ("inner") parameters; the rest (the body)
    stays at theta for every task and gets its meta-gradient from the query loss, by
    default second order through the head's adaptation. Works with any model: the head is
    chosen by parameter name. The forward pass still runs the whole model at every inner
    step (nothing assumes the head is the last layer), but the inner backward only needs
    the head's gradients.

    Args:
        model: any ``nn.Module``.
        inner_lr: step size of the head's inner SGD.
        inner_steps: inner SGD steps during meta-training.
        inner_params: which parameters adapt: a name or prefix (``"classifier"``), a
            sequence of them, or a predicate on names; ``None`` (default) takes the
            parameters of the model's last module that has any (``classifier`` in
            :class:`~metalearn.models.Conv4`, the output ``Linear`` of an MLP).
        first_order: treat the head's inner gradients as constants.
        loss: as for :class:`~metalearn.MAML`.
        **loss_options: as for :class:`~metalearn.MAML`.

    Example:
        >>> import torch
        >>> from metalearn import ANIL
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> anil = ANIL(model, inner_lr=0.01, inner_steps=5)
        >>> anil.inner_names
        ('4.weight', '4.bias')
        >>> batch = SineTasks(seed=0).sample(4)
        >>> fast = anil.adapt(batch.support_x, batch.support_y)
        >>> torch.equal(fast["0.weight"][0], model[0].weight)  # the body does not adapt
        True
        >>> metrics = anil.step(batch)
        >>> bool(model[0].weight.grad.abs().sum() > 0)         # but it is meta-learned
        True
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int,
                 inner_params: InnerSelection = None, first_order: bool = False,
                 loss: TaskLoss | None = None, **loss_options: Any) -> None:
        super().__init__(model, inner_lr, inner_steps, first_order, loss, **loss_options)
        self.inner_names = select_parameters(model, inner_params)

    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool, trajectory: bool = False):
        body = {k: v for k, v in params.items() if k not in self.inner_names}
        head = {k: params[k] for k in self.inner_names}

        def loss(h: Params, step: int, order: int) -> torch.Tensor:
            return self.support_loss({**body, **h}, x, y, order)

        out = inner_loop(loss, head, steps, sgd(self.inner_lr), first_order=first_order,
                         trajectory=trajectory)
        if not trajectory:
            return {**body, **out}
        head, path = out
        return {**body, **head}, [{**body, **h} for h in path]
