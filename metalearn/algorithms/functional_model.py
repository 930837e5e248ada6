"""Run any ``nn.Module`` as a pure function of a parameter dict."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def _batch_norm_with_batch_stats(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
    # Written out as x * scale + shift rather than with F.batch_norm: in torch 2.13 the
    # second derivative of an affine F.batch_norm under vmap is wrong (see
    # tests/test_maml.py::test_batched_step_matches_per_task_loop_on_conv4). This form also
    # keeps only x (shared with var_mean) for the backward, not a normalised copy of it:
    # about 30% less saved memory for Conv4 MAML than normalising first.
    dims = [0, *range(2, x.ndim)]
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + module.eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if module.weight is not None:
        scale = scale * module.weight.view(shape)
    shift = -mean * scale
    if module.bias is not None:
        shift = shift + module.bias.view(shape)
    return x * scale + shift


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
