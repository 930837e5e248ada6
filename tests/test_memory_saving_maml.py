"""MAML(memory_saving=True): the same exact second-order meta-gradient as the normal mode,
with saved memory nearly flat in inner steps instead of linear."""

import pytest
import torch

from metalearn import ANIL, FOMAML, MAML, MAMLPlusPlus, MetaSGD, memory_profile
from metalearn.algorithms.functional_model import Params
from metalearn.data import SineTasks, TaskBatch
from metalearn.models import MLP, Conv4
from tests.reference import central_differences
from tests.test_maml import query_loss_after_adaptation, tiny_sine_batch

FLOODS = {"none": {}, "batch": {"inner_flood": 0.3, "flood_mode": "batch"},
          "instance": {"inner_flood": 0.3, "flood_mode": "instance"}}


def image_batch(tasks=2, ways=5, shots=1, queries=2, size=14, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(tasks, ways * n, 1, size, size, generator=g, dtype=dtype)
        return x, torch.arange(ways).repeat_interleave(n).repeat(tasks, 1)

    return TaskBatch(*split(shots), *split(queries))


def small_conv4(dtype=torch.float32):
    return Conv4(ways=5, hidden=8, image_size=14).to(dtype)


def meta_gradients(model, batch, lr, steps, memory_saving, **kwargs):
    model.zero_grad(set_to_none=True)
    metrics = MAML(model, lr, steps, memory_saving=memory_saving, **kwargs).step(batch)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return metrics, grads


def max_relative_difference(a: Params, b: Params) -> float:
    # Relative to the largest entry of the whole gradient, not tensor by tensor: the conv
    # biases in front of BatchNorm have a true gradient of 0, so theirs is rounding noise.
    scale = max(g.abs().max().item() for g in a.values())
    return max((a[n] - b[n]).abs().max().item() for n in a) / scale


def assert_same_meta_gradient(model, batch, lr, steps, tol, **kwargs):
    torch.manual_seed(3)
    normal_metrics, normal = meta_gradients(model, batch, lr, steps, False, **kwargs)
    torch.manual_seed(3)
    saving_metrics, saving = meta_gradients(model, batch, lr, steps, True, **kwargs)
    assert saving_metrics == pytest.approx(normal_metrics, rel=1e-6)
    assert max_relative_difference(normal, saving) <= tol
    assert max(g.abs().max().item() for g in normal.values()) > 0


# Float32 rounding differs between the two orders of evaluation; float64 shows the maths.
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("flood", list(FLOODS))
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_same_meta_gradient_as_normal_mode_on_sine_mlp(steps, flood, precision):
    dtype, tol = getattr(torch, precision), TOLERANCE[precision]
    torch.manual_seed(0)
    batch = SineTasks(shots=10, queries=10, seed=1).sample(6).to("cpu", dtype)
    assert_same_meta_gradient(MLP().to(dtype), batch, 0.01, steps, tol, **FLOODS[flood])


@pytest.mark.parametrize("steps, flood, precision", [
    (1, "none", "float32"), (3, "batch", "float32"), (5, "instance", "float32"),
    (3, "instance", "float64"),
])
def test_same_meta_gradient_as_normal_mode_on_conv4_with_batchnorm(steps, flood, precision):
    dtype, tol = getattr(torch, precision), TOLERANCE[precision]
    # BatchNorm's double backward under vmap is where torch 2.13 goes wrong (see
    # metalearn/kernels); the recomputation must take the same safe path.
    torch.manual_seed(0)
    batch = image_batch(tasks=3, dtype=dtype)
    assert_same_meta_gradient(small_conv4(dtype), batch, 0.4, steps, tol, **FLOODS[flood])


def test_dropout_masks_are_replayed_in_the_recomputation():
    # Without the saved RNG state the backward would redraw the masks: a wrong gradient.
    torch.manual_seed(0)
    model, batch = MLP(dropout=0.3), SineTasks(shots=10, seed=1).sample(4)
    assert_same_meta_gradient(model, batch, 0.01, 3, 1e-5)
    # ... and the replay leaves the global RNG stream where the normal mode leaves it.
    states = []
    for memory_saving in (False, True):
        torch.manual_seed(4)
        meta_gradients(model, batch, 0.01, 3, memory_saving)
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
    torch.manual_seed(5)
    _, other_masks = meta_gradients(model, batch, 0.01, 3, False)
    torch.manual_seed(4)
    _, saving = meta_gradients(model, batch, 0.01, 3, True)
    assert max_relative_difference(other_masks, saving) > 1e-2


def test_comparison_can_fail_when_the_second_order_term_is_dropped():
    # The tolerance is tight enough to tell the exact gradient from the first-order one.
    torch.manual_seed(0)
    model, batch = MLP(), SineTasks(shots=10, seed=1).sample(6)
    _, saving = meta_gradients(model, batch, 0.01, 3, True)
    FOMAML(model, 0.01, 3).step(batch)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert max_relative_difference(saving, first) > 1e-3


@pytest.mark.parametrize("flood", ["none", "instance"])
def test_meta_gradient_matches_central_finite_differences(flood):
    torch.manual_seed(0)
    model = MLP(hidden=(6, 6)).double()
    batch = tiny_sine_batch()
    kwargs = {"inner_flood": 1.0, "flood_mode": "instance"} if flood == "instance" else {}
    _, analytic = meta_gradients(model, batch, 0.05, 2, True, **kwargs)

    def loss():
        return query_loss_after_adaptation(model, batch, 0.05, 2, **kwargs)

    for name, p in model.named_parameters():
        for j, numeric in central_differences(p, loss):
            assert analytic[name].view(-1)[j].item() == pytest.approx(
                numeric, rel=1e-5, abs=1e-8), f"{name}[{j}]"


def saved_bytes(memory_saving, steps):
    torch.manual_seed(0)
    learner = MAML(small_conv4(), 0.4, 1, memory_saving=memory_saving)
    records = memory_profile(learner, image_batch(tasks=2, queries=1), steps, repeats=1)
    return [r["saved_bytes"] for r in records]


def test_saved_memory_is_nearly_flat_in_inner_steps():
    one, ten = saved_bytes(True, (1, 10))
    (normal_ten,) = saved_bytes(False, (10,))
    # Per inner step only the fast weights of each task remain (here 2 x 7.7 KB), against
    # the activations of every step in the normal mode.
    fast_weights = 2 * sum(p.numel() * p.element_size() for p in small_conv4().parameters())
    assert ten - one <= 9 * fast_weights, (one, ten, fast_weights)
    assert ten <= 2 * one, (one, ten)
    assert ten < normal_ten, (ten, normal_ten)
    assert ten - one < (normal_ten - one) / 4


def test_zero_inner_steps_is_the_normal_joint_loss():
    torch.manual_seed(0)
    assert_same_meta_gradient(MLP(), SineTasks(seed=2).sample(4), 0.01, 0, 0.0)


def test_adapt_and_predict_are_unchanged():
    torch.manual_seed(0)
    model, batch = MLP(), SineTasks(seed=2).sample(3)
    fast = MAML(model, 0.01, 2).adapt(batch.support_x, batch.support_y)
    saving = MAML(model, 0.01, 2, memory_saving=True)
    again = saving.adapt(batch.support_x, batch.support_y)
    for n in fast:
        assert torch.equal(fast[n], again[n])
    assert saving.predict(again, batch.query_x).shape == batch.query_y.shape


def test_first_order_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="memory_saving=True needs second-order MAML"):
        MAML(MLP(), 0.01, 2, first_order=True, memory_saving=True)
    with pytest.raises(ValueError, match="already flat"):
        FOMAML(MLP(), 0.01, 2, memory_saving=True)
    maml = MAML(MLP(), 0.01, 2, memory_saving=True)
    maml.first_order = True  # changed after construction: caught at the step
    with pytest.raises(ValueError, match="first_order=False"):
        maml.step(SineTasks(seed=0).sample(2))


