"""Small per-task batches: the library's grouped convolution Functions against vmap's rule.

    python benchmarks/studies/grouped_double_backward.py [--repeats 7]

Under ``vmap`` a convolution with per-task weights becomes one grouped convolution. torch's
double backward of a grouped convolution computes its weight term group by group (one
small convolution per task and a ``cat``), and MAML's outer backward takes it through
every inner step after the first. ``metalearn/kernels/task_convolution.py`` therefore
merges the tasks into groups itself where a graph may be differentiated twice, recording
Functions whose written-out double backward is one grouped convolution per term
(``KernelSettings.tasks_as_groups``, on by default). This times that against ``False`` (the
previous default, vmap's own rule), taking turns round by round, on Omniglot 5-way 1-shot,
Conv4, meta-batch 32, at (a) 1 and (b) 15 queries per class, with the meta-gradients
compared. Run it on an idle machine. Writes benchmarks/results/grouped_double_backward.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import (  # noqa: E402
    header,
    interleaved_medians,
    omniglot_5w1s_batch,
    seeded_conv4_learner,
    write_json,
)
from metalearn.kernels import kernel_settings  # noqa: E402

CASES = (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    h = header(seed=0)
    rows = []
    for queries in (1, 15):
        batch = omniglot_5w1s_batch(queries, 32)
        for algo, steps in CASES:
            model, learner = seeded_conv4_learner(algo, steps)

            def run(as_groups: bool, model=model, learner=learner, batch=batch):
                def step():
                    model.zero_grad(set_to_none=True)
                    with kernel_settings(tasks_as_groups=as_groups):
                        learner.step(batch)
                return step

            grads = {}
            for as_groups in (True, False):
                run(as_groups)()
                grads[as_groups] = [p.grad.clone() for p in model.parameters()]
            diff = max((a - b).abs().max().item() for a, b in zip(grads[True], grads[False]))
            diff /= max(b.abs().max().item() for b in grads[False])
            t = interleaved_medians({"groups": run(True), "vmap_rule": run(False)},
                                    args.repeats)
            row = {"queries_per_class": queries, "algorithm": algo, "inner_steps": steps,
                   "groups_seconds": t["groups"], "vmap_rule_seconds": t["vmap_rule"],
                   "speedup": t["vmap_rule"] / t["groups"], "grad_max_rel_diff": diff}
            rows.append(row)
            print(f"({'a' if queries == 1 else 'b'}) {algo:7s} k={steps}  groups "
                  f"{t['groups']:.3f}s  vmap rule {t['vmap_rule']:.3f}s  "
                  f"x{row['speedup']:.2f}  grad diff {diff:.1e}", flush=True)
    h.update(threads=torch.get_num_threads(), repeats=args.repeats)
    print(f"wrote {write_json('grouped_double_backward.json', {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
