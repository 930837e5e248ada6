"""FewShotTasks episode sampling speed, side by side in one run.

Episodes per second (5-way 1-shot 15-query unless said otherwise) of:

1. ``FewShotTasks`` on in-memory 28x28 uint8 data shaped like Omniglot's train split
   (1100 classes of 20, the 90-degree rotations as a class augmentation), meta-batch 32.
   Goal: >= 20,000 episodes/s.
2. learn2learn's ``TaskDataset`` (``NWays``, ``KShots``, ``LoadData``, ``RemapLabels``) over
   the same images as a float32 ``TensorDataset`` (the 4 rotations stored as 4400 classes,
   as ``peers/l2l_parity.py`` does), stacked into the same batch layout. Goal: FewShotTasks
   >= 10x its rate. Skipped where learn2learn does not import (it lives in its own venv:
   ``bash benchmarks/peers/setup_learn2learn.sh``, then run this script with
   ``benchmarks/peers/.venv-l2l/bin/python``).
3. ``FewShotTasks`` on 84x84x3 synthetic data (miniImageNet's train split: 64 classes of
   600), meta-batch 4 and 32.
4. ``FewShotTasks`` over a lazily loaded on-disk ``Dataset`` (one ``.npy`` file per 84x84x3
   image, read when a batch needs it), with 0 and 2 DataLoader workers, meta-batch 4.

The candidates take turns round by round (``common.interleaved_medians``). Writes
``benchmarks/results/few_shot_sampling.json`` with the command, commit, machine and versions.
``--quick`` is a smoke run with tiny sizes that checks every column works; it writes
``few_shot_sampling_quick.json`` and its times mean nothing. Run the real one on an
otherwise idle machine::

    python benchmarks/few_shot_sampling.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import header, interleaved_medians, write_json  # noqa: E402
from metalearn.data import FewShotTasks, TaskBatch, rotations90  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 1, 15


class NpyFolder(Dataset):
    """One ``.npy`` file per image, loaded on access; labels stated up front (``targets``)."""

    def __init__(self, folder: Path, labels: list[int]) -> None:
        self.folder, self.targets = folder, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.load(self.folder / f"{i}.npy")), self.targets[i]


def synthetic(classes: int, per_class: int, shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (classes * per_class, *shape), generator=g, dtype=torch.uint8)
    return x, torch.arange(classes).repeat_interleave(per_class)


def l2l_sampler(x: torch.Tensor, y: torch.Tensor):
    """learn2learn's TaskDataset over the rotated images as float32; None if absent."""
    try:
        import learn2learn as l2l
    except ImportError:
        return None, None
    rot = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])  # 4x the classes
    labels = torch.cat([y + k * (int(y.max()) + 1) for k in range(4)])
    images = rot.float().div_(255)
    per = {}
    for i, c in enumerate(labels.tolist()):
        per.setdefault(c, []).append(i)
    ds = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels),
                              labels_to_indices=per)
    transforms = [l2l.data.transforms.NWays(ds, WAYS),
                  l2l.data.transforms.KShots(ds, SHOTS + QUERIES),
                  l2l.data.transforms.LoadData(ds),
                  l2l.data.transforms.RemapLabels(ds)]
    tasks = l2l.data.TaskDataset(ds, task_transforms=transforms, num_tasks=-1)
    shape = tuple(x.shape[1:])

    def batch(b: int) -> TaskBatch:
        sx, sy, qx, qy = [], [], [], []
        for _ in range(b):
            ex, ey = tasks.sample()
            order = ey.argsort(stable=True)  # group by class: support first, then query
            ex = ex[order].view(WAYS, SHOTS + QUERIES, *shape)
            ey = ey[order].view(WAYS, SHOTS + QUERIES)
            sx.append(ex[:, :SHOTS].reshape(-1, *shape))
            sy.append(ey[:, :SHOTS].reshape(-1))
            qx.append(ex[:, SHOTS:].reshape(-1, *shape))
            qy.append(ey[:, SHOTS:].reshape(-1))
        return TaskBatch(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))

    return batch, l2l.__version__


def check(batch: TaskBatch, b: int, shape: tuple[int, ...]) -> None:
    assert tuple(batch.support_x.shape) == (b, WAYS * SHOTS, *shape), batch.support_x.shape
    assert tuple(batch.query_x.shape) == (b, WAYS * QUERIES, *shape), batch.query_x.shape
    for t in range(b):
        assert sorted(batch.support_y[t].tolist()) == list(range(WAYS))


