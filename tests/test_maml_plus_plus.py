"""MAML++: each ingredient against MAML, the reference schedule and a plain per-task loop."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn import MAML, MAMLPlusPlus
from metalearn.algorithms.maml_plus_plus import msl_weights
from metalearn.algorithms.meta_sgd import param_key
from metalearn.cli import _config_from, build_parser
from metalearn.config import build_learner
from metalearn.data import SineTasks
from metalearn.models import MLP, Conv4
from tests.reference import batch_stats_copy, losses_of
from tests.test_maml import grads_of, synthetic_image_batch, tiny_sine_batch

OFF = dict(lslr=False, multi_step_loss=False, per_step_bn=False, first_order_iterations=0)


def bn_mlp():
    return nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                         nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).double()


def mamlpp_loop(model, batch, steps, lrs, bn, weights, first_order=False):
    """Per-task MAML++ with autograd.grad: per-step lrs ``{name: (rows,)}``, per-step BN rows
    ``{name: (rows, C)}`` (not adapted), loss ``sum_k weights[k] * query loss after step k``.
    Returns (loss, grads of theta, of the lrs, of the BN rows)."""
    net = batch_stats_copy(model)
    theta = dict(net.named_parameters())
    lr_t = {n: t.detach().clone().requires_grad_() for n, t in lrs.items()}
    bn_t = {n: t.detach().clone().requires_grad_() for n, t in bn.items()}
    total = 0.0
    for i in range(len(batch)):
        adapted = {n: v for n, v in theta.items() if n not in bn_t}
        for k in range(steps):
            rows = {n: t[k] for n, t in bn_t.items()}
            inner = losses_of(functional_call(net, {**adapted, **rows}, (batch.support_x[i],)),
                              batch.support_y[i]).mean()
            grads = torch.autograd.grad(inner, list(adapted.values()),
                                        create_graph=not first_order)
            adapted = {n: v - lr_t[n][k] * g for (n, v), g in zip(adapted.items(), grads)}
            if weights[k]:
                out = functional_call(net, {**adapted, **rows}, (batch.query_x[i],))
                total = total + weights[k] * losses_of(out, batch.query_y[i]).mean()
    loss = total / len(batch)
    leaves = [*theta.values(), *lr_t.values(), *bn_t.values()]
    grads = dict(zip([*theta, *(f"lr:{n}" for n in lr_t), *(f"bn:{n}" for n in bn_t)],
                     torch.autograd.grad(loss, leaves, allow_unused=True)))
    return loss.detach(), grads


def learned_tables(learner, seed=0):
    """Random per-step lrs and BN rows, written into the learner; returned by name."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in learner.learned.lrs.values():
            t.copy_(0.05 + 0.1 * torch.rand(t.shape, generator=g, dtype=t.dtype))
        for t in learner.learned.bn.values():
            t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    names = learner.fmodel.params()
    lrs = {n: learner.learned.lrs[param_key(n)] for n in names if param_key(n) in
           learner.learned.lrs}
    bn = {n: learner.learned.bn[param_key(n)] for n in learner.bn_names}
    return lrs, bn


@pytest.mark.parametrize("make, batch", [
    (MLP, SineTasks(seed=2).sample(4)),
    (lambda: Conv4(ways=5, hidden=8), synthetic_image_batch()),
])
def test_all_ingredients_off_is_maml_exactly(make, batch):
    torch.manual_seed(0)
    model = make()
    metrics = MAMLPlusPlus(model, 0.1, 2, **OFF).step(batch)
    plus = grads_of(model)
    model.zero_grad()
    assert metrics["loss"] == MAML(model, 0.1, 2).step(batch)["loss"]
    for n, g in grads_of(model).items():
        assert torch.equal(plus[n], g), n


def reference_importance_vector(n_steps, epoch, msl_epochs):
    """The reference code's get_per_step_loss_importance_vector, transcribed."""
    loss_weights = np.ones(shape=(n_steps,)) * (1.0 / n_steps)
    decay_rate = 1.0 / n_steps / msl_epochs
    min_value_for_non_final_losses = 0.03 / n_steps
    for i in range(len(loss_weights) - 1):
        loss_weights[i] = np.maximum(loss_weights[i] - (epoch * decay_rate),
                                     min_value_for_non_final_losses)
    loss_weights[-1] = np.minimum(loss_weights[-1] + (epoch * (n_steps - 1) * decay_rate),
                                  1.0 - ((n_steps - 1) * min_value_for_non_final_losses))
    return loss_weights


@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_msl_weights_follow_the_reference_schedule(n_steps):
    for epoch in range(10):  # the reference code's 10 epochs of 500 iterations
        ours = msl_weights(n_steps, epoch * 500, 10 * 500)
        np.testing.assert_allclose(ours, reference_importance_vector(n_steps, epoch, 10))
    assert msl_weights(5, 2500, 5000)[-1] > msl_weights(5, 0, 5000)[-1]
    assert msl_weights(n_steps, 5000, 5000) == [0.0] * (n_steps - 1) + [1.0]


