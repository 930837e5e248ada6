"""Omniglot N-way K-shot: MAML, FOMAML and Reptile with the papers' settings, on a budget.

    python benchmarks/compare_omniglot.py --shots 1 [--iterations maml=2000,...] [--full]
    python benchmarks/compare_omniglot.py --algorithms metasgd,anil,mamlpp,imaml \
        --out compare_omniglot_5w1s_variants

Each algorithm meta-trains with its paper's hyperparameters (MAML: meta-batch 32, inner lr
0.4, 1 step, Adam 1e-3, K queries per class; Reptile: 10 train shots, inner batch 10,
5 Adam(beta1=0) steps, meta-batch 5, meta step 1 -> 0), keeps the best validation
checkpoint, then adapts on 600 fixed test tasks (the same for every algorithm) for 0..10
steps (Reptile: 0..50, its evaluation setting) with transductive BatchNorm; Reptile is also
evaluated without transduction. The MAML variants (Meta-SGD, ANIL, MAML++, iMAML) take
MAML's settings plus their own defaults (``metalearn.config.ALGORITHM_SPECS``) and are
evaluated with their trained inner-loop state (learned rates). The iteration counts are far
below the papers' (60,000 and 100,000): the default is a reduced CPU budget, and --full runs
the papers' schedules. Writes benchmarks/results/{--out}.{json,png} (default
compare_omniglot_5w{K}s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, header, write_json  # noqa: E402
from metalearn import evaluate, train  # noqa: E402
from metalearn.checkpoint import atomic_write, load_checkpoint  # noqa: E402
from metalearn.config import (  # noqa: E402
    ALGORITHM_SPECS,
    PAPER_DEFAULTS,
    build_learner,
    build_sampler,
)

REDUCED = {"maml": 2000, "fomaml": 2000, "reptile": 5000, "metasgd": 2000, "anil": 2000,
           "mamlpp": 1000, "imaml": 1000}
EVAL_STEPS = {"reptile": 50, "imaml": 20}  # the others: 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--algorithms", default="maml,fomaml,reptile")
    parser.add_argument("--iterations", default="", help="e.g. maml=3000,reptile=8000")
    parser.add_argument("--full", action="store_true", help="the papers' schedules")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", default="", help="results file stem")
    args = parser.parse_args()
    budget = dict(REDUCED)
    budget.update({k: int(v) for k, v in (x.split("=") for x in args.iterations.split(",") if x)})
    tag = f"5w{args.shots}s" if args.ways == 5 else f"{args.ways}w{args.shots}s"
    t_start = time.perf_counter()
    h = header(seed=args.seed)  # the commit that runs, not the one at the end
    results = []
    for algo in args.algorithms.split(","):
        family = ALGORITHM_SPECS[algo].family
        iterations = (PAPER_DEFAULTS[("omniglot", family)]["iterations"] if args.full
                      else budget[algo])
        overrides = dict(dataset="omniglot", algorithm=algo, ways=args.ways, seed=args.seed,
                         iterations=iterations, val_every=max(iterations // 10, 1),
                         val_tasks=200, eval_shots=args.shots)
        if algo != "reptile":
            overrides["shots"] = args.shots
        ckpt = args.runs / f"omniglot_{tag}_{algo}.pt"
        t0 = time.perf_counter()
        res = train(checkpoint=ckpt, overwrite=True, progress=False, **overrides)
        seconds = time.perf_counter() - t0
        best = load_checkpoint(ckpt.with_suffix(".best.pt"))
        res.model.load_state_dict(best["model"])
        cfg = res.config
        tasks = build_sampler(cfg, "test", seed=12345, evaluation=True).sample(args.tasks)
        learner = build_learner(cfg, res.model, evaluation=True)
        if best.get("learner"):  # Meta-SGD's / MAML++'s learned rates at the best iteration
            learner.learned.load_state_dict(best["learner"])
        row = {"algorithm": algo, "ways": args.ways, "shots": args.shots,
               "iterations": iterations, "best_val": best["best"],
               "train_seconds": seconds, "seconds_per_iteration": seconds / iterations,
               "eval_queries_per_class": cfg.eval_queries, "config": cfg.to_dict()}
        for transductive in ((True, False) if algo == "reptile" else (True,)):
            ev = evaluate(learner, tasks, max_steps=EVAL_STEPS.get(algo, 10),
                          transductive=transductive, batch_size=25 if transductive else 5,
                          progress=False)
            key = "transductive" if transductive else "non_transductive"
            row[key] = {"steps": ev.steps, "accuracy": ev.mean, "ci95": ev.ci95}
            print(f"5w{args.shots}s {algo:8s} {key:16s} step 1: {100 * ev.mean[1]:.2f}%  "
                  f"step 3: {100 * ev.mean[min(3, len(ev.mean) - 1)]:.2f}%  last: "
                  f"{100 * ev.mean[-1]:.2f} ± {100 * ev.ci95[-1]:.2f}%  ({seconds:.0f}s train)",
                  flush=True)
        results.append(row)
    h.update(wall_seconds=time.perf_counter() - t_start, reduced=not args.full,
             test_tasks=args.tasks, threads=torch.get_num_threads())
    out = args.out or f"compare_omniglot_{tag}"
    path = write_json(f"{out}.json", {"header": h, "results": results})
    plot(results, RESULTS / f"{out}.png", tag)
    print(f"wrote {path}")


def plot(results: list[dict], path: Path, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        for key, style in (("transductive", "-"), ("non_transductive", "--")):
            if key in r:
                c = r[key]
                ax.errorbar(c["steps"], [100 * a for a in c["accuracy"]],
                            yerr=[100 * e for e in c["ci95"]], linestyle=style, capsize=2,
                            label=f"{r['algorithm']} ({r['iterations']} it, {key})")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("inner steps at test time")
    ax.set_ylabel("accuracy % (600 tasks, 95% CI)")
    ax.set_title(f"Omniglot {tag}, reduced budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


if __name__ == "__main__":
    main()
