"""The one inner loop and its update rules, against hand-written references; and the one
door to the kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from metalearn.algorithms.inner_loop import adam, inner_loop, sgd

ROOT = Path(__file__).resolve().parent.parent / "metalearn"


def quadratic(a: torch.Tensor):
    # loss(w) = 0.5 * sum(a * w^2) * (1 + w.sum()), so that second derivatives matter.
    def loss(p, step, order):
        w = p["w"]
        return 0.5 * (a * w * w).sum() * (1 + w.sum())
    return loss


def test_sgd_loop_is_the_hand_written_loop_to_second_order():
    torch.manual_seed(0)
    a = torch.rand(4, dtype=torch.float64) + 0.5
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = quadratic(a)
    fast = inner_loop(loss, {"w": theta}, 3, sgd(0.1))["w"]
    meta = torch.autograd.grad((fast ** 2).sum(), theta)[0]
    w = theta
    for _ in range(3):
        g = torch.autograd.grad(loss({"w": w}, 0, 2), w, create_graph=True)[0]
        w = w - 0.1 * g
    ref = torch.autograd.grad((w ** 2).sum(), theta)[0]
    torch.testing.assert_close(fast, w, rtol=0, atol=1e-15)
    torch.testing.assert_close(meta, ref, rtol=1e-12, atol=1e-14)


def test_first_order_treats_the_inner_gradients_as_constants():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    theta = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)
    fast = inner_loop(quadratic(a), {"w": theta}, 2, sgd(0.1), first_order=True)["w"]
    # d fast / d theta is the identity: the meta-gradient is the outer gradient at fast.
    meta = torch.autograd.grad((fast ** 2).sum(), theta)[0]
    torch.testing.assert_close(meta, 2 * fast.detach())


def test_trajectory_and_the_order_passed_to_the_loss():
    seen = []

    def loss(p, step, order):
        seen.append((step, order))
        return (p["w"] - 1.0).pow(2).sum()

    w0 = {"w": torch.zeros(())}
    fast, path = inner_loop(loss, w0, 3, sgd(0.25), trajectory=True)
    assert [float(p["w"]) for p in path] == [0.5, 0.75, 0.875]
    assert float(fast["w"]) == 0.875 and seen == [(0, 2), (1, 2), (2, 2)]
    seen.clear()
    inner_loop(loss, w0, 2, sgd(0.25), first_order=True)
    assert seen == [(0, 0), (1, 0)]


def test_sgd_with_learned_rates_per_name_and_step():
    rates = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([1.0, 0.5])}
    update = sgd(lambda name, step: rates[name][step])
    params = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    grads = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
    new, _ = update(1, params, grads, None)
    assert float(new["a"]) == pytest.approx(0.8) and float(new["b"]) == pytest.approx(1.5)


def test_adam_matches_torch_optim_adam():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64)
    target = torch.randn(5, dtype=torch.float64)
    loss = lambda p, step, order: ((p["w"] - target) ** 4).sum()  # noqa: E731
    fast = inner_loop(loss, {"w": w.clone()}, 4, adam(0.01, (0.0, 0.999), 1e-8),
                      first_order=True)["w"]
    ref = w.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(4):
        opt.zero_grad()
        ((ref - target) ** 4).sum().backward()
        opt.step()
    torch.testing.assert_close(fast, ref.detach(), rtol=1e-12, atol=1e-14)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_functional_model_opens_the_kernel_door():
    importers = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                       if "kernels" not in p.relative_to(ROOT).parts
                       and any(m.startswith("metalearn.kernels") for m in _imported_modules(p)))
    # The command line sets the public switch for --compile; no learner touches the kernels.
    assert importers == ["algorithms/functional_model.py", "cli.py"]
