"""From which per-task batch a convolution is faster task by task than grouped by ``vmap``.

    python benchmarks/studies/task_convolution_crossover.py [--repeats 7]

Forward and backward of one convolution for 32 tasks with per-task weights, for Conv4's
four layer shapes (3x3, stride 2, padding 1) and per-task batches of 5 to 75 images:
``vmap`` over ``F.conv2d`` (grouped convolutions) against the per-task rule of
metalearn/kernels/task_convolution.py, taking turns round by round. The library's
``KernelSettings.per_task_min_batch`` is chosen from this. Run it on an idle machine. Writes
benchmarks/results/task_convolution_crossover.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import header, interleaved_medians, write_json  # noqa: E402
from metalearn.kernels import current_settings  # noqa: E402
from metalearn.kernels.task_convolution import _Conv2d  # noqa: E402

TASKS = 32
LAYERS = ((1, 28), (64, 14), (64, 7), (64, 4))  # (input channels, input size) of Conv4
BATCHES = (5, 10, 20, 40, 75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    rows = []
    for n in BATCHES:
        total = {"grouped": 0.0, "per_task": 0.0}
        for channels, size in LAYERS:
            x = torch.randn(TASKS, n, channels, size, size, requires_grad=True)
            w = torch.randn(TASKS, 64, channels, 3, 3, requires_grad=True)
            b = torch.randn(TASKS, 64, requires_grad=True)

            def run(conv, x=x, w=w, b=b):
                out = vmap(lambda x, w, b: conv(x, w, b, (2, 2), (1, 1), (1, 1), 1))(x, w, b)
                out.backward(torch.ones_like(out))

            medians = interleaved_medians({"grouped": lambda: run(F.conv2d),
                                           "per_task": lambda: run(_Conv2d.apply)},
                                          repeats=args.repeats)
            rows.append({"per_task_batch": n, "in_channels": channels, "size": size,
                         "grouped_seconds": medians["grouped"],
                         "per_task_seconds": medians["per_task"]})
            for k in total:
                total[k] += medians[f"{k}"]
        print(f"batch {n:2d}: all four layers grouped {1e3 * total['grouped']:6.1f} ms, "
              f"per task {1e3 * total['per_task']:6.1f} ms "
              f"(x{total['grouped'] / total['per_task']:.2f})", flush=True)
    h = header(seed=0)
    h.update(wall_seconds=time.perf_counter() - t_start, tasks=TASKS, repeats=args.repeats,
             threads=torch.get_num_threads(),
             per_task_min_batch=current_settings().per_task_min_batch)
    print(f"wrote {write_json('task_convolution_crossover.json', {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
