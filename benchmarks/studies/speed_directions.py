"""Where the time of a meta-iteration goes, and what the directions of issue #8 buy.

    python benchmarks/studies/speed_directions.py [--repeats 3] [--no-compile]

Omniglot 5-way 1-shot, Conv4, meta-batch 32, at (a) 1 and (b) 15 queries per class, for
MAML with 1 and 5 inner steps and FOMAML with 5. In one run, side by side on the same
weights and batch, each direction is timed against the library's default path, taking
turns round by round (``vmap`` over tasks, which turns per-task convolutions into
grouped ones, except where a task's batch has at least ``KernelSettings.per_task_min_batch`` images:
those run task by task, metalearn/kernels/task_convolution.py):

* ``grouped_convolutions``: every convolution grouped by ``vmap``, whatever its batch (the
  default before the per-task convolutions);
* ``unfold_matmul``: every ``nn.Conv2d`` as ``unfold`` + matmul (im2col), so that under
  ``vmap`` the per-task convolutions and their double backward become batched matmuls;
* ``channels_last``: the model's weights (and the images) in ``torch.channels_last``
  memory format, so that the convolutions' activations are channels-last too;
* ``inplace_relu``: every ``nn.ReLU`` in place, on the norm layer's output: the
  allocation and memory pass that fusing ReLU into BatchNorm could save in eager torch
  (ATen has no fused CPU kernel for the two);
* ``one_thread``: ``torch.set_num_threads(1)`` instead of the default;
* ``compile``: ``torch.compile`` of ``MAML.meta_loss`` (MAML 1 step at (a) only: its compile
  time is reported separately, with the number of iterations after which it pays off).

Each direction's meta-gradient is checked against the default's (max abs difference over
the largest entry). Achieved GFLOP/s is reported as a fraction of a float32 matmul peak
and of a large 3x3 convolution's rate (``fraction_of_conv_peak``; on this AMD CPU MKL's
matmul runs at about half of oneDNN's convolution rate, benchmarks/common.py),
measured in the same run; the FLOPs are counted with ``torch.utils.flop_counter`` on the
per-task loop of ``tests/reference.py`` (plain convolutions, which it counts correctly:
it overcounts the grouped convolutions of the batched path). Run it on an idle machine.
Writes benchmarks/results/speed_directions.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import (  # noqa: E402
    conv_peak_gflops,
    header,
    interleaved_medians,
    matmul_peak_gflops,
    median_seconds,
    omniglot_5w1s_batch,
    seeded_conv4_learner,
    write_json,
)
from metalearn.kernels import kernel_settings  # noqa: E402
from metalearn.kernels.layer_swap import swapped_forwards  # noqa: E402
from tests.reference import maml_loop  # noqa: E402

CASES = (("maml", 1), ("maml", 5), ("fomaml", 5))
INNER_LR = 0.4


def _conv_as_matmul(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
    out = self.weight.reshape(self.out_channels, -1) @ cols
    size = [(x.shape[-2 + i] + 2 * self.padding[i] - self.kernel_size[i]) // self.stride[i] + 1
            for i in range(2)]
    out = out.reshape(out.shape[0], self.out_channels, *size)
    return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def conv_as_matmul(model: nn.Module):
    return swapped_forwards(
        model, lambda m: _conv_as_matmul if isinstance(m, nn.Conv2d) else None)


def grouped_convolutions():
    return kernel_settings(per_task_min_batch=sys.maxsize)


@contextlib.contextmanager
def channels_last(model: nn.Module, batch):
    def per_task_channels_last(x: torch.Tensor) -> torch.Tensor:  # (tasks, N, C, H, W)
        return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)

    images = batch.support_x, batch.query_x
    model.to(memory_format=torch.channels_last)
    batch.support_x, batch.query_x = map(per_task_channels_last, images)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
        batch.support_x, batch.query_x = images


@contextlib.contextmanager
def inplace_relu(model: nn.Module):
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU) and not m.inplace]
    for m in relus:
        m.inplace = True
    try:
        yield
    finally:
        for m in relus:
            m.inplace = False


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loop_flops(model: nn.Module, batch, algo: str, steps: int) -> int:
    with FlopCounterMode(display=False) as counter:
        maml_loop(model, batch, INNER_LR, steps, first_order=algo == "fomaml")
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--queries", default="1,15", help="queries per class, e.g. 1")
    args = parser.parse_args()
    t_start = time.perf_counter()
    peak, conv_peak = matmul_peak_gflops(), conv_peak_gflops()
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s, 3x3 convolution peak: {conv_peak:.1f}",
          flush=True)
    rows = []
    for queries in (int(q) for q in args.queries.split(",")):
        batch = omniglot_5w1s_batch(queries)
        for algo, steps in CASES:
            model, learner = seeded_conv4_learner(algo, steps, INNER_LR)
            flops = loop_flops(model, batch, algo, steps)

            def run(ctx=contextlib.nullcontext, learner=learner, model=model, batch=batch):
                model.zero_grad(set_to_none=True)
                with ctx():
                    learner.step(batch)
                return [p.grad.clone() for p in model.parameters()]

            reference = run()
            scale = max(g.abs().max().item() for g in reference)
            directions = {"default": contextlib.nullcontext,
                          "grouped_convolutions": grouped_convolutions,
                          "unfold_matmul": lambda model=model: conv_as_matmul(model),
                          "channels_last": lambda model=model, batch=batch: channels_last(
                              model, batch),
                          "inplace_relu": lambda model=model: inplace_relu(model),
                          "one_thread": lambda: threads(1)}
            row = {"queries_per_class": queries, "algorithm": algo, "inner_steps": steps,
                   "flops": flops}
            medians = interleaved_medians(
                {name: lambda ctx=ctx: run(ctx) for name, ctx in directions.items()},
                repeats=args.repeats)
            for name, ctx in directions.items():
                seconds = medians[name]
                diff = max((a - b).abs().max().item() for a, b in zip(run(ctx), reference))
                row[name] = {"seconds": seconds, "gflops": flops / seconds / 1e9,
                             "fraction_of_peak": flops / seconds / 1e9 / peak,
                             "fraction_of_conv_peak": flops / seconds / 1e9 / conv_peak,
                             "speedup_vs_default": None, "grad_rel_diff": diff / scale}
            for name in directions:
                row[name]["speedup_vs_default"] = row["default"]["seconds"] / row[name]["seconds"]
            if not args.no_compile and queries == 1 and (algo, steps) == ("maml", 1):
                row["compile"] = compiled(learner, model, batch, args.repeats, reference, scale,
                                          row["default"]["seconds"])
            rows.append(row)
            print(f"(q={queries:2d}) {algo}-{steps}: {flops / 1e9:6.1f} GFLOP  " + "  ".join(
                f"{n} {row[n]['seconds']:.3f}s ({100 * row[n]['fraction_of_peak']:.1f}% peak, "
                f"x{row[n]['speedup_vs_default']:.2f})" for n in directions), flush=True)
    h = header(seed=0)
    h.update(wall_seconds=time.perf_counter() - t_start, matmul_peak_gflops=peak,
             conv_peak_gflops=conv_peak,
             threads=torch.get_num_threads())
    print(f"wrote {write_json('speed_directions.json', {'header': h, 'rows': rows})}")


def compiled(learner, model, batch, repeats, reference, scale, default_seconds) -> dict:
    """torch.compile of the meta-loss: compile time, steady state, break-even iterations."""
    fn = torch.compile(learner.meta_loss)

    def run():
        model.zero_grad(set_to_none=True)
        loss, _ = fn(batch)
        loss.backward()

    try:
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        seconds = median_seconds(run, repeats=repeats)
    except Exception as err:  # noqa: BLE001 - record why the direction is unavailable
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    diff = max((p.grad - r).abs().max().item() for p, r in zip(model.parameters(), reference))
    gain = default_seconds - seconds
    print(f"  compile: first call {first:.1f}s, then {seconds:.3f}s/it", flush=True)
    return {"first_call_seconds": first, "seconds": seconds,
            "speedup_vs_default": default_seconds / seconds, "grad_rel_diff": diff / scale,
            "break_even_iterations": (first - seconds) / gain if gain > 0 else None}


if __name__ == "__main__":
    main()
