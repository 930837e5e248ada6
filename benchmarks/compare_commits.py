"""Speed, memory and meta-gradients of this checkout against another commit, side by side.

    python benchmarks/compare_commits.py --base REV [--repeats 9] [--out NAME]

For a change that must not slow the library down or change its results (a refactor, a
kernel change). The workloads are those of ``benchmarks/peers/speed.py``: Omniglot 5-way
1-shot, Conv4, meta-batch 32, at (a) 1 and (b) 15 queries per class; MAML with 1 and 5
inner steps, FOMAML and Reptile with 5. One worker process per tree (``--base`` checked
out into a temporary git worktree, and this checkout), each importing its own
``metalearn``; the parent has them take turns, one timed meta-iteration each, case by case
and round by round, so that a slow spell of the machine falls on both. Each worker starts
from the same seeded weights and batches, and reports for every case:

- the median seconds per meta-iteration;
- the autograd graph's saved bytes at its peak (``metalearn.memory.SavedTensorMeter``);
- its meta-gradient, which the parent compares with the other tree's (largest difference
  relative to the largest gradient entry).

Besides each tree's median, every row has the median of the paired ratios head/base (the
two iterations of a round ran back to back) with a distribution-free 95% confidence
interval for it (order statistics of the sorted ratios), and the raw times: on this
shared 2-core machine single runs move by several per cent either way.

Run it on an idle machine. Writes benchmarks/results/{--out}.json (default
``compare_commits``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [(q, algo, steps) for q in (1, 15)
         for algo, steps in (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5))]


def worker(grads_file: str) -> None:
    """Serve ``time I`` (one timed meta-iteration of case I) on stdin, answer on stdout."""
    sys.path.insert(0, str(Path.cwd()))
    import torch

    import metalearn
    from benchmarks.common import omniglot_5w1s_batch, seeded_conv4_learner
    from metalearn.memory import SavedTensorMeter

    if Path.cwd() not in Path(metalearn.__file__).resolve().parents:
        sys.exit(f"worker in {Path.cwd()} imported {metalearn.__file__}")

    batches = {q: omniglot_5w1s_batch(q, 32) for q in (1, 15)}
    setups = []
    for q, algo, steps in CASES:
        model, learner = seeded_conv4_learner(algo, steps)
        setups.append((model, learner, batches[q]))

    def step(i: int) -> None:
        model, learner, batch = setups[i]
        model.zero_grad(set_to_none=True)
        learner.step(batch)

    grads, saved = [], []
    for i, (model, _, _) in enumerate(setups):
        step(i)  # warm-up; its gradient is the one compared
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        with SavedTensorMeter() as meter:
            step(i)
        saved.append(meter.peak_bytes)
    torch.save(grads, grads_file)
    print(json.dumps({"saved_bytes": saved}), flush=True)
    for line in sys.stdin:
        i = int(line.split()[1])
        t0 = time.perf_counter()
        step(i)
        print(time.perf_counter() - t0, flush=True)


def start(tree: Path, grads_file: Path) -> tuple[subprocess.Popen, dict]:
    # This script, run in the other tree: it imports that tree's metalearn and benchmarks.
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(grads_file)],
                            cwd=tree, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())


def ask(proc: subprocess.Popen, i: int) -> float:
    proc.stdin.write(f"time {i}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of at least 95%: the order
    statistics ``v[j]`` and ``v[n - 1 - j]``, ``j`` the largest index with
    ``P(Binomial(n, 1/2) <= j) <= 2.5%`` (the whole range when ``n`` is too small)."""
    v, n = sorted(values), len(values)
    j, tail = -1, 0.0
    while True:
        tail += math.comb(n, j + 1) / 2**n
        if tail > 0.025:
            break
        j += 1
    j = max(j, 0)
    return v[j], v[n - 1 - j]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--base", help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="compare_commits")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if not args.base:
        parser.error("--base is required")
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.common import header, write_json

    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    h = header(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "base"), base],
                       cwd=ROOT, check=True, capture_output=True)
        try:
            trees = {"base": tmp / "base", "head": ROOT}
            workers = {k: start(t, tmp / f"{k}.pt") for k, t in trees.items()}
            times = {k: [[] for _ in CASES] for k in trees}
            for r in range(args.repeats):
                for i in range(len(CASES)):
                    # Alternate who goes first, so that neither always follows the other.
                    for k in (("base", "head") if (r + i) % 2 == 0 else ("head", "base")):
                        times[k][i].append(ask(workers[k][0], i))
            for proc, _ in workers.values():
                proc.stdin.close()
                proc.wait()
            grads = {k: torch.load(tmp / f"{k}.pt") for k in trees}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "base")],
                           cwd=ROOT, capture_output=True)
    rows = []
    for i, (q, algo, steps) in enumerate(CASES):
        med = {k: statistics.median(times[k][i]) for k in trees}
        scale = max(g.abs().max().item() for g in grads["base"][i].values())
        diff = max((grads["head"][i][n] - g).abs().max().item()
                   for n, g in grads["base"][i].items()) / scale
        paired = [h / b for h, b in zip(times["head"][i], times["base"][i])]
        row = {"queries_per_class": q, "algorithm": algo, "inner_steps": steps,
               "base_seconds": med["base"], "head_seconds": med["head"],
               "head_over_base": med["head"] / med["base"],
               "paired_ratio_median": statistics.median(paired),
               "paired_ratio_ci95": median_ci(paired),
               "base_saved_bytes": workers["base"][1]["saved_bytes"][i],
               "head_saved_bytes": workers["head"][1]["saved_bytes"][i],
               "grad_max_rel_diff": diff,
               "base_times": times["base"][i], "head_times": times["head"][i]}
        rows.append(row)
        print(f"({'a' if q == 1 else 'b'}) {algo:7s} k={steps}  base {med['base']:.3f}s  "
              f"head {med['head']:.3f}s  paired head/base {row['paired_ratio_median']:.3f} "
              f"[{row['paired_ratio_ci95'][0]:.3f}, {row['paired_ratio_ci95'][1]:.3f}]  saved "
              f"{row['base_saved_bytes'] / 2**20:.1f} -> {row['head_saved_bytes'] / 2**20:.1f}"
              f" MiB  grad diff {diff:.1e}", flush=True)
    h.update(base_commit=base, repeats=args.repeats, meta_batch=32)
    print(f"wrote {write_json(f'{args.out}.json', {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
