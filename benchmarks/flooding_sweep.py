"""Flooding in the inner loop: sweep the flood level b for MAML and FOMAML, Omniglot 5w1s.

    python benchmarks/flooding_sweep.py --probe                  # support-loss levels first
    python benchmarks/flooding_sweep.py                          # the reduced default sweep
    python benchmarks/flooding_sweep.py --full                   # the paper's 60,000 iterations
    python benchmarks/flooding_sweep.py --quick --out-dir /tmp/fs   # smoke test, ~2 minutes

Flooding the inner (support) loss replaces it by |L − b| + b (``flood_mode="batch"``,
Ishida et al. 2020) or by mean_i(|ℓ_i − b| + b) (``"instance"``, iFlood, Xie et al. 2022);
b = 0 is off and is run once per algorithm and seed, shared by both modes.

Why several inner steps: |L − b| + b is the identity while L > b. The initialisation cannot
know a task's label permutation, so its support loss is at least about ln 5 ≈ 1.61 at inner
step 0 (--probe: ≈ 1.6 for a trained MAML; FOMAML drifts to confident, arbitrary logits with
a much larger loss, 6.5 after 60 iterations and 48 after 2,000). With the paper's single
inner step, batch flooding at any b below that never changes a gradient. It can act only at
inner steps 1..K−1, once the support loss is below b; iFlood acts per example, and single
examples can sit near 0 loss even at step 0 (a confident initialisation guesses 1 label in
5). So MAML trains with 3 inner steps (steps 1 and 2 can be flooded; its second-order cost
and memory grow with K: about 2x a FOMAML iteration at K=3, and K=5 costs another ~1.4x)
and FOMAML with 5, both at the paper's inner lr 0.4, meta-batch 32, Adam 1e-3, one query
per class.

Choosing b (DEFAULT_LEVELS, from --probe): early in meta-training the task losses at steps
1..K−1 are 0.2-4 (the 0.4 step first overshoots), per-example losses 0.001-10; a trained
model fits the 5 support images in one step (task loss ≈ 0.001 for MAML, 0.03 for FOMAML,
from the 2,000-iteration checkpoints of compare_omniglot.py). So b = 0.01, 0.1, 1 span two
decades of that range, and b = 1 < ln 5 still leaves step 0 unflooded in batch mode. Near
0 loss the gradient vanishes too, so a flood can be "active" and still move the weights
little: the script also records the share of the inner path length taken in flooded steps.

Each (algorithm, mode, b, seed) run meta-trains with validation every ``--val-every``
iterations on fixed validation tasks, keeps the best-validation checkpoint, and is scored
on the same fixed test tasks (600 by default, seed 12345, as in compare_omniglot.py) after
0..K inner steps, flooded as in training, with transductive BatchNorm. At every validation
point the script also adapts a fixed set of training tasks with the current weights and
records the support losses along the (flooded) inner trajectory: how often flooding is
active, i.e. the fraction of inner steps 0..K−1 whose task loss is below b (batch mode) or
of per-example losses below b (instance mode). Training runs in segments between
validation points through ``train(..., resume=True)``, which reproduces an uninterrupted
run, so this measurement does not change the training.

Noise: a per-seed 95% CI over test tasks only covers the test-task sampling; differences
between seeds (initialisation, task order) are usually larger. So every cell reports the
mean over seeds with a t-based 95% CI across seeds, the paired difference to b = 0 (same
seed, same tasks) with its CI, and the per-seed task CIs. The validation-selected b per
(algorithm, mode) is chosen by mean validation accuracy over seeds (ties go to the smaller
b); the selection is also repeated per seed, whose test accuracy is an honest estimate of
"tune b on validation", selection noise included.

The default (REDUCED, DEFAULT_LEVELS, DEFAULT_SEEDS) is a pilot: 100 MAML / 200 FOMAML
meta-iterations per run, b in {0, 0.1, 1}, 2 seeds, about 25 minutes on an idle 2-core CPU.
The models are far from converged at that budget (about 75-85%), so it shows where the
floods act and whether anything moves early in training, not an answer about flooding at
convergence. A longer budget is one --iterations away (more levels: --levels, more seeds:
--seeds); --full runs the paper's 60,000 (a GPU job: ~0.6 s per MAML iteration here).
Writes {--out-dir}/{--out}.{json,png}; --probe writes
{--out}_probe.json, which a later sweep embeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, header, mean_ci  # noqa: E402
from metalearn import evaluate, train  # noqa: E402
from metalearn.algorithms.losses import FLOOD_MODES  # noqa: E402
from metalearn.bench import TEST_SEED  # noqa: E402
from metalearn.checkpoint import atomic_write, load_checkpoint  # noqa: E402
from metalearn.config import (  # noqa: E402
    PAPER_DEFAULTS,
    TrainConfig,
    build_learner,
    build_model,
    build_sampler,
)
from metalearn.training import NonFiniteError  # noqa: E402

ALGORITHMS = ("maml", "fomaml")
INNER_STEPS = {"maml": 3, "fomaml": 5}
# A pilot sized for about 25 minutes of an idle 2-core CPU: 2 algorithms x (1 + 2 modes x
# 2 levels) x 2 seeds = 20 runs; an iteration takes ~0.6 s (MAML, K=3) and ~0.27 s (FOMAML,
# K=5) there. The models reach only about 75-85% at this budget.
REDUCED = {"maml": 100, "fomaml": 200}
# Across the support losses --probe saw at inner steps 1..K-1 (module docstring); b = 1 stays
# below ln 5, so batch flooding never acts at step 0.
DEFAULT_LEVELS = "0,0.1,1"
DEFAULT_SEEDS = "0,1"
PROBE_SEED = 424_242  # the fixed training tasks of the activity probe
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
QUICK = dict(iterations="maml=4,fomaml=4", seeds="0", levels="0,0.3", tasks=20, val_tasks=10,
             val_every=2, probe_tasks=8, probe_iterations=4)


# -- support losses along the inner trajectory --------------------------------------------
@torch.no_grad()
def support_losses(learner, tasks, steps: int, chunk: int = 25) -> tuple:
    """Along the learner's own (flooded) inner trajectory: per-example support losses
    ``(tasks, steps + 1, n)`` at the weights after 0..steps inner steps, and the length of
    every step ``(tasks, steps)``, ||theta_{k+1} - theta_k||."""
    rows, norms = [], []
    for start in range(0, len(tasks), chunk):
        part = tasks[start:start + chunk]
        path = learner.adapt(part.support_x, part.support_y, steps=steps, trajectory=True)

        def losses(fast, x, y):
            return learner.loss.per_example(learner.fmodel(fast, x), y)

        per_step = [vmap(losses, randomness="different")(f, part.support_x, part.support_y)
                    for f in path]
        rows.append(torch.stack(per_step, 1))
        moves = [sum((b[n] - a[n]).flatten(1).pow(2).sum(1) for n in a).sqrt()
                 for a, b in zip(path, path[1:])]
        norms.append(torch.stack(moves, 1) if moves else torch.zeros(len(part), 0))
    return torch.cat(rows).to(torch.float64), torch.cat(norms).to(torch.float64)


def quantiles(x: torch.Tensor) -> dict:
    q = torch.quantile(x.flatten(), torch.tensor(QUANTILES, dtype=x.dtype)).tolist()
    return {f"q{round(100 * p)}": v for p, v in zip(QUANTILES, q)}


def loss_levels(losses: torch.Tensor, norms: torch.Tensor) -> list[dict]:
    """Per inner step: the task (batch) loss's mean and quantiles over tasks, the
    per-example losses' quantiles, and the mean length of the step taken from there."""
    out = []
    for k in range(losses.shape[1]):
        task = losses[:, k].mean(1)
        out.append({"step": k, "task_mean": task.mean().item(), "task": quantiles(task),
                    "example": quantiles(losses[:, k]),
                    "example_min": losses[:, k].min().item(),
                    "step_length": norms[:, k].mean().item() if k < norms.shape[1] else None})
    return out


