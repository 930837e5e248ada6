"""A per-example loss of the user's, in the inner and the outer loss of every learner.

Each learner's meta-gradient (and learned rates' gradient) with a user loss is checked in
float64 against a plain per-task loop written with ``torch.autograd.grad`` (no vmap, no
torch.func), which calls the same user loss: multi-hot BCE (float targets that are labels),
class-weighted cross-entropy and a focal loss, flooded and iFlooded.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn import (
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    GradientCombination,
    MAMLPlusPlus,
    MetaSGD,
    Reptile,
    TaskBatch,
)
from metalearn.algorithms.losses import LossShapeError, TaskLoss
from metalearn.algorithms.maml_plus_plus import msl_weights
from metalearn.algorithms.meta_sgd import param_key
from tests.reference import batch_stats_copy, flood

WAYS = 3


def bce(out, y):
    """Multi-label BCE: one loss per example, averaged over its labels."""
    return F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(-1)


weighted_ce = functools.partial(F.cross_entropy, weight=torch.tensor([0.5, 2.0, 1.0],
                                                                     dtype=torch.float64),
                                reduction="none")


def focal(out, y, gamma=2.0):
    ce = F.cross_entropy(out, y, reduction="none")
    return (1 - torch.exp(-ce)) ** gamma * ce


LOSSES = {"bce multi-hot": bce, "class-weighted ce": weighted_ce, "focal": focal}


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, WAYS)).double()


def tasks(loss_name: str, num=3, shots=4, queries=5, seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    n = shots + queries
    x = torch.randn(num, n, 2, generator=g, dtype=torch.float64)
    if loss_name == "bce multi-hot":
        y = (torch.rand(num, n, WAYS, generator=g) < 0.4).double()
    else:
        y = torch.randint(0, WAYS, (num, n), generator=g)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def unrolled(model, batch, steps, lr, loss_fn, first_order=False, inner=None,
             inner_flood=None, outer_flood=None, mode="batch", weights=None, extra=()):
    """Gradients of the mean query objective after per-task SGD, by name. The outer flood
    floods each query example (iFlood) or the mean over the tasks (batch mode).

    ``lr(name, step)``: the step size (a float or a leaf tensor in ``extra``); ``inner``:
    the adapted names (ANIL); ``weights``: the multi-step loss' weights per step (MAML++).
    """
    model = batch_stats_copy(model)
    theta = dict(model.named_parameters())
    adapted = list(theta) if inner is None else list(inner)
    total = 0.0
    for i in range(len(batch)):
        fast = dict(theta)
        objective = 0.0

        def query(f, i=i):
            out = functional_call(model, f, (batch.query_x[i],))
            return flood(loss_fn(out, batch.query_y[i]),
                         outer_flood if mode == "instance" else None, mode)

        for s in range(steps):
            out = functional_call(model, fast, (batch.support_x[i],))
            loss = flood(loss_fn(out, batch.support_y[i]), inner_flood, mode)
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted],
                                        create_graph=not first_order)
            fast = {**fast, **{n: fast[n] - lr(n, s) * g for n, g in zip(adapted, grads)}}
            if weights is not None and weights[s]:
                objective = objective + weights[s] * query(fast)
        total = total + (query(fast) if weights is None else objective)
    loss = total / len(batch)
    if mode == "batch" and outer_flood is not None:
        loss = (loss - outer_flood).abs() + outer_flood
    leaves = {**theta, **dict(extra)}
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()),
                                                allow_unused=True)))


def plain_sgd(model, x, y, steps, lr, loss_fn, record=None):
    """Per-task SGD without any graph; ``record`` collects each step's gradient."""
    model = batch_stats_copy(model)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(functional_call(model, params, (x,)), y).mean(),
                                    list(params.values()))
        if record is not None:
            record.append(dict(zip(params, grads)))
        params = {n: (p - lr * g).detach().requires_grad_()
                  for (n, p), g in zip(params.items(), grads)}
    return {n: p.detach() for n, p in params.items()}


def assert_grads(model_grads: dict, want: dict, atol=1e-10):
    for name, g in model_grads.items():
        torch.testing.assert_close(g, want[name], rtol=1e-8, atol=atol, msg=name)


