"""Reptile against per-task torch.optim loops and the paper's k = 1 identity."""

import pytest
import torch

from metalearn import Reptile
from metalearn.algorithms.reptile import minibatch_indices
from metalearn.data import SineTasks
from metalearn.models import MLP, Conv4
from tests.reference import losses_of, reptile_loop, reptile_loop_carried_adam
from tests.test_maml import grads_of, synthetic_image_batch


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("sampling", ["cycle", "replacement"])
def test_batched_reptile_matches_per_task_loop_on_sine(optimizer, sampling):
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(shots=10, seed=1).sample(6)
    lr = 0.01 if optimizer == "sgd" else 1e-3
    Reptile(model, lr, 5, inner_batch=4, inner_optimizer=optimizer, sampling=sampling,
            generator=torch.Generator().manual_seed(7)).step(batch)
    idx = minibatch_indices(6, 10, 4, 5, sampling, torch.Generator().manual_seed(7))
    ref = reptile_loop(model, batch, lr, 5, indices=idx, optimizer=optimizer)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6)


def test_batched_reptile_matches_per_task_loop_on_conv4():
    # SGD, not Adam: the conv biases in front of BatchNorm have a true gradient of 0, and
    # Adam's g / sqrt(v) would blow their float noise up to +-lr in both implementations.
    torch.manual_seed(0)
    model = Conv4(ways=5)
    batch = synthetic_image_batch(shots=2)
    Reptile(model, 0.1, 3).step(batch)
    ref = reptile_loop(model, batch, 0.1, 3)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6)


def _carried(reptile):
    m, v, t = reptile.carried_state()
    return ({n: x.clone() for n, x in m.items()}, {n: x.clone() for n, x in v.items()},
            t.item())


def test_carried_adam_state_matches_adam_carried_task_by_task():
    # float64 on sine: three meta-iterations, each checked against torch.optim.Adam started
    # from the carried state for every task, and the state folded over all tasks' steps.
    torch.manual_seed(0)
    model = MLP().double()
    tasks = SineTasks(shots=10, seed=1)
    reptile = Reptile(model, 1e-3, 5, inner_batch=4, inner_optimizer="adam",
                      generator=torch.Generator().manual_seed(7))
    assert reptile.adam_state == "carried" and reptile.carried_state()[2].item() == 0
    draws = torch.Generator().manual_seed(7)
    for _ in range(3):
        batch = tasks.sample(6).to("cpu", torch.float64)
        start = _carried(reptile)
        idx = minibatch_indices(6, 10, 4, 5, "cycle", draws)
        ref, (m, v, t) = reptile_loop_carried_adam(model, batch, 1e-3, 5, start, indices=idx)
        for p in model.parameters():
            p.grad = None
        reptile.step(batch)
        for name, g in grads_of(model).items():
            torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12)
        got_m, got_v, got_t = _carried(reptile)
        assert got_t == t == start[2] + 30
        for name in v:
            torch.testing.assert_close(got_v[name], v[name], rtol=1e-9, atol=1e-15)
            torch.testing.assert_close(got_m[name], m[name], rtol=1e-9, atol=1e-15)
        with torch.no_grad():  # the meta step, so that the next iteration starts elsewhere
            for p in model.parameters():
                p -= 0.5 * p.grad
    assert max(x.abs().max().item() for x in got_v.values()) > 0


