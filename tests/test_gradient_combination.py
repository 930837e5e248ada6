"""GradientCombination against a per-task torch.optim loop and the identities of Nichol et
al. (2018): sum of all g_i is Reptile's direction / alpha, g_1 is joint training, and the
separate-tail g_k is first-order MAML."""

import pytest
import torch

from metalearn import FOMAML, GradientCombination, Reptile, evaluate
from metalearn.algorithms.reptile import minibatch_indices
from metalearn.data import SineTasks
from metalearn.models import MLP, Conv4
from tests.reference import batch_stats_copy, losses_of
from tests.test_maml import grads_of, synthetic_image_batch


def combination_loop(model, batch, lr, steps, use, tail="shared", indices=None,
                     optimizer="sgd", betas=(0.0, 0.999), eps=1e-8):
    """Mean over tasks of sum_{i in use} g_i, each task run on its own with torch.optim.

    g_i is the mini-batch gradient read from ``p.grad`` just before the i-th optimiser
    step; with ``tail="separate"`` the last gradient is taken on the query set.
    """
    net = batch_stats_copy(model)
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    use = range(1, steps + 1) if use == "all" else [steps] if use == "last" else use
    totals = []
    for i in range(len(batch)):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(theta[n])
        if optimizer == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=lr)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=eps)
        total = {n: torch.zeros_like(v) for n, v in theta.items()}
        for t in range(steps):
            if tail == "separate" and t == steps - 1:
                x, y = batch.query_x[i], batch.query_y[i]
            else:
                x, y = batch.support_x[i], batch.support_y[i]
                if indices is not None:
                    x, y = x[indices[i, t]], y[indices[i, t]]
            opt.zero_grad()
            losses_of(net(x), y).mean().backward()
            if t + 1 in use:
                for n, p in net.named_parameters():
                    total[n] += p.grad
            opt.step()
        totals.append(total)
    return {n: torch.stack([t[n] for t in totals]).mean(0) for n in theta}


def sine64(tasks=5, seed=1):
    return SineTasks(shots=10, queries=6, seed=seed).sample(tasks).to("cpu", torch.float64)


@pytest.mark.parametrize("optimizer,tail,sampling,use", [
    ("sgd", "shared", "cycle", (1, 3)),
    ("sgd", "shared", "replacement", "all"),
    ("sgd", "separate", "cycle", (1, 2, 3)),
    ("adam", "shared", "cycle", (2, 3)),
    ("adam", "separate", "replacement", "last"),
])
def test_batched_direction_matches_per_task_loop(optimizer, tail, sampling, use):
    torch.manual_seed(0)
    model = MLP().double()
    batch = sine64()
    lr = 0.02 if optimizer == "sgd" else 1e-3
    GradientCombination(model, lr, 3, inner_batch=4, use=use, tail=tail,
                        inner_optimizer=optimizer, sampling=sampling,
                        generator=torch.Generator().manual_seed(7)).step(batch)
    support_steps = 3 - (tail == "separate")
    idx = minibatch_indices(5, 10, 4, support_steps, sampling, torch.Generator().manual_seed(7))
    ref = combination_loop(model, batch, lr, 3, use, tail, idx, optimizer)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12)


def test_batched_direction_matches_per_task_loop_on_conv4():
    # BatchNorm with batch statistics, whole-support steps, a separate tail of query images.
    torch.manual_seed(0)
    model = Conv4(ways=5)
    batch = synthetic_image_batch(tasks=3, shots=2, queries=2)
    GradientCombination(model, 0.1, 3, use=(1, 3), tail="separate").step(batch)
    ref = combination_loop(model, batch, 0.1, 3, (1, 3), "separate")
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampling", ["cycle", "replacement"])
def test_sum_of_all_gradients_is_reptile_direction_over_lr(sampling):
    # With SGD, theta - phi_k = alpha (g_1 + ... + g_k) exactly.
    torch.manual_seed(0)
    lr = 0.02
    model = MLP().double()
    batch = sine64()
    Reptile(model, lr, 4, inner_batch=4, sampling=sampling,
            generator=torch.Generator().manual_seed(3)).step(batch)
    reptile = grads_of(model)
    model.zero_grad(set_to_none=True)
    GradientCombination(model, lr, 4, inner_batch=4, use="all", sampling=sampling,
                        generator=torch.Generator().manual_seed(3)).step(batch)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, reptile[name] / lr, rtol=1e-7, atol=1e-10)


