"""Shared by the layers the learners swap into a user's model (norm_layers, task_convolution).

A swapped layer replaces a module's ``forward`` for the duration of a block; its Function's
vmap rule receives per-task tensors whose task dim it puts first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def swapped_forwards(model: nn.Module,
                     forward_for: Callable[[nn.Module], Callable | None]
                     ) -> Iterator[list[nn.Module]]:
    """Set ``m.forward = forward_for(m)`` on the modules where it is not None; yield them.

    A module whose ``forward`` is already set on the instance belongs to an enclosing use
    (or to the user) and is left alone. The instance attribute is removed on exit.
    """
    swapped = []
    for m in model.modules():
        forward = forward_for(m)
        if forward is None or "forward" in vars(m):
            continue
        m.forward = forward.__get__(m)
        swapped.append(m)
    try:
        yield swapped
    finally:
        for m in swapped:
            del m.forward


def task_first(t: torch.Tensor, dim: int | None, tasks: int) -> torch.Tensor:
    """An activation-like input with its task dim first (expanded if it has none)."""
    return t.movedim(dim, 0) if dim is not None else t.expand(tasks, *t.shape)


def leading(t: torch.Tensor | None, dim: int | None, ndim: int) -> torch.Tensor | None:
    """A per-task parameter (task dim ``dim``) put first and broadcastable against an
    ``ndim``-dim input with a leading task dim; a shared one broadcasts as it is."""
    if t is None or dim is None:
        return t
    t = t.movedim(dim, 0)
    return t.view(t.shape[0], *(1,) * (ndim - t.ndim), *t.shape[1:])
