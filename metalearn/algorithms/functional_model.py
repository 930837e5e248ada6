"""Run any ``nn.Module`` as a pure function of a parameter dict: the one door to the kernels."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from metalearn.kernels import compiled, layers_for
from metalearn.kernels.settings import current_settings, in_traced_region

Params = dict[str, torch.Tensor]


class FunctionalModel:
    """A module seen as ``f(params, x, order)``, with ``params`` its trainable parameters.

    Frozen parameters (``requires_grad=False``) and buffers stay inside the module and
    are not adapted. ``order`` says how the result will be differentiated (2: twice, as a
    second-order inner step; 1: once, by a later backward, as a query loss; 0: at most
    once and at once, or never), which picks the kernels the model's layers run on
    (:mod:`metalearn.kernels`). Every order gives the same values to round-off; 2 is
    right for any use, the lower orders are faster or keep less memory.

    Args:
        model: any ``nn.Module``.

    Example:
        >>> import torch
        >>> from metalearn.models import MLP
        >>> from metalearn.algorithms.functional_model import FunctionalModel
        >>> f = FunctionalModel(MLP())
        >>> f(f.params(), torch.zeros(5, 1), order=0).shape
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

    def __call__(self, params: Params, x: torch.Tensor, order: int = 2) -> torch.Tensor:
        if in_traced_region():  # a compiled region entered the kernels' contexts already
            out = functional_call(self.module, params, (x,), strict=False)
        else:
            with layers_for(self.module, order):
                out = functional_call(self.module, params, (x,), strict=False)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the model returned a {type(out).__name__}, but the learners need its forward "
                "to return one tensor: the logits (classification) or the outputs "
                "(regression). Wrap it in a module whose forward returns that tensor, e.g. "
                "`return self.net(x)[0]` for a model that returns (logits, features)")
        return out

    def run_compiled(self, owner: object, name: str, fn, params: Params, *args, steps: int):
        """``fn(params, *args)`` through ``torch.compile`` when ``kernel_settings(compile=True)``,
        once per ``owner`` and ``name`` (:func:`metalearn.kernels.compiled.run`); else eagerly,
        as also where ``fn`` unrolls more than ``MAX_UNROLLED_STEPS`` inner ``steps``.

        A compiled region keeps no graph, so ``params`` enter it detached; with gradients
        enabled (a caller differentiating through ``fn``) it runs eagerly on ``params`` as
        they are."""
        if torch.is_grad_enabled():
            return fn(params, *args)
        return compiled.run(owner, self.module, name, fn,
                            {n: p.detach() for n, p in params.items()}, *args, steps=steps)

    @staticmethod
    def compiling() -> bool:
        """Whether regions differentiated at most once run compiled now."""
        return current_settings().compile
