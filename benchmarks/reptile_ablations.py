"""Reptile paper ablations on 5-shot 5-way Omniglot: gradient combinations and tail overlap.

    python benchmarks/reptile_ablations.py --study c|d|all [--iterations N | --full]
        [--seeds 0,1,2] [--configs g1,g1+g2] [--compile] [--resume] [--out-dir DIR]
        [--name NAME] [--quick] [--workers 2] [--status] [--replot]

Nichol, Achiam and Schulman (2018), "On First-Order Meta-Learning Algorithms"
(arXiv:1803.02999), section 6, both studies run with :class:`metalearn.GradientCombination`:

(c) "Comparing different inner-loop gradient combinations" (the paper's Figure 4): the outer
    direction is g1, g2, g3, g4, g1+g2, g1+g2+g3 or g1+g2+g3+g4 (Reptile with SGD). The
    setup is the reference code's README ("Comparing different inner-loop gradient
    combinations", openai/supervised-reptile, archived version): ``--sgd --inner-batch 25
    --learning-rate 0.003 --meta-step 0.25 --meta-step-final 0 --meta-iters 40000
    --eval-batch 25 --eval-iters 5``, meta-batch 1 (the script default), non-transductive
    evaluation, and ``--inner-iters k --train-shots 5k`` where k is the largest index used:
    each task's pool holds 5k drawings per class and cycling through it gives k disjoint
    mini-batches of 25. "gi alone" is ``--foml`` (the reference's FOML takes the last
    inner step, ``-alpha g_k`` with SGD). The interpolation ``theta += eps (phi - theta)``
    with meta step eps equals outer SGD with learning rate ``eps * alpha`` on the summed
    gradients, annealed linearly to 0 as ``--meta-step-final 0`` does.
(d) "Overlap between inner-loop mini-batches" (the paper's Figure 5): Reptile and FOMAML
    with a shared tail (the last mini-batch drawn like the others, so it may overlap them)
    or a separate tail (a held-out final mini-batch, the reference's ``FOML(tail_shots)``),
    each with cycling or with replacement, over a sweep of inner iterations (batch 25) and
    of inner batch size (4 iterations). The paper text was not available to check the
    sweep's exact values: this setup is study (c)'s (SGD 0.003, meta step 0.25 -> 0,
    meta-batch 1, a pool of 20 drawings per class = 100 examples). It places the start of
    overlap for shared-tail cycling where a third-party summary of the paper reports the
    drop (5 or more iterations at batch 25; batch sizes above 25 at 4 iterations). The separate tail
    holds 5 drawings per class (25 examples, one default mini-batch) out of the 20, as
    ``--foml-tail 5`` would, so its inner loop cycles through 75 examples.

Learning curves: every ``--val-every`` iterations each run adapts on the same fixed
validation tasks (``--val-tasks``, default 100) as the paper evaluates: 5 shots per class,
5 SGD steps of lr 0.003 on the whole 25-example support set, queries predicted alone with
the support set (non-transductive BatchNorm), ``--eval-queries`` per class (the paper: 1).
At the end the final model is scored with :func:`metalearn.evaluate` on fixed test tasks
(``--test-tasks``), mean and 95% CI after 0..5 steps.

Budget: the paper trains 40,000 iterations per run. The default is a reduced CPU budget
(``REDUCED``: 2,000 iterations per run for study c, 1,000 for study d's 42 runs, with the
meta step annealed over the shorter run, and fewer test tasks for d); ``--full`` runs
40,000. ``--quick`` is a smoke run (12 iterations of every configuration, 5 val and 5 test
tasks) that prints the measured seconds per iteration and an estimate of the default run's
time. Writes ``{out-dir}/{name}.json`` and ``.png`` (default out-dir benchmarks/results,
name ``reptile_ablations_{study}``) after every run; ``--resume`` keeps the runs a stopped
study already wrote there (same settings) and trains only the rest, continuing the run it
was stopped in from its last validation (its state is saved in ``{name}.partial/`` at
every validation, and removed when the run ends). ``{name}.cpu.jsonl`` records once a
minute how many cores other processes used, and each run's ``cpu_shared_share`` is the
share of its minutes in which they used more than a quarter of one. ``--compile`` runs the
inner loops and evaluation's adaptation through ``torch.compile`` (1.7-1.9x faster on these
small tasks, ``benchmarks/results/compile_regions.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    SHARED_CORES,
    CpuMonitor,
    cpu_shared_within,
    header,
    mean_ci,
    paired,
    read_jsonl,
    utc_now,
    worker_pool,
)
from metalearn import GradientCombination, Reptile, TaskBatch, evaluate  # noqa: E402
from metalearn.checkpoint import atomic_write  # noqa: E402
from metalearn.data import OmniglotTasks  # noqa: E402
from metalearn.evaluation import EvaluationResult, _predict_each_query_alone  # noqa: E402
from metalearn.kernels import kernel_settings  # noqa: E402
from metalearn.models import Conv4  # noqa: E402

WAYS, SHOTS = 5, 5
INNER_LR = 0.003  # --learning-rate 0.003 with --sgd
META_STEP = 0.25  # --meta-step 0.25, annealed to --meta-step-final 0
INNER_BATCH = 25
EVAL_STEPS = 5  # --eval-iters 5 with --eval-batch 25 = the whole 5-shot support set
PAPER_ITERATIONS = 40_000
# The default reduced CPU budget per study: iterations per run, validations per run and
# test tasks (study d has 42 runs per seed, so fewer of each).
REDUCED = {"c": {"iterations": 2_000, "val_points": 10, "test_tasks": 600},
           "d": {"iterations": 1_000, "val_points": 4, "test_tasks": 200}}
POOL_SHOTS_D = 20  # study d: 20 drawings per class = 4 disjoint batches of 25
TAIL_SHOTS = 5  # study d, separate tail: 5 of them held out as the final mini-batch
SWEEP_ITERATIONS = (2, 4, 6, 8)  # at batch 25; cycling overlaps from 5
SWEEP_BATCHES = (5, 10, 25, 50)  # at 4 iterations; cycling overlaps above 25
D_ITERATIONS, D_BATCH = 4, 25  # the point both sweeps share
COMBINATIONS = {"g1": (1,), "g2": (2,), "g3": (3,), "g4": (4,), "g1+g2": (1, 2),
                "g1+g2+g3": (1, 2, 3), "g1+g2+g3+g4": (1, 2, 3, 4)}
VARIANTS = ("reptile", "fomaml-shared", "fomaml-separate")
SAMPLINGS = ("cycle", "replacement")


@dataclass
class Run:
    """One meta-training run: its learner options and the data its tasks need."""

    study: str
    name: str
    steps: int
    batch: int
    use: tuple[int, ...] | str
    tail: str = "shared"
    sampling: str = "cycle"
    pool_shots: int = 20
    extra: dict = field(default_factory=dict)


def study_c_runs() -> list[Run]:
    return [Run("c", name, max(use), INNER_BATCH, use, pool_shots=5 * max(use))
            for name, use in COMBINATIONS.items()]


def study_d_runs() -> list[Run]:
    points = sorted({(k, D_BATCH) for k in SWEEP_ITERATIONS}
                    | {(D_ITERATIONS, b) for b in SWEEP_BATCHES} | {(D_ITERATIONS, D_BATCH)})
    runs = []
    for k, b in points:
        for variant in VARIANTS:
            for sampling in SAMPLINGS:
                use = "all" if variant == "reptile" else "last"
                tail = "separate" if variant == "fomaml-separate" else "shared"
                runs.append(Run("d", f"{variant}-{sampling}-k{k}-b{b}", k, b, use, tail, sampling,
                                POOL_SHOTS_D, {"variant": variant}))
    return runs


class PoolSampler:
    """Training tasks of one run: ``pool_shots`` drawings per class.

    Shared tail: the whole pool is the support set and the query set (used only for the
    step's logged metrics) is one drawing per class of it, because Omniglot's 20 drawings
    per class leave none over at 20. Separate tail: ``TAIL_SHOTS`` per class are the query
    set, held out of the support set.
    """

    def __init__(self, run: Run, seed: int) -> None:
        self.tail = run.tail
        queries = TAIL_SHOTS if run.tail == "separate" else 1
        self.tasks = OmniglotTasks(split="train", ways=WAYS, shots=run.pool_shots - queries,
                                   queries=queries, seed=seed, progress=False)

    def sample(self, n: int) -> TaskBatch:
        b = self.tasks.sample(n)
        if self.tail == "separate":
            return b
        pool_x = torch.cat([b.support_x, b.query_x], 1)
        pool_y = torch.cat([b.support_y, b.query_y], 1)
        return TaskBatch(pool_x, pool_y, b.query_x, b.query_y)


def eval_tasks(split: str, n: int, queries: int, seed: int) -> TaskBatch:
    return OmniglotTasks(split=split, ways=WAYS, shots=SHOTS, queries=queries, seed=seed,
                         progress=False).sample(n)


def score(learner: Reptile, tasks: TaskBatch, device: str) -> dict:
    """Non-transductive accuracy after 0..EVAL_STEPS steps, mean and 95% CI."""
    r = evaluate(learner, tasks.to(device), max_steps=EVAL_STEPS, transductive=False,
                 batch_size=5, progress=False)
    return {"steps": r.steps, "accuracy": r.mean, "ci95": r.ci95, "tasks": r.num_tasks}


def final_accuracy(learner: Reptile, tasks: TaskBatch, device: str, chunk: int = 5) -> tuple:
    """Mean and 95% CI of the accuracy after EVAL_STEPS steps only.

    The protocol of :func:`score` without scoring the intermediate steps: predicting each
    query alone costs more than the adaptation, so the learning curves skip the other steps.
    """
    per_task = []
    with torch.no_grad():
        for s in range(0, len(tasks), chunk):
            c = tasks[s:s + chunk].to(device)
            fast = learner.adapt(c.support_x, c.support_y, steps=EVAL_STEPS)
            out = _predict_each_query_alone(learner, fast, c.support_x, c.query_x)
            per_task.append((out.argmax(-1) == c.query_y).double().mean(1).cpu())
    r = EvaluationResult.from_per_task("accuracy", torch.cat(per_task).unsqueeze(1))
    return r.mean[0], r.ci95[0]


def train_run(run: Run, seed: int, iterations: int, val: TaskBatch, test: TaskBatch,
              val_every: int, device: str, meta_batch: int, partial: Path | None = None,
              partial_key: dict | None = None) -> dict:
    """Train and test one run. With ``partial``, its state is saved there (atomically) at
    every validation and a run stopped part-way continues from it exactly, if it was saved
    under the same ``partial_key`` (settings and commit); the file goes when the run ends."""
    torch.manual_seed(seed)
    model = Conv4(ways=WAYS).to(device)
    learner = GradientCombination(model, INNER_LR, run.steps, inner_batch=run.batch, use=run.use,
                                  tail=run.tail, sampling=run.sampling,
                                  generator=torch.Generator().manual_seed(seed + 17))
    # Evaluation: Reptile's adaptation on the same model, 5 full-batch SGD steps.
    evaluator = Reptile(model, INNER_LR, EVAL_STEPS)
    base_lr = META_STEP * INNER_LR
    opt = torch.optim.SGD(model.parameters(), lr=base_lr)
    sampler = PoolSampler(run, seed)
    curve, step_seconds, last, start, segments = [], [], {}, 0, []
    key = {"config": run.name, "seed": seed, "iterations": iterations, "val_every": val_every,
           "meta_batch": meta_batch, **(partial_key or {})}
    if partial is not None and partial.exists():
        saved = torch.load(partial, weights_only=False)
        if saved["key"] == key:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            learner.generator.set_state(saved["generator"])
            sampler.tasks.load_state_dict(saved["sampler"])
            curve, step_seconds, start = saved["curve"], saved["step_seconds"], saved["iteration"]
            segments = saved["segments"]
            print(f"{run.name} seed {seed}: continuing from iteration {start}", flush=True)
        else:
            print(f"{run.name} seed {seed}: {partial} was saved with other settings; "
                  "starting the run again", flush=True)
    segments.append([utc_now(), None])  # this process's stretch of the run: [start, end]
    for it in range(start, iterations):
        t0 = time.perf_counter()
        # --meta-step-final 0: linear from the meta step at i = 0 towards 0 at i = iterations.
        opt.param_groups[0]["lr"] = base_lr * (1 - it / iterations)
        opt.zero_grad(set_to_none=True)
        last = learner.step(sampler.sample(meta_batch).to(device))
        opt.step()
        step_seconds.append(time.perf_counter() - t0)
        if (it + 1) % val_every == 0 or it + 1 == iterations:
            t1 = time.perf_counter()
            acc, ci = final_accuracy(evaluator, val, device)
            curve.append({"iteration": it + 1, "accuracy": acc, "ci95": ci,
                          "train_loss": last["loss"], "eval_seconds": time.perf_counter() - t1})
            segments[-1][1] = utc_now()
            if partial is not None and it + 1 < iterations:
                state = {"key": key, "iteration": it + 1, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "generator": learner.generator.get_state(),
                         "sampler": sampler.tasks.state_dict(), "curve": curve,
                         "step_seconds": step_seconds, "segments": segments}
                partial.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(partial, lambda f, st=state: torch.save(st, f))
    t1 = time.perf_counter()
    test_result = score(evaluator, test, device)
    segments[-1][1] = utc_now()
    if partial is not None:
        partial.unlink(missing_ok=True)
    warm = step_seconds[len(step_seconds) // 4:]
    return {"study": run.study, "config": run.name, "seed": seed, "iterations": iterations,
            "inner_steps": run.steps, "inner_batch": run.batch,
            "use": list(run.use) if not isinstance(run.use, str) else run.use,
            "tail": run.tail, "sampling": run.sampling, "pool_shots": run.pool_shots,
            **run.extra, "curve": curve, "test": test_result,
            "test_seconds": time.perf_counter() - t1, "train_seconds": sum(step_seconds),
            "seconds_per_iteration": sum(step_seconds) / iterations,
            # Without the first quarter's warm-up, which dominates short runs; the minimum
            # is the cost on an idle machine, the median the cost under the load there was.
            "median_step_seconds": statistics.median(warm), "min_step_seconds": min(warm),
            "segments": segments}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("c", "d", "all"), default="all")
    parser.add_argument("--iterations", type=int, default=None,
                        help="per run (default: REDUCED[study]['iterations']; --full "
                             f"{PAPER_ITERATIONS})")
    parser.add_argument("--full", action="store_true", help="the paper's 40,000 per run")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--configs", default="",
                        help="comma-separated run names or patterns, e.g. 'g1,fomaml-shared-*'")
    parser.add_argument("--meta-batch", type=int, default=1, help="the reference default: 1")
    parser.add_argument("--val-every", type=int, default=None,
                        help="iterations between validations (default: REDUCED[study] points)")
    parser.add_argument("--val-tasks", type=int, default=100)
    parser.add_argument("--test-tasks", type=int, default=None,
                        help="default: REDUCED[study]['test_tasks']")
    parser.add_argument("--eval-queries", type=int, default=1,
                        help="queries per class of the val/test tasks (the paper: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None,
                        help="file name of the results, without .json (default: "
                             "reptile_ablations_{study}; one study per name)")
    parser.add_argument("--compile", action="store_true",
                        help="inner loops and evaluation's adaptation through torch.compile")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the results file (same settings), "
                             "continue the one in progress from its last validation, and "
                             "train the others")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at once, each in a process of its own with one "
                             "thread (default 1: one run at a time at torch's threads); 2 on "
                             "a 2-core CPU gives 1.4-2.0x the throughput "
                             "(benchmarks/results/threads_vs_processes.json)")
    parser.add_argument("--replot", action="store_true",
                        help="draw the study's plot again from its results file; train "
                             "nothing")
    parser.add_argument("--status", action="store_true",
                        help="print which of the selected runs are done (with their test "
                             "accuracy), in progress (at which iteration) or to do; train "
                             "nothing")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a few iterations per config; prints s/iteration and "
                             "the default run's estimated time")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    studies = ("c", "d") if args.study == "all" else (args.study,)
    if args.name and len(studies) > 1:
        parser.error("--name names one study's file: give --study c or --study d")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.status:
        for study in studies:
            print(status(args, study, seeds))
        return
    if args.replot:
        for study in studies:
            path = results_path(args, study)
            if not path.exists():
                parser.error(f"--replot: {path} does not exist; check --out-dir and --name")
            saved = json.loads(path.read_text())
            plot(saved["results"], study, path.with_suffix(".png"),
                 saved["header"]["iterations"])
            print(f"wrote {path.with_suffix('.png')}")
        return
    started = header(seed=seeds[0] if seeds else None)  # the commit that runs
    plans = {}
    for study in studies:
        budget = REDUCED[study]
        if args.quick:
            iterations, val_tasks, test_tasks = args.iterations or 12, 5, 5
        else:
            iterations = args.iterations or (PAPER_ITERATIONS if args.full
                                             else budget["iterations"])
            val_tasks, test_tasks = args.val_tasks, args.test_tasks or budget["test_tasks"]
        points = 2 if args.quick else budget["val_points"]
        val_every = args.val_every or max(iterations // points, 1)
        runs = study_c_runs() if study == "c" else study_d_runs()
        if args.configs:
            patterns = args.configs.split(",")
            runs = [r for r in runs if any(fnmatch(r.name, p) for p in patterns)]
        # Fixed evaluation sets, the same for every run and seed of the study.
        plans[study] = dict(
            runs=runs, iterations=iterations, val_every=val_every,
            val=eval_tasks("val", val_tasks, args.eval_queries, seed=1_000_003),
            test=eval_tasks("test", test_tasks, args.eval_queries, seed=12345))
    if not any(p["runs"] for p in plans.values()):
        names = [r.name for s in studies for r in (study_c_runs() if s == "c" else study_d_runs())]
        parser.error(f"--configs {args.configs!r} matches no run; known: {names}")
    results = []
    monitor = None
    for study, plan in plans.items():
        t_start = time.perf_counter()
        cpu_log = results_path(args, study).with_suffix(".cpu.jsonl")
        if not args.quick:  # once a minute, how much other processes used the CPU
            cpu_log.parent.mkdir(parents=True, exist_ok=True)
            if monitor is None:
                monitor = CpuMonitor(cpu_log)
                monitor.start()
            monitor.path = cpu_log
        rows = run_study(args, study, plan, started, seeds, cpu_log, t_start)
        pending = partial_dir(args, study)
        if pending.is_dir() and not any(pending.iterdir()):
            pending.rmdir()  # no run left in progress
        results += rows
    if args.quick:
        report_timing(results, plans, len(seeds))


def run_study(args: argparse.Namespace, study: str, plan: dict, started: dict,
              seeds: list[int], cpu_log: Path, t_start: float) -> list[dict]:
    """Train the study's runs not yet in its file, one at a time or ``--workers`` at once,
    writing the file after each; its rows, in the plan's order."""
    rows = previous_runs(args, study, plan, started) if args.resume else []
    done = {(r["config"], r["seed"]) for r in rows}
    total = len(seeds) * len(plan["runs"])
    jobs = [(seed, run) for seed in seeds for run in plan["runs"]
            if (run.name, seed) not in done]
    order = {(run.name, seed): i for i, (seed, run) in enumerate(
        (seed, run) for seed in seeds for run in plan["runs"])}
    key = {"commit": started["commit"], "device": args.device, "compile": args.compile,
           "val_tasks": len(plan["val"])}

    def job_args(seed: int, run: Run) -> tuple:
        # Saved at every validation, so that --resume can continue a stopped run;
        # without --resume a run starts afresh.
        partial = (None if args.quick
                   else partial_dir(args, study) / f"{run.name}-seed{seed}.pt")
        if partial is not None and not args.resume:
            partial.unlink(missing_ok=True)
        return (run, seed, plan["iterations"], plan["val"], plan["test"],
                plan["val_every"], args.device, args.meta_batch, partial, key,
                args.compile)

    def finished(row: dict) -> None:
        row["cpu_shared_share"] = cpu_shared_within(read_jsonl(cpu_log), row["segments"])
        rows.append(row)
        rows.sort(key=lambda r: order.get((r["config"], r["seed"]), -1))
        t = row["test"]
        print(f"[{study}] {row['config']:34s} seed {row['seed']}: test "
              f"{100 * t['accuracy'][-1]:6.2f} ± {100 * t['ci95'][-1]:.2f}%  "
              f"{row['median_step_seconds']:.4f} s/it  ({len(rows)}/{total})", flush=True)
        # Written after every run, so a long study stopped part-way keeps what it did.
        write_study(args, study, plan, started, seeds, rows, t_start)

    if args.workers == 1:
        for seed, run in jobs:
            finished(train_job(*job_args(seed, run)))
    else:
        with worker_pool(args.workers) as pool:
            futures = [pool.submit(train_job, *job_args(seed, run)) for seed, run in jobs]
            for future in as_completed(futures):
                finished(future.result())
    return rows


def train_job(run: Run, seed: int, iterations: int, val: TaskBatch, test: TaskBatch,
              val_every: int, device: str, meta_batch: int, partial: Path | None,
              partial_key: dict, compile: bool) -> dict:
    """:func:`train_run` under the study's kernel settings, in this process or a worker."""
    with kernel_settings(compile=compile):
        return train_run(run, seed, iterations, val, test, val_every, device, meta_batch,
                         partial, partial_key)


def status(args: argparse.Namespace, study: str, seeds: list[int]) -> str:
    """``--status``: each selected run of ``study`` done, in progress or to do."""
    runs = study_c_runs() if study == "c" else study_d_runs()
    if args.configs:
        runs = [r for r in runs if any(fnmatch(r.name, p) for p in args.configs.split(","))]
    path = results_path(args, study)
    rows = json.loads(path.read_text())["results"] if path.exists() else []
    done = {(r["config"], r["seed"]): r for r in rows}
    lines, left = [f"{path}: {len(runs) * len(seeds)} runs selected"], 0
    for seed in seeds:
        for run in runs:
            row = done.get((run.name, seed))
            partial = partial_dir(args, study) / f"{run.name}-seed{seed}.pt"
            if row is not None:
                t = row["test"]
                what = (f"done, test {100 * t['accuracy'][-1]:.2f} ± "
                        f"{100 * t['ci95'][-1]:.2f}%")
            elif partial.exists():
                saved = torch.load(partial, weights_only=False)
                what = f"at iteration {saved['iteration']} of {saved['key']['iterations']}"
                left += 1
            else:
                what, left = "to do", left + 1
            lines.append(f"  {run.name:34s} seed {seed}: {what}")
    lines.append(f"  {left} not done")
    return "\n".join(lines)


def results_path(args: argparse.Namespace, study: str) -> Path:
    return args.out_dir / f"{args.name or f'reptile_ablations_{study}'}.json"


def partial_dir(args: argparse.Namespace, study: str) -> Path:
    """Where ``--resume`` keeps the state of the run in progress (``<name>.partial/``)."""
    return results_path(args, study).with_suffix(".partial")


# What a resumed study must share with the file it continues (the code too: its commit).
RESUME_KEYS = ("commit", "iterations", "val_every", "device", "compile")


def previous_runs(args: argparse.Namespace, study: str, plan: dict, started: dict
                  ) -> list[dict]:
    """The rows of a stopped study's results file whose config and seed are still planned."""
    path = results_path(args, study)
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    now = {"commit": started["commit"], "iterations": plan["iterations"],
           "val_every": plan["val_every"],
           "device": args.device, "compile": args.compile}
    differ = [f"{k} {old['header'].get(k)!r} there, {now[k]!r} now" for k in RESUME_KEYS
              if old["header"].get(k) != now[k]]
    differ += [f"{k} {old['setup'].get(k)!r} there, {v!r} now"
               for k, v in (("meta_batch", args.meta_batch), ("val_tasks", len(plan["val"])),
                            ("test_tasks", len(plan["test"])))
               if old["setup"].get(k) != v]
    if differ:
        sys.exit(f"error: --resume: {path} was written with other settings ("
                 + "; ".join(differ) + "); use the same flags, or another --name")
    names = {r.name for r in plan["runs"]}
    return [r for r in old["results"] if r["config"] in names]


def summarise(rows: list[dict]) -> dict:
    """Final test accuracy per configuration across seeds (mean, 95% t-interval), and the
    paired differences across seeds (same initial weights and tasks) that Figure 5 turns
    on: shared-tail FOMAML against separate-tail FOMAML and against Reptile at the same
    inner-loop setting."""
    final = {}
    for r in rows:
        final.setdefault(r["config"], {})[r["seed"]] = r["test"]["accuracy"][-1]
    contrasts = {}
    for config, by_seed in final.items():
        if config.startswith("fomaml-shared-"):
            setting = config.removeprefix("fomaml-shared-")
            for other in (f"fomaml-separate-{setting}", f"reptile-{setting}"):
                if other in final:
                    contrasts[f"{config} minus {other}"] = paired(by_seed, final[other])
    return {"final_accuracy": {c: mean_ci(list(v.values())) for c, v in final.items()},
            "paired_differences": contrasts}


def write_study(args: argparse.Namespace, study: str, plan: dict, started: dict,
                seeds: list[int], rows: list[dict], t_start: float) -> None:
    """The study's JSON and plot so far; ``header.complete`` says whether every run is in."""
    planned = len(seeds) * len(plan["runs"])
    h = dict(started)
    h.update(seeds=seeds, wall_seconds=time.perf_counter() - t_start, quick=args.quick,
             reduced=not args.full, iterations=plan["iterations"],
             val_every=plan["val_every"],
             threads=1 if args.workers > 1 else torch.get_num_threads(), workers=args.workers,
             device=args.device, compile=args.compile, complete=len(rows) == planned,
             runs_done=len(rows), runs_planned=planned,
             cpu_shared_rule=f"minutes in which other processes used > {SHARED_CORES} cores, "
                             "over the minutes monitored within each run's segments "
                             "(results[i].cpu_shared_share)")
    setup = {"study": study, "ways": WAYS, "shots": SHOTS, "inner_lr": INNER_LR,
             "inner_optimizer": "sgd", "meta_step": META_STEP, "meta_step_final": 0.0,
             "outer": "SGD, lr = meta_step * inner_lr, linear to 0",
             "meta_batch": args.meta_batch, "eval_steps": EVAL_STEPS,
             "eval_queries_per_class": args.eval_queries, "val_tasks": len(plan["val"]),
             "test_tasks": len(plan["test"]), "transductive": False,
             "paper_iterations": PAPER_ITERATIONS}
    if study == "d":
        setup.update(pool_shots=POOL_SHOTS_D, tail_shots=TAIL_SHOTS,
                     sweep_iterations=SWEEP_ITERATIONS, sweep_batches=SWEEP_BATCHES,
                     sweep_point=[D_ITERATIONS, D_BATCH])
    path = results_path(args, study)
    payload = {"header": h, "setup": setup, "summary": summarise(rows), "results": rows}
    atomic_write(path, lambda f, p=payload: f.write(json.dumps(p, indent=2).encode()))
    plot(rows, study, path.with_suffix(".png"), plan["iterations"])
    print(f"wrote {path}", flush=True)


def report_timing(results: list[dict], plans: dict, n_seeds: int) -> None:
    """Seconds per iteration of every config, and the default reduced run's time."""
    print("\nseconds per training iteration after warm-up (median under the machine's load, "
          "min ~ idle):")
    for r in results:
        print(f"  [{r['study']}] {r['config']:34s} {r['median_step_seconds']:.4f}  "
              f"min {r['min_step_seconds']:.4f}")
    for study, plan in plans.items():
        rows = [r for r in results if r["study"] == study]
        if not rows:
            continue
        budget = REDUCED[study]
        val_task = sum(c["eval_seconds"] for r in rows for c in r["curve"]) / (
            sum(len(r["curve"]) for r in rows) * len(plan["val"]))
        test_task = sum(r["test_seconds"] for r in rows) / (len(rows) * len(plan["test"]))
        evals = len(rows) / n_seeds * (budget["val_points"] * 100 * val_task
                                      + budget["test_tasks"] * test_task)
        for key, what in (("median_step_seconds", "at this load"), ("min_step_seconds", "idle")):
            train = sum(r[key] for r in rows) * budget["iterations"] / n_seeds
            print(f"study {study} default run ({len(rows) // n_seeds} runs x "
                  f"{budget['iterations']} it, 1 seed), training {what}: {train / 3600:.2f} h")
        print(f"study {study} evaluation: {val_task:.3f} s per val task, {test_task:.3f} s per "
              f"test task -> {budget['val_points']} x 100 val + {budget['test_tasks']} test "
              f"tasks per run: {evals / 3600:.2f} h; --full trains "
              f"{PAPER_ITERATIONS / budget['iterations']:.3g}x longer")


def plot(rows: list[dict], study: str, path: Path, iterations: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(config_rows: list[dict]) -> tuple[list[int], list[float]]:
        its = [c["iteration"] for c in config_rows[0]["curve"]]
        accs = [100 * sum(r["curve"][i]["accuracy"] for r in config_rows) / len(config_rows)
                for i in range(len(its))]
        return its, accs

    configs = list(dict.fromkeys(r["config"] for r in rows))
    by_config = {c: [r for r in rows if r["config"] == c] for c in configs}
    if study == "c":
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for c in configs:
            ax.plot(*mean_curve(by_config[c]), label=c)
        ax.set_xlabel("outer iteration")
        ax.set_ylabel("val accuracy % (5 SGD steps)")
        ax.set_title(f"Omniglot 5w5s gradient combinations ({iterations} it)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        across = summarise(rows)["final_accuracy"]

        def final(c: str) -> float:
            return 100 * across[c]["mean"]

        def error(c: str) -> float:
            """The t-interval across seeds; with one seed, the run's test interval."""
            if across[c]["ci95"] is not None:
                return 100 * across[c]["ci95"]
            return 100 * sum(r["test"]["ci95"][-1] for r in by_config[c]) / len(by_config[c])

        batch_sweep = len({r["inner_batch"] for r in rows
                           if r["inner_steps"] == D_ITERATIONS}) > 1

        for variant in VARIANTS:
            for sampling in SAMPLINGS:
                label = f"{variant} {sampling}"
                pts = [(r["inner_steps"], r["inner_batch"], r["config"]) for r in rows
                       if r["variant"] == variant and r["sampling"] == sampling]
                pts = list(dict.fromkeys(pts))
                ks = sorted((k, c) for k, b, c in pts if b == D_BATCH)
                bs = sorted((b, c) for k, b, c in pts if k == D_ITERATIONS)
                # One colour per variant and one marker per sampling, in both panels.
                style = dict(linestyle="-" if sampling == "cycle" else "--",
                             marker="o" if sampling == "cycle" else "s",
                             color=f"C{VARIANTS.index(variant)}")
                for ax, xs in ((axes[0], ks), (axes[1], bs if batch_sweep else [])):
                    if xs:
                        ax.errorbar([x for x, _ in xs], [final(c) for _, c in xs],
                                    yerr=[error(c) for _, c in xs], capsize=2,
                                    label=label, **style)
                if not batch_sweep:  # no batch sweep to show: the validation curves
                    for k, c in ks:
                        axes[1].plot(*mean_curve(by_config[c]), label=f"{variant} {sampling} "
                                     f"k={k}", color=style["color"],
                                     linestyle=("-", "--", ":", "-.")[sorted(
                                         {k for k, _ in ks}).index(k) % 4])
        seeds = len({r["seed"] for r in rows})
        axes[0].set_xlabel(f"inner iterations (batch {D_BATCH})")
        axes[0].set_ylabel("test accuracy % (5 SGD steps; mean, 95% CI"
                           + (f" over {seeds} seeds)" if seeds > 1 else ")"))
        if batch_sweep:
            axes[1].set_xlabel(f"inner batch size ({D_ITERATIONS} iterations)")
            axes[1].set_ylabel(axes[0].get_ylabel())
        else:
            axes[1].set_xlabel("outer iteration")
            axes[1].set_ylabel("validation accuracy %" + (" (mean over seeds)" if seeds > 1
                                                          else ""))
            axes[1].legend(fontsize=7)
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Omniglot 5w5s mini-batch overlap ({iterations} it)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