def activity(losses: torch.Tensor, norms: torch.Tensor, level: float) -> dict:
    """How often a flood at ``level`` acts on inner steps 0..K-1 (the steps that take a
    gradient): the fraction of task losses below it (batch flooding) and of per-example
    losses below it (iFlood), overall and per step. ``batch_movement``: the share of the
    inner loop's path length taken in flooded (reversed) steps under batch flooding; a
    flood can be active yet move little, since the gradient vanishes as the loss does."""
    grad_steps = losses[:, :-1]
    below = grad_steps.mean(2) < level
    batch = below.to(torch.float64)
    instance = (grad_steps < level).to(torch.float64)
    total = norms.sum().item()
    return {"batch": batch.mean().item(), "instance": instance.mean().item(),
            "batch_per_step": batch.mean(0).tolist(),
            "instance_per_step": instance.mean((0, 2)).tolist(),
            "batch_movement": (norms * batch).sum().item() / total if total else 0.0}


def format_levels(levels: list[dict]) -> str:
    head = (f"  {'step':>4}  {'task loss: mean':>15} {'q10':>6} {'q50':>6} {'q90':>6}  |  "
            f"{'example loss: q10':>17} {'q25':>6} {'q50':>6} {'q75':>6} {'q90':>6}  |  "
            "step length")
    lines = [head]
    for r in levels:
        t, e = r["task"], r["example"]
        move = f"{r['step_length']:.3g}" if r["step_length"] is not None else "-"
        lines.append(f"  {r['step']:>4}  {r['task_mean']:>15.3f} {t['q10']:>6.3f} "
                     f"{t['q50']:>6.3f} {t['q90']:>6.3f}  |  {e['q10']:>17.3f} {e['q25']:>6.3f} "
                     f"{e['q50']:>6.3f} {e['q75']:>6.3f} {e['q90']:>6.3f}  |  {move:>11}")
    return "\n".join(lines)


