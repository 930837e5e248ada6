"""ResNet-12 and MAML's 84x84 Conv4 under every learner, against the per-task references
(plain autograd loops, no vmap), in float64 on narrow networks and small images; and the
full-size networks' shapes and parameter counts."""

import math

import pytest
import torch
from torch.func import functional_call

from metalearn import ANIL, FOMAML, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from metalearn.algorithms.maml_plus_plus import msl_weights
from metalearn.data import TaskBatch
from metalearn.models import Conv4, ResNet12
from metalearn.models.resnet12 import DropBlock
from tests.reference import batch_stats_copy, losses_of, maml_loop, reptile_loop
from tests.test_anil import anil_loop
from tests.test_maml_plus_plus import learned_tables, mamlpp_loop
from tests.test_meta_sgd import lr_grads, meta_sgd_loop, random_rates

WAYS, SIZE = 3, 16  # 16x16 images end at 1x1 after the four 2x2 max-pools

BACKBONES = {
    "resnet12": lambda: ResNet12(WAYS, channels=(2, 3, 3, 4)),
    "conv4_mini_imagenet": lambda: Conv4.mini_imagenet(WAYS, hidden=4, image_size=SIZE),
}


def backbone(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BACKBONES[name]().double()


def image_batch(tasks=2, shots=2, queries=2, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(tasks, WAYS * n, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
        return x, torch.arange(WAYS).repeat_interleave(n).repeat(tasks, 1)

    return TaskBatch(*split(shots), *split(queries))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got: dict, ref: dict, tol: float = 1e-9) -> None:
    # Relative to the largest entry of the whole gradient: Conv4's conv biases in front of
    # BatchNorm have a true gradient of 0, so theirs is rounding noise.
    assert set(got) == set(ref)
    scale = max(r.abs().max().item() for r in ref.values())
    assert scale > 0
    worst = max((got[n] - ref[n]).abs().max().item() for n in ref) / scale
    assert worst <= tol, worst


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("learner", ["maml", "fomaml", "maml_memory_saving"])
def test_maml_family_matches_per_task_loop(name, learner):
    model, batch = backbone(name), image_batch()
    make = {"maml": lambda: MAML(model, 0.3, 2), "fomaml": lambda: FOMAML(model, 0.3, 2),
            "maml_memory_saving": lambda: MAML(model, 0.3, 2, memory_saving=True)}[learner]
    metrics = make().step(batch)
    loss, ref = maml_loop(model, batch, 0.3, 2, first_order=learner == "fomaml")
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert_same(grads(model), ref)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_reptile_matches_per_task_loop(name):
    model, batch = backbone(name), image_batch()
    Reptile(model, 0.1, 3).step(batch)
    assert_same(grads(model), reptile_loop(model, batch, 0.1, 3))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_meta_sgd_matches_per_task_loop(name):
    model, batch = backbone(name), image_batch()
    learner = MetaSGD(model, 0.1, 2)
    rates = random_rates(learner, low=0.05, high=0.3)
    metrics = learner.step(batch)
    loss, ref_theta, ref_lr = meta_sgd_loop(model, rates, batch, 2)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert_same(grads(model), ref_theta)
    assert_same(lr_grads(learner), ref_lr)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_anil_matches_per_task_loop(name):
    model, batch = backbone(name), image_batch()
    learner = ANIL(model, 0.3, 2)
    assert learner.inner_names == ("classifier.weight", "classifier.bias")
    metrics = learner.step(batch)
    loss, ref = anil_loop(model, batch, 0.3, 2, learner.inner_names)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert_same(grads(model), ref)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_maml_plus_plus_matches_per_task_loop(name):
    model, batch = backbone(name), image_batch()
    learner = MAMLPlusPlus(model, 0.1, 2, msl_iterations=10)
    learner.iteration = 3  # the multi-step loss weighs both steps
    lrs, bn = learned_tables(learner)
    metrics = learner.step(batch)
    objective, ref = mamlpp_loop(model, batch, 2, lrs, bn, msl_weights(2, 3, 10))
    assert metrics["objective"] == pytest.approx(objective.item(), rel=1e-10)
    assert_same(grads(model), {n: ref[n] for n in grads(model)})
    assert_same({f"lr:{n}": t.grad for n, t in lrs.items()},
                {f"lr:{n}": ref[f"lr:{n}"] for n in lrs})
    assert_same({f"bn:{n}": t.grad for n, t in bn.items()},
                {f"bn:{n}": ref[f"bn:{n}"] for n in bn})


def imaml_reference(model, batch, lr, steps, lam, terms=40):
    """Per task: gradient descent on the proximal loss with autograd, then the implicit
    gradient (I + H / lam)^-1 grad L_query(phi) as the Neumann series sum_k (-H / lam)^k
    grad L_query(phi), with Hessian-vector products by plain double backward (no vmap, no
    conjugate gradient)."""
    net = batch_stats_copy(model)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflatten(v):
        parts = torch.split(v, [math.prod(s) for s in shapes])
        return {n: t.view(s) for n, t, s in zip(names, parts, shapes)}

    def loss(v, x, y):
        return losses_of(functional_call(net, unflatten(v), (x,)), y).mean()

    total = 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        phi = theta.clone()
        for _ in range(steps):
            v = phi.detach().requires_grad_()
            g, = torch.autograd.grad(loss(v, sx, sy) + 0.5 * lam * (v - theta).pow(2).sum(), v)
            phi = phi - lr * g
        at = phi.detach().requires_grad_()
        support_grad, = torch.autograd.grad(loss(at, sx, sy), at, create_graph=True)

        def hvp(t, support_grad=support_grad, at=at):
            return torch.autograd.grad(support_grad @ t, at, retain_graph=True)[0]

        q, = torch.autograd.grad(loss(at, qx, qy), at)
        term, solution = q, q
        for _ in range(terms):
            term = -hvp(term) / lam
            solution = solution + term
        residual = solution + hvp(solution) / lam - q
        assert residual.norm() <= 1e-12 * q.norm()  # the series converged
        total = total + solution
    return unflatten(total / len(batch))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_imaml_matches_the_implicit_gradient(name):
    model, batch = backbone(name), image_batch(shots=1, queries=1)
    lam = 50.0  # large enough for the series: |eigenvalues of H| / lam < 1
    IMAML(model, 0.05, 3, lam=lam, cg_steps=16).step(batch)
    ref = imaml_reference(model, batch, 0.05, 3, lam)
    assert_same(grads(model), ref)
    model.zero_grad()
    IMAML(model, 0.05, 3, lam=lam, cg_steps=0).step(batch)  # first order: must be caught
    with pytest.raises(AssertionError):
        assert_same(grads(model), ref, tol=1e-4)


def test_full_size_resnet12_is_learn2learns_layout():
    net = ResNet12(5)
    count = sum(p.numel() for p in net.parameters())
    assert count == 12_427_525  # = learn2learn 0.2.0's ResNet12(5), checked side by side
    assert sum(p.numel() for p in net.classifier.parameters()) == 640 * 5 + 5
    assert [b.conv1.out_channels for b in net.features] == [64, 160, 320, 640]
    for block in net.features:
        assert block.conv1.bias is None and block.shortcut[0].kernel_size == (1, 1)
        assert block.relu.negative_slope == 0.1 and isinstance(block.drop, torch.nn.Identity)
    # MetaOptNet's init: Kaiming-normal with fan-out and gain sqrt(2) for the convolutions.
    w = net.features[3].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (640 * 9)), rel=0.01)
    flat = ResNet12(5, avg_pool=False)
    assert flat.classifier.in_features == 640 * 5 * 5  # the 16,000-dim embedding at 84x84


