"""Memory and time per meta-iteration against inner steps (MAML grows, the others stay flat).

    python benchmarks/inner_steps_memory.py [--steps 1,2,...,10] [--repeats 3]
    python benchmarks/inner_steps_memory.py --algorithms maml,metasgd,anil,mamlpp,imaml \
        --out inner_steps_memory_variants

Omniglot 5-way 1-shot, Conv4, meta-batch 32, 15 queries per class (and the sine MLP):
for MAML, FOMAML and Reptile at each inner-step count, the autograd graph's saved bytes
(``metalearn.memory_profile``), the CUDA peak on a GPU, and the median seconds per
meta-iteration. The MAML variants run with their library defaults at each step count
(MAML++ with all ingredients on; iMAML with 5 CG steps, whose memory should stay flat).
Writes benchmarks/results/{--out}.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, header, write_json  # noqa: E402
from metalearn import (  # noqa: E402
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    MAMLPlusPlus,
    MetaSGD,
    Reptile,
    memory_profile,
)
from metalearn.checkpoint import atomic_write  # noqa: E402
from metalearn.data import OmniglotTasks, SineTasks  # noqa: E402
from metalearn.models import MLP, Conv4  # noqa: E402

# Built with the largest step count, so MAML++'s per-step tables cover every count profiled.
LEARNERS = {
    "maml": lambda m, lr, k: MAML(m, lr, 1),
    "fomaml": lambda m, lr, k: FOMAML(m, lr, 1),
    "reptile": lambda m, lr, k: Reptile(m, lr, 1),
    "metasgd": lambda m, lr, k: MetaSGD(m, lr, 1),
    "anil": lambda m, lr, k: ANIL(m, lr, 1),
    "mamlpp": lambda m, lr, k: MAMLPlusPlus(m, lr, k),
    "imaml": lambda m, lr, k: IMAML(m, lr, k),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,2,3,4,5,6,7,8,9,10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--algorithms", default="maml,fomaml,reptile",
                        help=f"any of {','.join(LEARNERS)}")
    parser.add_argument("--out", default="inner_steps_memory", help="results file stem")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    names = args.algorithms.split(",")
    unknown = [n for n in names if n not in LEARNERS]
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {','.join(LEARNERS)}")
    t0 = time.perf_counter()
    setups = {
        "omniglot 5w1s Conv4, 15 queries/class, meta-batch 32": (
            lambda: Conv4(ways=5), 0.4,
            OmniglotTasks(split="train", ways=5, shots=1, queries=15, seed=0,
                          progress=False).sample(32)),
        "sine MLP, 10 shots, meta-batch 25": (
            MLP, 0.01, SineTasks(shots=10, queries=10, seed=0).sample(25)),
    }
    rows = []
    for setup, (make_model, lr, batch) in setups.items():
        for name in names:
            torch.manual_seed(0)
            model = make_model().to(args.device)
            learner = LEARNERS[name](model, lr, max(steps))
            if hasattr(learner, "learned"):
                learner.learned.to(args.device)
            profile = memory_profile(learner, batch.to(args.device),
                                     inner_steps=steps, repeats=args.repeats)
            for r in profile:
                rows.append({"setup": setup, **r, "algorithm": name})
                print(f"{setup[:30]:30s} {name:7s} k={r['inner_steps']:2d} "
                      f"saved {r['saved_bytes'] / 2**20:8.2f} MiB  "
                      f"{r['seconds_per_iteration']:.4f} s/it", flush=True)
    h = header(seed=0)
    h["wall_seconds"] = time.perf_counter() - t0
    path = write_json(f"{args.out}.json", {"header": h, "rows": rows})
    plot(rows, RESULTS / f"{args.out}.png")
    print(f"wrote {path}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(r["setup"] for r in rows))
    fig, axes = plt.subplots(len(setups), 2, figsize=(11, 3.6 * len(setups)), squeeze=False)
    for (ax_mem, ax_time), setup in zip(axes, setups):
        for algo in dict.fromkeys(r["algorithm"] for r in rows):
            sel = [r for r in rows if r["setup"] == setup and r["algorithm"] == algo]
            k = [r["inner_steps"] for r in sel]
            ax_mem.plot(k, [r["saved_bytes"] / 2**20 for r in sel], marker="o", label=algo)
            ax_time.plot(k, [r["seconds_per_iteration"] for r in sel], marker="o", label=algo)
        ax_mem.set_title(f"saved-for-backward memory\n{setup}", fontsize=9)
        ax_mem.set_ylabel("MiB")
        ax_time.set_title(f"time per meta-iteration\n{setup}", fontsize=9)
        ax_time.set_ylabel("seconds")
        for ax in (ax_mem, ax_time):
            ax.set_xlabel("inner steps")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


if __name__ == "__main__":
    main()
