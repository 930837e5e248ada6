"""Memory per inner step: metalearn's MAML against learn2learn 0.2.0's, same weights and batch.

    bash benchmarks/peers/setup_learn2learn.sh
    benchmarks/peers/.venv-l2l/bin/python benchmarks/peers/memory_vs_l2l.py [--steps 1,2,4]

Omniglot 5-way 1-shot, Conv4, meta-batch 32, 15 queries per class. For each inner-step
count, the peak bytes of the storages that autograd keeps for the backward
(``metalearn.memory.SavedTensorMeter``, which counts any autograd graph: learn2learn's
per-task graphs as well as the ``vmap`` graphs of metalearn) during one meta-iteration of
exact second-order MAML: learn2learn's ``MAML.clone``/``adapt`` loop over the tasks, then
one backward of the mean query loss (as in its examples), against ``metalearn.MAML`` in the
normal and the ``memory_saving`` mode. The meta-gradients are checked for parity first.
Writes benchmarks/results/memory_vs_l2l.json.
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

from benchmarks.common import header, omniglot_5w1s_batch, write_json  # noqa: E402
from benchmarks.peers.l2l_parity import batch_statistics_only, compare, l2l_grads  # noqa: E402
from metalearn import MAML  # noqa: E402
from metalearn.memory import SavedTensorMeter  # noqa: E402
from metalearn.models import Conv4  # noqa: E402

INNER_LR = 0.4


def saved_peak(fn) -> int:
    with SavedTensorMeter() as meter:
        fn()
    return meter.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,2,4,6,8,10")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=15)
    args = parser.parse_args()
    t0 = time.perf_counter()
    batch = omniglot_5w1s_batch(args.queries, args.meta_batch)
    torch.manual_seed(0)
    ours = Conv4(ways=5)
    theirs = batch_statistics_only(copy.deepcopy(ours))
    rows = []
    for k in (int(s) for s in args.steps.split(",")):
        mib = {}
        for name, saving in (("metalearn", False), ("metalearn_memory_saving", True)):
            learner = MAML(ours, INNER_LR, k, memory_saving=saving)

            def run(learner=learner):
                ours.zero_grad(set_to_none=True)
                learner.step(batch)

            run()  # warm-up
            mib[name] = saved_peak(run) / 2**20
        ours_grads = {n: p.grad.detach().clone() for n, p in ours.named_parameters()}
        l2l_grads(theirs, batch, INNER_LR, k, first_order=False)  # warm-up
        mib["learn2learn"] = saved_peak(
            lambda k=k: l2l_grads(theirs, batch, INNER_LR, k, first_order=False)) / 2**20
        theirs_grads = {n: p.grad.detach().clone() for n, p in theirs.named_parameters()}
        parity = compare(ours_grads, theirs_grads)["max_rel_diff"]
        if parity > 1e-3:
            raise SystemExit(f"parity failed at k={k}: {parity:.2e}")
        rows.append({"inner_steps": k, "saved_mib": mib, "grad_parity_max_rel": parity,
                     "ratio_metalearn_over_l2l": mib["metalearn"] / mib["learn2learn"]})
        print(f"k={k:2d}  " + "  ".join(f"{n} {v:8.1f} MiB" for n, v in mib.items())
              + f"  parity {parity:.1e}", flush=True)
    h = header(seed=0)
    h.update(learn2learn=l2l.__version__, threads=torch.get_num_threads(),
             meta_batch=args.meta_batch, queries_per_class=args.queries,
             wall_seconds=time.perf_counter() - t0)
    print(f"wrote {write_json('memory_vs_l2l.json', {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