# -- one run --------------------------------------------------------------------------------
def run_config(algo: str, mode: str, level: float, seed: int, iterations: int, steps: int,
               args) -> dict:
    return dict(dataset="omniglot", algorithm=algo, ways=5, shots=1, seed=seed,
                iterations=iterations, inner_steps=steps, inner_flood=level or None,
                flood_mode=mode, val_every=args.val_every_for(iterations),
                val_tasks=args.val_tasks)


def train_segmented(overrides: dict, ckpt: Path, on_point) -> tuple:
    """Train to ``overrides["iterations"]`` in segments that end at the validation points,
    calling ``on_point(iteration, learner)`` after each. Resuming reproduces an unbroken run
    (the schedule is constant, so the segment ends do not change it)."""
    total, every = overrides["iterations"], overrides["val_every"]
    ends = list(range(every, total, every)) + [total]
    for path in (ckpt, *(ckpt.with_suffix(s) for s in (".best.pt", ".jsonl"))):
        path.unlink(missing_ok=True)  # a stale run must not be resumed or appended to
    history, res, seconds = [], None, 0.0
    for i, end in enumerate(ends):
        t0 = time.perf_counter()
        res = train(checkpoint=ckpt, resume=i > 0, progress=False,
                    **dict(overrides, iterations=end))
        seconds += time.perf_counter() - t0
        history += res.history
        on_point(end, res.learner)
    return res, history, seconds


