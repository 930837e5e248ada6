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


# -- how often the flood acts, reported by step() -------------------------------------------
def test_flood_active_formulas():
    from metalearn.algorithms.losses import flood_active

    losses = torch.tensor([0.25, 0.5, 0.75])  # mean 0.5, exact in binary
    assert flood_active(losses, None).item() == 0.0
    assert flood_active(losses, 0.5, "batch").item() == 0.0  # at the level: not below
    assert flood_active(losses, 0.7, "batch").item() == 1.0
    assert flood_active(losses, 0.7, "instance").item() == pytest.approx(2 / 3)
    assert flood_active(losses, 0.1, "instance").item() == 0.0


def _by_hand(maml, batch, steps, inner, outer, mode):
    """The activity and query loss of step(), from adapt()'s trajectory and plain forwards."""
    def active(losses, level):
        return float(losses.mean() < level) if mode == "batch" else \
            (losses < level).double().mean().item()

    inner_active, outer_active, query = [], [], []
    for t in range(len(batch)):
        sx, sy, qx, qy = (batch.support_x[t], batch.support_y[t], batch.query_x[t],
                          batch.query_y[t])
        # The weights after 0..steps inner steps of this task (flooded as in training).
        fast_path = maml.adapt(sx, sy, steps=steps, trajectory=True)
        with torch.no_grad():
            inner_active.append(sum(active(losses_of(maml.fmodel(p, sx), sy), inner)
                                    for p in fast_path[:steps]) / steps)
            q = losses_of(maml.fmodel(fast_path[steps], qx), qy)
        outer_active.append(active(q, outer))
        query.append(q.mean().item())
    n = len(batch)
    # The batch-mode outer flood floods the meta-batch's mean query loss: active or not.
    outer = (float(sum(query) / n < outer) if mode == "batch" else sum(outer_active) / n)
    return sum(inner_active) / n, outer, sum(query) / n, sum(outer_active) / n


@pytest.mark.parametrize("mode", ["batch", "instance"])
@pytest.mark.parametrize("first_order, memory_saving", [(False, False), (True, False),
                                                        (False, True)])
def test_step_reports_flood_activity_as_computed_by_hand(mode, first_order, memory_saving):
    torch.manual_seed(0)
    steps, inner, outer = 2, 0.8, 1.5
    batch = SineTasks(shots=5, queries=5, seed=3).sample(6)
    maml = MAML(MLP(), 0.02, steps, first_order=first_order, inner_flood=inner,
                outer_flood=outer, flood_mode=mode, memory_saving=memory_saving)
    *expected, per_task = _by_hand(maml, batch, steps, inner, outer, mode)
    metrics = maml.step(batch)
    assert set(metrics) == {"loss", "query_loss", "inner_flood_active", "outer_flood_active"}
    got = (metrics["inner_flood_active"], metrics["outer_flood_active"], metrics["query_loss"])
    assert got == pytest.approx(expected, abs=1e-5)
    # The levels sit inside the losses' range, so the check is not of all-or-nothing values
    # (in batch mode, per task: a per-task outer flood would have reported 0 < per_task < 1).
    assert 0 < expected[0] < 1 and 0 < per_task < 1


def test_unflooded_step_reports_what_it_did_before():
    torch.manual_seed(0)
    batch = SineTasks(seed=0).sample(4)
    assert set(MAML(MLP(), 0.01, 1).step(batch)) == {"loss"}
    assert set(MAML(MLP(), 0.01, 1, outer_flood=0.5).step(batch)) == {
        "loss", "query_loss", "outer_flood_active"}
    assert set(MAML(MLP(), 0.01, 1, inner_flood=0.5).step(batch)) == {
        "loss", "inner_flood_active"}


