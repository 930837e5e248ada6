"""Sine regression: MAML, FOMAML, Reptile and a pretrained (joint-training) baseline.

    python benchmarks/compare_sine.py [--iterations 10000 | --full] [--shots 5,10]

Each algorithm meta-trains with its paper defaults (MAML: inner lr 0.01, 1 step,
meta-batch 25, Adam 1e-3), then adapts on 600 fixed test tasks for 0..10 SGD steps at
lr 0.01 (Reptile: its own inner loop). The pretrained baseline is the same network trained
on the pooled tasks with no inner loop (MAML with 0 inner steps), then fine-tuned the same
way, as in Finn et al. (2017) section 5.1. The default budget is reduced from the paper's
70,000 iterations; --full runs the paper's. Writes benchmarks/results/compare_sine.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, header, write_json  # noqa: E402
from metalearn import MAML, evaluate, train  # noqa: E402
from metalearn.checkpoint import atomic_write  # noqa: E402
from metalearn.config import build_learner  # noqa: E402
from metalearn.data import SineTasks  # noqa: E402
from metalearn.training import NonFiniteError  # noqa: E402

RUNS = {  # name -> train() overrides
    "maml": dict(algorithm="maml"),
    "fomaml": dict(algorithm="fomaml"),
    "reptile": dict(algorithm="reptile"),
    "pretrained": dict(algorithm="maml", inner_steps=0),
    "metasgd": dict(algorithm="metasgd"),
    "anil": dict(algorithm="anil"),
    "mamlpp": dict(algorithm="mamlpp"),
    "mamlpp-no-lslr": dict(algorithm="mamlpp", lslr=False),
    "mamlpp-no-msl": dict(algorithm="mamlpp", multi_step_loss=False),
    "mamlpp-fo-first-half": dict(algorithm="mamlpp", first_order_iterations=-1),  # set below
    "imaml": dict(algorithm="imaml"),
}
DEFAULT_RUNS = "maml,fomaml,reptile,pretrained"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--full", action="store_true", help="the paper's 70,000 iterations")
    parser.add_argument("--shots", default="5,10")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"from {','.join(RUNS)}")
    parser.add_argument("--out", default="compare_sine", help="results file stem")
    args = parser.parse_args()
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {','.join(RUNS)}")
    iterations = 70_000 if args.full else args.iterations
    t_start = time.perf_counter()
    results = []
    for shots in [int(s) for s in args.shots.split(",")]:
        test = SineTasks(shots=shots, queries=10, seed=2024).sample(args.tasks)
        for name in args.runs.split(","):
            overrides = dict(RUNS[name])
            if overrides.get("first_order_iterations") == -1:
                overrides["first_order_iterations"] = iterations // 2
            t0 = time.perf_counter()
            try:
                res = train(dataset="sine", shots=shots, queries=10, iterations=iterations,
                            val_every=max(iterations // 10, 1), seed=args.seed,
                            progress=False, **overrides)
            except NonFiniteError as err:  # a diverging setting is a result, not a crash
                results.append({"shots": shots, "name": name, "iterations": iterations,
                                "diverged": str(err).split(";")[0]})
                print(f"K={shots:2d} {name:10s} diverged: {str(err).split(';')[0][-60:]}",
                      flush=True)
                continue
            seconds = time.perf_counter() - t0
            if name == "pretrained":  # fine-tuned with plain SGD at the MAML inner lr
                learner = MAML(res.model, inner_lr=0.01, inner_steps=1)
            else:
                # share=: Meta-SGD's and MAML++'s trained inner learning rates.
                learner = build_learner(res.config, res.model, evaluation=True,
                                        share=res.learner)
            ev = evaluate(learner, test, max_steps=10, progress=False)
            results.append({"shots": shots, "name": name, "iterations": iterations,
                            "train_seconds": seconds,
                            "seconds_per_iteration": seconds / iterations,
                            "mse": ev.mean, "ci95": ev.ci95, "steps": ev.steps})
            print(f"K={shots:2d} {name:10s} mse after 1 step {ev.mean[1]:.3f} ± {ev.ci95[1]:.3f}"
                  f", after 10 {ev.mean[10]:.3f} ± {ev.ci95[10]:.3f}  ({seconds:.0f}s)",
                  flush=True)
    h = header(seed=args.seed)
    h.update(wall_seconds=time.perf_counter() - t_start, reduced=not args.full,
             test_tasks=args.tasks, threads=torch.get_num_threads())
    path = write_json(f"{args.out}.json", {"header": h, "results": results})
    plot(results, RESULTS / f"{args.out}.png")
    print(f"wrote {path}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({r["shots"] for r in results})
    fig, axes = plt.subplots(1, len(shots), figsize=(5.5 * len(shots), 4), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for r in (r for r in results if r["shots"] == k and "mse" in r):
            ax.errorbar(r["steps"], r["mse"], yerr=r["ci95"], label=r["name"], capsize=2)
        ax.set_title(f"sine, K={k} ({results[0]['iterations']} meta-iterations)")
        ax.set_xlabel("gradient steps at test time")
        ax.set_ylabel("MSE (600 tasks, 95% CI)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


if __name__ == "__main__":
    main()
