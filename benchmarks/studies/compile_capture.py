"""How much of a meta-iteration torch.compile captures: graphs, breaks and traced ops.

    python benchmarks/studies/compile_capture.py

``torch._dynamo.explain`` on ``meta_loss`` (MAML, FOMAML) or ``step`` (Reptile) for
Omniglot 5-way 1-shot, 1 query per class, Conv4, meta-batch 32: the number of graphs, graph
breaks and operations dynamo traced, with the break reasons, once as the learners run and
once with their input checks (which read label ranges with ``.item()``) skipped. It says
whether the ``compile`` column of speed_directions.json measures compiled code or eager
code. A control: MAML-1 on the sine MLP, which has no normalisation layers or
convolutions and so runs none of metalearn's custom autograd Functions.
Writes benchmarks/results/compile_capture.json.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import (  # noqa: E402
    header,
    omniglot_5w1s_batch,
    seeded_conv4_learner,
    write_json,
)
from metalearn import MAML  # noqa: E402
from metalearn.data import SineTasks  # noqa: E402
from metalearn.models import MLP  # noqa: E402

CASES = (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5))


def capture(algorithm: str, steps: int, batch, skip_checks: bool, learner=None) -> dict:
    if learner is None:
        _, learner = seeded_conv4_learner(algorithm, steps)
    if skip_checks:
        learner._check_batch = lambda b: None
    fn = learner.step if algorithm == "reptile" else learner.meta_loss
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(batch)
    reasons = collections.Counter(
        f"{str(r.reason).splitlines()[0]} (at {r.user_stack[-1].filename.split('/')[-1]}:"
        f"{r.user_stack[-1].lineno})" if r.user_stack else str(r.reason).splitlines()[0]
        for r in e.break_reasons)
    return {"graphs": e.graph_count, "graph_breaks": e.graph_break_count,
            "traced_ops": e.op_count,
            "traced_op_names": sorted({str(getattr(op, "__name__", op)) for ops in e.ops_per_graph
                                       for op in ops}),
            "break_reasons": dict(reasons.most_common())}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch._logging.set_logs(dynamo=logging.ERROR)
    batch = omniglot_5w1s_batch(1)
    rows = []
    for algorithm, steps in CASES:
        for skip in (False, True):
            row = {"algorithm": algorithm, "inner_steps": steps, "input_checks": not skip,
                   "model": "Conv4",
                   **capture(algorithm, steps, batch, skip)}
            rows.append(row)
            print(f"{algorithm}-{steps} checks {'on ' if not skip else 'off'}: "
                  f"{row['graphs']} graphs, {row['graph_breaks']} breaks, "
                  f"{row['traced_ops']} ops traced: {', '.join(row['traced_op_names'])}",
                  flush=True)
    torch.manual_seed(0)
    sine = capture("maml", 1, SineTasks(seed=0).sample(25), True, MAML(MLP(), 0.01, 1))
    rows.append({"algorithm": "maml", "inner_steps": 1, "input_checks": False,
                 "model": "sine MLP (control)", **sine})
    print(f"control, sine MLP MAML-1 checks off: {sine['graphs']} graphs, "
          f"{sine['graph_breaks']} breaks, {sine['traced_ops']} ops traced", flush=True)
    path = write_json("compile_capture.json", {
        **header(), "benchmark": "compile_capture",
        "setup": "Omniglot 5w1s, 1 query/class, Conv4, meta-batch 32",
        "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