def test_measuring_the_inner_flood_changes_no_gradient_even_with_dropout(monkeypatch):
    from metalearn.algorithms.base import MetaLearner

    def grads(measure: bool):
        torch.manual_seed(0)
        model = MLP(dropout=0.3)
        maml = MAML(model, 0.01, 2, inner_flood=0.5)
        if not measure:
            monkeypatch.setattr(MetaLearner, "_inner_flood_active",
                                lambda self, points, x, y: x.new_zeros(()))
        torch.manual_seed(1)
        maml.step(SineTasks(seed=0).sample(4))
        torch.manual_seed(1)
        maml.step(SineTasks(seed=1).sample(4))  # the draws after the first step, too
        return [p.grad.clone() for p in model.parameters()]

    measured = grads(True)
    plain = grads(False)
    for a, b in zip(measured, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the outer flood: the meta-batch's mean query loss (batch mode) ---------------------------
def _outer_learners():
    from metalearn import ANIL, FOMAML, IMAML, MAML, MAMLPlusPlus, MetaSGD

    return {
        "maml": lambda **kw: MAML(MLP(), 0.02, 2, **kw),
        "maml memory_saving": lambda **kw: MAML(MLP(), 0.02, 2, memory_saving=True, **kw),
        "fomaml": lambda **kw: FOMAML(MLP(), 0.02, 2, **kw),
        "meta-sgd": lambda **kw: MetaSGD(MLP(), 0.02, 2, **kw),
        "anil": lambda **kw: ANIL(MLP(), 0.02, 2, **kw),
        # The final step's loss alone, so that the objective is the tasks' mean query loss.
        "maml++": lambda **kw: MAMLPlusPlus(MLP(), 0.02, 2, multi_step_loss=False, **kw),
        "imaml": lambda **kw: IMAML(MLP(), 0.02, 2, lam=1.0, cg_steps=3, **kw),
    }


def _outer_step(name, compiled=False, **kw):
    """Meta-gradient and metrics of one step from seed-0 weights, and the tasks' query
    losses at the adapted weights."""
    from metalearn.kernels import kernel_settings

    torch.manual_seed(0)
    learner = _outer_learners()[name](**kw)
    batch = SineTasks(shots=5, queries=5, seed=7).sample(6)
    with kernel_settings(compile=compiled):
        metrics = learner.step(batch)
    grads = [p.grad.clone() for p in learner.meta_parameters()]
    with torch.no_grad():
        fast = learner.adapt(batch.support_x, batch.support_y)
        per_task = ((learner.predict(fast, batch.query_x) - batch.query_y) ** 2).mean((1, 2))
    return grads, metrics, per_task


@pytest.mark.parametrize("name, compiled", [(n, False) for n in _outer_learners()]
                         + [("fomaml", True)])
def test_batch_outer_flood_floods_the_meta_batch_mean_not_each_task(name, compiled):
    plain, metrics, per_task = _outer_step(name, compiled)
    mean = per_task.mean().item()
    assert metrics["loss"] == pytest.approx(mean, rel=1e-5)  # the same tasks, the same loss
    # A level above the mean, though below some tasks' losses: the whole meta-gradient turns
    # (a per-task flood would turn only the tasks below it) ...
    level = mean + 0.25 * (per_task.max().item() - mean)
    assert (per_task > level).any() and (per_task < level).any()
    flooded, fm, _ = _outer_step(name, compiled, outer_flood=level)
    for g, p in zip(flooded, plain):
        torch.testing.assert_close(g, -p, rtol=1e-5, atol=1e-7)
    assert fm["outer_flood_active"] == 1.0
    assert fm.get("objective", fm["loss"]) == pytest.approx(2 * level - mean, rel=1e-4)
    # ... and a level below the mean, though above some tasks' losses, changes nothing.
    level = per_task.min().item() + 0.5 * (mean - per_task.min().item())
    kept, km, _ = _outer_step(name, compiled, outer_flood=level)
    for g, p in zip(kept, plain):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-7)
    assert km["outer_flood_active"] == 0.0


def test_a_shard_without_a_process_group_cannot_take_the_meta_batch_mean():
    learner = MAML(MLP(), 0.02, 1, outer_flood=0.5)
    batch = SineTasks(seed=0).sample(4)
    with pytest.raises(RuntimeError, match="process group"):
        learner.step(batch[:2], shard=(0, 4))
    learner.step(batch, shard=(0, 4))  # the whole meta-batch: nothing to reduce
    MAML(MLP(), 0.02, 1, outer_flood=0.5, flood_mode="instance").step(batch[:2], shard=(0, 4))
