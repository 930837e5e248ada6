"""Seconds per meta-iteration: the batched library path against a plain per-task loop.

    python benchmarks/batched_vs_loop.py [--repeats 5] [--threads N]

The loop is the test suite's independent reference (tests/reference.py): one task at a
time, ``torch.autograd.grad`` with ``create_graph``, no vmap. Both compute the same
meta-gradient (the tests check it); this measures how long each takes, side by side in one
run. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header, median_seconds, write_json  # noqa: E402
from metalearn import FOMAML, MAML, Reptile  # noqa: E402
from metalearn.data import OmniglotTasks, SineTasks  # noqa: E402
from metalearn.models import MLP, Conv4  # noqa: E402
from tests.reference import maml_loop, reptile_loop  # noqa: E402


def workloads():
    sine = SineTasks(shots=10, queries=10, seed=0).sample(25)
    yield "sine MLP, meta-batch 25", MLP, sine, 0.01
    for queries in (1, 15):
        tasks = OmniglotTasks(split="train", ways=5, shots=1, queries=queries, seed=0,
                              progress=False).sample(32)
        yield (f"omniglot Conv4 5w1s, {queries} query/class, meta-batch 32",
               lambda: Conv4(ways=5), tasks, 0.4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, make_model, batch, lr in workloads():
        for algo, steps in (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5)):
            torch.manual_seed(0)
            model = make_model()
            if algo == "reptile":
                learner = Reptile(model, lr, steps)

                def loop(model=model, steps=steps, lr=lr, batch=batch):
                    reptile_loop(model, batch, lr, steps)
            else:
                learner = (MAML if algo == "maml" else FOMAML)(model, lr, steps)

                def loop(model=model, steps=steps, lr=lr, fo=algo == "fomaml", batch=batch):
                    maml_loop(model, batch, lr, steps, first_order=fo)

            def batched(model=model, learner=learner, batch=batch):
                model.zero_grad(set_to_none=True)
                learner.step(batch)

            t_batched = median_seconds(batched, args.repeats)
            t_loop = median_seconds(loop, args.repeats)
            row = {"workload": name, "algorithm": algo, "inner_steps": steps,
                   "batched_seconds": t_batched, "loop_seconds": t_loop,
                   "speedup": t_loop / t_batched}
            rows.append(row)
            print(f"{name:48s} {algo:7s} k={steps}  batched {t_batched:.4f}s  "
                  f"loop {t_loop:.4f}s  x{row['speedup']:.2f}", flush=True)
    h = header(seed=0)
    h["threads"] = torch.get_num_threads()
    path = write_json("batched_vs_loop.json", {"header": h, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
