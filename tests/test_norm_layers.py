"""Normalisation layers in a user's model: exact meta-gradients under vmap.

In torch 2.13 the second derivative of the native affine batch, instance and layer norms
under ``vmap`` is wrong (about 1e-2 relative in float64 for these models); the learners
compute them in metalearn/kernels/norm_layers.py instead. The reference is the plain
per-task loop over the native layers, in float64, so a wrong double backward shows up as
an error far above round-off.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from metalearn import FOMAML, MAML, Reptile
from metalearn.algorithms.functional_model import FunctionalModel
from metalearn.kernels.norm_layers import (
    _NormalizeBackward,
    _NormalizeWithStatistics,
    batch_statistics,
)
from metalearn.memory import SavedTensorMeter
from tests.reference import maml_loop, reptile_loop
from tests.test_maml import synthetic_image_batch

NORMS = {
    "batch, affine": lambda: nn.BatchNorm2d(8),
    "batch, no affine": lambda: nn.BatchNorm2d(8, affine=False),
    "instance, affine": lambda: nn.InstanceNorm2d(8, affine=True),
    "instance, plain": lambda: nn.InstanceNorm2d(8),
    "instance, running stats in eval": lambda: nn.InstanceNorm2d(
        8, affine=True, track_running_stats=True).eval(),
    "layer, over C,H,W": lambda: nn.LayerNorm([8, 13, 13]),
    "layer, last dim, no bias": lambda: nn.LayerNorm(13, bias=False),
    "layer, no affine": lambda: nn.LayerNorm(13, elementwise_affine=False),
    "group": lambda: nn.GroupNorm(2, 8),
    "rms": lambda: nn.RMSNorm([13, 13]),
}


def small_net(norm: nn.Module) -> nn.Module:
    # No bias before the norm: its true gradient is 0, which makes relative errors noise.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, 2, bias=False), norm, nn.ReLU(),
                        nn.Conv2d(8, 8, 3, 2), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    with torch.no_grad():  # non-trivial affine parameters, so that they matter
        for name, p in net.named_parameters():
            if name.startswith("1."):
                p.add_(0.3 * torch.randn_like(p))
    return net.double()


def float64_batch():
    b = synthetic_image_batch()
    return type(b)(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y)


@pytest.mark.parametrize("norm", list(NORMS))
def test_maml_gradient_matches_native_per_task_loop(norm):
    model = small_net(NORMS[norm]())
    batch = float64_batch()
    MAML(model, 0.4, 2).step(batch)
    _, ref = maml_loop(model, batch, 0.4, 2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_first_order_gradient_matches_native_per_task_loop(norm, algorithm):
    # First-order paths run the native kernels (forwards of order 0): their first
    # derivatives under vmap must be exact.
    model = small_net(NORMS[norm]())
    batch = float64_batch()
    if algorithm == "fomaml":
        FOMAML(model, 0.4, 3).step(batch)
        _, ref = maml_loop(model, batch, 0.4, 3, first_order=True)
    else:
        Reptile(model, 0.4, 3).step(batch)
        ref = reptile_loop(model, batch, 0.4, 3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-9, atol=1e-12)


def _autograd_nodes(out: torch.Tensor) -> set[str]:
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node.name() in seen:
            continue
        seen.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return seen


def test_native_kernels_only_for_order_zero():
    model = small_net(nn.BatchNorm2d(8))
    x = float64_batch().support_x[0]
    f = FunctionalModel(model)
    exact = _autograd_nodes(f(f.params(), x))
    assert _autograd_nodes(f(f.params(), x, order=1)) == exact
    native = _autograd_nodes(f(f.params(), x, order=0))
    assert not any("NativeBatchNorm" in n for n in exact), exact
    assert any("NativeBatchNorm" in n for n in native), native
    assert _autograd_nodes(f(f.params(), x)) == exact  # the order applies to its call only
    with pytest.raises(ValueError, match="order must be 0, 1 or 2"):
        f(f.params(), x, order=3)


@pytest.mark.parametrize("norm", list(NORMS))
def test_forward_equals_the_native_layer(norm):
    model = small_net(NORMS[norm]())
    x = float64_batch().support_x[0]
    expected = model(x)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    f = FunctionalModel(model)
    torch.testing.assert_close(f(f.params(), x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f(f.params(), x, order=0), expected, rtol=1e-12, atol=1e-12)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)


def test_instance_norm_running_stats_are_left_alone_in_training():
    model = small_net(nn.InstanceNorm2d(8, affine=True, track_running_stats=True))
    norm = model[1]
    before = norm.running_mean.clone(), norm.running_var.clone()
    MAML(model, 0.4, 1).step(float64_batch())
    assert torch.equal(norm.running_mean, before[0])
    assert torch.equal(norm.running_var, before[1])
    assert "forward" not in vars(norm)  # the patch is undone


def test_unbatched_instance_norm_input():
    norm = nn.InstanceNorm1d(3, affine=True).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 7, dtype=torch.float64)  # (C, L): no batch dimension
    f = FunctionalModel(norm)
    torch.testing.assert_close(f(f.params(), x), norm(x))
    torch.testing.assert_close(f(f.params(), x, order=0), norm(x))


def test_inner_step_keeps_no_more_than_the_native_batch_norm():
    # The native batch-norm double backward keeps the layer's input and the incoming
    # gradient per inner step; autograd's generic chain through var_mean also keeps
    # x - mean, one activation more (6 instead of 5 here). The reference is the per-task
    # loop over the native layers, measured the same way.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 28 * 28, 5)).double()
    batch = float64_batch()
    activation = batch.support_x[:, :, :1].numel() * 8 * 8  # bytes, all tasks

    def per_step(meta_step):
        peak = []
        for steps in (1, 3):
            with SavedTensorMeter() as meter:
                meta_step(steps)
            peak.append(meter.peak_bytes)
        return (peak[1] - peak[0]) / 2 / activation

    ours = per_step(lambda steps: MAML(net, 0.4, steps).step(batch))
    native = per_step(lambda steps: maml_loop(net, batch, 0.4, steps))
    assert 4 < native < 6
    # The backward is one node that saves only x, weight and g: no per-channel statistics
    # beyond what the native layer keeps (its saved mean and inverse std).
    assert ours <= native, (ours, native)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dims", [[0, 2, 3], [2, 3]], ids=["batch", "instance"])
def test_written_out_derivatives_match_finite_differences(weighted, dims):
    # First and second derivatives of the layer, and the derivative of its backward node
    # (a third derivative of the layer), against central differences in float64.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    shape = (1, 3, 1, 1)
    w = (1 + 0.3 * torch.randn(shape, dtype=torch.float64)).requires_grad_() if weighted else None
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def layer(x, w, b):
        return _NormalizeWithStatistics.apply(x, w, b, dims, 1e-5)[0]

    def backward_node(x, w, g):
        with torch.no_grad():  # as the forward passes them: constants to autograd
            var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return _NormalizeBackward.apply(x, w, g, mean, torch.rsqrt(var + 1e-5), dims, 1e-5)

    # gradcheck's default rtol of 1e-3 would pass a term off by 0.1%.
    tol = {"atol": 1e-8, "rtol": 1e-6}
    for fn, inputs in ((layer, (x, w, b)), (backward_node, (x, w, g))):
        assert torch.autograd.gradcheck(fn, inputs, **tol)
        assert torch.autograd.gradgradcheck(fn, inputs, **tol)

    # The backward node's backward takes the forward's statistics unless its own graph is
    # built, when it recomputes them from x: both must give the same values.
    outputs = backward_node(x, w, g)
    cotangents = [torch.randn_like(t) for t in outputs]
    needs = [t for t in (x, w, g) if t is not None]
    plain = torch.autograd.grad(outputs, needs, cotangents, retain_graph=True)
    graphed = torch.autograd.grad(outputs, needs, cotangents, create_graph=True)
    for a, b_ in zip(plain, graphed):
        torch.testing.assert_close(a, b_.detach(), rtol=1e-12, atol=1e-14)


def test_float32_error_no_worse_than_the_native_layer():
    # A channel whose mean is far above its spread (as after a biased convolution of
    # Omniglot's white background): x * scale - mean * scale would lose the difference
    # in float32, and MAML's outer step amplifies that (5x worse meta-gradients on Conv4).
    # Each output's float32 error against float64 must be within 1.5x the native layer's.
    torch.manual_seed(0)
    x = 10.0 + 0.01 * torch.randn(16, 4, 6, 6, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(4, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    v, u = torch.randn_like(x), torch.randn_like(x)

    def ours(x, w, b):
        return _NormalizeWithStatistics.apply(x, w.view(1, -1, 1, 1), b.view(1, -1, 1, 1),
                                              [0, 2, 3], 1e-5)[0]

    def native(x, w, b):
        return torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)

    def outputs(layer, dtype):
        xd, wd, bd = (t.to(dtype).requires_grad_() for t in (x, w, b))
        y = layer(xd, wd, bd)
        gx, gw = torch.autograd.grad(y, (xd, wd), v.to(dtype), create_graph=True)
        hx, hw = torch.autograd.grad((gx * u.to(dtype)).sum() + gw.sum(), (xd, wd))
        return [t.detach().double() for t in (y, gx, gw, hx, hw)]

    def errors(layer):
        return [((lo - hi).norm() / hi.norm()).item()
                for lo, hi in zip(outputs(layer, torch.float32), outputs(layer, torch.float64))]

    for name, e_ours, e_native in zip(["y", "dy/dx", "dy/dw", "d2/dx", "d2/dw"],
                                      errors(ours), errors(native)):
        assert e_ours <= 1.5 * e_native, (name, e_ours, e_native)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_float32_error_no_worse_than_the_native_layer(affine):
    # The same regime for LayerNorm, through the layer a learner runs: each output's and
    # first and second derivative's float32 error within 1.5x the native layer's. The input
    # is exact in float32, so only the layers' own arithmetic differs.
    torch.manual_seed(0)
    x = (10.0 + 0.01 * torch.randn(16, 4, 6, 6, dtype=torch.float64)).float().double()
    v, u = torch.randn_like(x), torch.randn_like(x)
    reference = nn.LayerNorm([4, 6, 6], elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            reference.weight.add_(0.3 * torch.randn_like(reference.weight))
            reference.bias.normal_()

    def outputs(exact_under_vmap, dtype):
        layer = nn.LayerNorm([4, 6, 6], elementwise_affine=affine).to(dtype)
        layer.load_state_dict(reference.state_dict())
        xd = x.to(dtype).requires_grad_()
        inputs = [xd, *layer.parameters()]
        with batch_statistics(layer) if exact_under_vmap else contextlib.nullcontext():
            y = layer(xd)
        first = torch.autograd.grad(y, inputs, v.to(dtype), create_graph=True)
        second = torch.autograd.grad(
            (first[0] * u.to(dtype)).sum() + sum((g * g).sum() for g in first[1:]), inputs,
            allow_unused=True, materialize_grads=True)
        return [t.detach().double() for t in (y, *first, *second)]

    def errors(exact_under_vmap):
        return [((lo - hi).norm() / hi.norm()).item() if hi.norm() > 0 else 0.0
                for lo, hi in zip(outputs(exact_under_vmap, torch.float32),
                                  outputs(exact_under_vmap, torch.float64))]

    ours, native = errors(True), errors(False)
    assert max(ours) > 0
    for i, (e_ours, e_native) in enumerate(zip(ours, native)):
        assert e_ours <= 1.5 * e_native, (i, e_ours, e_native)


CHANNELS_LAST = {
    # (tasks, N, C, H, W) stored as (tasks, N, H, W, C): each task's batch channels-last.
    "per task": (0, 1, 3, 4, 2),
    # stored as (N, H, W, tasks, C): a grouped convolution's channels-last output, where
    # tasks and channels merge into one channels-last dim without a copy.
    "grouped": (1, 3, 4, 0, 2),
}


def _stored_as(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    return x.permute(order).contiguous().permute([order.index(d) for d in range(x.ndim)])


@pytest.mark.parametrize("layout", list(CHANNELS_LAST))
@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("per_task_weights", [False, True])
@pytest.mark.parametrize("order", [2, 0])
def test_channels_last_input_is_as_exact_in_float32(layout, tasks, per_task_weights, order):
    # torch's channels-last CPU batch-norm kernel computes the statistics less exactly in
    # float32 (20-30x the standard layout's error when a channel's mean is far above its
    # spread); the layers must not hand it a channels-last input. Per-task weights take
    # the native kernel in the exact path, shared ones the written-out forward.
    torch.manual_seed(0)
    x = 3.0 + 0.05 * torch.randn(tasks, 40, 64, 6, 6, dtype=torch.float64)
    v = torch.randn_like(x)
    layer = nn.BatchNorm2d(64).double()
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(64, dtype=torch.float64))

    def outputs(xd: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        f = FunctionalModel(layer.to(dtype))
        params = {k: p.detach().requires_grad_() for k, p in f.params().items()}
        batched = {k: p.expand(tasks, *p.shape) for k, p in params.items()}
        xd = xd.to(dtype).requires_grad_()
        y = torch.func.vmap(f, in_dims=(0 if per_task_weights else None, 0, None))(
            batched if per_task_weights else params, xd, order)
        grads = torch.autograd.grad(y, (xd, params["weight"]), v.to(dtype))
        return [t.detach().double() for t in (y, *grads)]

    reference = outputs(x.clone(), torch.float64)
    standard = outputs(x.float(), torch.float32)
    channels_last = outputs(_stored_as(x.float(), CHANNELS_LAST[layout]), torch.float32)
    for name, hi, e_std, e_cl in zip(["y", "dy/dx", "dy/dw"], reference, standard,
                                     channels_last):
        err_std = ((e_std - hi).norm() / hi.norm()).item()
        err_cl = ((e_cl - hi).norm() / hi.norm()).item()
        assert err_cl <= 1.5 * err_std, (name, err_cl, err_std)