def grads_of(module: nn.Module) -> dict:
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_and_fomaml(loss_name, first_order):
    model, batch, fn = net(), tasks(loss_name), LOSSES[loss_name]
    cls = FOMAML if first_order else MAML
    cls(model, inner_lr=0.3, inner_steps=2, loss_fn=fn).step(batch)
    want = unrolled(model, batch, 2, lambda n, s: 0.3, fn, first_order=first_order)
    assert_grads(grads_of(model), want)


@pytest.mark.parametrize("mode", ["batch", "instance"])
def test_maml_with_flooding_and_iflood_of_a_user_loss(mode):
    model, batch = net(), tasks("bce multi-hot")
    # Levels between the losses, so that both signs of the flood are exercised.
    options = dict(inner_flood=0.69, outer_flood=0.7, flood_mode=mode)
    MAML(model, inner_lr=0.3, inner_steps=2, loss_fn=bce, **options).step(batch)
    want = unrolled(model, batch, 2, lambda n, s: 0.3, bce, inner_flood=0.69,
                    outer_flood=0.7, mode=mode)
    assert_grads(grads_of(model), want)
    unflooded = unrolled(model, batch, 2, lambda n, s: 0.3, bce)
    assert any(not torch.allclose(want[n], unflooded[n]) for n in want)  # flooding acted