def run_one(algo: str, mode: str, level: float, seed: int, iterations: int, steps: int,
            tasks, probe_tasks, levels: list[float], args) -> dict:
    overrides = run_config(algo, mode, level, seed, iterations, steps, args)
    name = f"{algo}_{'off' if not level else mode}_b{level:g}_s{seed}"
    ckpt = args.runs / f"{name}.pt"
    record_path = ckpt.with_suffix(".record.json")
    key = {"config": overrides, "tasks": args.tasks, "probe_tasks": args.probe_tasks,
           "test_seed": TEST_SEED, "unflooded_eval": args.unflooded_eval}
    if args.reuse and record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("key") == key:
            old["reused"] = True
            return old
    points = []

    def on_point(it: int, learner) -> None:
        losses, norms = support_losses(learner, probe_tasks, steps)
        point = {"iteration": it, "levels": loss_levels(losses, norms)}
        if level:
            point["active"] = activity(losses, norms, level)
        else:  # unflooded: how often each swept level would have acted
            point["below"] = {f"{b:g}": activity(losses, norms, b) for b in levels if b}
        points.append(point)

    row = {"algorithm": algo, "mode": mode if level else "off", "level": level, "seed": seed,
           "iterations": iterations, "inner_steps": steps, "key": key}
    t0 = time.perf_counter()
    try:
        res, history, train_seconds = train_segmented(overrides, ckpt, on_point)
    except NonFiniteError as err:  # a diverging run is a result, not a crash
        row.update(diverged=str(err), points=points, wall_seconds=time.perf_counter() - t0)
        return row
    probe_seconds = time.perf_counter() - t0 - train_seconds
    best = load_checkpoint(ckpt.with_suffix(".best.pt"))
    res.model.load_state_dict(best["model"])
    t1 = time.perf_counter()
    ev = evaluate(build_learner(res.config, res.model, evaluation=True), tasks, max_steps=steps,
                  progress=False)
    row["test"] = {"steps": ev.steps, "accuracy": ev.mean, "ci95": ev.ci95}
    if args.unflooded_eval and level:  # separates test-time flooding from meta-training
        cfg = TrainConfig(**dict(res.config.to_dict(), inner_flood=None))
        ev0 = evaluate(build_learner(cfg, res.model, evaluation=True), tasks, max_steps=steps,
                       progress=False)
        row["test_unflooded"] = {"steps": ev0.steps, "accuracy": ev0.mean, "ci95": ev0.ci95}
    eval_seconds = time.perf_counter() - t1
    val = [{"iteration": h["iteration"], "accuracy": h["accuracy"], "ci95": h["ci95"]}
           for h in history if h.get("split") == "val"]
    # Time averages over the validation points (each point: the weights at that iteration).
    active = [p["active"][mode] for p in points if "active" in p]
    movement = [p["active"]["batch_movement"] for p in points if "active" in p
                and mode == "batch"]
    row.update(
        best_val=best["best"]["value"], best_val_ci95=best["best"]["ci95"],
        best_iteration=best["best"]["iteration"], val_curve=val,
        test_accuracy=ev.mean[steps], test_ci95=ev.ci95[steps],
        active_fraction=sum(active) / len(active) if active else 0.0,
        flooded_movement=sum(movement) / len(movement) if movement else None,
        points=points, train_seconds=train_seconds, probe_seconds=probe_seconds,
        eval_seconds=eval_seconds, seconds_per_iteration=train_seconds / iterations,
        wall_seconds=time.perf_counter() - t0, config=res.config.to_dict())
    atomic_write(record_path, lambda f: f.write(json.dumps(row, indent=1).encode()))
    return row


# -- aggregation -----------------------------------------------------------------------------
def aggregate(rows: list[dict], algorithms, modes, levels) -> dict:
    """Per (algorithm, mode, b): statistics over seeds; per (algorithm, mode): selection."""
    ok = [r for r in rows if "test_accuracy" in r]
    cells, selection = [], []
    for algo in algorithms:
        base = {r["seed"]: r for r in ok if r["algorithm"] == algo and r["level"] == 0}
        for mode in modes:
            per_level = {}
            for b in levels:
                runs = {r["seed"]: r for r in ok if r["algorithm"] == algo and r["level"] == b
                        and (b == 0 or r["mode"] == mode)}
                if not runs:
                    continue
                seeds = sorted(runs)
                paired = [runs[s]["test_accuracy"] - base[s]["test_accuracy"]
                          for s in seeds if s in base]
                cell = {
                    "algorithm": algo, "mode": mode, "level": b, "seeds": seeds,
                    "test": mean_ci([runs[s]["test_accuracy"] for s in seeds]),
                    "val": mean_ci([runs[s]["best_val"] for s in seeds]),
                    "diff_vs_off": mean_ci(paired),
                    "per_seed": [{"seed": s, "test": runs[s]["test_accuracy"],
                                  "test_task_ci95": runs[s]["test_ci95"],
                                  "val": runs[s]["best_val"],
                                  "active_fraction": runs[s]["active_fraction"]}
                                 for s in seeds],
                    "active_fraction": mean_ci([runs[s]["active_fraction"] for s in seeds]),
                    "flooded_movement": mean_ci([runs[s]["flooded_movement"] for s in seeds
                                                 if runs[s].get("flooded_movement") is not None]),
                    "diverged": sum(1 for r in rows if r["algorithm"] == algo
                                    and r["level"] == b and "diverged" in r
                                    and (b == 0 or r["mode"] == mode)),
                }
                cells.append(cell)
                per_level[b] = runs
            if per_level:
                selection.append(select(algo, mode, per_level, base))
    return {"cells": cells, "selection": selection}


