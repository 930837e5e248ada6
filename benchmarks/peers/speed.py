"""Meta-iterations per second: metalearn against learn2learn 0.2.0, side by side.

    bash benchmarks/peers/setup_learn2learn.sh
    benchmarks/peers/.venv-l2l/bin/python benchmarks/peers/speed.py [--repeats 5]

Omniglot 5-way 1-shot, Conv4, meta-batch 32, at (a) 1 and (b) 15 queries per class;
MAML with 1 and 5 inner steps, FOMAML and Reptile with 5. Both libraries start from the
same weights and see the same batches, and the meta-gradients are checked for parity
before anything is timed; the two then take turns, round by round. learn2learn has no
Reptile class; its example (deepcopy the model per task, SGD steps, average the
differences) is what we time for it, with the query loss and accuracy after adaptation
that metalearn's ``Reptile.step`` returns.

Each row also has metalearn's ceiling in the same run (benchmarks/time_breakdown.py):
``ceiling_seconds`` is the meta-iteration of Conv4 with 4 filters (the same calls with
almost no arithmetic: the per-call cost) plus the convolutions' FLOPs at the rate of a
large dense 3x3 convolution measured at the start, and ``ceiling_speedup`` is
learn2learn's time over it: about the most this design could reach if all its other work
were free and every convolution ran as fast as that one.

For the goal of 3x, each row also has ``goal_seconds`` (learn2learn's time over 3), the
time oneDNN itself spends in one iteration of each library (``*_onednn_ms``: convolution
and reorder primitives, from its verbose log), and ``conv_only_speedup``: learn2learn's
time over the convolution FLOPs alone at the peak rate (no per-call cost, nothing else).
``--compile`` times metalearn with its first-order regions compiled
(benchmarks/compile_regions.py); parity is then checked on the eager path, and the
compiled float32 meta-gradient's distance from it is reported. Run on an idle machine. Writes
benchmarks/results/speed_vs_l2l.json (or ``--out``); the header records GLIBC_TUNABLES and
thread variables if set (benchmarks/studies/malloc_tunables.py), and ``metalearn_compile``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import learn2learn as l2l
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    conv_peak_gflops,
    header,
    interleaved_medians,
    omniglot_5w1s_batch,
    write_json,
)
from benchmarks.peers.l2l_parity import (  # noqa: E402
    batch_statistics_only,
    l2l_grads,
    task_loss,
)
from benchmarks.time_breakdown import (  # noqa: E402
    FLOOR_FILTERS,
    bound_seconds,
    conv4_iteration,
    convolution_gflop,
    onednn_milliseconds,
)
from metalearn import FOMAML, MAML, Reptile  # noqa: E402
from metalearn.kernels import kernel_settings  # noqa: E402
from metalearn.models import Conv4  # noqa: E402

CASES = (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5))
INNER_LR = 0.4
PRIMITIVES = ("convolution", "reorder")  # the oneDNN primitive kinds a convolution runs


def l2l_step(model, batch, algo, steps):
    model.zero_grad(set_to_none=True)
    if algo == "reptile":
        theta = [p.detach().clone() for p in model.parameters()]
        deltas = [torch.zeros_like(p) for p in theta]
        for i in range(len(batch)):
            net = copy.deepcopy(model)
            opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)
            for _ in range(steps):
                opt.zero_grad()
                task_loss(net(batch.support_x[i]), batch.support_y[i]).backward()
                opt.step()
            for d, t, p in zip(deltas, theta, net.parameters()):
                d.add_(t - p.detach(), alpha=1 / len(batch))
            # The query loss and accuracy after adaptation, which metalearn's Reptile.step
            # returns too: the same work on both sides.
            with torch.no_grad():
                out = net(batch.query_x[i])
                task_loss(out, batch.query_y[i]).item()
                (out.argmax(1) == batch.query_y[i]).float().mean().item()
        for p, d in zip(model.parameters(), deltas):
            p.grad = d
        return
    l2l_grads(model, batch, INNER_LR, steps, first_order=algo == "fomaml")


def ml_learner(model, algo, steps):
    cls = {"maml": MAML, "fomaml": FOMAML, "reptile": Reptile}[algo]
    return cls(model, INNER_LR, steps)


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def max_rel(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / max(
        y.abs().max().item() for y in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--out", default="speed_vs_l2l.json", help="results file name")
    parser.add_argument("--compile", action="store_true",
                        help="metalearn with kernel_settings(compile=True) (FOMAML's and "
                             "Reptile's inner loops compiled; MAML unchanged); the first "
                             "call, which compiles, is not timed")
    args = parser.parse_args()
    with kernel_settings(compile=args.compile):
        run(args)


def run(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    h = header(seed=0)  # at the start: the commit that runs, even if HEAD moves meanwhile
    peak = conv_peak_gflops()
    print(f"3x3 convolution peak: {peak:.1f} GFLOP/s", flush=True)
    rows = []
    for queries in (1, 15):
        batch = omniglot_5w1s_batch(queries, args.meta_batch)
        for algo, steps in CASES:
            torch.manual_seed(0)
            ours = Conv4(ways=5)
            theirs = batch_statistics_only(copy.deepcopy(ours))
            learner = ml_learner(ours, algo, steps)
            # Parity on the eager path. Compiled, the float32 meta-gradient moves with the
            # ReLU gates that flip where a pre-activation is within round-off of zero
            # (benchmarks/results/compile_regions.json), so it is reported, not checked;
            # the tests check compiled against eager in float64.
            with kernel_settings(compile=False):
                ours.zero_grad(set_to_none=True)
                learner.step(batch)
                eager = grads(ours)
            l2l_step(theirs, batch, algo, steps)
            parity = max_rel(eager, grads(theirs))
            if parity > 1e-3:
                raise SystemExit(f"parity failed for {algo} k={steps}: {parity:.2e}")
            compiled = {}
            if args.compile:
                ours.zero_grad(set_to_none=True)
                learner.step(batch)  # the first call compiles: not timed
                compiled = {"compiled_vs_eager_max_rel": max_rel(grads(ours), eager)}

            def run_ours(ours=ours, learner=learner, batch=batch):
                ours.zero_grad(set_to_none=True)
                learner.step(batch)

            def run_theirs(theirs=theirs, batch=batch, algo=algo, steps=steps):
                l2l_step(theirs, batch, algo, steps)

            medians = interleaved_medians(
                {"ours": run_ours, "theirs": run_theirs,
                 "floor": conv4_iteration(algo, steps, batch, FLOOR_FILTERS)}, args.repeats)
            t_ours, t_theirs = medians["ours"], medians["theirs"]
            # The FLOPs and oneDNN's time of the eager path (under --compile too): its
            # dispatch mode and verbose log see eager calls only.
            with kernel_settings(compile=False):
                conv_gflop = convolution_gflop(run_ours)
                onednn = {} if torch.cuda.is_available() else {
                    "metalearn_onednn_ms": onednn_milliseconds(run_ours),
                    "learn2learn_onednn_ms": onednn_milliseconds(run_theirs)}
            ceiling = bound_seconds(medians["floor"], conv_gflop, peak)
            row = {"queries_per_class": queries, "algorithm": algo, "inner_steps": steps,
                   "metalearn_seconds": t_ours, "learn2learn_seconds": t_theirs,
                   "speedup": t_theirs / t_ours, "grad_parity_max_rel": parity,
                   "metalearn_floor_seconds": medians["floor"], "conv_gflop": conv_gflop,
                   "ceiling_seconds": ceiling, "ceiling_speedup": t_theirs / ceiling,
                   "goal_seconds": t_theirs / 3,
                   "conv_only_speedup": t_theirs / (conv_gflop / peak), **onednn, **compiled}
            rows.append(row)
            print(f"({'a' if queries == 1 else 'b'}) {queries:2d} q/class {algo:7s} k={steps}  "
                  f"metalearn {t_ours:.3f}s  learn2learn {t_theirs:.3f}s  "
                  f"x{row['speedup']:.2f} (ceiling x{row['ceiling_speedup']:.2f})  "
                  f"parity {parity:.1e}", flush=True)
            if onednn:
                ml, theirs_ms = (sum(onednn[k].get(kind, 0.0) for kind in PRIMITIVES) / 1e3
                                 for k in ("metalearn_onednn_ms", "learn2learn_onednn_ms"))
                print(f"    3x needs <= {row['goal_seconds']:.3f}s; oneDNN convolutions + reorders "
                      f"take metalearn {ml:.3f}s, learn2learn {theirs_ms:.3f}s; FLOPs alone "
                      f"at the peak x{row['conv_only_speedup']:.2f}", flush=True)
    h.update(wall_seconds=time.perf_counter() - t_start, learn2learn=l2l.__version__,
             conv_peak_gflops=peak, floor_filters=FLOOR_FILTERS,
             threads=torch.get_num_threads(), meta_batch=args.meta_batch, repeats=args.repeats,
             metalearn_compile=args.compile)
    print(f"wrote {write_json(args.out, {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
