"""memory_profile and SavedTensorMeter: storage counting on known graphs, and the shape of
saved memory against inner steps (MAML linear, FOMAML and Reptile flat)."""

import pytest
import torch
from torch.func import grad, vmap

from metalearn import FOMAML, MAML, Reptile
from metalearn.data import SineTasks, TaskBatch
from metalearn.memory import SavedTensorMeter, memory_profile, storage_key
from metalearn.models import MLP, Conv4

STEPS = (1, 2, 4, 8)


def image_batch(tasks=4, ways=5, shots=1, queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(tasks, ways * n, 1, 28, 28, generator=g)
        return x, torch.arange(ways).repeat_interleave(n).repeat(tasks, 1)

    return TaskBatch(*split(shots), *split(queries))


def test_mul_graph_saves_exactly_its_two_inputs():
    x = torch.randn(100, requires_grad=True)
    y = torch.randn(30, 100, requires_grad=True)
    with SavedTensorMeter() as meter:
        z = (x * y).sum()
        assert meter.current_bytes == x.nbytes + y.nbytes
        z.backward()
    assert meter.peak_bytes == x.nbytes + y.nbytes == 400 + 12000
    assert meter.current_bytes == 0


def test_a_storage_saved_by_many_nodes_and_views_counts_once():
    w = torch.randn(10, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        # sin and cos save w; the view w[0] and w*w share its storage too.
        loss = (w.sin() + w.cos()).sum() + w[0].sin().sum() + (w * w).sum()
    assert meter.peak_bytes == w.nbytes
    with SavedTensorMeter() as meter:
        loss = (w.sin() + w.exp()).sum()  # exp saves its output: a second storage
    assert meter.peak_bytes == 2 * w.nbytes
    del loss


def test_freed_graphs_stay_flat_and_kept_graphs_grow():
    w = torch.randn(50, requires_grad=True)
    with SavedTensorMeter() as meter:
        for _ in range(5):
            torch.autograd.grad(w.exp().sum(), w)
    assert meter.peak_bytes == w.nbytes  # one exp output alive at a time
    with SavedTensorMeter() as meter:
        kept = [w.exp().sum() for _ in range(5)]
    assert meter.peak_bytes == 5 * w.nbytes
    del kept
    assert meter.current_bytes == 0


def test_functorch_wrappers_are_counted_by_their_underlying_storage():
    x = torch.randn(3, 7)
    keys = []
    vmap(lambda xi: keys.append(storage_key(xi)) or xi)(x)
    grad(lambda xi: keys.append(storage_key(xi)) or xi.sum())(x)
    assert keys == [storage_key(x)] * 2 == [(("cpu", x.data_ptr()), 84)] * 2
    w = torch.randn(7)
    with SavedTensorMeter() as meter:
        vmap(grad(lambda w, xi: (w * xi).sin().sum()), in_dims=(None, 0))(w, x)
    # x is saved by the forward mul and again by the backward graph that grad records;
    # the product w*x is a second storage. Counting x twice would give >= 3 * 84.
    assert 2 * x.nbytes <= meter.peak_bytes < 3 * x.nbytes
    assert meter.current_bytes == 0


def test_metering_does_not_change_the_meta_gradient():
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8)
    maml = MAML(model, 0.4, 2)
    batch = image_batch(tasks=2)
    maml.step(batch)
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with SavedTensorMeter() as meter:
        maml.step(batch)
    assert meter.peak_bytes > 0 and meter.current_bytes == 0
    for a, p in zip(plain, model.parameters()):
        assert torch.equal(a, p.grad)


def profile_all(model, batch, lr):
    return {cls.__name__: [r["saved_bytes"] for r in memory_profile(
        cls(model, lr, 1), batch, STEPS, repeats=1)] for cls in (MAML, FOMAML, Reptile)}


def assert_maml_grows_linearly(saved):
    s = dict(zip(STEPS, saved))
    slope_low, slope_high = (s[4] - s[2]) / 2, (s[8] - s[4]) / 4  # bytes per inner step
    assert slope_low > 0
    assert abs(slope_high - slope_low) <= 0.25 * slope_low
    assert s[8] > 2 * s[1]


def test_saved_bytes_against_inner_steps_on_conv4():
    torch.manual_seed(0)
    saved = profile_all(Conv4(ways=5, hidden=16), image_batch(), lr=0.4)
    assert_maml_grows_linearly(saved["MAML"])
    for name in ("FOMAML", "Reptile"):
        assert max(saved[name]) / min(saved[name]) < 1.3, (name, saved[name])


def test_saved_bytes_against_inner_steps_on_sine_mlp():
    torch.manual_seed(0)
    model = MLP()
    tasks = 10
    saved = profile_all(model, SineTasks(shots=10, seed=0).sample(tasks), lr=0.01)
    assert_maml_grows_linearly(saved["MAML"])
    param_bytes = sum(p.nbytes for p in model.parameters())
    for name in ("FOMAML", "Reptile"):
        one, *rest = saved[name]
        assert max(rest) / min(rest) < 1.3, (name, saved[name])
        # The first inner step differentiates at the shared initial weights (one copy);
        # later steps at per-task weights, up to one more copy per task. On this tiny
        # net weights rival the activations, so that step from 1 to 2 is visible.
        assert one <= rest[0] <= one + (tasks - 1) * param_bytes


def test_profile_leaves_model_grads_rng_and_inner_steps_untouched():
    torch.manual_seed(0)
    model = MLP()
    gen = torch.Generator().manual_seed(5)
    reptile = Reptile(model, 0.02, 3, inner_batch=5, generator=gen)
    params = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    grads = [p.grad for p in model.parameters()]
    gen_state, rng_state = gen.get_state(), torch.get_rng_state()
    memory_profile(reptile, SineTasks(seed=0).sample(4), inner_steps=(1, 2), repeats=1)
    for p, before, g in zip(model.parameters(), params, grads):
        assert torch.equal(p, before)
        assert p.grad is g and torch.equal(g, torch.full_like(g, 7.0))
    assert reptile.inner_steps == 3
    assert torch.equal(gen.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_records_on_cpu():
    fomaml = FOMAML(MLP(), 0.01, 5)
    model = fomaml.model
    assert all(p.grad is None for p in model.parameters())
    records = memory_profile(fomaml, SineTasks(seed=0).sample(2), inner_steps=(0, 3),
                             repeats=2)
    assert [r["inner_steps"] for r in records] == [0, 3]
    for r in records:
        assert set(r) == {"algorithm", "inner_steps", "saved_bytes", "cuda_peak_bytes",
                          "seconds_per_iteration"}
        assert r["algorithm"] == "fomaml"
        assert r["cuda_peak_bytes"] is None
        assert r["seconds_per_iteration"] > 0 and r["saved_bytes"] > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"inner_steps": ()}, "at least one"),
    ({"inner_steps": (1, -1)}, "integers >= 0"),
    ({"repeats": 0}, "repeats"),
    ({"device": "meta"}, "model is on cpu"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memory_profile(MAML(MLP(), 0.01, 1), SineTasks(seed=0).sample(2), **kwargs)