def select(algo: str, mode: str, per_level: dict, base: dict) -> dict:
    """b chosen by mean validation accuracy over seeds, and b chosen per seed."""
    # Ties go to the smaller b (sorted order, strict >), i.e. towards no flooding.
    mean_val = {b: sum(r["best_val"] for r in runs.values()) / len(runs)
                for b, runs in per_level.items()}
    chosen = max(sorted(mean_val), key=lambda b: (mean_val[b], -b))
    runs = per_level[chosen]
    paired = [runs[s]["test_accuracy"] - base[s]["test_accuracy"] for s in runs if s in base]
    seeds = sorted({s for r in per_level.values() for s in r})
    per_seed = []
    for s in seeds:
        options = {b: r[s] for b, r in per_level.items() if s in r}
        b = max(sorted(options), key=lambda x: (options[x]["best_val"], -x))
        entry = {"seed": s, "level": b, "test": options[b]["test_accuracy"]}
        if s in base:
            entry["diff_vs_off"] = options[b]["test_accuracy"] - base[s]["test_accuracy"]
        per_seed.append(entry)
    return {
        "algorithm": algo, "mode": mode, "mean_val_by_level": {f"{b:g}": v
                                                                for b, v in mean_val.items()},
        "selected_level": chosen, "test": mean_ci([r["test_accuracy"] for r in runs.values()]),
        "diff_vs_off": mean_ci(paired),
        "per_seed_selection": per_seed,
        "per_seed_selection_test": mean_ci([e["test"] for e in per_seed]),
        "per_seed_selection_diff_vs_off": mean_ci([e["diff_vs_off"] for e in per_seed
                                                   if "diff_vs_off" in e]),
    }


def pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    ci = f" ± {100 * stat['ci95']:.2f}" if stat["ci95"] is not None else ""
    return f"{100 * stat['mean']:.2f}{ci}"


def print_summary(agg: dict) -> None:
    print("\ntest accuracy % at the training step count (mean over seeds ± 95% CI across "
          "seeds); diff = paired vs b=0")
    for c in agg["cells"]:
        print(f"  {c['algorithm']:6s} {c['mode']:8s} b={c['level']:<5g} test {pct(c['test']):>15s}"
              f"  diff {pct(c['diff_vs_off']):>15s}  val {pct(c['val']):>15s}  active "
              f"{100 * (c['active_fraction']['mean'] or 0):5.1f}%  (n={c['test']['n']})")
    for s in agg["selection"]:
        print(f"  selected {s['algorithm']:6s} {s['mode']:8s}: b={s['selected_level']:g}  test "
              f"{pct(s['test'])}  diff {pct(s['diff_vs_off'])}; per-seed selection: test "
              f"{pct(s['per_seed_selection_test'])}  diff "
              f"{pct(s['per_seed_selection_diff_vs_off'])}")