def rates(candidates: dict, repeats: int, calls: int) -> dict:
    """Episodes/s of each ``name: (sample_fn, batch)``, medians of interleaved rounds."""
    def repeat(f, b: int) -> None:
        for _ in range(calls):
            f(b)  # dropped at once, as a training loop does: holding all the batches of a
            # round would make every call fill fresh pages and time the page faults

    fns = {name: (lambda f=f, b=b: repeat(f, b)) for name, (f, b) in candidates.items()}
    medians = interleaved_medians(fns, repeats=repeats, warmup=1)
    return {name: {"meta_batch": b, "calls_per_round": calls, "median_s": medians[name],
                   "episodes_per_s": b * calls / medians[name]}
            for name, (_, b) in candidates.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=20, help="sample() calls per round")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, no timing")
    p.add_argument("--out", help="result file name under benchmarks/results/")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    repeats, calls = (1, 1) if q else (args.repeats, args.calls)
    omni_classes, omni_per = (30, 20) if q else (1100, 20)
    mini_classes, mini_per = (8, 20) if q else (64, 600)
    disk_classes, disk_per = (6, 16) if q else (64, 100)
    result = {"header": header(seed=0), "quick": q, "episode": "5-way 1-shot 15-query",
              "goals": {"fewshot_28px_batch32_episodes_per_s": 20_000,
                        "speedup_over_learn2learn": 10}}

    # 1-2: 28x28, in memory, against learn2learn on the same tensors.
    x, y = synthetic(omni_classes, omni_per, (1, 28, 28))
    t0 = time.perf_counter()
    ours = FewShotTasks(x, y, WAYS, SHOTS, QUERIES, seed=0, class_augment=rotations90())
    setup = {"fewshot_28px": time.perf_counter() - t0}
    check(ours.sample(32), 32, (1, 28, 28))
    candidates = {"fewshot_28px_batch32": (ours.sample, 32)}
    t0 = time.perf_counter()
    l2l_batch, l2l_version = l2l_sampler(x, y)
    if l2l_batch is not None:
        setup["learn2learn_28px"] = time.perf_counter() - t0
        check(l2l_batch(2), 2, (1, 28, 28))
        candidates["learn2learn_28px_batch32"] = (l2l_batch, 32)
    result["learn2learn"] = l2l_version or "not importable: column skipped"
    runs = rates(candidates, repeats, calls)

    # 3: 84x84x3 in memory, meta-batch 4 and 32.
    x, y = synthetic(mini_classes, mini_per, (3, 84, 84), seed=1)
    t0 = time.perf_counter()
    mini = FewShotTasks(x, y, WAYS, SHOTS, QUERIES, seed=0)
    setup["fewshot_84px"] = time.perf_counter() - t0
    check(mini.sample(4), 4, (3, 84, 84))
    runs.update(rates({"fewshot_84px_batch4": (mini.sample, 4),
                       "fewshot_84px_batch32": (mini.sample, 32)}, repeats, calls))
    del x, mini

    # 4: a lazily loaded on-disk Dataset, 0 and 2 workers.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x, y = synthetic(disk_classes, disk_per, (3, 84, 84), seed=2)
        for i in range(len(x)):
            np.save(folder / f"{i}.npy", x[i].numpy())
        ds = NpyFolder(folder, y.tolist())
        lazy = {w: FewShotTasks(ds, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=0,
                                num_workers=w) for w in (0, 2)}
        for tasks in lazy.values():
            check(tasks.sample(4), 4, (3, 84, 84))
        runs.update(rates({f"fewshot_disk_84px_batch4_workers{w}": (t.sample, 4)
                           for w, t in lazy.items()}, repeats, calls))
        del lazy

    result["setup_s"] = setup
    result["runs"] = runs
    ours_rate = runs["fewshot_28px_batch32"]["episodes_per_s"]
    result["fewshot_28px_goal_met"] = ours_rate >= 20_000
    if "learn2learn_28px_batch32" in runs:
        ratio = ours_rate / runs["learn2learn_28px_batch32"]["episodes_per_s"]
        result["speedup_over_learn2learn"] = ratio
        result["speedup_goal_met"] = ratio >= 10
    if q:
        result["note"] = ("--quick: tiny sizes, one round; checks that every column runs, "
                          "the times mean nothing")
    for name, r in runs.items():
        print(f"{name:40s} {r['episodes_per_s']:12,.0f} episodes/s")
    name = args.out or ("few_shot_sampling_quick.json" if q else "few_shot_sampling.json")
    print(f"wrote {write_json(name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
