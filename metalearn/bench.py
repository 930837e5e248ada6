"""``metalearn bench``: MAML, FOMAML and Reptile side by side on one dataset."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from metalearn.checkpoint import atomic_write
from metalearn.config import (
    ALGORITHM_SPECS,
    PAPER_DEFAULTS,
    TrainConfig,
    build_learner,
    build_sampler,
    evaluation_tasks,
)
from metalearn.evaluation import evaluate, format_metric
from metalearn.memory import memory_profile
from metalearn.run_record import run_header
from metalearn.training import train

SHORT_ITERATIONS = {"sine": 1000, "omniglot": 300, "mini-imagenet": 300,
                    "tiered-imagenet": 300, "cifar-fs": 300, "fc100": 300}
TEST_SEED = 12345


def _iterations(iterations: int | None, full: bool, cfg: TrainConfig) -> int:
    if iterations:
        return iterations
    if full:
        family = ALGORITHM_SPECS[cfg.algorithm].family
        return PAPER_DEFAULTS[(cfg.dataset, family)]["iterations"]
    return SHORT_ITERATIONS[cfg.dataset]


def run_bench(base: TrainConfig, algorithms: Sequence[str], *, out: str | Path,
              iterations: int | None = None, full: bool = False, tasks: int = 600,
              eval_steps: int = 10, steps_list: Sequence[int] = (1, 2, 4, 8),
              progress: bool = True) -> int:
    """Train each algorithm briefly, then evaluate, profile memory and time it.

    Args:
        base: the settings the algorithms share, unresolved: each algorithm fills in its
            own paper defaults.
        algorithms: the algorithms to compare, e.g. ``("maml", "fomaml", "reptile")``.
        out: the JSON file to write (the plot goes beside it, ``.png``).
        iterations: meta-iterations of each; ``None`` takes a short budget (or the papers'
            with ``full``).
        full: the papers' schedules.
        tasks: test tasks.
        eval_steps: the most inner steps scored at test time.
        steps_list: the inner-step counts whose memory and time are profiled.
        progress: show progress bars.

    Returns:
        0, the command's exit code.
    """
    t_start = time.perf_counter()
    device = torch.device(base.device)
    records, curves = [], {}
    for algorithm in algorithms:
        # Each algorithm gets its own paper defaults; only what the user set is shared.
        cfg = dataclasses.replace(base, algorithm=algorithm, iterations=None)
        cfg = dataclasses.replace(cfg, iterations=_iterations(iterations, full, cfg.resolved()))
        cfg = dataclasses.replace(cfg, val_every=cfg.iterations, val_tasks=100).resolved()
        print(f"== {algorithm}: {cfg.iterations} meta-iterations on {cfg.dataset}", flush=True)
        t0 = time.perf_counter()
        result = train(cfg, progress=progress)
        train_seconds = time.perf_counter() - t0

        test = evaluation_tasks(cfg, "test", TEST_SEED, tasks)
        eval_learner = build_learner(cfg, result.model, evaluation=True, share=result.learner)
        ev = evaluate(eval_learner, **test, max_steps=eval_steps, progress=progress)
        curves[algorithm] = ev.to_dict()

        batch = build_sampler(cfg, "train", seed=cfg.seed + 7).sample(cfg.meta_batch).to(device)
        # A fresh learner: profiling steps it, which must not touch the trained one's state.
        profile = memory_profile(build_learner(cfg, result.model), batch,
                                 inner_steps=steps_list)
        for row in profile:
            k = row["inner_steps"]
            idx = min(k, eval_steps)
            # Two meanings of "steps": the inner steps of the profiled meta-iteration, and
            # the test-time steps behind the metric (as many, capped by eval_steps).
            records.append({
                "algorithm": algorithm, "train_inner_steps": k,
                ev.metric: ev.mean[idx], "ci95": ev.ci95[idx], "test_steps": idx,
                "saved_bytes": row["saved_bytes"], "cuda_peak_bytes": row["cuda_peak_bytes"],
                "seconds_per_iteration": row["seconds_per_iteration"],
                "train_iterations": cfg.iterations, "train_seconds": train_seconds,
            })

    header = run_header()
    header["wall_seconds"] = time.perf_counter() - t_start
    header["config"] = base.to_dict()
    header["test_tasks"] = tasks
    payload = {"header": header, "records": records, "curves": curves}
    out = Path(out)
    atomic_write(out, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    plot = out.with_suffix(".png")
    plot_bench(payload, plot)
    print(format_table(records))
    print(f"\nresults: {out}  plot: {plot}")
    return 0


def format_table(records: list[dict]) -> str:
    """The bench records as an aligned text table (accuracy in percent, as everywhere)."""
    if not records:
        return "(no records)"
    metric = "accuracy" if "accuracy" in records[0] else "mse"
    lines = [f"{'':<9} {'after test steps':^26} | {'a meta-iteration with inner steps':^38}",
             f"{'algorithm':<9} {'steps':>5} {metric:>20}   | {'steps':>5} "
             f"{'saved MB':>9} {'cuda MB':>8} {'s/iter':>9}"]
    for r in records:
        cuda = "-" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / 2**20:.1f}"
        lines.append(f"{r['algorithm']:<9} {r['test_steps']:>5} "
                     f"{format_metric(metric, r[metric], r['ci95']):>20}   | "
                     f"{r['train_inner_steps']:>5} {r['saved_bytes'] / 2**20:>9.2f} {cuda:>8} "
                     f"{r['seconds_per_iteration']:>9.4f}")
    return "\n".join(lines)


def plot_bench(payload: dict, path: Path) -> None:
    """Accuracy/MSE against test-time inner steps, and memory against inner steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in payload["curves"].items():
        steps, mean, ci = curve["steps"], curve["mean"], curve["ci95"]
        ax1.errorbar(steps, mean, yerr=ci, label=name, capsize=2)
        ax1.set_ylabel(curve["metric"])
        rows = [r for r in payload["records"] if r["algorithm"] == name]
        ax2.plot([r["train_inner_steps"] for r in rows],
                 [r["saved_bytes"] / 2**20 for r in rows], marker="o", label=name)
    ax1.set_xlabel("inner steps at test time")
    cfg = payload["header"]["config"]
    budget = {r["algorithm"]: r["train_iterations"] for r in payload["records"]}
    ax1.set_title(f"{cfg['dataset']}, {cfg.get('shots') or 'paper'} shots: adaptation "
                  "(mean, 95% CI)", fontsize=9)
    fig.suptitle("meta-iterations: " + ", ".join(f"{a} {n}" for a, n in budget.items()),
                 fontsize=9)
    ax2.set_xlabel("inner steps in the meta-iteration")
    ax2.set_ylabel("autograd saved tensors (MiB)")
    ax2.set_title("memory per meta-iteration")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
