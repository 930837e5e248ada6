"""Meta-SGD against MAML, finite differences and a plain per-task loop."""

import pytest
import torch
from torch.func import functional_call

from metalearn import MAML, MetaSGD
from metalearn.algorithms.meta_sgd import param_key
from metalearn.config import TrainConfig, build_learner
from metalearn.data import SineTasks
from metalearn.models import MLP
from tests.reference import batch_stats_copy, central_differences, losses_of
from tests.test_maml import grads_of, tiny_sine_batch


def meta_sgd_loop(model, lrs, batch, steps, first_order=False):
    """Per-task Meta-SGD with torch.autograd.grad; returns (loss, theta grads, lr grads)."""
    net = batch_stats_copy(model)
    theta = dict(net.named_parameters())
    alpha = {n: lrs[n].detach().clone().requires_grad_() for n in theta}
    total = 0.0
    for i in range(len(batch)):
        fast = dict(theta)
        for _ in range(steps):
            inner = losses_of(functional_call(net, fast, (batch.support_x[i],)),
                              batch.support_y[i]).mean()
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=not first_order)
            fast = {k: v - alpha[k] * g for (k, v), g in zip(fast.items(), grads)}
        out = functional_call(net, fast, (batch.query_x[i],))
        total = total + losses_of(out, batch.query_y[i]).mean()
    loss = total / len(batch)
    grads = torch.autograd.grad(loss, [*theta.values(), *alpha.values()])
    n = len(theta)
    return loss.detach(), dict(zip(theta, grads[:n])), dict(zip(theta, grads[n:]))


def random_rates(learner, low=0.005, high=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.learned.values():
            p.copy_(low + (high - low) * torch.rand(p.shape, generator=g, dtype=p.dtype))
    return {n: learner.learned[param_key(n)].detach() for n in learner.fmodel.params()}


def lr_grads(learner):
    return {n: learner.learned[param_key(n)].grad.clone() for n in learner.fmodel.params()}


@pytest.mark.parametrize("steps", [1, 3])
def test_equal_rates_give_maml(steps):
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(seed=2).sample(4)
    metrics = MetaSGD(model, 0.01, steps).step(batch)
    meta_sgd = grads_of(model)
    model.zero_grad()
    assert metrics["loss"] == pytest.approx(MAML(model, 0.01, steps).step(batch)["loss"])
    for n, g in grads_of(model).items():
        torch.testing.assert_close(meta_sgd[n], g)


@pytest.mark.parametrize("first_order", [False, True])
def test_batched_step_matches_per_task_loop(first_order):
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(shots=10, queries=10, seed=1).sample(6)
    learner = MetaSGD(model, 0.01, 2, first_order=first_order)
    rates = random_rates(learner)
    metrics = learner.step(batch)
    ref_loss, ref_theta, ref_lr = meta_sgd_loop(model, rates, batch, 2, first_order)
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref_theta[name], rtol=1e-4, atol=1e-5)
    for name, g in lr_grads(learner).items():
        torch.testing.assert_close(g, ref_lr[name], rtol=1e-4, atol=1e-5)


def test_rate_and_weight_gradients_match_finite_differences():
    torch.manual_seed(0)
    model = MLP(hidden=(6, 6)).double()
    batch = tiny_sine_batch()
    learner = MetaSGD(model, 0.05, 2)
    rates = random_rates(learner, 0.02, 0.08)
    learner.step(batch)
    eps = 1e-6

    def loss_at():
        with torch.enable_grad():
            return meta_sgd_loop(model, rates, batch, 2)[0].item()

    checks = [(rates["2.weight"], learner.learned["2-weight"].grad),
              (rates["4.bias"], learner.learned["4-bias"].grad),
              (model[0].weight.data, model[0].weight.grad)]
    for tensor, analytic in checks:
        for j, numeric in central_differences(tensor, loss_at, eps, limit=4):
            assert analytic.view(-1)[j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_non_uniform_rates_change_the_adaptation():
    # The per-element rates must be used: the weights adapted with them differ from MAML's.
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(seed=3).sample(2)
    learner = MetaSGD(model, 0.01, 1)
    rates = random_rates(learner)
    fast = learner.adapt(batch.support_x, batch.support_y)
    plain = MAML(model, 0.01, 1).adapt(batch.support_x, batch.support_y)
    theta = learner.fmodel.params()
    for n in fast:
        step = theta[n].detach() - fast[n]
        plain_step = (theta[n].detach() - plain[n]) / 0.01
        torch.testing.assert_close(step, rates[n] * plain_step, rtol=1e-4, atol=1e-7)


def test_rates_are_trained_checkpointed_and_shared():
    torch.manual_seed(0)
    model = MLP()
    cfg = TrainConfig(algorithm="metasgd").resolved()
    learner = build_learner(cfg, model)
    assert isinstance(learner, MetaSGD) and cfg.inner_lr == 0.01
    params = learner.meta_parameters()
    assert len(params) == 2 * len(list(model.parameters()))
    opt = torch.optim.Adam(params, lr=1e-3)
    opt.zero_grad()
    learner.step(SineTasks(seed=0).sample(4))
    opt.step()
    assert (learner.learned["0-weight"] != 0.01).any()
    evaluator = build_learner(cfg, model, evaluation=True, share=learner)
    assert evaluator.learned is learner.learned
    restored = MetaSGD(model, 0.01, 1)
    restored.load_state_dict(learner.state_dict())
    batch = SineTasks(seed=5).sample(3)
    for a, b in zip(restored.adapt(batch.support_x, batch.support_y).values(),
                    learner.adapt(batch.support_x, batch.support_y).values()):
        torch.testing.assert_close(a, b)


def test_rates_on_another_dtype_are_a_clear_error():
    model = MLP()
    learner = MetaSGD(model, 0.01, 1)
    model.double()
    with pytest.raises(ValueError, match="build the learner after moving the model"):
        learner.step(SineTasks(seed=0).sample(2).to("cpu", torch.float64))
