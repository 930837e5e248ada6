"""Where the time of a meta-iteration goes: convolutions, other operations, per-call overhead.

    python benchmarks/time_breakdown.py [--repeats 7] [--malloc-reuse]

Omniglot 5-way 1-shot, Conv4, meta-batch 32, at (a) 1 and (b) 15 queries per class, for
MAML 1 and 5 steps, FOMAML 5 and Reptile 5: the four learners of issue #8's table. For each:

* ``seconds``: the median meta-iteration (``zero_grad`` + ``step``) of the library as it is;
* under a dispatch mode that times every kernel call, below autograd and ``vmap`` (so it
  sees the batched kernels that really run): the time in convolutions (forward and
  backward), with their FLOPs counted here per call from the shapes, grouped ones
  included (torch 2.13's ``torch.utils.flop_counter`` gets their backward wrong), as
  GFLOP/s and as fractions of a float32 matmul peak and of a large 3x3 convolution's rate,
  both measured in the same run; the time in all other kernels; and the
  number of calls. The mode's own Python cost per call inflates these (compare
  ``timed_seconds`` with ``seconds``);
* ``floor_seconds``: the same learner on Conv4 with 4 filters instead of 64 (about 1/150
  of the convolution FLOPs; same batch, same calls), taking turns with the first: what is
  left when the arithmetic almost vanishes, i.e. the per-call cost of dispatch, ``vmap``,
  autograd and Python;
* ``bound_seconds``: ``floor_seconds`` plus the convolutions' FLOPs at the rate of a large
  dense 3x3 convolution measured in the same run (``conv_peak_gflops``; on this AMD CPU
  twice the MKL matmul rate, which understates it). An estimate, not a proof: an
  implementation of this design (the same kernels, called as often) gets near it only if
  everything else (the norm layers' elementwise passes, layout reorders) costs nothing
  and every convolution, backward ones included, runs as fast as that large forward;
* ``onednn_milliseconds``: one iteration's time inside oneDNN's primitives by kind, from
  its verbose log: ``convolution`` (the arithmetic) against ``reorder`` (layout
  conversions).

``--malloc-reuse`` applies :func:`metalearn.allocator.reuse_freed_memory` first, as the
command line does. Run it on an otherwise idle machine. Writes
benchmarks/results/time_breakdown.json (``time_breakdown_malloc_reuse.json``).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from math import prod
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    conv_peak_gflops,
    header,
    interleaved_medians,
    matmul_peak_gflops,
    omniglot_5w1s_batch,
    seeded_conv4_learner,
    write_json,
)

CASES = (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5))
FLOOR_FILTERS = 4
_CONV = "convolution"
_CONV_BACKWARD = "convolution_backward"


def convolution_flops(name: str, args: tuple, out) -> int:
    """Multiply-adds x 2 of one ``aten.convolution`` or ``aten.convolution_backward`` call.

    Each output element of a convolution sums ``C_in / groups * prod(kernel)`` products
    (``weight.shape[1:]``); its input and weight gradients cost the same as the forward
    each, and the bias gradient (a sum) is not counted, as in ``torch.utils.flop_counter``.
    For a transposed convolution the roles of input and output swap.
    """
    if name == _CONV:
        x, weight, transposed = args[0], args[1], args[6]
        per_output = prod(weight.shape[1:])
        return 2 * (x.numel() if transposed else out.numel()) * per_output
    g, x, weight, transposed, mask = args[0], args[1], args[2], args[7], args[10]
    per_output = prod(weight.shape[1:])
    return 2 * (x.numel() if transposed else g.numel()) * per_output * (mask[0] + mask[1])


class KernelTimer(TorchDispatchMode):
    """Wall time and calls per kernel, and the convolutions' FLOPs, of the code run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.conv_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - t0
        self.calls[name] += 1
        if name in (_CONV, _CONV_BACKWARD):
            self.conv_flops += convolution_flops(name, args, out)
        return out


def conv4_iteration(algorithm: str, steps: int, batch, filters: int = 64):
    """A function that runs one meta-iteration of ``algorithm`` on Conv4 with ``filters``
    filters, from the seed-0 weights of the speed benchmarks."""
    model, learner = seeded_conv4_learner(algorithm, steps, filters=filters)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        learner.step(batch)

    return run