# -- the probe -------------------------------------------------------------------------------
def run_probe(args, algorithms: list[str], iterations: dict, steps: dict, probe_tasks) -> dict:
    """Unflooded training with support-loss levels at initialisation and at every
    validation point; plus any --probe-checkpoint, adapted with the sweep's step count."""
    out = {"runs": [], "checkpoints": []}
    for algo in algorithms:
        k = steps[algo]
        its = args.probe_iterations or iterations[algo]
        overrides = run_config(algo, "batch", 0.0, args.seeds[0], its, k, args)
        cfg = TrainConfig(**overrides).resolved()
        torch.manual_seed(cfg.seed)  # as train() does before building the model
        learner = build_learner(cfg, build_model(cfg))
        points = [{"iteration": 0,
                   "levels": loss_levels(*support_losses(learner, probe_tasks, k))}]

        def on_point(it, learner, points=points, k=k):
            points.append({"iteration": it,
                           "levels": loss_levels(*support_losses(learner, probe_tasks, k))})

        t0 = time.perf_counter()
        res, history, _ = train_segmented(overrides, args.runs / f"probe_{algo}.pt", on_point)
        val = [(h["iteration"], h["accuracy"]) for h in history if h.get("split") == "val"]
        out["runs"].append({"algorithm": algo, "inner_steps": k, "iterations": its,
                            "seed": cfg.seed, "val_curve": val, "points": points,
                            "seconds": time.perf_counter() - t0})
        for p in points:
            print(f"{algo} K={k} at iteration {p['iteration']} ({len(probe_tasks)} training "
                  "tasks, unflooded)")
            print(format_levels(p["levels"]))
        print(f"  validation accuracy: {', '.join(f'{i}: {100 * a:.1f}%' for i, a in val)}",
              flush=True)
    for path in args.probe_checkpoint:
        state = load_checkpoint(path)
        saved = TrainConfig.from_dict(state["config"])
        for algo in algorithms:  # the trained weights, adapted with each sweep setting
            cfg = TrainConfig(**dict(saved.to_dict(), algorithm=algo, inner_steps=steps[algo],
                                     inner_flood=None)).resolved()
            model = build_model(cfg)
            model.load_state_dict(state["model"])
            levels = loss_levels(*support_losses(build_learner(cfg, model), probe_tasks,
                                                 steps[algo]))
            out["checkpoints"].append({"path": str(path), "trained_as": saved.algorithm,
                                       "trained_inner_steps": saved.inner_steps,
                                       "trained_iterations": state.get("iteration"),
                                       "adapted_as": algo, "inner_steps": steps[algo],
                                       "levels": levels})
            print(f"checkpoint {path} ({saved.algorithm}, {saved.inner_steps} inner step(s), "
                  f"iteration {state.get('iteration')}) adapted {steps[algo]} steps as {algo}")
            print(format_levels(levels))
    return out