@pytest.mark.parametrize("first_order", [False, True])
def test_everything_on_matches_per_task_loop(first_order):
    torch.manual_seed(0)
    model = bn_mlp()
    batch = tiny_sine_batch(tasks=4)
    learner = MAMLPlusPlus(model, 0.1, 3, first_order=first_order, msl_iterations=10)
    learner.iteration = 4
    lrs, bn = learned_tables(learner)
    assert set(bn) == {"1.weight", "1.bias", "4.weight", "4.bias"}
    metrics = learner.step(batch)
    weights = msl_weights(3, 4, 10)
    assert len(set(weights)) == 2  # the annealing is under way
    objective, ref = mamlpp_loop(model, batch, 3, lrs, bn, weights, first_order)
    assert metrics["objective"] == pytest.approx(objective.item(), rel=1e-10)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n in bn), n  # the model's own BN affine is unused
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-8, atol=1e-10)
    for n, t in [*lrs.items()]:
        torch.testing.assert_close(t.grad, ref[f"lr:{n}"], rtol=1e-8, atol=1e-10)
    for n, t in bn.items():
        torch.testing.assert_close(t.grad, ref[f"bn:{n}"], rtol=1e-8, atol=1e-10)
        assert (t.grad.abs().sum(1) > 0).all(), n  # every step's row is learned
    assert learner.iteration == 5


def test_meta_gradient_matches_finite_differences():
    torch.manual_seed(1)
    model = bn_mlp()
    batch = tiny_sine_batch(tasks=2, seed=4)
    learner = MAMLPlusPlus(model, 0.1, 2, msl_iterations=10)
    lrs, bn = learned_tables(learner, seed=3)
    learner.step(batch)
    weights = msl_weights(2, 0, 10)
    for tensor in (lrs["3.weight"], bn["4.weight"], bn["1.bias"], model[3].weight):
        flat, analytic = tensor.data.view(-1), tensor.grad.view(-1)
        for j in range(min(3, len(flat))):
            old = flat[j].item()
            flat[j] = old + 1e-6
            with torch.enable_grad():
                up = mamlpp_loop(model, batch, 2, lrs, bn, weights)[0].item()
            flat[j] = old - 1e-6
            with torch.enable_grad():
                down = mamlpp_loop(model, batch, 2, lrs, bn, weights)[0].item()
            flat[j] = old
            assert analytic[j].item() == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8)


def test_derivative_order_annealing_switches_after_n_iterations():
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(seed=2).sample(4)
    annealed = MAMLPlusPlus(model, 0.01, 2, **dict(OFF, first_order_iterations=1))
    grads = []
    for _ in range(2):
        model.zero_grad()
        annealed.step(batch)
        grads.append(grads_of(model))
    for first_order, expected in ((True, grads[0]), (False, grads[1])):
        model.zero_grad()
        MAML(model, 0.01, 2, first_order=first_order).step(batch)
        for n, g in grads_of(model).items():
            torch.testing.assert_close(expected[n], g)
    assert not torch.allclose(grads[0]["0.weight"], grads[1]["0.weight"])


def test_state_round_trip_and_steps_beyond_the_tables():
    torch.manual_seed(0)
    model = bn_mlp()
    batch = tiny_sine_batch(tasks=2)
    learner = MAMLPlusPlus(model, 0.1, 2)
    learned_tables(learner)
    learner.iteration = 7
    restored = MAMLPlusPlus(model, 0.1, 2)
    restored.load_state_dict(learner.state_dict())
    assert restored.iteration == 7
    path = restored.adapt(batch.support_x, batch.support_y, steps=4, trajectory=True)
    bn1 = learner.learned.bn["1-weight"]
    for k, row in ((0, 0), (1, 0), (2, 1), (4, 1)):  # after k updates: row k - 1, clamped
        torch.testing.assert_close(path[k]["1.weight"], bn1[row].detach().expand(2, -1))
    direct = restored.adapt(batch.support_x, batch.support_y, steps=4)
    torch.testing.assert_close(direct["0.weight"], path[4]["0.weight"])


def test_cli_switches_reach_the_learner():
    args = build_parser().parse_args(["train", "--algorithm", "mamlpp", "--no-msl", "--lslr",
                                      "--first-order-iterations", "3", "--no-per-step-bn"])
    cfg = _config_from(args, algorithm=args.algorithm).resolved()
    learner = build_learner(cfg, MLP())
    assert isinstance(learner, MAMLPlusPlus)
    assert (learner.multi_step_loss, learner.lslr, learner.per_step_bn) == (False, True, False)
    assert (learner.first_order_iterations, learner.msl_iterations) == (3, 5000)
    with pytest.raises(ValueError, match="same model"):
        build_learner(cfg, MLP(), share=learner)
    assert build_learner(cfg, learner.model, share=learner).learned is learner.learned
