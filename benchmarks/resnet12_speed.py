"""MAML on ResNet-12 at 84x84: seconds per meta-iteration, against learn2learn where it imports.

    python benchmarks/resnet12_speed.py [--device cuda] [--repeats 5]
    benchmarks/peers/.venv-l2l/bin/python benchmarks/resnet12_speed.py     # with learn2learn
    python benchmarks/resnet12_speed.py --quick      # a smoke run at 20x20, to /tmp

5-way 1-shot tasks with 15 queries per class (``--queries``), meta-batch 4, MAML with 1
and 5 inner steps (inner lr 0.01, second order) on :class:`metalearn.models.ResNet12`
(64-160-320-640, 12.4M parameters). The images are uniform noise from a fixed seed: the
time of a meta-iteration does not depend on the pixels, and no miniImageNet copy is
needed.

learn2learn 0.2.0 (optional: the peer venv of ``benchmarks/peers/setup_learn2learn.sh``)
runs its own ``ResNet12`` with DropBlock off, loaded with metalearn's initial weights, on
the same batch, with ``l2l.algorithms.MAML`` and a loop over tasks. Its ``AvgPool2d(5)``
is replaced by a global average (the same at 84x84, where the last map is 5x5; needed
for ``--quick``'s small images), and its BatchNorm layers use batch statistics only, as
metalearn's do. Before anything is timed, the two meta-gradients are compared in float64
on one task (``grad_parity_max_rel_float64``: the largest difference relative to the largest
entry; the script stops above 1e-9), and their float32 difference on the timed batch is
recorded (``grad_difference_max_rel_float32``: float32 rounding, several percent for this
network, see ``float64_parity``). Then the two take turns, round by round, and the
medians over ``--repeats`` rounds after one warm-up are reported.

Run on an idle machine. Writes benchmarks/results/resnet12_speed.json (``--out``), with
the header of ``benchmarks/common.py`` (command, commit, machine, versions).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header, interleaved_medians, write_json  # noqa: E402
from metalearn import MAML, TaskBatch  # noqa: E402
from metalearn.export import batch_statistics_everywhere  # noqa: E402
from metalearn.models import ResNet12  # noqa: E402

try:
    import learn2learn as l2l
except ImportError:  # the comparison is optional: metalearn alone is timed then
    l2l = None

WAYS, SHOTS, INNER_LR = 5, 1, 0.01


def synthetic_batch(tasks: int, queries: int, size: int, device: str) -> TaskBatch:
    g = torch.Generator().manual_seed(0)

    def split(n: int):
        x = torch.rand(tasks, WAYS * n, 3, size, size, generator=g)
        return x, torch.arange(WAYS).repeat_interleave(n).repeat(tasks, 1)

    return TaskBatch(*split(SHOTS), *split(queries)).to(device)


def l2l_name(name: str) -> str:
    """learn2learn's name of a ResNet12 parameter or buffer of ours."""
    if not name.startswith("features."):
        return name  # classifier.*
    _, block, rest = name.split(".", 2)
    return f"features.layer{int(block) + 1}.0.{rest.replace('shortcut.', 'downsample.')}"


def l2l_resnet12(ours: ResNet12) -> nn.Module:
    """learn2learn's ResNet12 holding ``ours``'s weights, batch statistics only."""
    theirs = l2l.vision.models.ResNet12(WAYS, dropblock_dropout=0.0)
    theirs.features.avgpool = nn.AdaptiveAvgPool2d(1)
    theirs.load_state_dict({l2l_name(n): v for n, v in ours.state_dict().items()})
    return batch_statistics_everywhere(theirs).to(next(ours.parameters()).device)


def l2l_step(model: nn.Module, batch: TaskBatch, steps: int) -> None:
    model.zero_grad(set_to_none=True)
    maml = l2l.algorithms.MAML(model, lr=INNER_LR)
    loss = nn.functional.cross_entropy
    total = 0.0
    for i in range(len(batch)):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss(learner(batch.support_x[i]), batch.support_y[i]))
        total = total + loss(learner(batch.query_x[i]), batch.query_y[i])
    (total / len(batch)).backward()


