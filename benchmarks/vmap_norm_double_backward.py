"""A minimal reproduction of torch's wrong second derivative of native norm kernels under vmap.

    python benchmarks/vmap_norm_double_backward.py

Why metalearn computes BatchNorm, InstanceNorm and LayerNorm itself wherever a second
derivative is taken. The pattern is MAML's: the inner gradient of every task is
``vmap(torch.func.grad(loss), in_dims=(None, 0, 0))`` with the initial weights shared by
all tasks, and the outer gradient is plain autograd through it. With the native kernels,
the outer gradient of the weights *before* the norm layer is wrong (float64, tiny shapes);
the same computation with the normalisation written out in ``var_mean`` is exact, as is
every variant without a norm layer, and so is the same meta-gradient computed in torch.func
alone (``vmap`` of ``grad`` of ``grad``, last column). The reference is a per-task loop of
``torch.autograd.grad(..., create_graph=True)``, itself checked by central finite
differences. The script needs torch only (the metalearn imports are for the JSON header),
so its ``reproduce`` function can go into an upstream report as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header, write_json  # noqa: E402

KINDS = ("batch_norm", "instance_norm", "layer_norm", "var_mean (written out)", "no norm")
TASKS, N, C, H = 3, 4, 2, 3


def normalise(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "batch_norm":
        return F.batch_norm(h, None, None, w, b, training=True)
    if kind == "instance_norm":
        return F.instance_norm(h, weight=w, bias=b)
    if kind == "layer_norm":
        shape = h.shape[1:]
        return F.layer_norm(h, shape, w[:, None, None].expand(shape).contiguous(),
                            b[:, None, None].expand(shape).contiguous())
    if kind == "var_mean (written out)":
        var, mean = torch.var_mean(h, dim=(0, 2, 3), keepdim=True, correction=0)
        return (h - mean) / torch.sqrt(var + 1e-5) * w[:, None, None] + b[:, None, None]
    return h * w[:, None, None] + b[:, None, None]


def reproduce(kind: str, shared_init: bool = True, seed: int = 0) -> dict:
    """Relative error of the vmapped meta-gradient against the per-task loop, per weight."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    xs, xq = (torch.randn(TASKS, N, 1, H, H, generator=g, dtype=dt) for _ in range(2))
    ys, yq = (torch.randn(TASKS, N, C, H, H, generator=g, dtype=dt) for _ in range(2))
    shapes = [(C, 1, 3, 3), (C,), (C,)]  # conv weight, norm weight, norm bias
    lead = () if shared_init else (TASKS,)
    params = tuple(torch.randn(*lead, *s, generator=g, dtype=dt).requires_grad_()
                   for s in shapes)

    def loss(p, x, y):
        k, w, b = p
        return ((normalise(F.conv2d(x, k, padding=1), w, b, kind) - y) ** 2).mean()

    def meta_loss_vmapped(p):
        in_dims = (None, 0, 0) if shared_init else (0, 0, 0)
        inner = vmap(grad(loss), in_dims=in_dims)(p, xs, ys)  # [TASKS, ...] per weight
        fast = tuple(a - 0.1 * d for a, d in zip(p, inner))
        return vmap(loss)(fast, xq, yq).sum()

    def meta_loss_loop(p):
        total = 0.0
        for t in range(TASKS):
            pt = p if shared_init else tuple(a[t] for a in p)
            inner = torch.autograd.grad(loss(pt, xs[t], ys[t]), pt, create_graph=True)
            total = total + loss(tuple(a - 0.1 * d for a, d in zip(pt, inner)), xq[t], yq[t])
        return total

    def meta_loss_task(p, x_s, y_s, x_q, y_q):
        inner = grad(loss)(p, x_s, y_s)
        return loss(tuple(a - 0.1 * d for a, d in zip(p, inner)), x_q, y_q)

    batched = torch.autograd.grad(meta_loss_vmapped(params), params)
    loop = torch.autograd.grad(meta_loss_loop(params), params)
    # The same meta-gradient in torch.func alone: vmap over tasks of grad of grad.
    in_dims = (None, 0, 0, 0, 0) if shared_init else 0
    per_task = vmap(grad(meta_loss_task), in_dims=in_dims)(
        tuple(a.detach() for a in params), xs, ys, xq, yq)
    func_only = tuple(a.sum(0) for a in per_task) if shared_init else per_task
    # The reference itself, by central differences on the conv weight's first entries.
    eps, fd = 1e-6, []
    flat = params[0].detach().view(-1)  # shares storage: perturbs the weight in place
    for i in range(4):
        flat[i] += eps
        up = meta_loss_loop(params).item()
        flat[i] -= 2 * eps
        down = meta_loss_loop(params).item()
        flat[i] += eps
        fd.append((up - down) / (2 * eps))
    fd_err = max(abs(a - b) for a, b in zip(fd, loop[0].view(-1)[:4].tolist()))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {"kind": kind, "shared_init": shared_init,
            "rel_error": dict(zip(("conv_weight", "norm_weight", "norm_bias"),
                                  (rel(a, b) for a, b in zip(batched, loop)))),
            "func_only_rel_error": dict(zip(("conv_weight", "norm_weight", "norm_bias"),
                                            (rel(a, b) for a, b in zip(func_only, loop)))),
            "loop_vs_finite_differences": fd_err}


def main() -> None:
    rows = [reproduce(kind, shared) for shared in (True, False) for kind in KINDS]
    print(f"torch {torch.__version__}; float64; relative error of vmap's meta-gradient "
          "against a per-task loop")
    print(f"{'norm':<24} {'initial weights':<16} {'conv weight':>12} {'norm weight':>12} "
          f"{'norm bias':>12} {'loop vs FD':>11} {'func only':>10}")
    for r in rows:
        e = r["rel_error"]
        print(f"{r['kind']:<24} {'shared' if r['shared_init'] else 'per task':<16} "
              f"{e['conv_weight']:>12.2e} {e['norm_weight']:>12.2e} {e['norm_bias']:>12.2e} "
              f"{r['loop_vs_finite_differences']:>11.1e} "
              f"{max(r['func_only_rel_error'].values()):>10.1e}")
    write_json("vmap_norm_double_backward.json", {"header": header(seed=0), "rows": rows,
                                              "shapes": {"tasks": TASKS, "n": N, "c": C,
                                                         "h": H}})


if __name__ == "__main__":
    main()