def onednn_milliseconds(run) -> dict[str, float]:
    """oneDNN's own execution time of each primitive kind during ``run()``, in ms.

    From oneDNN's verbose log (each primitive's exec time, as oneDNN measures it), written
    to the process's stdout, which is redirected to a file meanwhile. ``reorder`` is
    layout conversion: torch's NCHW tensors to and from the blocked formats the kernels
    compute in, and per-task weights, which change every step, reordered on every call.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        totals: collections.Counter = collections.Counter()
        for line in log:
            fields = line.rstrip().split(",")
            # onednn_verbose,v1,primitive,exec,cpu,<kind>,<implementation>,...,<ms>
            if len(fields) > 6 and fields[0] == "onednn_verbose" and fields[3] == "exec":
                try:
                    totals[fields[5]] += float(fields[-1])
                except ValueError:
                    continue
    return dict(totals)


def bound_seconds(floor_seconds: float, conv_gflop: float, conv_peak: float) -> float:
    """The floor plus the convolutions' FLOPs at ``conv_peak`` GFLOP/s: the fastest this
    design's calls could run if all else were free (the module docstring's bound)."""
    return floor_seconds + conv_gflop / conv_peak


def convolution_gflop(run, iterations: int = 1) -> float:
    """GFLOP of convolution per call of ``run()``, counted by :class:`KernelTimer`."""
    timer = KernelTimer()
    with timer:
        for _ in range(iterations):
            run()
    return timer.conv_flops / iterations / 1e9


def breakdown(algorithm: str, steps: int, batch, repeats: int, timed: int, peak: float,
              conv_peak: float) -> dict:
    run, floor = conv4_iteration(algorithm, steps, batch), conv4_iteration(
        algorithm, steps, batch, FLOOR_FILTERS)
    medians = interleaved_medians({"full": run, "floor": floor}, repeats=repeats, warmup=2)
    timer = KernelTimer()
    t0 = time.perf_counter()
    with timer:
        for _ in range(timed):
            run()
    timed_seconds = (time.perf_counter() - t0) / timed
    conv_seconds = (timer.seconds[_CONV] + timer.seconds[_CONV_BACKWARD]) / timed
    kernel_seconds = sum(timer.seconds.values()) / timed
    conv_gflop = timer.conv_flops / timed / 1e9
    onednn = {} if torch.cuda.is_available() else onednn_milliseconds(run)
    top = [(k, v / timed) for k, v in timer.seconds.most_common()
           if k not in (_CONV, _CONV_BACKWARD)][:8]
    return {
        "seconds": medians["full"],
        "timed_seconds": timed_seconds,
        "conv_seconds": conv_seconds,
        "conv_gflop": conv_gflop,
        "conv_gflops": conv_gflop / conv_seconds,
        "conv_fraction_of_peak": conv_gflop / conv_seconds / peak,
        "conv_fraction_of_conv_peak": conv_gflop / conv_seconds / conv_peak,
        "other_kernel_seconds": kernel_seconds - conv_seconds,
        "kernel_calls": sum(timer.calls.values()) // timed,
        "conv_calls": (timer.calls[_CONV] + timer.calls[_CONV_BACKWARD]) // timed,
        "top_other_kernels_seconds": dict(top),
        "onednn_milliseconds": onednn,
        "floor_seconds": medians["floor"],
        "conv_seconds_at_conv_peak": conv_gflop / conv_peak,
        "bound_seconds": bound_seconds(medians["floor"], conv_gflop, conv_peak),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case")
    parser.add_argument("--timed", type=int, default=3,
                        help="iterations under the kernel timer per case")
    parser.add_argument("--queries", default="1,15", help="queries per class, e.g. 1")
    parser.add_argument("--malloc-reuse", action="store_true",
                        help="apply metalearn.allocator.reuse_freed_memory() first")
    args = parser.parse_args()
    for name in ("repeats", "timed"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    try:
        queries = [int(q) for q in args.queries.split(",")]
    except ValueError:
        parser.error(f"--queries must be comma-separated integers, got {args.queries!r}")
    if args.malloc_reuse:
        from metalearn.allocator import reuse_freed_memory

        if not reuse_freed_memory():
            parser.error("--malloc-reuse needs glibc's malloc (Linux)")
    t_start = time.perf_counter()
    peak, conv_peak = matmul_peak_gflops(), conv_peak_gflops()
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s, 3x3 convolution peak: {conv_peak:.1f}",
          flush=True)
    rows = []
    for q in queries:
        batch = omniglot_5w1s_batch(q)
        for algorithm, steps in CASES:
            row = {"queries_per_class": q, "algorithm": algorithm, "inner_steps": steps,
                   **breakdown(algorithm, steps, batch, args.repeats, args.timed, peak,
                                conv_peak)}
            rows.append(row)
            print(f"(q={q:2d}) {algorithm}-{steps}: {row['seconds']:.3f}s; under the timer "
                  f"{row['timed_seconds']:.3f}s = conv {row['conv_seconds']:.3f}s "
                  f"({row['conv_gflop']:.1f} GFLOP, {row['conv_gflops']:.0f} GFLOP/s, "
                  f"{100 * row['conv_fraction_of_peak']:.0f}% of matmul, "
                  f"{100 * row['conv_fraction_of_conv_peak']:.0f}% of conv peak) + other kernels "
                  f"{row['other_kernel_seconds']:.3f}s ({row['kernel_calls']} calls); "
                  f"floor {row['floor_seconds']:.3f}s, bound {row['bound_seconds']:.3f}s; "
                  "oneDNN ms: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(
                      row["onednn_milliseconds"].items(), key=lambda kv: -kv[1])),
                  flush=True)
    h = header(seed=0)
    h.update(wall_seconds=time.perf_counter() - t_start, matmul_peak_gflops=peak,
             conv_peak_gflops=conv_peak, floor_filters=FLOOR_FILTERS)
    name = "time_breakdown_malloc_reuse.json" if args.malloc_reuse else "time_breakdown.json"
    print(f"wrote {write_json(name, {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
