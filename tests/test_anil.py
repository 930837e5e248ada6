"""ANIL: head-only inner loop, against a plain per-task loop and finite differences."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn import ANIL, MAML
from metalearn.algorithms.anil import select_parameters
from metalearn.cli import _config_from, build_parser
from metalearn.config import build_learner
from metalearn.data import SineTasks
from metalearn.models import MLP, Conv4
from tests.reference import batch_stats_copy, losses_of
from tests.test_maml import grads_of, synthetic_image_batch, tiny_sine_batch


def anil_loop(model, batch, inner_lr, steps, head, first_order=False):
    """Per-task ANIL with torch.autograd.grad over the head only; returns (loss, grads)."""
    net = batch_stats_copy(model)
    theta = dict(net.named_parameters())
    total = 0.0
    for i in range(len(batch)):
        fast = dict(theta)
        for _ in range(steps):
            inner = losses_of(functional_call(net, fast, (batch.support_x[i],)),
                              batch.support_y[i]).mean()
            grads = torch.autograd.grad(inner, [fast[k] for k in head],
                                        create_graph=not first_order)
            fast.update({k: fast[k] - inner_lr * g for k, g in zip(head, grads)})
        out = functional_call(net, fast, (batch.query_x[i],))
        total = total + losses_of(out, batch.query_y[i]).mean()
    loss = total / len(batch)
    return loss.detach(), dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))


def test_body_gets_no_inner_update_but_an_outer_gradient():
    torch.manual_seed(0)
    model = MLP()
    anil = ANIL(model, 0.01, 3)
    batch = SineTasks(seed=1).sample(4)
    path = anil.adapt(batch.support_x, batch.support_y, trajectory=True)
    for fast in path[1:]:
        for name, p in model.named_parameters():
            same = torch.equal(fast[name], p.detach().expand_as(fast[name]))
            assert same == (name not in ("4.weight", "4.bias")), name
    anil.step(batch)
    for name, g in grads_of(model).items():
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_batched_step_matches_per_task_loop_on_sine(first_order, steps):
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(shots=10, queries=10, seed=1).sample(6)
    metrics = ANIL(model, 0.01, steps, first_order=first_order).step(batch)
    ref_loss, ref = anil_loop(model, batch, 0.01, steps, ("4.weight", "4.bias"), first_order)
    assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5)


def test_batched_step_matches_per_task_loop_on_conv4():
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8)
    batch = synthetic_image_batch()
    anil = ANIL(model, 0.4, 2)
    assert anil.inner_names == ("classifier.weight", "classifier.bias")
    metrics = anil.step(batch)
    ref_loss, ref = anil_loop(model, batch, 0.4, 2, anil.inner_names)
    assert metrics["accuracy"] >= 0 and metrics["loss"] == pytest.approx(ref_loss.item(),
                                                                         rel=1e-5)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-5)


def test_body_gradient_matches_finite_differences_and_first_order_does_not():
    torch.manual_seed(0)
    model = MLP(hidden=(6, 6)).double()
    batch = tiny_sine_batch()
    head = ("4.weight", "4.bias")
    ANIL(model, 0.1, 2).step(batch)
    second = grads_of(model)["2.weight"].view(-1)
    model.zero_grad()
    ANIL(model, 0.1, 2, first_order=True).step(batch)
    first = grads_of(model)["2.weight"].view(-1)
    w = model[2].weight.data.view(-1)
    numeric = torch.zeros_like(w)
    for j in range(len(w)):
        old = w[j].item()
        w[j] = old + 1e-6
        with torch.enable_grad():
            up = anil_loop(model, batch, 0.1, 2, head)[0]
        w[j] = old - 1e-6
        with torch.enable_grad():
            down = anil_loop(model, batch, 0.1, 2, head)[0]
        w[j] = old
        numeric[j] = (up - down) / 2e-6
    assert numeric.abs().max() > 1e-3
    torch.testing.assert_close(second, numeric, rtol=1e-5, atol=1e-8)
    assert (first - numeric).abs().max() > 1e-3 * numeric.abs().max()


def test_adapting_every_parameter_is_maml():
    torch.manual_seed(0)
    model = MLP()
    batch = SineTasks(seed=2).sample(4)
    ANIL(model, 0.01, 2, inner_params=lambda name: True).step(batch)
    anil = grads_of(model)
    model.zero_grad()
    MAML(model, 0.01, 2).step(batch)
    for n, g in grads_of(model).items():
        torch.testing.assert_close(anil[n], g)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)
        self.head2 = nn.Linear(4, 1)
        self.frozen = nn.Linear(1, 1).requires_grad_(False)

    def forward(self, x):
        return self.head(self.body(x)) + self.head2(self.body(x))


def test_parameter_selection():
    net = TwoHeads()
    # Two heads summed: no one layer produces the output, so ANIL asks for inner_params
    # (it used to take head2, the last declared).
    with pytest.raises(ValueError, match=r"several branches \(head, head2\).*inner_params="):
        select_parameters(net, None)
    assert select_parameters(net, "head") == ("head.weight", "head.bias")
    assert select_parameters(net, ["head.", "body.bias"]) == ("body.bias", "head.weight",
                                                              "head.bias")
    assert select_parameters(net, lambda n: n.endswith("bias")) == ("body.bias", "head.bias",
                                                                    "head2.bias")
    with pytest.raises(ValueError, match=r"selects none of .*body.weight, body.bias, head"):
        ANIL(net, 0.1, 1, inner_params="classifier")
    with pytest.raises(ValueError, match="selects none"):
        ANIL(net, 0.1, 1, inner_params="frozen")


def test_cli_flag_selects_the_head():
    args = build_parser().parse_args(["train", "--algorithm", "anil", "--anil-inner",
                                      "0, 2"])
    cfg = _config_from(args, algorithm=args.algorithm).resolved()
    learner = build_learner(cfg, MLP())
    assert isinstance(learner, ANIL) and learner.first_order is False
    assert learner.inner_names == ("0.weight", "0.bias", "2.weight", "2.bias")
