"""Plain per-task loops: the independent reference for the batched algorithms.

Nothing here uses vmap or torch.func transforms: each task is adapted on its own with
``torch.autograd.grad``, on a deep copy of the model whose BatchNorm layers have no
running statistics (so they use batch statistics, as the papers do).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def batch_stats_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return clone


def losses_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.dtype.is_floating_point:
        return ((out - y) ** 2).reshape(len(out), -1).mean(1)
    return F.cross_entropy(out, y, reduction="none")


def flood(losses: torch.Tensor, level, mode: str) -> torch.Tensor:
    if level is None:
        return losses.mean()
    if mode == "batch":
        return (losses.mean() - level).abs() + level
    return ((losses - level).abs() + level).mean()


def maml_loop(model, batch, inner_lr, steps, first_order=False, inner_flood=None,
              flood_mode="batch"):
    """Mean query loss after per-task SGD adaptation; returns (loss, grads by name)."""
    net = batch_stats_copy(model)
    theta = {n: p for n, p in net.named_parameters()}
    total = 0.0
    for i in range(len(batch)):
        fast = dict(theta)
        for _ in range(steps):
            inner = flood(losses_of(functional_call(net, fast, (batch.support_x[i],)),
                                    batch.support_y[i]), inner_flood, flood_mode)
            grads = torch.autograd.grad(inner, list(fast.values()),
                                        create_graph=not first_order)
            fast = {k: v - inner_lr * g for (k, v), g in zip(fast.items(), grads)}
        out = functional_call(net, fast, (batch.query_x[i],))
        total = total + losses_of(out, batch.query_y[i]).mean()
    loss = total / len(batch)
    grads = torch.autograd.grad(loss, list(theta.values()))
    return loss.detach(), dict(zip(theta, grads))


def reptile_loop(model, batch, inner_lr, steps, indices=None, optimizer="sgd",
                 betas=(0.0, 0.999), eps=1e-8):
    """theta - mean_i phi_i, with phi_i from a torch.optim optimiser run per task."""
    net = batch_stats_copy(model)
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    phis = []
    for i in range(len(batch)):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(theta[n])
        if optimizer == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=inner_lr, betas=betas, eps=eps)
        _adapt_task(net, opt, batch, i, steps, indices)
        phis.append({n: p.detach().clone() for n, p in net.named_parameters()})
    return {n: theta[n] - torch.stack([phi[n] for phi in phis]).mean(0) for n in theta}


def _adapt_task(net, opt, batch, i, steps, indices=None, grads=None):
    """``steps`` steps of ``opt`` on task ``i``'s support set (its mini-batches where
    ``indices`` gives them); each step's gradients appended to ``grads`` if given."""
    for t in range(steps):
        x, y = batch.support_x[i], batch.support_y[i]
        if indices is not None:
            x, y = x[indices[i, t]], y[indices[i, t]]
        opt.zero_grad()
        losses_of(net(x), y).mean().backward()
        if grads is not None:
            grads.append({n: p.grad.detach().clone() for n, p in net.named_parameters()})
        opt.step()


def reptile_loop_carried_adam(model, batch, inner_lr, steps, state, indices=None,
                              betas=(0.0, 0.999), eps=1e-8):
    """Reptile with the reference code's inner Adam carried across tasks, task by task.

    ``state`` is ``(m, v, t)`` (dicts by parameter name, and the step count). Every task
    starts a ``torch.optim.Adam`` from it (the batched learner runs the tasks of a
    meta-batch in parallel from the state they share); the carried state afterwards is
    Adam's recursion run over all the tasks' gradients in task order, as one optimiser
    adapting the tasks in turn would leave it given the same gradients. Returns
    ``(theta - mean_i phi_i, (m, v, t))``.
    """
    net = batch_stats_copy(model)
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    m0, v0, t0 = state
    phis, grads = [], []
    for i in range(len(batch)):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(theta[n])
        opt = torch.optim.Adam(net.parameters(), lr=inner_lr, betas=betas, eps=eps)
        for n, p in net.named_parameters():
            opt.state[p] = {"step": torch.tensor(float(t0)), "exp_avg": m0[n].clone(),
                            "exp_avg_sq": v0[n].clone()}
        _adapt_task(net, opt, batch, i, steps, indices, grads)
        phis.append({n: p.detach().clone() for n, p in net.named_parameters()})
    b1, b2 = betas
    m = {n: t.clone() for n, t in m0.items()}
    v = {n: t.clone() for n, t in v0.items()}
    for g in grads:  # Adam's moment recursions over every step of every task, in order
        m = {n: b1 * m[n] + (1 - b1) * g[n] for n in m}
        v = {n: b2 * v[n] + (1 - b2) * g[n] * g[n] for n in v}
    direction = {n: theta[n] - torch.stack([phi[n] for phi in phis]).mean(0) for n in theta}
    return direction, (m, v, float(t0) + len(grads))


def central_differences(tensor: torch.Tensor, loss: Callable[[], torch.Tensor | float],
                        eps: float = 1e-6, limit: int | None = None,
                        ) -> Iterator[tuple[int, float]]:
    """``(j, (loss(t + eps e_j) - loss(t - eps e_j)) / 2 eps)`` for the first ``limit``
    entries of ``tensor``, perturbed in place and restored."""
    flat = tensor.data.view(-1)
    for j in range(flat.numel() if limit is None else min(limit, flat.numel())):
        old = flat[j].item()
        flat[j] = old + eps
        up = float(loss())
        flat[j] = old - eps
        down = float(loss())
        flat[j] = old
        yield j, (up - down) / (2 * eps)