def test_first_gradient_alone_is_joint_training_gradient_of_first_minibatch():
    torch.manual_seed(0)
    model = MLP().double()
    batch = sine64()
    GradientCombination(model, 0.02, 3, inner_batch=4, use=(1,),
                        generator=torch.Generator().manual_seed(5)).step(batch)
    idx = minibatch_indices(5, 10, 4, 3, "cycle", torch.Generator().manual_seed(5))
    params = dict(model.named_parameters())
    joint = sum(losses_of(model(batch.support_x[i][idx[i, 0]]),
                          batch.support_y[i][idx[i, 0]]).mean() for i in range(len(batch)))
    joint_grads = torch.autograd.grad(joint / len(batch), list(params.values()))
    got = grads_of(model)
    for name, g in zip(params, joint_grads):
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_separate_tail_last_gradient_is_fomaml(k):
    # k - 1 full-support SGD steps, then the query gradient at phi_{k-1}: FOMAML's.
    torch.manual_seed(0)
    model = MLP().double()
    batch = sine64()
    fomaml_metrics = FOMAML(model, 0.02, k - 1).step(batch)
    fomaml = grads_of(model)
    model.zero_grad(set_to_none=True)
    metrics = GradientCombination(model, 0.02, k, use="last", tail="separate").step(batch)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, fomaml[name], rtol=1e-10, atol=1e-12)
    assert metrics["loss"] == pytest.approx(fomaml_metrics["loss"], rel=1e-10)


def test_shared_tail_metrics_are_reptile_query_metrics():
    torch.manual_seed(0)
    model = Conv4(ways=5)
    batch = synthetic_image_batch(tasks=2, shots=2, queries=2)
    ours = GradientCombination(model, 0.1, 2, use="last").step(batch)
    model.zero_grad(set_to_none=True)
    reptile = Reptile(model, 0.1, 2).step(batch)
    assert ours == pytest.approx(reptile, rel=1e-5)


def test_evaluate_runs_on_a_gradient_combination():
    torch.manual_seed(0)
    learner = GradientCombination(MLP(), 0.02, 2, inner_batch=5, use=(1, 2))
    result = evaluate(learner, SineTasks(seed=4).sample(6), max_steps=3, progress=False)
    assert result.metric == "mse" and tuple(result.per_task.shape) == (6, 4)


def test_shard_slices_the_meta_batch_draws():
    # Two halves with shard set give the same summed direction as the whole batch.
    torch.manual_seed(0)
    model = MLP().double()
    batch = sine64(tasks=4)
    make = lambda: GradientCombination(  # noqa: E731
        model, 0.02, 2, inner_batch=4, use="all", generator=torch.Generator().manual_seed(1))
    make().step(batch)
    whole = grads_of(model)
    model.zero_grad(set_to_none=True)
    for offset in (0, 2):
        part = make()
        part.step(batch[offset: offset + 2], shard=(offset, 4))
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g / 2, whole[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(use=(0,)), r"use holds g_0 but the inner loop has inner_steps=3"),
    (dict(use=(1, 4)), r"use holds g_4 .* indices must be in 1..3"),
    (dict(use=()), r"use is empty"),
    (dict(use="first"), r"unknown use 'first'"),
    (dict(use=(1, 1)), r"use repeats an index"),
    (dict(use=(True,)), r"use holds True"),
    (dict(use=(1.0,)), r"use holds 1.0"),
    (dict(use=3), r"use must be 'all', 'last' or an iterable"),
    (dict(tail="middle"), r"unknown tail 'middle'; choose one of \('shared', 'separate'\)"),
    (dict(sampling="shuffle"), r"unknown sampling 'shuffle'"),
    (dict(inner_optimizer="rmsprop"), r"unknown inner_optimizer 'rmsprop'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientCombination(MLP(), 0.01, 3, **kwargs)


def test_zero_inner_steps_and_oversized_batches_are_rejected():
    with pytest.raises(ValueError, match="inner_steps must be >= 1"):
        GradientCombination(MLP(), 0.01, 0)
    with pytest.raises(ValueError, match="inner_batch=20 exceeds the 10 support"):
        GradientCombination(MLP(), 0.01, 2, inner_batch=20).step(SineTasks(shots=10).sample(2))
