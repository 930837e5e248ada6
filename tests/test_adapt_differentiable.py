"""adapt(differentiable=True): an outer loop of the user's gives the learner's meta-gradient.

A user-written outer loop (adapt with the graph kept, predict, the query loss, backward) must
put into ``.grad`` of every meta-parameter what ``learner.step`` accumulates, in float64, for
a batch of tasks at once and for one task at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
from metalearn.algorithms.maml_plus_plus import msl_weights

WAYS = 3


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, WAYS)).double()


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 5 * 5, WAYS)).double()


def tasks(num=3, shots=4, queries=5, image=False, seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    n = shots + queries
    shape = (num, n, 1, 5, 5) if image else (num, n, 2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, WAYS, (num, n), generator=g)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def randomise(learner, seed=5):
    """Learned rates away from their uniform start, the same for every call."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.learned.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return learner


LEARNERS = {
    "maml": lambda m: MAML(m, inner_lr=0.3, inner_steps=2),
    "maml first order": lambda m: MAML(m, inner_lr=0.3, inner_steps=2, first_order=True),
    "fomaml": lambda m: FOMAML(m, inner_lr=0.3, inner_steps=2),
    "metasgd": lambda m: randomise(MetaSGD(m, inner_lr=0.3, inner_steps=2)),
    "metasgd first order": lambda m: randomise(MetaSGD(m, 0.3, 2, first_order=True)),
    "anil": lambda m: ANIL(m, inner_lr=0.3, inner_steps=2),
    "mamlpp lslr": lambda m: randomise(MAMLPlusPlus(m, 0.3, 2, lslr=True,
                                                    multi_step_loss=False)),
    # MAML++ in its first-order phase (derivative-order annealing).
    "mamlpp annealing": lambda m: randomise(MAMLPlusPlus(m, 0.3, 2, lslr=True,
                                                         multi_step_loss=False,
                                                         first_order_iterations=5)),
}


def step_grads(make, model_fn, batch):
    learner = make(model_fn())
    learner.step(batch)
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


def assert_same_grads(learner, want):
    got = dict(learner.named_parameters())
    assert set(got) == set(want)
    for n, g in want.items():
        torch.testing.assert_close(got[n].grad, g, rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("name", LEARNERS)
def test_user_outer_loop_on_a_batch_gives_the_step_meta_gradient(name):
    batch, make = tasks(), LEARNERS[name]
    want = step_grads(make, mlp, batch)
    learner = make(mlp())
    fast = learner.adapt(batch.support_x, batch.support_y, differentiable=True)
    out = learner.predict(fast, batch.query_x)                       # (B, q, ways)
    loss = torch.stack([F.cross_entropy(out[i], batch.query_y[i])
                        for i in range(len(batch))]).mean()
    loss.backward()
    assert_same_grads(learner, want)


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "anil", "mamlpp lslr"])
def test_user_outer_loop_one_task_at_a_time(name):
    batch, make = tasks(), LEARNERS[name]
    want = step_grads(make, mlp, batch)
    learner = make(mlp())
    for i in range(len(batch)):
        fast = learner.adapt(batch.support_x[i], batch.support_y[i], differentiable=True)
        assert fast["0.weight"].shape == (6, 2)                        # one task: no task dim
        out = learner.predict(fast, batch.query_x[i])
        (F.cross_entropy(out, batch.query_y[i]) / len(batch)).backward()
    assert_same_grads(learner, want)


@pytest.mark.parametrize("first_order", [False, True])
def test_batch_norm_model_second_and_first_order(first_order):
    batch = tasks(image=True)
    want = step_grads(lambda m: MAML(m, 0.1, 2, first_order=first_order), bn_cnn, batch)
    learner = MAML(bn_cnn(), 0.1, 2, first_order=first_order)
    fast = learner.adapt(batch.support_x, batch.support_y, differentiable=True)
    out = learner.predict(fast, batch.query_x)
    F.cross_entropy(out.flatten(0, 1), batch.query_y.flatten()).backward()
    assert_same_grads(learner, want)


def test_mamlpp_multi_step_loss_from_the_differentiable_trajectory():
    def make(m):
        return randomise(MAMLPlusPlus(m, 0.3, 3, lslr=True, multi_step_loss=True,
                                      msl_iterations=10))

    batch = tasks()
    want = step_grads(make, mlp, batch)
    learner = make(mlp())
    path = learner.adapt(batch.support_x, batch.support_y, differentiable=True,
                         trajectory=True)
    assert len(path) == 4                                              # theta, then 3 steps
    weights = msl_weights(3, learner.iteration, learner.msl_iterations)
    objective = 0.0
    for w, fast in zip(weights, path[1:]):
        out = learner.predict(fast, batch.query_x)
        objective = objective + w * F.cross_entropy(out.flatten(0, 1), batch.query_y.flatten())
    objective.backward()
    assert_same_grads(learner, want)


def test_second_order_differs_from_first_order():
    """The check above can tell the orders apart (the graph really is second order)."""
    batch = tasks()
    second = step_grads(LEARNERS["maml"], mlp, batch)
    first = step_grads(LEARNERS["fomaml"], mlp, batch)
    assert not torch.allclose(second["model.0.weight"], first["model.0.weight"], atol=1e-6)


def test_default_adapt_stays_detached_and_predict_is_unchanged():
    batch = tasks()
    learner = MAML(mlp(), 0.3, 2)
    for path in (learner.adapt(batch.support_x, batch.support_y),
                 *learner.adapt(batch.support_x, batch.support_y, trajectory=True)):
        assert not any(t.requires_grad for t in path.values())
    detached = learner.adapt(batch.support_x, batch.support_y)
    kept = learner.adapt(batch.support_x, batch.support_y, differentiable=True)
    assert all(t.requires_grad and t.grad_fn is not None for t in kept.values())
    for n in detached:
        torch.testing.assert_close(kept[n].detach(), detached[n], rtol=0, atol=1e-12)
    torch.testing.assert_close(learner.predict(kept, batch.query_x).detach(),
                               learner.predict(detached, batch.query_x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("make, word", [
    (lambda m: Reptile(m, 0.1, 2), "Reptile"),
    (lambda m: GradientCombination(m, 0.1, 2), "Reptile"),
    (lambda m: IMAML(m, 0.1, 2), "implicit"),
])
def test_learners_without_a_loss_through_the_adapted_weights_refuse(make, word):
    batch = tasks()
    learner = make(mlp())
    with pytest.raises(NotImplementedError, match=word):
        learner.adapt(batch.support_x, batch.support_y, differentiable=True)
    learner.adapt(batch.support_x, batch.support_y)                      # detached still works
