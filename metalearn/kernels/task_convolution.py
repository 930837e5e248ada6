"""2-d convolutions under ``vmap`` over tasks: task by task for large per-task batches,
as one grouped convolution with a cheap double backward for small ones.

``vmap`` over tasks turns a convolution whose weights differ per task into one grouped
convolution. On CPU that wins for small per-task batches (MAML's 5-image support sets) and
loses for large ones: with 75 query images per task, the forward and backward of 32 tasks'
grouped convolutions take 2x as long as 32 plain ones on Conv4's layers
(``benchmarks/studies/task_convolution_crossover.py``). Here the convolution is a Function whose
vmap rule loops over tasks with the native kernel when a task's batch has at least
``KernelSettings.per_task_min_batch`` examples (on CPU; elsewhere a loop pays one launch per
task), so each level of autograd below it records native per-task convolution nodes. Below
that it merges the tasks into the groups of one convolution itself, as ``vmap`` would, but
records this module's Functions rather than the native convolution: torch's double backward
of a grouped convolution (``_convolution_double_backward``) computes its weight term one
group at a time, 32 small convolutions and a ``cat`` per layer, where the written-out
backward of :class:`_Conv2dBackward` is one grouped convolution per term. The backward is a
Function of the same kind, so an inner-loop gradient taken under ``vmap`` is batched the
same way.

Under ``torch.compile`` the vmap rules run eagerly: dynamo traces them as frames of their
own, and torch 2.13's inductor fails on them once their shapes turn dynamic ("cannot
determine truth value of Relational").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.kernels.layer_swap import swapped_forwards, task_first
from metalearn.kernels.settings import current_settings, native_kernels


def _conv_backward(g, x, w, stride, padding, dilation, groups, mask=(True, True, True)):
    return torch.ops.aten.convolution_backward(
        g, x, w, [w.shape[0]], stride, padding, dilation, False, [0, 0], groups, list(mask))


def _per_task_loop(x: torch.Tensor) -> bool:
    """Whether a task-first ``(tasks, N, ...)`` batch runs task by task (else as groups)."""
    return _large(x.shape[1], x.device)


def _large(per_task_batch: int, device: torch.device) -> bool:
    return per_task_batch >= current_settings().per_task_min_batch and device.type == "cpu"


def _masked(dims: tuple[int, int, int], mask: tuple[bool, ...]) -> tuple[int | None, ...]:
    """vmap out_dims of ``(dx, dw, db)``: None for the gradients ``mask`` leaves out."""
    return tuple(d if m else None for d, m in zip(dims, mask))


def _as_groups(x: torch.Tensor) -> torch.Tensor:
    """``(tasks, N, C, H, W)`` as ``(N, tasks * C, H, W)``: each task a block of channels
    (free when ``x`` is laid out ``(N, tasks, C, H, W)``, as the norm layers leave it)."""
    return x.movedim(0, 1).flatten(1, 2)


def _from_groups(x: torch.Tensor, tasks: int) -> torch.Tensor:
    """The inverse of :func:`_as_groups`, as a view laid out ``(N, tasks, C, H, W)``."""
    return x.view(x.shape[0], tasks, x.shape[1] // tasks, *x.shape[2:])


def _weights_as_groups(w: torch.Tensor, w_dim: int | None, tasks: int) -> torch.Tensor:
    """Per-task (or shared) ``(O, C, k, k)`` weights as ``(tasks * O, C, k, k)``."""
    return task_first(w, w_dim, tasks).flatten(0, 1)


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` with a vmap rule that loops over tasks or merges them into groups (see
    the module docstring)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, *ctx.conv = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        # Only what is needed: the images' gradient (the first layer's dx) is as costly as
        # the rest of that layer's backward.
        need = ctx.needs_input_grad
        mask = (need[0], need[1], ctx.has_bias and need[2])
        gx, gw, gb = _Conv2dBackward.apply(g, x, weight, *ctx.conv, mask)
        return gx, gw, gb, None, None, None, None

    @staticmethod
    @torch.compiler.disable  # see the module docstring
    def vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups):
        tasks = info.batch_size
        x_dim, w_dim, b_dim = in_dims[:3]
        x = task_first(x, x_dim, tasks)
        if w_dim is None and b_dim is None:  # weights shared by all tasks: one convolution
            out = F.conv2d(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups)
            return out.view(*x.shape[:2], *out.shape[1:]), 0
        if not _per_task_loop(x):
            out = _from_groups(_Conv2d.apply(
                _as_groups(x), _weights_as_groups(weight, w_dim, tasks), None, stride,
                padding, dilation, groups * tasks), tasks)
            if bias is not None:
                # Added outside: the grouped kernel with a bias took twice as long.
                b = task_first(bias, b_dim, tasks)
                out = out + b.view(1, *b.shape, *(1,) * (out.ndim - 3))
            return out, 1
        # unbind, not x[t]: the backward of each x[t] would write a full-size zero tensor.
        xs, ws = x.unbind(0), task_first(weight, w_dim, tasks).unbind(0)
        bs = [None] * tasks if bias is None else task_first(bias, b_dim, tasks).unbind(0)
        outs = [F.conv2d(xt, wt, bt, stride, padding, dilation, groups)
                for xt, wt, bt in zip(xs, ws, bs)]
        # Stacked as (N, tasks, C, H, W), the layout after which the batch-norm layer's
        # vmap rule merges tasks and channels without a copy.
        return torch.stack(outs, 1), 1


class _Conv2dBackward(torch.autograd.Function):
    """The convolution's backward ``(dx, dw, db)`` from ``(g, x, w)``, batched under vmap
    as :class:`_Conv2d` is; ``mask`` says which of the three to compute (None otherwise)."""

    @staticmethod
    def forward(g, x, weight, stride, padding, dilation, groups, mask):
        return _conv_backward(g, x, weight, stride, padding, dilation, groups, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, weight, *ctx.conv, _ = inputs
        ctx.save_for_backward(g, x, weight)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        # dx, dw and db are linear in g and bilinear in (g, x) and (g, w), so their
        # derivatives are convolutions again; in native ops, so that they differentiate too.
        g, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        d_g = d_x = d_w = None
        if need_g:
            terms = []
            if ggx is not None:
                terms.append(F.conv2d(ggx, weight, None, stride, padding, dilation, groups))
            if ggw is not None:
                terms.append(F.conv2d(x, ggw, None, stride, padding, dilation, groups))
            if ggb is not None:
                terms.append(ggb.view(1, -1, 1, 1).expand_as(g))
            d_g = sum(terms[1:], terms[0]) if terms else None
        if need_x and ggw is not None:
            d_x = _conv_backward(g, x, ggw, *ctx.conv, mask=(True, False, False))[0]
        if need_w and ggx is not None:
            d_w = _conv_backward(g, ggx, weight, *ctx.conv, mask=(False, True, False))[1]
        return d_g, d_x, d_w, None, None, None, None, None

    @staticmethod
    @torch.compiler.disable  # see the module docstring
    def vmap(info, in_dims, g, x, weight, stride, padding, dilation, groups, mask):
        tasks = info.batch_size
        g_dim, x_dim, w_dim = in_dims[:3]
        g, x = task_first(g, g_dim, tasks), task_first(x, x_dim, tasks)
        if not _per_task_loop(x):
            return _grouped_backward(g, x, weight, w_dim, (stride, padding, dilation, groups),
                                     mask)
        per_task = (g.unbind(0), x.unbind(0), task_first(weight, w_dim, tasks).unbind(0))
        outs = [_conv_backward(gt, xt, wt, stride, padding, dilation, groups, mask)
                for gt, xt, wt in zip(*per_task)]
        return (tuple(torch.stack(o) if m else None for o, m in zip(zip(*outs), mask)),
                _masked((0, 0, 0), mask))


def _grouped_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      w_dim: int | None, conv: tuple, mask: tuple[bool, bool, bool]):
    """:class:`_Conv2dBackward`'s vmap rule for small batches: ``g`` and ``x`` task-first,
    every task's ``(dx, dw, db)`` from grouped convolutions (batch-first ``dx``)."""
    stride, padding, dilation, groups = conv
    tasks = x.shape[0]
    if w_dim is not None:
        dx, dw, db = _Conv2dBackward.apply(
            _as_groups(g), _as_groups(x), _weights_as_groups(weight, w_dim, tasks), *conv[:3],
            groups * tasks, mask)
        dx = None if dx is None else _from_groups(dx, tasks)
        dx_dim = 1
    else:
        # A shared weight (MAML's first step): dx is one plain convolution over all tasks'
        # images; dw does not depend on the weight's values, so the grouped call for dw and
        # db gets a zero-stride stand-in for the per-task copies.
        dx = dw = db = None
        if mask[0]:
            dx = _Conv2dBackward.apply(g.flatten(0, 1), x.flatten(0, 1), weight, *conv,
                                       (True, False, False))[0]
            dx = dx.view(tasks, -1, *dx.shape[1:])
        if mask[1] or mask[2]:
            stand_in = weight.new_zeros(()).expand(tasks * weight.shape[0], *weight.shape[1:])
            _, dw, db = _Conv2dBackward.apply(_as_groups(g), _as_groups(x), stand_in,
                                              *conv[:3], groups * tasks, (False, *mask[1:]))
        dx_dim = 0
    outs = (dx, None if dw is None else dw.view(tasks, -1, *dw.shape[1:]),
            None if db is None else db.view(tasks, -1))
    return outs, _masked((dx_dim, 0, 0), mask)


def _conv2d_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # Outside vmap the Function is the native convolution; under it, its rule decides. Where
    # nothing is differentiated twice (first-order inner loops, evaluation), torch's double
    # backward never runs, and vmap's own grouped rule costs less Python per call.
    if x.ndim == 4 and (_large(x.shape[0], x.device)
                        or (current_settings().tasks_as_groups and not native_kernels())):
        return _Conv2d.apply(x, module.weight, module.bias, module.stride, module.padding,
                             module.dilation, module.groups)
    return module._conv_forward(x, module.weight, module.bias)


@contextmanager
def per_task_convolutions(model: nn.Module) -> Iterator[None]:
    """Run the model's ``nn.Conv2d`` layers under vmap as this module's Functions.

    Only zero-padded convolutions on batched (4-d) input are affected: task by task on CPU
    with at least ``KernelSettings.per_task_min_batch`` examples per task, else merged into groups;
    the results are the same as the native layer's, to round-off.
    """
    with swapped_forwards(model, _swap_for):
        yield


def _swap_for(m: nn.Module):
    if type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
        return _conv2d_forward
    return None