# -- main ------------------------------------------------------------------------------------
def per_algorithm(text: str, default: dict, cast=int) -> dict:
    """``"N"`` for every algorithm, or ``"maml=N,fomaml=M"``."""
    out = dict(default)
    if not text:
        return out
    if "=" not in text:
        return {k: cast(text) for k in out}
    out.update({k: cast(v) for k, v in (x.split("=") for x in text.split(",") if x)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="maml,fomaml")
    parser.add_argument("--modes", default="batch,instance")
    parser.add_argument("--levels", default=None, help=f"flood levels b, 0 = off "
                        f"(default {DEFAULT_LEVELS})")
    parser.add_argument("--seeds", default=None, help=f"default {DEFAULT_SEEDS}")
    parser.add_argument("--iterations", default=None,
                        help=f"N or maml=N,fomaml=M (default {REDUCED})")
    parser.add_argument("--full", action="store_true", help="the paper's 60,000 iterations")
    parser.add_argument("--inner-steps", default="", help=f"default {INNER_STEPS}")
    parser.add_argument("--tasks", type=int, default=None, help="test tasks (default 600)")
    parser.add_argument("--val-tasks", type=int, default=None, help="default 100")
    parser.add_argument("--val-every", type=int, default=None,
                        help="default: 2 validations per run (--full: every 2,000)")
    parser.add_argument("--probe-tasks", type=int, default=None,
                        help="training tasks of the flood-activity probe (default 32)")
    parser.add_argument("--unflooded-eval", action="store_true",
                        help="also score flooded runs with unflooded test-time adaptation")
    parser.add_argument("--probe", action="store_true",
                        help="only measure unflooded support-loss levels per inner step")
    parser.add_argument("--probe-iterations", type=int, default=None,
                        help="--probe: training iterations (default: the sweep's)")
    parser.add_argument("--probe-checkpoint", type=Path, action="append", default=[],
                        help="--probe: also probe these trained checkpoints")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished runs' records in --runs with the same settings")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default; use 1 if the CPU is shared, "
                             "oversubscribed threads ran 10x slower here)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "flooding_sweep")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--out", default="flooding_sweep", help="results file stem")
    args = parser.parse_args()
    quick = QUICK if args.quick else {}
    for name, default in (("levels", DEFAULT_LEVELS), ("seeds", DEFAULT_SEEDS), ("tasks", 600),
                          ("val_tasks", 100), ("probe_tasks", 32), ("iterations", ""),
                          ("probe_iterations", None)):
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, default))
    if args.threads:
        torch.set_num_threads(args.threads)
    algorithms = [a for a in args.algorithms.split(",") if a]
    modes = [m for m in args.modes.split(",") if m]
    bad = (set(algorithms) - set(ALGORITHMS)) | (set(modes) - set(FLOOD_MODES))
    if bad:
        parser.error(f"unknown {sorted(bad)}; algorithms {ALGORITHMS}, modes {FLOOD_MODES}")
    levels = sorted({float(b) for b in args.levels.split(",")})
    if levels[0] < 0:
        parser.error("flood levels must be >= 0")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    paper = PAPER_DEFAULTS[("omniglot", "maml")]["iterations"]
    iterations = ({a: paper for a in ALGORITHMS} if args.full
                  else per_algorithm(args.iterations, REDUCED))
    steps = per_algorithm(args.inner_steps, INNER_STEPS)
    quick_every = quick.get("val_every")

    def val_every_for(its: int) -> int:
        # Each validation point is also a flood-activity probe point.
        every = args.val_every or quick_every or (2000 if args.full else -(-its // 2))
        return max(1, min(every, its))

    args.val_every_for = val_every_for
    args.runs.mkdir(parents=True, exist_ok=True)
    probe_tasks = build_sampler(TrainConfig(dataset="omniglot", shots=1).resolved(), "train",
                                seed=PROBE_SEED).sample(args.probe_tasks)
    t_start = time.perf_counter()
    h = header()
    h.update(seeds=args.seeds, threads=torch.get_num_threads(), reduced=not args.full,
             quick=args.quick, iterations=iterations, inner_steps=steps,
             test_tasks=args.tasks, test_seed=TEST_SEED, val_tasks=args.val_tasks,
             probe_tasks=args.probe_tasks, probe_seed=PROBE_SEED)
    probe_path = args.out_dir / f"{args.out}_probe.json"

    if args.probe:
        probe = run_probe(args, algorithms, iterations, steps, probe_tasks)
        h["wall_seconds"] = time.perf_counter() - t_start
        atomic_write(probe_path, lambda f: f.write(
            json.dumps({"header": h, **probe}, indent=1).encode()))
        print(f"wrote {probe_path}")
        return

    tasks = build_sampler(TrainConfig(dataset="omniglot", shots=1).resolved(), "test",
                          seed=TEST_SEED, evaluation=True).sample(args.tasks)
    plan = [(a, "batch" if b == 0 else m, b, s) for s in args.seeds for a in algorithms
            for b in levels for m in (modes[:1] if b == 0 else modes)]
    print(f"{len(plan)} runs: {algorithms} x levels {levels} (b=0 once) x modes {modes} x seeds "
          f"{args.seeds}; iterations {iterations}, inner steps {steps}", flush=True)
    rows = []
    for i, (algo, mode, b, seed) in enumerate(plan, 1):
        row = run_one(algo, mode, b, seed, iterations[algo], steps[algo], tasks, probe_tasks,
                      levels, args)
        rows.append(row)
        elapsed = time.perf_counter() - t_start
        eta = elapsed / i * (len(plan) - i)
        what = f"{algo:6s} {row['mode']:8s} b={b:<5g} seed {seed}"
        moved = ("" if row.get("flooded_movement") is None
                 else f" (of the path: {100 * row['flooded_movement']:.1f}%)")
        if "diverged" in row:
            print(f"[{i}/{len(plan)}] {what}: DIVERGED ({row['diverged'].splitlines()[0]})",
                  flush=True)
            continue
        print(f"[{i}/{len(plan)}] {what}: test {100 * row['test_accuracy']:.2f} ± "
              f"{100 * row['test_ci95']:.2f}%  val {100 * row['best_val']:.2f}% (it "
              f"{row['best_iteration']})  flood active {100 * row['active_fraction']:.1f}%"
              f"{moved}  "
              f"{row['seconds_per_iteration']:.2f} s/it  {row['wall_seconds']:.0f}s"
              f"{' (reused)' if row.get('reused') else ''}  elapsed {elapsed / 60:.1f} min, "
              f"ETA {eta / 60:.1f} min", flush=True)

    agg = aggregate(rows, algorithms, modes, levels)
    print_summary(agg)
    h["wall_seconds"] = time.perf_counter() - t_start
    payload = {"header": h, "levels": levels, "modes": modes, "algorithms": algorithms,
               "summary": agg, "runs": [{k: v for k, v in r.items() if k != "key"}
                                        for r in rows]}
    if probe_path.is_file():
        payload["probe"] = json.loads(probe_path.read_text())
        payload["probe"]["file"] = str(probe_path)
    path = args.out_dir / f"{args.out}.json"
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))
    plot(agg, algorithms, modes, steps, iterations, args.out_dir / f"{args.out}.png")
    print(f"wrote {path}")


