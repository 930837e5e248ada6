"""Convolutions under vmap, task by task or merged into groups
(metalearn/kernels/task_convolution.py).

The reference is the plain per-task loop over the native layers, in float64; spies on the
vmap rules and on their choice make sure the path named is the one tested.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from metalearn import FOMAML, MAML, Reptile
from metalearn.data import TaskBatch
from metalearn.kernels import current_settings, kernel_settings, task_convolution
from metalearn.kernels.task_convolution import _Conv2d, _Conv2dBackward
from tests.reference import maml_loop, reptile_loop


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
    ).double()


def batch(per_task: int, tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat(per_task // 5 + 1)[:per_task].repeat(tasks, 1)
    def x():
        return torch.rand(tasks, per_task, 1, 10, 10, generator=g, dtype=torch.float64)
    return TaskBatch(x(), y, x(), y.clone())


@pytest.fixture
def rule_calls(monkeypatch):
    """How often each vmap rule ran."""
    calls = {"conv": 0, "backward": 0}
    for cls, key in ((_Conv2d, "conv"), (_Conv2dBackward, "backward")):
        rule = cls.vmap
        def counted(*args, rule=rule, key=key):
            calls[key] += 1
            return rule(*args)
        monkeypatch.setattr(cls, "vmap", staticmethod(counted))
    return calls


@pytest.fixture
def loop_choices(monkeypatch):
    """Every choice of the rules between the per-task loop (True) and groups (False)."""
    choices = []
    choose = task_convolution._per_task_loop
    def recorded(x):
        choices.append(choose(x))
        return choices[-1]
    monkeypatch.setattr(task_convolution, "_per_task_loop", recorded)
    return choices


@pytest.mark.parametrize("per_task_loop", [True, False], ids=["per-task", "groups"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_gradient_matches_native_per_task_loop(algorithm, per_task_loop, rule_calls,
                                               loop_choices):
    model = net()
    tasks = batch(current_settings().per_task_min_batch - (0 if per_task_loop else 1))
    if algorithm == "reptile":
        Reptile(model, 0.3, 2).step(tasks)
        ref = reptile_loop(model, tasks, 0.3, 2)
    else:
        (MAML if algorithm == "maml" else FOMAML)(model, 0.3, 2).step(tasks)
        _, ref = maml_loop(model, tasks, 0.3, 2, first_order=algorithm == "fomaml")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-9, atol=1e-12)
    # The inner steps' gradients and the forwards went through the rules, by the path named;
    # small batches in first-order inner loops (never differentiated twice) are vmap's.
    if per_task_loop or algorithm == "maml":
        assert rule_calls["conv"] > 0 and rule_calls["backward"] > 0, rule_calls
    else:
        assert rule_calls["backward"] == 0, rule_calls
    assert set(loop_choices) == ({per_task_loop} if rule_calls["conv"] else set())


def test_small_batches_can_be_left_to_vmap(rule_calls):
    model = net()
    with kernel_settings(tasks_as_groups=False):
        MAML(model, 0.3, 1).step(batch(current_settings().per_task_min_batch - 1))
    assert rule_calls == {"conv": 0, "backward": 0}
    with pytest.raises(TypeError, match="unknown kernel settings"):
        with kernel_settings(tasks_as_group=False):
            pass


def test_per_task_min_batch_is_a_setting(rule_calls, loop_choices):
    with kernel_settings(per_task_min_batch=4):
        MAML(net(), 0.3, 1).step(batch(5))
    assert set(loop_choices) == {True}


def test_groups_avoid_torchs_per_group_double_backward():
    # torch's double backward of a grouped convolution runs one convolution per group, so
    # its count grows with the tasks; this module's written-out one is one per term.
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    def convolutions(as_groups: bool, tasks: int) -> int:
        counts.clear()
        with kernel_settings(tasks_as_groups=as_groups), Ops():
            MAML(net(), 0.3, 2).step(batch(5, tasks))
        return counts["aten.convolution"] + counts["aten.convolution_backward"]

    counts = collections.Counter()
    assert convolutions(True, 3) == convolutions(True, 6)
    assert convolutions(False, 3) < convolutions(False, 6)  # what the groups path avoids


@pytest.mark.parametrize("groups", [1, 2])
def test_written_out_derivatives_match_finite_differences(groups):
    # The Functions outside vmap, to the third derivative of the convolution: gradcheck and
    # gradgradcheck of the backward node check its own written-out backward.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    conv = ((2, 2), (1, 1), (1, 1), groups)
    tol = {"atol": 1e-8, "rtol": 1e-6}
    for fn, inputs in ((lambda x, w, b: _Conv2d.apply(x, w, b, *conv), (x, w, b)),
                       (lambda g, x, w: _Conv2dBackward.apply(g, x, w, *conv, (True,) * 3),
                        (g, x, w))):
        assert torch.autograd.gradcheck(fn, inputs, **tol)
        assert torch.autograd.gradgradcheck(fn, inputs, **tol)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_meta_loss_compiles_with_the_groups_path(rule_calls):
    # Dynamo traced the vmap rules as frames of their own, and inductor failed on them once
    # the layers' differing shapes made them dynamic; they now run eagerly.
    model = net().float()
    learner = MAML(model, 0.1, 1)
    tasks = batch(5).to("cpu", torch.float32)
    model.zero_grad()
    learner.step(tasks)
    eager = [p.grad.clone() for p in model.parameters()]
    rule_calls.update(conv=0, backward=0)
    torch._dynamo.reset()
    try:
        model.zero_grad()
        loss, _ = torch.compile(learner.meta_loss)(tasks)
        loss.backward()
    finally:
        torch._dynamo.reset()
    assert rule_calls["conv"] > 0 and rule_calls["backward"] > 0  # the groups path ran
    for p, e in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