def max_rel(ours: nn.Module, theirs: nn.Module) -> float:
    """max |ours' grad - theirs'| over all parameters, over the largest of theirs."""
    b = {n: p.grad for n, p in theirs.named_parameters()}
    a = {l2l_name(n): p.grad for n, p in ours.named_parameters()}
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[n] - b[n]).abs().max().item() for n in b) / max(
        g.abs().max().item() for g in b.values())


def float64_parity(ours: ResNet12, steps: int, size: int, device: str) -> float:
    """The two meta-gradients' :func:`max_rel` in float64, on one task with one query per
    class: the check that the two compute the same thing. In float32 the second-order
    meta-gradient of ResNet-12 is rounded by percents of its largest entry, so a float32
    difference says nothing about a defect."""
    ours64 = copy.deepcopy(ours).double()
    theirs64 = l2l_resnet12(copy.deepcopy(ours64)).double()
    task = synthetic_batch(1, 1, size, device).to(device, dtype=torch.float64)
    ours64.zero_grad(set_to_none=True)
    MAML(ours64, INNER_LR, steps).step(task)
    l2l_step(theirs64, task, steps)
    return max_rel(ours64, theirs64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,5", help="inner-step counts, comma-separated")
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--queries", type=int, default=15, help="queries per class")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20x20 images, 2 tasks, 1 query, 1 step, 1 repeat, "
                             "written under /tmp unless --out is given")
    parser.add_argument("--out", default=None, help="results file name")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.meta_batch, args.queries, args.image_size, args.repeats = (
            "1", 2, 1, 20, 1)
    out = args.out or ("resnet12_speed.json" if not args.quick else
                       str(Path(tempfile.gettempdir()) / "resnet12_speed_quick.json"))
    t_start = time.perf_counter()
    h = header(seed=0)
    batch = synthetic_batch(args.meta_batch, args.queries, args.image_size, args.device)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        torch.manual_seed(0)
        ours = ResNet12(WAYS).to(args.device)
        learner = MAML(ours, INNER_LR, steps)

        def run_ours(ours=ours, learner=learner):
            ours.zero_grad(set_to_none=True)
            learner.step(batch)

        fns = {"metalearn": run_ours}
        parity = parity32 = None
        if l2l is not None:
            parity = float64_parity(ours, steps, args.image_size, args.device)
            if parity > 1e-9:
                raise SystemExit(f"parity failed for MAML k={steps}: {parity:.2e} in float64")
            theirs = l2l_resnet12(copy.deepcopy(ours))
            run_ours()
            l2l_step(theirs, batch, steps)
            parity32 = max_rel(ours, theirs)  # float32 rounding: a record, not a test
            fns["learn2learn"] = lambda theirs=theirs, steps=steps: l2l_step(theirs, batch,
                                                                              steps)
        medians = interleaved_medians(fns, args.repeats)
        row = {"algorithm": "maml", "inner_steps": steps,
               "metalearn_seconds": medians["metalearn"],
               "learn2learn_seconds": medians.get("learn2learn"),
               "speedup": (medians["learn2learn"] / medians["metalearn"]
                           if "learn2learn" in medians else None),
               "grad_parity_max_rel_float64": parity,
               "grad_difference_max_rel_float32": parity32}
        rows.append(row)
        theirs_text = (f"learn2learn {row['learn2learn_seconds']:.3f}s  x{row['speedup']:.2f}  "
                       f"parity {parity:.1e} (float64), {parity32:.1e} (float32)"
                       if parity is not None else
                       "learn2learn not installed")
        print(f"MAML k={steps}  metalearn {row['metalearn_seconds']:.3f}s  {theirs_text}",
              flush=True)
    h.update(wall_seconds=time.perf_counter() - t_start,
             learn2learn=None if l2l is None else l2l.__version__,
             device=args.device, threads=torch.get_num_threads(),
             setup={"model": "ResNet12(5), 64-160-320-640", "ways": WAYS, "shots": SHOTS,
                    "queries_per_class": args.queries, "image_size": args.image_size,
                    "meta_batch": args.meta_batch, "inner_lr": INNER_LR,
                    "images": "uniform noise, seed 0"},
             repeats=args.repeats)
    print(f"wrote {write_json(out, {'header': h, 'rows': rows})}")  # an absolute out stays


if __name__ == "__main__":
    main()