def test_carried_state_is_read_not_changed_by_adapt_and_kept_by_state_dict():
    torch.manual_seed(0)
    model = MLP()
    reptile = Reptile(model, 1e-3, 3, inner_optimizer="adam")
    batch = SineTasks(seed=2).sample(4)
    reptile.step(batch)
    before = {k: v.clone() for k, v in reptile.state_dict().items() if "adam" in k}
    assert before and all(k.startswith("learned.adam_") for k in before)
    fast = reptile.adapt(batch.support_x, batch.support_y)
    after = {k: v for k, v in reptile.state_dict().items() if "adam" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    # adapt starts from the carried state: fresh moments adapt differently.
    fresh = Reptile(model, 1e-3, 3, inner_optimizer="adam", adam_state="task")
    other = fresh.adapt(batch.support_x, batch.support_y)
    assert any(not torch.allclose(fast[n], other[n]) for n in fast)
    # A new learner loads the state and adapts as the first one does.
    again = Reptile(model, 1e-3, 3, inner_optimizer="adam")
    again.load_state_dict(reptile.state_dict())
    same = again.adapt(batch.support_x, batch.support_y)
    assert all(torch.equal(fast[n], same[n]) for n in fast)


def test_task_adam_state_and_sgd_keep_no_buffers_and_bad_values_are_refused():
    assert not list(Reptile(MLP(), 1e-3, 2, inner_optimizer="adam",
                            adam_state="task").learned.buffers())
    assert not list(Reptile(MLP(), 0.01, 2).learned.buffers())
    with pytest.raises(ValueError, match="unknown adam_state 'shared'"):
        Reptile(MLP(), 1e-3, 2, inner_optimizer="adam", adam_state="shared")


def test_reptile_with_one_step_is_lr_times_joint_training_gradient():
    # Nichol et al. section 5: with k = 1, E[theta - phi] = alpha * grad of the mean loss.
    # float64: theta - (theta - alpha g) cancels too much in float32 for a tight check.
    torch.manual_seed(0)
    model = MLP().double()
    batch = SineTasks(shots=10, seed=3).sample(5).to("cpu", torch.float64)
    Reptile(model, 0.01, 1).step(batch)
    reptile = grads_of(model)
    params = dict(model.named_parameters())
    joint = 0.0
    for i in range(len(batch)):
        joint = joint + losses_of(model(batch.support_x[i]), batch.support_y[i]).mean()
    joint_grads = torch.autograd.grad(joint / len(batch), list(params.values()))
    for (name, _), g in zip(params.items(), joint_grads):
        torch.testing.assert_close(reptile[name], 0.01 * g, rtol=1e-9, atol=1e-12)


def test_reptile_sgd_meta_step_moves_towards_adapted_weights():
    torch.manual_seed(0)
    model = MLP()
    reptile = Reptile(model, 0.01, 3)
    batch = SineTasks(seed=2).sample(4)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = reptile.adapt(batch.support_x, batch.support_y)
    reptile.step(batch)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for n, p in model.named_parameters():
        expected = theta[n] + 0.5 * (phi[n].mean(0) - theta[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_cycling_visits_every_example_before_repeating():
    idx = minibatch_indices(3, 10, 4, 5, "cycle", torch.Generator().manual_seed(0))
    flat = idx.reshape(3, -1)
    for row in flat:
        assert sorted(row[:10].tolist()) == list(range(10))
        assert sorted(row[10:20].tolist()) == list(range(10))


def test_replacement_batches_have_no_repeats_inside_but_overlap_across():
    idx = minibatch_indices(2, 10, 6, 20, "replacement", torch.Generator().manual_seed(0))
    assert all(len(set(b.tolist())) == 6 for b in idx.reshape(-1, 6))
    assert not torch.equal(idx[0, 0], idx[0, 1])


def test_inner_batch_larger_than_support_is_rejected():
    with pytest.raises(ValueError, match="inner_batch=20 exceeds the 10 support"):
        Reptile(MLP(), 0.01, 2, inner_batch=20).step(SineTasks(shots=10).sample(2))


def test_zero_inner_steps_is_refused_with_the_reason(capsys):
    # phi = theta: the Reptile update would change nothing, silently. MAML with zero steps
    # stays legal (joint training).
    from metalearn import MAML
    from metalearn.cli import main
    from metalearn.config import TrainConfig

    with pytest.raises(ValueError, match="inner_steps must be >= 1 for Reptile"):
        Reptile(MLP(), 0.1, 0)
    with pytest.raises(ValueError, match="inner_steps must be >= 1 for reptile"):
        TrainConfig(algorithm="reptile", inner_steps=0).resolved()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--algorithm", "reptile", "--inner-steps", "0"])
    assert exit_info.value.code == 2
    assert "usage: metalearn train" in capsys.readouterr().err
    assert MAML(MLP(), 0.1, 0).inner_steps == 0
    assert TrainConfig(algorithm="maml", inner_steps=0).resolved().inner_steps == 0
