"""Run any ``nn.Module`` as a pure function of a parameter dict."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.norm_layers import batch_statistics
from metalearn.algorithms.task_convolution import per_task_convolutions

Params = dict[str, torch.Tensor]


class FunctionalModel:
    """A module seen as ``f(params, x)``, with ``params`` its trainable parameters.

    Frozen parameters (``requires_grad=False``) and buffers stay inside the module and
    are not adapted.

    Args:
        model: any ``nn.Module``.

    Example:
        >>> import torch
        >>> from metalearn.models import MLP
        >>> from metalearn.algorithms.functional_model import FunctionalModel
        >>> f = FunctionalModel(MLP())
        >>> f(f.params(), torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.module = model
        if not self.params():
            raise ValueError(
                "the model has no trainable parameters (all have requires_grad=False); "
                "meta-learning needs at least one parameter to adapt"
            )

    def params(self) -> Params:
        """The trainable parameters, by name (the live ``nn.Parameter`` objects)."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        with batch_statistics(self.module), per_task_convolutions(self.module):
            return functional_call(self.module, params, (x,), strict=False)