@pytest.mark.parametrize("make", [
    lambda: MetaSGD(MLP(), 0.01, 1),
    lambda: ANIL(MLP(), 0.01, 1),
    lambda: MAMLPlusPlus(MLP(), 0.01, 1),
])
def test_unsupported_subclasses_raise(make):
    learner = make()
    with pytest.raises(NotImplementedError, match=f"not for {type(learner).__name__}"):
        learner.memory_saving = True
    assert learner.memory_saving is False


def test_a_subclass_keeping_the_inner_loop_is_supported():
    class Logged(MAML):
        pass

    torch.manual_seed(0)
    batch = SineTasks(seed=2).sample(3)
    assert Logged(MLP(), 0.01, 2, memory_saving=True).step(batch)["loss"] > 0


def test_config_and_cli_build_a_memory_saving_maml(capsys):
    from metalearn.cli import _config_from, build_parser, main
    from metalearn.config import TrainConfig, build_learner
    from metalearn.training import _config_mismatch

    args = build_parser().parse_args(["train", "--memory-saving", "--inner-steps", "3"])
    cfg = _config_from(args, algorithm=args.algorithm).resolved()
    learner = build_learner(cfg, MLP())
    assert type(learner) is MAML and learner.memory_saving and learner.inner_steps == 3
    assert build_learner(TrainConfig().resolved(), MLP()).memory_saving is False
    # A checkpoint's config from before the option existed still resumes.
    old = TrainConfig().resolved().to_dict()
    del old["memory_saving"]
    assert _config_mismatch(old, TrainConfig().resolved().to_dict()) == []
    with pytest.raises(ValueError, match="algorithm='maml' only"):
        TrainConfig(algorithm="fomaml", memory_saving=True).resolved()
    with pytest.raises(SystemExit):
        main(["bench", "--memory-saving", "--algorithms", "maml,reptile"])
    assert "--memory-saving applies to maml only" in capsys.readouterr().err