def plot(agg: dict, algorithms, modes, steps, iterations, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(algorithms), figsize=(5.5 * len(algorithms), 6.5),
                             squeeze=False, sharex="col")
    positive = sorted({c["level"] for c in agg["cells"] if c["level"] > 0})
    for j, algo in enumerate(algorithms):
        top, bottom = axes[0][j], axes[1][j]
        for n, mode in enumerate(modes):
            cells = [c for c in agg["cells"] if c["algorithm"] == algo and c["mode"] == mode]
            if not cells:
                continue
            x = [c["level"] for c in cells]
            y = [100 * c["test"]["mean"] for c in cells]
            # Across-seed CI; with a single seed, the task CI of that seed.
            err = [100 * (c["test"]["ci95"] if c["test"]["ci95"] is not None
                          else c["per_seed"][0]["test_task_ci95"]) for c in cells]
            shift = [v * (1 + 0.04 * (n - 0.5)) if v else 0 for v in x]  # keep bars apart
            line = top.errorbar(shift, y, yerr=err, marker="o", capsize=3, label=mode)
            for c, xs in zip(cells, shift):
                top.scatter([xs] * len(c["per_seed"]), [100 * s["test"] for s in c["per_seed"]],
                            s=8, alpha=0.4, color=line[0].get_color())
            sel = next(s for s in agg["selection"] if s["algorithm"] == algo
                       and s["mode"] == mode)
            top.scatter([sel["selected_level"]], [100 * sel["test"]["mean"]], marker="*", s=150,
                        color=line[0].get_color(), zorder=5,
                        label=f"{mode}: val-selected b={sel['selected_level']:g}")
            bottom.plot(x, [100 * c["active_fraction"]["mean"] for c in cells], marker="o",
                        label=mode)
        top.set_title(f"{algo}, {steps[algo]} inner steps, {iterations[algo]} iterations")
        top.set_ylabel("test accuracy % (mean over seeds;\n95% CI across seeds, or task CI "
                       "if 1 seed)")
        bottom.set_ylabel("flood active % of inner steps\n(batch) / examples (instance)")
        bottom.set_xlabel("flood level b (0 = off)")
        for ax in (top, bottom):
            if positive:
                ax.set_xscale("symlog", linthresh=positive[0])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Omniglot 5-way 1-shot: flooding the inner loss")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