@pytest.mark.slow
def test_full_size_forwards_at_84x84():
    with torch.no_grad():
        assert ResNet12(5)(torch.randn(2, 3, 84, 84)).shape == (2, 5)
        assert ResNet12(5, avg_pool=False)(torch.randn(2, 3, 84, 84)).shape == (2, 5)


def test_mini_imagenet_conv4_is_mamls_network():
    net = Conv4.mini_imagenet(5)
    assert sum(p.numel() for p in net.parameters()) == 32_901
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in net.features if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [32] * 4 and convs[0].in_channels == 3
    assert all(c.stride == (1, 1) for c in convs) and len(pools) == 4
    assert net.classifier.in_features == 32 * 5 * 5
    assert net(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    bound = math.sqrt(6 / (32 * 9 + 32 * 9))  # Xavier-uniform, as the MAML code
    assert convs[2].weight.abs().max().item() <= bound
    assert Conv4.mini_imagenet(5, hidden=8).classifier.in_features == 8 * 5 * 5


def test_resnet12_bad_arguments():
    with pytest.raises(ValueError, match="channels must be 4"):
        ResNet12(5, channels=(64, 160, 320))
    with pytest.raises(ValueError, match="drop_rate"):
        ResNet12(5, drop_rate=1.0)
    with pytest.raises(ValueError, match="image_size 8 is too small"):
        ResNet12(5, avg_pool=False, image_size=8)


def test_dropblock_drops_square_blocks_at_about_the_rate():
    torch.manual_seed(0)
    block = DropBlock(0.2, block_size=3).train()
    out = block(torch.ones(64, 8, 12, 12))
    kept = out != 0
    assert 1 - kept.double().mean().item() == pytest.approx(0.2, abs=0.05)
    assert out[kept].unique().numel() == 1  # one scale per forward
    assert out.sum().item() == pytest.approx(out.numel(), rel=1e-6)  # the mean is kept
    # Every dropped unit lies in some dropped 3x3 square.
    dropped = (~kept).double()
    squares = torch.nn.functional.avg_pool2d(dropped, 3, stride=1) == 1
    padded = torch.nn.functional.pad(squares.double(), (2, 2, 2, 2))
    covered = torch.nn.functional.max_pool2d(padded, 3, stride=1) == 1
    assert covered[~kept].all()


def test_dropblock_draws_per_task_under_maml():
    torch.manual_seed(0)
    model = ResNet12(WAYS, channels=(2, 3, 3, 4), drop_rate=0.2).double()
    batch = image_batch()
    assert isinstance(model.features[2].drop, DropBlock)
    assert isinstance(model.features[0].drop, torch.nn.Dropout)
    metrics = MAML(model, 0.3, 1).step(batch)
    assert math.isfinite(metrics["loss"])
    assert all(p.grad is not None for p in model.parameters())
