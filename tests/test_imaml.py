"""iMAML against the exact implicit gradient (dense Hessian solve, finite differences of the
converged inner solution), and its memory against inner steps."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn import IMAML, MAML
from metalearn.algorithms.imaml import conjugate_gradient
from metalearn.cli import _config_from, build_parser
from metalearn.config import TrainConfig, build_learner
from metalearn.data import SineTasks, TaskBatch
from metalearn.memory import memory_profile
from metalearn.models import MLP
from tests.reference import losses_of
from tests.test_maml import grads_of

LAM, LR, STEPS = 2.0, 0.3, 200  # the inner problem converges to ~1e-16 in STEPS steps


def smooth_net():
    # tanh, not ReLU: gradient descent on a ReLU net can stall on a kink, never converging.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def smooth_tasks(tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(tasks, n, 1, generator=g, dtype=torch.float64) * 2 - 1
        return x, torch.sin(2 * x) + 0.1 * torch.randn(tasks, n, 1, generator=g,
                                                        dtype=torch.float64)

    return TaskBatch(*split(5), *split(6))


class Flat:
    """The model as a function of one flat parameter vector (plain autograd, no vmap)."""

    def __init__(self, model):
        self.model = model
        self.shapes = {n: p.shape for n, p in model.named_parameters()}

    def vector(self):
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def loss(self, v, x, y):
        params, i = {}, 0
        for n, s in self.shapes.items():
            params[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return losses_of(functional_call(self.model, params, (x,)), y).mean()

    def solve_inner(self, theta, x, y):
        """argmin_phi L(phi) + LAM/2 |phi - theta|^2: gradient descent, then Newton steps."""
        phi = theta.clone()
        for _ in range(STEPS):
            phi = phi - LR * (torch.func.grad(self.loss)(phi, x, y) + LAM * (phi - theta))
        for _ in range(3):
            g = torch.func.grad(self.loss)(phi, x, y) + LAM * (phi - theta)
            h = torch.autograd.functional.hessian(lambda v: self.loss(v, x, y), phi)
            phi = phi - torch.linalg.solve(h + LAM * torch.eye(len(phi), dtype=phi.dtype), g)
        assert (torch.func.grad(self.loss)(phi, x, y) + LAM * (phi - theta)).abs().max() < 1e-12
        return phi

    def implicit_gradient(self, batch):
        """Mean over tasks of (I + H/LAM)^-1 grad L_query(phi*), with a dense solve."""
        theta, total = self.vector(), 0.0
        for i in range(len(batch)):
            phi = self.solve_inner(theta, batch.support_x[i], batch.support_y[i])
            h = torch.autograd.functional.hessian(
                lambda v, i=i: self.loss(v, batch.support_x[i], batch.support_y[i]), phi)
            a = torch.eye(len(phi), dtype=phi.dtype) + h / LAM
            assert torch.linalg.eigvalsh(a).min() > 0.05  # CG's premise: positive definite
            v = torch.func.grad(self.loss)(phi, batch.query_x[i], batch.query_y[i])
            total = total + torch.linalg.solve(a, v)
        return total / len(batch)

    def query_loss_at_solution(self, theta, batch):
        return sum(self.loss(self.solve_inner(theta, batch.support_x[i], batch.support_y[i]),
                             batch.query_x[i], batch.query_y[i])
                   for i in range(len(batch))) / len(batch)


def flat_grad(model):
    return torch.cat([g.reshape(-1) for g in grads_of(model).values()])


def test_meta_gradient_is_the_dense_implicit_gradient():
    model, batch = smooth_net(), smooth_tasks()
    flat = Flat(model)
    IMAML(model, LR, STEPS, lam=LAM, cg_steps=len(flat.vector())).step(batch)
    exact = flat.implicit_gradient(batch)
    torch.testing.assert_close(flat_grad(model), exact, rtol=1e-7, atol=1e-10)


def test_meta_gradient_matches_finite_differences_of_the_converged_solution():
    model, batch = smooth_net(), smooth_tasks(seed=1)
    flat = Flat(model)
    IMAML(model, LR, STEPS, lam=LAM, cg_steps=13).step(batch)
    analytic, theta = flat_grad(model), flat.vector()
    for j in (0, 5, 9, 12):
        e = torch.zeros_like(theta)
        e[j] = 1e-5
        up = flat.query_loss_at_solution(theta + e, batch)
        down = flat.query_loss_at_solution(theta - e, batch)
        assert analytic[j].item() == pytest.approx(((up - down) / 2e-5).item(), rel=1e-6,
                                                   abs=1e-9)


def test_fewer_cg_steps_are_further_off_and_first_order_is_wrong():
    model, batch = smooth_net(), smooth_tasks()
    exact = Flat(model).implicit_gradient(batch)
    errors = []
    for cg_steps in (0, 1, 3, 13):
        model.zero_grad()
        IMAML(model, LR, STEPS, lam=LAM, cg_steps=cg_steps).step(batch)
        errors.append((flat_grad(model) - exact).norm().item())
    assert errors[0] > 1e-2 * exact.norm().item()  # the implicit correction matters here
    assert errors[0] > errors[2] > errors[3] and errors[1] > errors[3]
    assert errors[3] < 1e-9


def test_conjugate_gradient_is_exact_in_n_steps_and_safe_when_converged():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"v": a @ v["v"]}, {"v": b}, 10)["v"]  # 4 steps past n
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
    zero = conjugate_gradient(lambda v: {"v": a @ v["v"]}, {"v": 0 * b}, 3)["v"]
    assert torch.equal(zero, 0 * b)  # no 0/0 once the residual vanishes


def test_conjugate_gradient_stops_at_non_positive_curvature_under_vmap():
    # Three systems solved at once: SPD (solved exactly in n = 3 steps), indefinite with
    # negative curvature met at the second step (the first iterate is kept), and negative
    # definite (negative curvature at once: b is returned).
    dtype = torch.float64
    spd = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=dtype)
    indefinite = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=dtype))
    mats = torch.stack([spd, indefinite, -torch.eye(3, dtype=dtype)])
    b = torch.ones(3, 3, dtype=dtype)

    def solve(a, rhs):
        return conjugate_gradient(lambda v: {"v": a @ v["v"]}, {"v": rhs}, 3)["v"]

    x = torch.func.vmap(solve)(mats, b)
    torch.testing.assert_close(x[0], torch.linalg.solve(spd, b[0]))
    # Step 1: alpha = b.b / b.Ab = 3/4. Step 2's direction r + (4.875 / 3) b, with
    # r = b - (3/4) A b, has curvature -8.4375: stop there.
    torch.testing.assert_close(x[1], 0.75 * b[1])
    torch.testing.assert_close(x[2], b[2])


def test_adapt_solves_the_proximal_problem():
    model, batch = smooth_net(), smooth_tasks()
    flat = Flat(model)
    fast = IMAML(model, LR, STEPS, lam=LAM).adapt(batch.support_x, batch.support_y)
    got = torch.cat([fast[n][1].reshape(-1) for n in flat.shapes])
    want = flat.solve_inner(flat.vector(), batch.support_x[1], batch.support_y[1])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_memory_does_not_grow_with_inner_steps():
    torch.manual_seed(0)
    batch = SineTasks(seed=0).sample(4)

    def saved(learner):
        rows = memory_profile(learner, batch, inner_steps=(1, 8), repeats=1)
        return [r["saved_bytes"] for r in rows]

    imaml = saved(IMAML(MLP(), 0.01, 1, cg_steps=3))
    maml = saved(MAML(MLP(), 0.01, 1))
    assert imaml[0] > 0 and imaml[1] == imaml[0]
    assert maml[1] > 3 * maml[0]  # the meter sees an unrolled graph when there is one


def test_classification_and_cli_options():
    args = build_parser().parse_args(["train", "--algorithm", "imaml", "--imaml-lambda",
                                      "0.5", "--cg-steps", "2"])
    cfg = _config_from(args, algorithm=args.algorithm).resolved()
    learner = build_learner(cfg, MLP())
    assert isinstance(learner, IMAML) and (learner.lam, learner.cg_steps) == (0.5, 2)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        IMAML(MLP(), 0.01, 1, lam=0.0)


def test_omniglot_preset_is_the_papers_lambda_with_its_own_inner_lr():
    from metalearn.config import TrainConfig

    omniglot = TrainConfig(dataset="omniglot", algorithm="imaml").resolved()
    assert (omniglot.imaml_lambda, omniglot.inner_lr, omniglot.inner_steps) == (2.0, 0.025, 16)
    sine = TrainConfig(dataset="sine", algorithm="imaml").resolved()
    assert (sine.imaml_lambda, sine.inner_lr) == (1.0, 0.01)
    given = TrainConfig(dataset="omniglot", algorithm="imaml", imaml_lambda=5.0,
                        inner_lr=0.1).resolved()
    assert (given.imaml_lambda, given.inner_lr) == (5.0, 0.1)
    maml = TrainConfig(dataset="omniglot", algorithm="maml").resolved()
    assert (maml.inner_lr, maml.imaml_lambda) == (0.4, None)


def test_the_reference_codes_protocol_against_a_dense_solve():
    # aravindr93/imaml_dev: plain SGD steps on the support loss, one pull-back step on
    # lam/2 |phi - theta|^2, then CG on (1 + cg_damping) I + H / (lam + lam_damping).
    model, batch = smooth_net(), smooth_tasks(seed=2)
    flat = Flat(model)
    lr, steps, lam, cg_damping, lam_damping = 0.1, 16, 2.0, 1.0, 10.0
    n = len(flat.vector())
    learner = IMAML(model, lr, steps, lam=lam, cg_steps=n, inner_solve="pullback",
                    cg_damping=cg_damping, lam_damping=lam_damping)
    learner.step(batch)
    theta, want, phis = flat.vector(), 0.0, []
    for i in range(len(batch)):
        sx, sy = batch.support_x[i], batch.support_y[i]
        phi = theta.clone()
        for _ in range(steps):
            phi = phi - lr * torch.func.grad(flat.loss)(phi, sx, sy)
        phi = phi - lr * lam * (phi - theta)
        phis.append(phi)
        h = torch.autograd.functional.hessian(lambda v, sx=sx, sy=sy: flat.loss(v, sx, sy), phi)
        a = (1 + cg_damping) * torch.eye(n, dtype=phi.dtype) + h / (lam + lam_damping)
        v = torch.func.grad(flat.loss)(phi, batch.query_x[i], batch.query_y[i])
        want = want + torch.linalg.solve(a, v) / len(batch)
    torch.testing.assert_close(flat_grad(model), want, rtol=1e-8, atol=1e-11)
    fast = learner.adapt(batch.support_x, batch.support_y)
    got = torch.cat([fast[k][1].reshape(-1) for k in flat.shapes])
    torch.testing.assert_close(got, phis[1], rtol=1e-10, atol=1e-12)


def test_the_reference_protocol_tests_with_lam_zero_and_checks_its_arguments():
    model, batch = smooth_net(), smooth_tasks()
    # lam = 0 (the reference's test setting): no pull-back, the plain inner steps only.
    plain = IMAML(model, 0.1, 3, lam=0.0, cg_steps=0, inner_solve="pullback")
    fomaml = MAML(model, 0.1, 3, first_order=True)
    a = plain.adapt(batch.support_x, batch.support_y)
    b = fomaml.adapt(batch.support_x, batch.support_y)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="lam \\+ lam_damping must be > 0"):
        IMAML(model, 0.1, 3, lam=0.0, cg_steps=2, inner_solve="pullback")
    with pytest.raises(ValueError, match="inner_solve must be one of"):
        IMAML(model, 0.1, 3, inner_solve="newton")
    with pytest.raises(ValueError, match="cg_damping must be a finite number >= 0"):
        IMAML(model, 0.1, 3, cg_damping=-1.0)


def test_the_reference_protocol_from_the_cli():
    args = build_parser().parse_args([
        "train", "--dataset", "omniglot", "--algorithm", "imaml", "--imaml-inner-solve",
        "pullback", "--cg-damping", "1", "--lam-damping", "10", "--inner-lr", "0.1"])
    cfg = _config_from(args, algorithm=args.algorithm).resolved()
    torch.manual_seed(0)
    model = MLP()
    train = build_learner(cfg, model)
    assert (train.inner_solve, train.lam, train.cg_damping, train.lam_damping) == (
        "pullback", 2.0, 1.0, 10.0)
    test = build_learner(cfg, model, evaluation=True)
    assert (test.inner_solve, test.lam) == ("pullback", 0.0)  # the reference tests at lam 0
    default = TrainConfig(dataset="omniglot", algorithm="imaml").resolved()
    assert (default.imaml_inner_solve, default.cg_damping, default.lam_damping) == (
        "proximal", 0.0, 0.0)
    with pytest.raises(ValueError, match="cg_damping applies to algorithm='imaml' only"):
        TrainConfig(algorithm="maml", cg_damping=1.0).resolved()
