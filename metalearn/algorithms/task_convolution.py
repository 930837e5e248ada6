"""2-d convolutions that run task by task under ``vmap`` when each task's batch is large.

``vmap`` over tasks turns a convolution whose weights differ per task into one grouped
convolution. On CPU that wins for small per-task batches (MAML's 5-image support sets) and
loses for large ones: with 75 query images per task, the forward and backward of 32 tasks'
grouped convolutions take 1.9x as long as 32 plain ones on Conv4's layers
(``benchmarks/task_convolution_crossover.py``). Here the convolution is a Function whose vmap rule
loops over tasks with the native kernel when a task's batch has at least
:data:`PER_TASK_MIN_BATCH` examples, so each level of autograd below it records native
per-task convolution nodes. Its backward is a Function of the same kind, so an inner-loop
gradient taken under ``vmap`` runs task by task as well. On other devices, where a loop
pays one kernel launch per task, the convolution is left to ``vmap``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.layer_swap import swapped_forwards, task_first

# Per-task batch from which the loop beats the grouped convolution on Conv4's layers on a
# 2-core CPU (task_convolution_crossover.json: even at 20 images, 1.5x faster at 40).
PER_TASK_MIN_BATCH = 32


def _conv_backward(g, x, w, stride, padding, dilation, groups, mask=(True, True, True)):
    return torch.ops.aten.convolution_backward(
        g, x, w, [w.shape[0]], stride, padding, dilation, False, [0, 0], groups, list(mask))


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` with a vmap rule that loops over tasks (see the module docstring)."""

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
        gx, gw, gb = _Conv2dBackward.apply(g, x, weight, *ctx.conv)
        return gx, gw, gb if ctx.has_bias else None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups):
        tasks = info.batch_size
        x_dim, w_dim, b_dim = in_dims[:3]
        x = task_first(x, x_dim, tasks)
        if w_dim is None and b_dim is None:  # weights shared by all tasks: one convolution
            out = F.conv2d(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups)
            return out.view(*x.shape[:2], *out.shape[1:]), 0
        # unbind, not x[t]: the backward of each x[t] would write a full-size zero tensor.
        xs, ws = x.unbind(0), task_first(weight, w_dim, tasks).unbind(0)
        bs = [None] * tasks if bias is None else task_first(bias, b_dim, tasks).unbind(0)
        outs = [F.conv2d(xt, wt, bt, stride, padding, dilation, groups)
                for xt, wt, bt in zip(xs, ws, bs)]
        # Stacked as (N, tasks, C, H, W), the layout after which the batch-norm layer's
        # vmap rule merges tasks and channels without a copy.
        return torch.stack(outs, 1), 1


class _Conv2dBackward(torch.autograd.Function):
    """The convolution's backward ``(dx, dw, db)`` from ``(g, x, w)``, looping under vmap."""

    @staticmethod
    def forward(g, x, weight, stride, padding, dilation, groups):
        return _conv_backward(g, x, weight, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, weight, *ctx.conv = inputs
        ctx.save_for_backward(g, x, weight)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        # dx, dw and db are linear in g and bilinear in (g, x) and (g, w), so their
        # derivatives are convolutions again; in native ops, so that they differentiate too.
        g, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        d_g = torch.zeros_like(g)
        if ggx is not None:
            d_g = d_g + F.conv2d(ggx, weight, None, stride, padding, dilation, groups)
        if ggw is not None:
            d_g = d_g + F.conv2d(x, ggw, None, stride, padding, dilation, groups)
        if ggb is not None:
            d_g = d_g + ggb.view(1, -1, 1, 1)
        d_x = d_w = None
        if ggw is not None:
            d_x = _conv_backward(g, x, ggw, *ctx.conv, mask=(True, False, False))[0]
        if ggx is not None:
            d_w = _conv_backward(g, ggx, weight, *ctx.conv, mask=(False, True, False))[1]
        return d_g, d_x, d_w, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, g, x, weight, stride, padding, dilation, groups):
        per_task = (task_first(t, d, info.batch_size).unbind(0)
                    for t, d in zip((g, x, weight), in_dims[:3]))
        outs = [_conv_backward(gt, xt, wt, stride, padding, dilation, groups)
                for gt, xt, wt in zip(*per_task)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0)


def _conv2d_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 4 and x.shape[0] >= PER_TASK_MIN_BATCH and x.device.type == "cpu":
        return _Conv2d.apply(x, module.weight, module.bias, module.stride, module.padding,
                             module.dilation, module.groups)
    return module._conv_forward(x, module.weight, module.bias)


@contextmanager
def per_task_convolutions(model: nn.Module) -> Iterator[None]:
    """Run the model's ``nn.Conv2d`` layers task by task under vmap for large batches.

    Only zero-padded convolutions on batched (4-d) input are affected, and only on CPU with
    at least :data:`PER_TASK_MIN_BATCH` examples per task; the results are the same as
    the native layer's, to round-off.
    """
    with swapped_forwards(model, _swap_for):
        yield


def _swap_for(m: nn.Module):
    if type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
        return _conv2d_forward
    return None
