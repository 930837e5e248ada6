"""Run any ``nn.Module`` as a pure function of a parameter dict."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def _batch_norm_with_batch_stats(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
    # Normalise natively without the affine part, then scale and shift by hand: in torch
    # 2.13 the second derivative of an affine F.batch_norm under vmap is wrong (see
    # tests/test_maml.py::test_batched_step_matches_per_task_loop_on_conv4).
    out = F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
    if module.weight is None:
        return out
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return out * module.weight.view(shape) + module.bias.view(shape)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Make every BatchNorm layer normalise with the current batch's statistics.

    The MAML papers use batch statistics in training and at test time (transductive
    BatchNorm). Removing the running-stat buffers for the duration also keeps them from
    being updated in place, which ``vmap`` over tasks could not do. The buffers are put
    back untouched on exit.
    """
    saved = []
    for m in model.modules():
        # A module already patched belongs to an enclosing use of this context.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" not in vars(m):
            saved.append((m, m.running_mean, m.running_var))
            m.running_mean = None
            m.running_var = None
            m.forward = _batch_norm_with_batch_stats.__get__(m)
    try:
        yield
    finally:
        for m, mean, var in saved:
            m.running_mean, m.running_var = mean, var
            del m.forward


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
        with batch_statistics(self.module):
            return functional_call(self.module, params, (x,), strict=False)
