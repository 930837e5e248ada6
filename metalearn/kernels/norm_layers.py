"""Normalisation layers that use the current batch's statistics and stay exact under vmap.

In torch 2.13 the second derivative of the native affine batch, instance and layer norms
under ``vmap`` is wrong (up to 1e-2 relative in float64; tests/test_norm_layers.py), which
would silently corrupt MAML's meta-gradient. Inside the learners these layers are
therefore computed here instead, from ``var_mean`` and elementwise ops whose derivatives
``vmap`` gets right. GroupNorm and RMSNorm are exact natively and are left alone.

Only second derivatives are wrong. The Function's vmap rule therefore runs the native
batch-norm kernel for all tasks below the vmap level, where it is only differentiated
once, and keeps the written-out backward and double backward for the levels that
differentiate twice. A forward of order 0 (no graph kept: first-order inner loops,
evaluation; see :func:`metalearn.kernels.layers_for`) runs the plain native functions
(with batch statistics and no running-stat updates, as above); not a forward whose graph
is kept, because vmap's own batch-norm rule keeps a normalised copy of the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from metalearn.kernels.layer_swap import leading, swapped_forwards, task_first
from metalearn.kernels.settings import native_kernels


def _channels_last(x: torch.Tensor) -> bool:
    """Whether the spatial dims are not innermost (channels-last): torch's CPU batch-norm
    kernel for that layout computes float32 statistics 20-30x less exactly when a channel's
    mean is far above its spread (as after a biased convolution of Omniglot's white
    background), so the native kernel is never handed one."""
    return x.ndim > 2 and x.stride(-1) != 1


class _NormalizeWithStatistics(torch.autograd.Function):
    """``(x - mean) * rsqrt(var + eps) * weight + bias``, statistics over ``dims``.

    Returns ``(out, mean, rstd)``; the statistics (non-differentiable) are kept for the
    backward, whose two passes would otherwise reduce over ``x`` again each time.

    The backward is written out, as the native batch-norm backward is, as one node
    (:class:`_NormalizeBackward`), so that MAML's inner gradient keeps only the layer's
    input, weight and incoming gradient for the outer backward: per inner step, no more
    than learn2learn's native layer (autograd's generic chain through ``var_mean`` also
    keeps ``x - mean``, and the backward in elementwise ops per-channel statistics).
    """

    @staticmethod
    def forward(x, weight, bias, dims, eps):
        # x - mean first: x * scale - mean * scale cancels in float32 when |mean| >> std,
        # and MAML's second derivative amplifies that error (about 20x on Conv4).
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        xc = x - mean
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight
        out = xc * scale if bias is None else torch.addcmul(bias, xc, scale)
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, dims, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.dims, ctx.eps = dims, eps
        ctx.bias_shape = None if bias is None else bias.shape

    @staticmethod
    def backward(ctx, g, _mean, _rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, sum_g_xhat, sum_g = _NormalizeBackward.apply(x, weight, g, mean, rstd, ctx.dims,
                                                         ctx.eps)
        dw = None if weight is None else sum_g_xhat.sum_to_size(weight.shape)
        db = None if ctx.bias_shape is None else sum_g.sum_to_size(ctx.bias_shape)
        return dx, dw, db, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, dims, eps):
        # Written by hand: generate_vmap_rule builds a new Function class per call.
        x_dim, w_dim, b_dim = in_dims[:3]
        x = task_first(x, x_dim, info.batch_size)
        # Batch norm whose tasks and channels merge into one dim without a copy (the
        # layout of a grouped convolution's output; not that of a convolution with weights
        # shared by all tasks, where a copy would be kept besides x), and not channels-last.
        if (x.ndim >= 3 and list(dims) == [0, *range(2, x.ndim - 1)] and not _channels_last(x)
                and x.stride(0) == x.shape[2] * x.stride(2)):
            return _task_batch_norm(x, weight, w_dim, bias, b_dim, eps), (1, 0, 0)
        return _task_normalize_written_out(x, weight, w_dim, bias, b_dim, dims, eps), (0, 0, 0)


class _NormalizeBackward(torch.autograd.Function):
    """The layer's backward as one node: ``(dx, sum(g * xhat), sum(g))`` from
    ``(x, weight, g)`` and the forward's statistics ``mean`` and ``rstd`` of ``x``.

    As a Function it saves only ``x``, ``weight``, ``g`` and the statistics, which the graph
    holds anyway; written in elementwise ops, autograd would also save about ten
    per-channel statistics per layer and inner step. Its backward (the layer's second
    derivative, which MAML's outer step takes) is written out in differentiable ops; when
    its own graph is built (a third derivative), with the statistics recomputed from
    ``x``, so that stays exact as well.
    """

    @staticmethod
    def forward(x, weight, g, mean, rstd, dims, eps):
        # dx = a * (g - mean(g) - xhat * mean(g * xhat)), on x centred first for float32's
        # sake, as in the backward below; sum(xc) = 0, so mean(g * xhat) needs no centred g.
        xc = x - mean
        g_sum = g.sum(dim=dims, keepdim=True)
        n = prod([x.shape[d] for d in dims])
        g_xhat_mean = rstd * (g * xc).mean(dim=dims, keepdim=True)
        a = rstd if weight is None else rstd * weight
        dx = torch.addcmul(a * (g - g_sum / n), xc, -a * rstd * g_xhat_mean)
        return dx, g_xhat_mean * n, g_sum

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, g, mean, rstd, dims, eps = inputs
        ctx.save_for_backward(x, weight, g, mean, rstd)
        ctx.dims, ctx.eps = dims, eps

    @staticmethod
    def backward(ctx, gdx, c1, c2):
        # With xhat = r (x - mu), q = mean(g xhat) and u = gdx * weight, differentiating
        # <gdx, dx> + <c1, sum(g xhat)> + <c2, sum(g)> gives per-channel combinations of
        # x - mu, g - mean(g) and gdx (derived by hand; tests/test_norm_layers.py checks them
        # against finite differences): three elementwise passes instead of about twenty.
        # Centring x and g first keeps float32 from cancelling mu against x.
        x, weight, g, mu, r = ctx.saved_tensors
        dims = ctx.dims
        n = prod([x.shape[d] for d in dims])

        def total(t: torch.Tensor) -> torch.Tensor:
            return t.sum(dim=dims, keepdim=True)

        if gdx is None:
            gdx = torch.zeros_like(g)
        c1 = 0.0 if c1 is None else c1
        c2 = 0.0 if c2 is None else c2
        if torch.is_grad_enabled():  # this backward's graph needs them as functions of x
            var, mu = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
            r = torch.rsqrt(var + ctx.eps)
        xc, gc = x - mu, g - g.mean(dim=dims, keepdim=True)
        q = r * total(gc * xc) / n
        d_g, d_x, d_1 = total(gdx * gc), total(gdx * xc), total(gdx)
        w = 1.0 if weight is None else weight
        p = r * w * d_x  # sum(u xhat)
        s = w * d_g  # sum(u (g - mean g))
        u_mean = w * d_1 / n
        big_c = c1 - r * p / n
        big_d = r * r * (2 * p * q - s) / n
        grad_x = ((big_c * r) * gc + (big_d * r - big_c * r * r * q) * xc
                  + (-r * r * q * w) * gdx + r * r * q * u_mean)
        grad_g = (r * w) * gdx + (c1 * r - r * r * p / n) * xc + (c2 - r * u_mean)
        grad_w = None
        if weight is not None:
            grad_w = (r * d_g - r * r * q * d_x).sum_to_size(weight.shape)
        return grad_x, grad_w, grad_g, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, g, mean, rstd, dims, eps):
        tasks = info.batch_size
        x_dim, w_dim, g_dim, m_dim, r_dim = in_dims[:5]
        x, g = task_first(x, x_dim, tasks), task_first(g, g_dim, tasks)
        mean, rstd = task_first(mean, m_dim, tasks), task_first(rstd, r_dim, tasks)
        out = _NormalizeBackward.apply(x, leading(weight, w_dim, x.ndim), g, mean, rstd,
                                       [d + 1 for d in dims], eps)
        return out, (0, 0, 0)


def _task_normalize_written_out(x: torch.Tensor, weight: torch.Tensor | None,
                                w_dim: int | None, bias: torch.Tensor | None,
                                b_dim: int | None, dims: list[int], eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Function over every task at once: ``x`` is ``(tasks, ...)``, and so are the
    results.

    The layer is already batched over its statistics dims, so a batch of tasks is one more
    leading dim.
    """
    weight, bias = leading(weight, w_dim, x.ndim), leading(bias, b_dim, x.ndim)
    return _NormalizeWithStatistics.apply(x, weight, bias, [d + 1 for d in dims], eps)


def _task_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, w_dim: int | None,
                     bias: torch.Tensor | None, b_dim: int | None, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm of every task at once, as the native kernel over (task, channel) pairs.

    ``x`` is ``(tasks, N, C, ...)``; the result is ``(N, tasks, C, ...)``, with the
    kernel's mean and inverse std as ``(tasks, 1, C, 1, ...)`` views of what it saves
    (so the Function's backward keeps no statistics of its own). The native kernel runs
    below the vmap level, where only its first derivative is ever taken: a second
    derivative of the layer goes through the Function's written-out backward one level
    up. Fused, it is faster than the written-out forward, and it keeps only its input
    (a view of it) and per-channel statistics, unlike vmap's own batch-norm rule, which
    normalises without the affine and then scales, keeping a normalised copy as well.
    """
    tasks, n, c = x.shape[:3]
    flat = x.movedim(0, 1).reshape(n, tasks * c, *x.shape[3:])

    def per_task_channel(t: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.reshape(c) if dim is None else t.movedim(dim, 0).reshape(tasks, c)
        return t.expand(tasks, c).reshape(tasks * c)

    out, mean, invstd = torch.native_batch_norm(
        flat, per_task_channel(weight, w_dim), per_task_channel(bias, b_dim), None, None,
        True, 0.0, eps)
    stats_shape = (tasks, 1, c, *(1,) * (x.ndim - 3))
    return out.view(n, tasks, c, *x.shape[3:]), mean.view(stats_shape), invstd.view(stats_shape)


def _batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
    """Batch norm with the statistics of ``x`` (channels in dim 1), running stats untouched."""
    if native_kernels():
        if _channels_last(x):
            # Copy only then: under vmap, contiguous() would also copy a grouped
            # convolution's output.
            x = x.contiguous()
        # torch.batch_norm, not F.batch_norm: _FunctionalNorms would take it for the model's.
        return torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps,
                                torch.backends.cudnn.enabled)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    weight = None if weight is None else weight.view(shape)
    bias = None if bias is None else bias.view(shape)
    return _NormalizeWithStatistics.apply(x, weight, bias, [0, *range(2, x.ndim)], eps)[0]


def _batch_norm_with_batch_stats(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor):
    return _batch_norm(x, module.weight, module.bias, module.eps)


def _instance_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, channel_dim: int) -> torch.Tensor:
    """Instance norm with each instance's statistics; ``channel_dim`` 0 for unbatched input."""
    if native_kernels():
        batched = x if channel_dim else x.unsqueeze(0)
        out = torch.instance_norm(batched, weight, bias, None, None, True, 0.0, eps,
                                  torch.backends.cudnn.enabled)
        return out if channel_dim else out.squeeze(0)
    shape = (-1,) + (1,) * (x.ndim - channel_dim - 1)
    weight = None if weight is None else weight.view(shape)
    bias = None if bias is None else bias.view(shape)
    return _NormalizeWithStatistics.apply(x, weight, bias, list(range(channel_dim + 1, x.ndim)),
                                          eps)[0]


def _instance_norm_with_instance_stats(module: nn.modules.instancenorm._InstanceNorm,
                                       x: torch.Tensor):
    weight, bias = (module.weight, module.bias) if module.affine else (None, None)
    return _instance_norm(x, weight, bias, module.eps, x.ndim - module._get_no_batch_dim())


def _layer_norm_of(x: torch.Tensor, normalized_shape: tuple[int, ...],
                   weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    if native_kernels():
        return torch.layer_norm(x, normalized_shape, weight, bias, eps,
                                torch.backends.cudnn.enabled)
    # The Function centres x before scaling (x * rstd - mean * rstd had up to 1.7x the native
    # layer's float32 error in the second derivative) and keeps only x and the statistics.
    # Its weight is per channel over the statistics dims; LayerNorm's is elementwise there,
    # so the affine goes outside it.
    dims = list(range(x.ndim - len(normalized_shape), x.ndim))
    out = _NormalizeWithStatistics.apply(x, None, None, dims, eps)[0]
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor):
    return _layer_norm_of(x, tuple(module.normalized_shape), module.weight, module.bias,
                          module.eps)


def _exact_forward(m: nn.Module):
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _batch_norm_with_batch_stats
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and (
            m.training or not m.track_running_stats):
        return _instance_norm_with_instance_stats
    if isinstance(m, nn.LayerNorm):
        return _layer_norm
    return None


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Make BatchNorm use batch statistics, and normalisation layers exact under vmap.

    The MAML papers use batch statistics in training and at test time (transductive
    BatchNorm). Removing the running-stat buffers for the duration also keeps them from
    being updated in place, which ``vmap`` over tasks could not do. The buffers are put
    back untouched on exit. InstanceNorm that normalises with each instance's statistics
    (training mode, or no running statistics) and LayerNorm are computed here too; an
    InstanceNorm's running statistics are not updated.
    """
    with swapped_forwards(model, _exact_forward) as swapped:
        saved = [(m, m.running_mean, m.running_var) for m in swapped
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m, _, _ in saved:
            m.running_mean = None
            m.running_var = None
        try:
            yield
        finally:
            for m, mean, var in saved:
                m.running_mean, m.running_var = mean, var


# -- normalisation functions called by the model's own code --------------------------------
def _functional_batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                           training=False, momentum=0.1, eps=1e-5):
    # As for the modules: the batch's statistics, in every mode; running stats untouched.
    return _batch_norm(input, weight, bias, eps)


def _functional_instance_norm(input, running_mean=None, running_var=None, weight=None,
                              bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:  # an affine map with fixed statistics: exact natively
        return NotImplemented
    return _instance_norm(input, weight, bias, eps, channel_dim=1)


def _functional_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _layer_norm_of(input, tuple(normalized_shape), weight, bias, eps)


_FUNCTIONS = {F.batch_norm: _functional_batch_norm, F.instance_norm: _functional_instance_norm,
              F.layer_norm: _functional_layer_norm}


class _FunctionalNorms(TorchFunctionMode):
    """Computes ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` called by a model's
    own code as the modules are computed (:func:`batch_statistics`); records whether any was."""

    def __init__(self) -> None:
        super().__init__()
        self.used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _FUNCTIONS.get(func)
        if handler is not None:
            out = handler(*args, **kwargs)
            if out is not NotImplemented:
                self.used = True
                return out
        return func(*args, **kwargs)


# Whether a model's forward calls those functions, by model and training mode (a forward may
# branch on self.training): known after its first forward, which runs under the mode.
_CALLS_NORM_FUNCTIONS: WeakKeyDictionary[nn.Module, dict[bool, bool]] = WeakKeyDictionary()


@contextmanager
def norm_functions(model: nn.Module) -> Iterator[None]:
    """Make the normalisation functions the model calls itself exact under vmap, like the
    modules: ``F.batch_norm`` with the batch's statistics in every mode (running statistics
    neither used nor updated, as for ``nn.BatchNorm``), ``F.instance_norm`` with each
    instance's, ``F.layer_norm``. ``F.group_norm`` is exact natively.

    A ``TorchFunctionMode`` intercepts them; since it sees every torch call of the forward,
    it stays on only for the models whose first forward (in each of train and eval mode)
    called one.
    """
    seen = _CALLS_NORM_FUNCTIONS.setdefault(model, {})
    known = seen.get(model.training)
    if known is False:
        yield
        return
    mode = _FunctionalNorms()
    with mode:
        yield
    if known is None:
        seen[model.training] = mode.used
