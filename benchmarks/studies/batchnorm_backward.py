"""Three ways to compute BatchNorm with batch statistics under vmap, timed side by side.

    python benchmarks/studies/batchnorm_backward.py [--repeats 5] [--queries 1,15]

All three give exact meta-gradients (see metalearn/kernels/norm_layers.py):

- "library": what the learners do. An autograd.Function whose backward is the native
  formula in differentiable ops (the native double backward is wrong under vmap) and
  whose vmap rule runs the native kernel over (task, channel) pairs below the vmap level;
  inside torch.no_grad first-order regions (FOMAML's and Reptile's inner loops,
  evaluation) plain F.batch_norm under vmap.
- "written-out": that Function with its written-out forward everywhere, also below the
  vmap level and in the first-order regions (the library at the previous stop).
- "chain": ``x * scale + shift`` from ``var_mean`` everywhere, whose backward autograd
  derives; it also keeps ``x - mean`` per inner step (the library two stops ago).

Omniglot 5w1s, Conv4, meta-batch 32, MAML 1 and 5 steps, FOMAML 5 and Reptile 5, same
weights and batch, gradients compared; the variants alternate within each repeat so that
all see the same machine state. Reports the median seconds per meta-iteration and the
saved-for-backward MiB. Writes benchmarks/results/batchnorm_backward.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import metalearn.kernels.norm_layers as norm_layers  # noqa: E402
from benchmarks.common import (  # noqa: E402
    header,
    omniglot_5w1s_batch,
    seeded_conv4_learner,
    write_json,
)
from metalearn.memory import SavedTensorMeter  # noqa: E402

CASES = (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5))


def _chain_batch_norm(module, x):
    dims = [0, *range(2, x.ndim)]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + module.eps) * module.weight.view(shape)
    return x * scale + (module.bias.view(shape) - mean * scale)


def _written_out_task_batch_norm(x, weight, w_dim, bias, b_dim, eps):
    dims = [0, *range(2, x.ndim - 1)]  # per task
    out, mean, rstd = norm_layers._task_normalize_written_out(
        x, weight, w_dim, bias, b_dim, dims, eps)
    return out.movedim(0, 1), mean, rstd


@contextlib.contextmanager
def written_out():
    # Never the native kernels, and the written-out forward over all tasks.
    originals = norm_layers.native_kernels, norm_layers._task_batch_norm
    norm_layers.native_kernels = lambda: False
    norm_layers._task_batch_norm = _written_out_task_batch_norm
    try:
        yield
    finally:
        norm_layers.native_kernels, norm_layers._task_batch_norm = originals


@contextlib.contextmanager
def chain_batch_norm():
    original = norm_layers._batch_norm_with_batch_stats
    norm_layers._batch_norm_with_batch_stats = _chain_batch_norm
    try:
        yield
    finally:
        norm_layers._batch_norm_with_batch_stats = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", default="1,15")
    args = parser.parse_args()
    t_start = time.perf_counter()
    h = header(seed=0)
    variants = {"library": contextlib.nullcontext, "written-out": written_out,
                "chain": chain_batch_norm}
    rows = []
    for queries in (int(q) for q in args.queries.split(",")):
        batch = omniglot_5w1s_batch(queries)
        for algo, steps in CASES:
            model, learner = seeded_conv4_learner(algo, steps)

            def run(ctx, model=model, learner=learner, batch=batch):
                model.zero_grad(set_to_none=True)
                with ctx():
                    learner.step(batch)
                return [p.grad.clone() for p in model.parameters()]

            grads, saved, times = {}, {}, {name: [] for name in variants}
            for name, ctx in variants.items():
                grads[name] = run(ctx)  # also the warm-up
                with SavedTensorMeter() as meter:
                    run(ctx)
                saved[name] = meter.peak_bytes / 2**20
            for _ in range(args.repeats):
                for name, ctx in variants.items():
                    t0 = time.perf_counter()
                    run(ctx)
                    times[name].append(time.perf_counter() - t0)
            scale = max(g.abs().max().item() for g in grads["chain"])
            diff = max((a - b).abs().max().item() for name in ("library", "written-out")
                       for a, b in zip(grads[name], grads["chain"]))
            seconds = {n: statistics.median(t) for n, t in times.items()}
            row = {"queries_per_class": queries, "algorithm": algo, "inner_steps": steps,
                   "seconds": seconds, "saved_mib": saved, "grad_rel_diff": diff / scale,
                   "time_over_library": {n: seconds[n] / seconds["library"] for n in seconds}}
            rows.append(row)
            cells = " | ".join(f"{n} {seconds[n]:.3f}s {saved[n]:.1f} MiB" for n in variants)
            print(f"(q={queries:2d}) {algo}-{steps}: {cells} | grad diff {diff / scale:.1e}",
                  flush=True)
    h.update(wall_seconds=time.perf_counter() - t_start, repeats=args.repeats,
             threads=torch.get_num_threads(), meta_batch=32)
    print(f"wrote {write_json('batchnorm_backward.json', {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