@pytest.mark.parametrize("loss_name", ["bce multi-hot", "focal"])
def test_meta_sgd_rates_and_weights(loss_name):
    model, batch, fn = net(), tasks(loss_name), LOSSES[loss_name]
    learner = MetaSGD(model, inner_lr=0.2, inner_steps=2, loss_fn=fn)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in learner.learned.values():
            r.copy_(torch.rand(r.shape, generator=g, dtype=r.dtype) * 0.4)
    learner.step(batch)
    rates = {n: learner.learned[param_key(n)].detach().clone().requires_grad_()
             for n, _ in model.named_parameters()}
    want = unrolled(model, batch, 2, lambda n, s: rates[n], fn,
                    extra={f"rate {n}": r for n, r in rates.items()}.items())
    assert_grads(grads_of(model), want)
    for n, _ in model.named_parameters():
        torch.testing.assert_close(learner.learned[param_key(n)].grad, want[f"rate {n}"],
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss_name", ["bce multi-hot", "class-weighted ce"])
def test_anil(loss_name):
    model, batch, fn = net(), tasks(loss_name), LOSSES[loss_name]
    ANIL(model, inner_lr=0.3, inner_steps=2, loss_fn=fn).step(batch)
    want = unrolled(model, batch, 2, lambda n, s: 0.3, fn, inner=["2.weight", "2.bias"])
    assert_grads(grads_of(model), want)


@pytest.mark.parametrize("loss_name", ["bce multi-hot", "focal"])
def test_mamlpp_learned_rates_and_multi_step_loss(loss_name):
    model, batch, fn = net(), tasks(loss_name), LOSSES[loss_name]
    learner = MAMLPlusPlus(model, inner_lr=0.2, inner_steps=3, lslr=True,
                           multi_step_loss=True, msl_iterations=10, per_step_bn=False,
                           loss_fn=fn)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for table in learner.learned.lrs.values():
            table.copy_(torch.rand(table.shape, generator=g, dtype=table.dtype) * 0.4)
    learner.iteration = 4
    learner.step(batch)
    tables = {n: learner.learned.lrs[param_key(n)].detach().clone().requires_grad_()
              for n, _ in model.named_parameters()}
    want = unrolled(model, batch, 3, lambda n, s: tables[n][s], fn,
                    weights=msl_weights(3, 4, 10),
                    extra={f"lrs {n}": t for n, t in tables.items()}.items())
    assert_grads(grads_of(model), want)
    for n in tables:
        torch.testing.assert_close(learner.learned.lrs[param_key(n)].grad, want[f"lrs {n}"],
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss_name", ["bce multi-hot", "class-weighted ce"])
def test_imaml_against_a_dense_implicit_gradient(loss_name):
    model, batch, fn = net(), tasks(loss_name), LOSSES[loss_name]
    lam, lr, steps = 2.0, 0.1, 5
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    IMAML(model, inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=2 * sum(sizes),
          loss_fn=fn).step(batch)
    ref = batch_stats_copy(model)

    def unflat(v):
        return {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes)}

    def loss(v, x, y):
        return fn(functional_call(ref, unflat(v), (x,)), y).mean()

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    total = torch.zeros_like(theta)
    for i in range(len(batch)):
        sx, sy = batch.support_x[i], batch.support_y[i]
        phi = theta.clone()
        for _ in range(steps):  # gradient descent on the proximal objective, as iMAML's
            p = phi.clone().requires_grad_()
            g, = torch.autograd.grad(loss(p, sx, sy) + 0.5 * lam * (p - theta).pow(2).sum(), p)
            phi = phi - lr * g
        p = phi.clone().requires_grad_()
        v, = torch.autograd.grad(loss(p, batch.query_x[i], batch.query_y[i]), p)
        h = torch.autograd.functional.hessian(lambda q, sx=sx, sy=sy: loss(q, sx, sy), phi)
        total += torch.linalg.solve(torch.eye(len(phi), dtype=phi.dtype) + h / lam, v)
    want = unflat(total / len(batch))
    assert_grads(grads_of(model), want, atol=1e-9)


@pytest.mark.parametrize("loss_name", ["bce multi-hot", "focal"])
def test_reptile(loss_name):
    model, batch, fn = net(), tasks(loss_name), LOSSES[loss_name]
    metrics = Reptile(model, inner_lr=0.2, inner_steps=3, loss_fn=fn).step(batch)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    phis = [plain_sgd(model, batch.support_x[i], batch.support_y[i], 3, 0.2, fn)
            for i in range(len(batch))]
    want = {n: theta[n] - torch.stack([phi[n] for phi in phis]).mean(0) for n in theta}
    assert_grads(grads_of(model), want)
    # The reported query loss is the user's loss at phi too.
    query = [fn(functional_call(model, phi, (batch.query_x[i],)), batch.query_y[i])
             for i, phi in enumerate(phis)]
    assert metrics["loss"] == pytest.approx(torch.cat(query).mean().item(), rel=1e-10)


@pytest.mark.parametrize("use", ["all", "last", (1, 2)])
def test_gradient_combination(use):
    model, batch = net(), tasks("bce multi-hot")
    GradientCombination(model, inner_lr=0.2, inner_steps=3, use=use, loss_fn=bce).step(batch)
    used = {"all": (1, 2, 3), "last": (3,)}.get(use, use)
    per_task = []
    for i in range(len(batch)):
        record = []
        plain_sgd(model, batch.support_x[i], batch.support_y[i], 3, 0.2, bce, record)
        per_task.append({n: sum(record[k - 1][n] for k in used) for n in record[0]})
    want = {n: torch.stack([d[n] for d in per_task]).mean(0) for n in per_task[0]}
    assert_grads(grads_of(model), want)


def test_default_loss_is_unchanged_and_user_loss_changes_the_gradient():
    batch = tasks("class-weighted ce")
    a, b, c = net(), net(), net()
    MAML(a, inner_lr=0.3, inner_steps=1).step(batch)
    MAML(b, inner_lr=0.3, inner_steps=1,
         loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none")).step(batch)
    MAML(c, inner_lr=0.3, inner_steps=1, loss_fn=weighted_ce).step(batch)
    for n, p in a.named_parameters():
        torch.testing.assert_close(dict(b.named_parameters())[n].grad, p.grad, rtol=0, atol=0)
    assert not torch.allclose(c[2].weight.grad, a[2].weight.grad)


def test_a_loss_that_does_not_return_one_value_per_example_is_named():
    batch = tasks("bce multi-hot")
    learner = MAML(net(), inner_lr=0.3, inner_steps=1,
                   loss_fn=lambda o, y: F.binary_cross_entropy_with_logits(o, y,
                                                                          reduction="none"))
    with pytest.raises(LossShapeError, match=r"returned shape \(4, 3\) for 4 examples; it "
                                             r"must return one loss per example, shape \(4,\)"):
        learner.step(batch)
    with pytest.raises(LossShapeError, match=r"returned shape \(\)"):
        MAML(net(), 0.3, 1, loss_fn=lambda o, y: bce(o, y).mean()).step(batch)
    with pytest.raises(LossShapeError, match="returned float"):
        TaskLoss(loss_fn=lambda o, y: 1.0).inner(torch.zeros(2, 3), torch.zeros(2, 3))


def test_bad_loss_arguments_are_named():
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        MAML(net(), 0.3, 1, loss_fn="bce")
    with pytest.raises(TypeError, match="instead of a TaskLoss"):
        TaskLoss(loss_fn=TaskLoss())
    with pytest.raises(ValueError, match="label_smoothing applies to the default"):
        MAML(net(), 0.3, 1, loss_fn=bce, label_smoothing=0.1)
