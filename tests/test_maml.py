"""MAML and FOMAML against finite differences and a plain per-task loop."""

import pytest
import torch

from metalearn import FOMAML, MAML
from metalearn.data import SineTasks, TaskBatch
from metalearn.models import MLP, Conv4
from tests.reference import central_differences, maml_loop


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def tiny_sine_batch(dtype=torch.float64, tasks=3, seed=0):
    return SineTasks(shots=5, queries=6, seed=seed).sample(tasks).to("cpu", dtype)


def synthetic_image_batch(tasks=4, ways=5, shots=1, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    def split(n):
        x = torch.rand(tasks, ways * n, 1, 28, 28, generator=g)
        y = torch.arange(ways).repeat_interleave(n).repeat(tasks, 1)
        return x, y
    return TaskBatch(*split(shots), *split(queries))


def query_loss_after_adaptation(model, batch, inner_lr, steps, **flood):
    with torch.enable_grad():
        loss, _ = maml_loop(model, batch, inner_lr, steps, **flood)
    return loss


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_central_finite_differences(steps):
    torch.manual_seed(0)
    model = MLP(hidden=(6, 6)).double()
    batch = tiny_sine_batch()
    MAML(model, inner_lr=0.05, inner_steps=steps).step(batch)
    analytic = grads_of(model)

    def loss():
        return query_loss_after_adaptation(model, batch, 0.05, steps)

    for name, p in model.named_parameters():
        for j, numeric in central_differences(p, loss):
            assert analytic[name].view(-1)[j].item() == pytest.approx(
                numeric, rel=1e-5, abs=1e-8
            ), f"{name}[{j}]"


def test_finite_differences_detect_a_first_order_gradient():
    # The FD check must be able to fail: FOMAML's gradient is not the true one.
    torch.manual_seed(0)
    model = MLP(hidden=(6, 6)).double()
    batch = tiny_sine_batch()
    FOMAML(model, inner_lr=0.05, inner_steps=3).step(batch)
    p = model[0].weight
    old = p.data[0, 0].item()
    p.data[0, 0] = old + 1e-6
    up = query_loss_after_adaptation(model, batch, 0.05, 3)
    p.data[0, 0] = old - 1e-6
    down = query_loss_after_adaptation(model, batch, 0.05, 3)
    p.data[0, 0] = old
    numeric = ((up - down) / 2e-6).item()
    assert abs(p.grad[0, 0].item() - numeric) > 1e-4 * abs(numeric)


def test_flooded_maml_gradient_matches_finite_differences():
    torch.manual_seed(1)
    model = MLP(hidden=(6, 6)).double()
    batch = tiny_sine_batch(seed=3)
    for mode, level in (("batch", 50.0), ("instance", 1.0)):
        model.zero_grad()
        MAML(model, 0.05, 2, inner_flood=level, flood_mode=mode).step(batch)
        flood = {"inner_flood": level, "flood_mode": mode}
        p = model[2].weight
        for j in range(4):
            old = p.data.view(-1)[j].item()
            p.data.view(-1)[j] = old + 1e-6
            up = query_loss_after_adaptation(model, batch, 0.05, 2, **flood)
            p.data.view(-1)[j] = old - 1e-6
            down = query_loss_after_adaptation(model, batch, 0.05, 2, **flood)
            p.data.view(-1)[j] = old
            numeric = ((up - down) / 2e-6).item()
            assert p.grad.view(-1)[j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_batched_step_matches_per_task_loop_on_sine(first_order, steps):
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(shots=10, queries=10, seed=1).sample(8)
    metrics = MAML(model, 0.01, steps, first_order=first_order).step(batch)
    ref_loss, ref = maml_loop(model, batch, 0.01, steps, first_order=first_order)
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first_order", [False, True])
def test_batched_step_matches_per_task_loop_on_conv4(first_order):
    torch.manual_seed(0)
    model = Conv4(ways=5)
    batch = synthetic_image_batch()
    metrics = MAML(model, 0.4, 2, first_order=first_order).step(batch)
    ref_loss, ref = maml_loop(model, batch, 0.4, 2, first_order=first_order)
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5)


def test_fomaml_differs_from_maml_on_a_curved_loss():
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(seed=2).sample(4)
    MAML(model, 0.01, 2).step(batch)
    second = grads_of(model)
    model.zero_grad()
    FOMAML(model, 0.01, 2).step(batch)
    first = grads_of(model)
    gap = max((second[n] - first[n]).abs().max().item() for n in first)
    scale = max(second[n].abs().max().item() for n in second)
    assert gap > 1e-3 * scale


def test_zero_inner_steps_is_joint_training_and_fo_equals_so():
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(seed=2).sample(4)
    MAML(model, 0.01, 0).step(batch)
    a = grads_of(model)
    model.zero_grad()
    FOMAML(model, 0.01, 0).step(batch)
    for n, g in grads_of(model).items():
        torch.testing.assert_close(g, a[n])


def test_step_accumulates_like_backward():
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(seed=2).sample(4)
    maml = MAML(model, 0.01, 1)
    maml.step(batch)
    once = grads_of(model)
    maml.step(batch)
    for n, g in grads_of(model).items():
        torch.testing.assert_close(g, 2 * once[n])


def test_batchnorm_running_stats_are_left_alone():
    model = Conv4(ways=5)
    before = {n: b.clone() for n, b in model.named_buffers()}
    MAML(model, 0.4, 1).step(synthetic_image_batch())
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert model.features[1].running_mean is not None


def test_classification_metrics_include_accuracy():
    metrics = MAML(Conv4(ways=5), 0.4, 1).step(synthetic_image_batch())
    assert set(metrics) == {"loss", "accuracy"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
