"""Flooding (Ishida et al. 2020) and iFlood (Xie et al. 2022) in the inner loop."""

import pytest
import torch

from metalearn import MAML
from metalearn.algorithms.losses import flooded_mean
from metalearn.data import SineTasks
from metalearn.models import MLP
from tests.reference import losses_of


def test_formulas():
    losses = torch.tensor([0.2, 0.6, 1.0])
    assert flooded_mean(losses, None).item() == pytest.approx(0.6)
    assert flooded_mean(losses, 0.5, "batch").item() == pytest.approx(0.6)  # above: unchanged
    assert flooded_mean(losses, 0.8, "batch").item() == pytest.approx(0.2 + 0.8)
    expected = ((0.5 - 0.2) + 0.5 + (0.6 - 0.5) + 0.5 + (1.0 - 0.5) + 0.5) / 3
    assert flooded_mean(losses, 0.5, "instance").item() == pytest.approx(expected)


def one_step_update(level, mode):
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(shots=6, seed=4).sample(1)
    maml = MAML(model, 0.01, 1, inner_flood=level, flood_mode=mode)
    fast = maml.adapt(batch.support_x[0], batch.support_y[0])
    params = dict(model.named_parameters())
    losses = losses_of(model(batch.support_x[0]), batch.support_y[0])
    return params, fast, losses


def test_batch_flood_flips_the_inner_gradient_below_the_level():
    params, fast, losses = one_step_update(level=1e6, mode="batch")  # L < b
    grads = torch.autograd.grad(losses.mean(), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(fast[name], p.detach() + 0.01 * g)  # ascent


def test_batch_flood_is_plain_descent_above_the_level():
    params, fast, losses = one_step_update(level=1e-9, mode="batch")
    grads = torch.autograd.grad(losses.mean(), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(fast[name], p.detach() - 0.01 * g)


def test_iflood_acts_per_instance():
    _, _, losses = one_step_update(level=None, mode="batch")
    level = losses.median().item() + 1e-4  # some examples below, some above
    params, fast, losses = one_step_update(level=level, mode="instance")
    signs = torch.sign(losses.detach() - level)
    assert (signs > 0).any() and (signs < 0).any()
    grads = torch.autograd.grad((signs * losses).mean(), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(fast[name], p.detach() - 0.01 * g)
    # ... which is not what batch flooding at the same level does.
    _, fast_batch, _ = one_step_update(level=level, mode="batch")
    assert not torch.allclose(fast_batch["0.weight"], fast["0.weight"])


def test_zero_level_means_off():
    _, off, _ = one_step_update(level=None, mode="batch")
    _, zero, _ = one_step_update(level=0.0, mode="instance")
    for name in off:
        torch.testing.assert_close(off[name], zero[name])
