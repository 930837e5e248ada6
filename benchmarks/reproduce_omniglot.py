"""The papers' full schedules on Omniglot 5-way 1-shot: MAML, FOMAML and Reptile, resumable.

    git worktree add ../wt-repro <commit>          # the code the run is pinned to
    cd ../wt-repro && nohup python benchmarks/reproduce_omniglot.py maml > /tmp/maml.out 2>&1 &
    python benchmarks/reproduce_omniglot.py maml --status      # from any checkout

Each run takes hours on a 2-core CPU, longer than a working session, so it is built to be
killed and started again: the first start records the commit it runs (``<stem>.run.json``),
every later start must run that same commit (from a worktree pinned to it) and resumes from
the latest checkpoint, which ``train`` writes atomically at every validation. Files go to
``benchmarks/results/reproductions/`` of the repository's main working tree (also when run
from a worktree), named after the algorithm and the task (``maml_omniglot_5w1s``):

- ``<stem>.pt``: the latest state (resume), ``<stem>.best.pt``: the best validation model,
  loadable by ``Conv4(5).load_state_dict(torch.load(path)["model"])``; Reptile's also holds
  the inner Adam state carried across tasks (``["learner"]``: ``adam_m__*``, ``adam_v__*``,
  ``adam_t``), which its test-time adaptation starts from, as in the reference code;
- ``<stem>.jsonl``: the training log (train loss every 50 iterations, validation every 500);
- ``<stem>.cpu.jsonl``: once a minute, how many cores this process and all others used,
  so that the result can say which share of its wall-clock shared the CPU;
- ``<stem>.json``: at the end, the test evaluation of the best checkpoint on 600 fixed test
  tasks (seed 12345, one query per class, accuracy and 95% CI after each step 0..10;
  Reptile 0..50, with and without transduction), the validation curve against cumulative
  wall-clock, and where the time went;
- ``<stem>.last.json``: ``--evaluate-last``, once the run has ended, tests the last
  checkpoint the same way (the reference codes report the last model, not the best one).

Settings: MAML and FOMAML as Finn et al. 2017 (meta-batch 32, one inner SGD step at 0.4,
Adam 1e-3, one query per class, 60,000 iterations); Reptile as Nichol et al. 2018's code
(meta-batch 5, 5 inner Adam steps at 1e-3 with beta1 = 0 on batches of 10, 10 train shots,
meta step 1 -> 0 over 100,000 iterations, 50 test steps on batches of 5). Validation: 500
fixed tasks from the validation characters every 500 (Reptile: 1,000) iterations, scored
after 3 inner steps (Reptile: 50).

The MAML variants run at their reference code's settings for a budget of wall-clock
(``WALL_CLOCK``, idle-equivalent: see :func:`idle_rate`) instead of their whole schedules,
so that their learning curves compare with MAML's at equal wall-clock: ``mamlpp`` as
HowToTrainYourMAMLPytorch's Omniglot 5w1s config (metalearn's preset: learned inner rates
from 0.1, 5 steps, meta-batch 8, cosine over 50,000 iterations, 5 test steps) and
``imaml`` as aravindr93/imaml_dev's Omniglot example (16 plain steps at 0.1 then one
pull-back step at lambda 2, 5 CG steps with cg_damping 1 and lam_damping 10, meta-batch
32, Adam at 1e-3 with epsilon 1e-3, 20,000 iterations; tested with lambda 0 and 16 steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    SHARED_CORES,
    CpuMonitor,
    header,
    read_jsonl,
    shared_share,
)
from metalearn.checkpoint import atomic_write, load_checkpoint  # noqa: E402

TASK = "omniglot_5w1s"
TEST_TASKS, TEST_SEED = 600, 12345
COMMON = dict(dataset="omniglot", ways=5, seed=0, val_tasks=500, eval_shots=1, eval_queries=1)
RUNS = {
    "maml": dict(COMMON, algorithm="maml", shots=1, queries=1, iterations=60_000,
                 val_every=500, eval_steps=3),
    "fomaml": dict(COMMON, algorithm="fomaml", shots=1, queries=1, iterations=60_000,
                   val_every=500, eval_steps=3),
    "reptile": dict(COMMON, algorithm="reptile", iterations=100_000, val_every=1000),
    # The MAML variants at their reference code's settings, on a wall-clock budget
    # (WALL_CLOCK) rather than to the end of their schedules.
    "mamlpp": dict(COMMON, algorithm="mamlpp", shots=1, queries=1, iterations=50_000,
                   val_every=500),
    "imaml": dict(COMMON, algorithm="imaml", shots=1, queries=1, iterations=20_000,
                  val_every=500, imaml_lambda=2.0, inner_lr=0.1, cg_steps=5,
                  imaml_inner_solve="pullback", cg_damping=1.0, lam_damping=10.0,
                  outer_eps=1e-3),
}
# Runs whose first-order inner loops go through torch.compile (`metalearn train --compile`):
# Reptile's training step is 1.49x faster so (benchmarks/results/compile_regions.json,
# workload reptile_repro); its 50-step evaluations stay eager (compiled.MAX_UNROLLED_STEPS).
COMPILED = {"reptile"}
TEST_STEPS = {"maml": 10, "fomaml": 10, "reptile": 50, "mamlpp": 5, "imaml": 16}
# Idle-equivalent seconds each variant trains for (see idle_rate): their learning curves
# are compared with MAML's at equal wall-clock.
WALL_CLOCK = {"mamlpp": 1.5 * 3600, "imaml": 1.5 * 3600}


def repository(path: Path) -> tuple[Path, str, bool]:
    """(the main working tree, HEAD's commit, whether the library and scripts are unedited)
    of the git checkout holding ``path``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True,
                              check=True).stdout.strip()

    common = Path(git("rev-parse", "--path-format=absolute", "--git-common-dir"))
    clean = not git("status", "--porcelain", "--", ":(top)metalearn", ":(top)benchmarks/*.py")
    return common.parent, git("rev-parse", "HEAD"), clean


def cumulative_seconds(records: list[dict]) -> list[float | None]:
    """Each record's wall-clock since the run began, across restarts.

    ``train`` logs the seconds since its own process started; a resumed process starts
    again from 0 at the checkpoint's iteration, after the log was cut back to it. So the
    time a restart adds is the last train record's seconds before the clock went back.
    """
    out, offset, last = [], 0.0, 0.0
    for r in records:
        s = r.get("seconds")
        if s is None:  # validation records: the time of the train record before them
            out.append(offset + last)
            continue
        if s < last:
            offset += last
        last = s
        out.append(offset + s)
    return out


def idle_rate(log: list[dict], segments: list[dict], cpu: list[dict],
              margin: float = 60.0) -> dict | None:
    """Seconds per iteration measured while no other process used the CPU.

    A shared CPU stretches wall-clock, so the runs' clocks are not comparable as they are.
    Each interval between consecutive train records of one process (typically 50
    iterations, validations included where they fall) is placed in time from its segment's
    start (``run.json``) and counts as idle if every monitored minute within ``margin``
    seconds of it had other processes below ``SHARED_CORES`` (the margin absorbs the
    process's start-up before its clock starts). The rate is the idle intervals' seconds
    over their iterations; ``None`` without idle intervals.
    """
    starts = [(s["start_iteration"], datetime.fromisoformat(s["started"])) for s in segments]
    minutes = [(datetime.fromisoformat(r["utc"]), r["seconds"], r["other_cores"]) for r in cpu]
    train = [r for r in log if r["split"] == "train"]

    def segment(iteration: int):
        return [s for s in starts if s[0] < iteration][-1]

    seconds = iterations = idle = total = 0
    for a, b in zip(train, train[1:]):
        start = segment(b["iteration"])
        if b["seconds"] <= a["seconds"] or segment(a["iteration"]) != start:
            continue  # a restart lies between them
        total += 1
        lo = start[1] + timedelta(seconds=a["seconds"] - margin)
        hi = start[1] + timedelta(seconds=b["seconds"] + margin)
        near = [o for end, length, o in minutes
                if end > lo and end - timedelta(seconds=length) < hi]
        if near and all(o <= SHARED_CORES for o in near):
            idle += 1
            seconds += b["seconds"] - a["seconds"]
            iterations += b["iteration"] - a["iteration"]
    if not iterations:
        return None
    return {"seconds_per_iteration": seconds / iterations, "idle_intervals": idle,
            "of_intervals": total,
            "rule": f"intervals between train records with every monitored minute within "
                    f"{margin:g} s below {SHARED_CORES} cores of other processes"}


def run_idle_rate(stem: Path) -> dict | None:
    """:func:`idle_rate` of the run whose files start with ``stem``."""
    run_file = stem.with_suffix(".run.json")
    if not run_file.exists():
        return None
    return idle_rate(read_jsonl(stem.with_suffix(".jsonl")),
                     json.loads(run_file.read_text())["segments"],
                     read_jsonl(stem.with_suffix(".cpu.jsonl")))


def status(stem: Path) -> str:
    log = read_jsonl(stem.with_suffix(".jsonl"))
    if not log:
        return f"{stem.name}: not started"
    times = cumulative_seconds(log)
    val = [(r, t) for r, t in zip(log, times) if r["split"] == "val"]
    last_train = [r for r in log if r["split"] == "train"][-1]
    total = RUNS[stem.name.split("_")[0]]["iterations"]
    it = last_train["iteration"]
    line = (f"{stem.name}: iteration {it} of {total} ({100 * it / total:.1f}%), "
            f"{times[-1] / 3600:.2f} h of wall-clock")
    if val:
        best = max(val, key=lambda v: v[0]["accuracy"])[0]
        line += (f"; validation {100 * val[-1][0]['accuracy']:.2f}% "
                 f"(best {100 * best['accuracy']:.2f}% at {best['iteration']})")
    share = shared_share(read_jsonl(stem.with_suffix(".cpu.jsonl")))
    if share is not None:
        line += f"; CPU shared {100 * share:.0f}% of the time"
    name = stem.name.split("_")[0]
    if name in WALL_CLOCK:
        left = remaining_seconds(stem, name)
        line += (f"; budget {WALL_CLOCK[name] / 3600:.2f} idle-equivalent h, "
                 f"{max(left, 0) / 3600:.2f} h left")
    elif it < total and (idle := run_idle_rate(stem)):
        rate = idle["seconds_per_iteration"]
        line += (f"; about {(total - it) * rate / 3600:.1f} h left on an idle CPU "
                 f"({rate:.3f} s/iteration)")
    if stem.with_suffix(".json").exists():
        line += "; finished, evaluated"
    return line


def pin(run_file: Path, algorithm: str, commit: str, clean: bool) -> dict:
    """The run record: created on the first start, checked on every later one."""
    if run_file.exists():
        run = json.loads(run_file.read_text())
        if run["commit"] != commit:
            sys.exit(f"error: {run_file.name} pins this run to {run['commit']}, but this "
                     f"checkout is at {commit}. Resume it from a worktree at that commit:\n"
                     f"  git worktree add ../wt-{run['commit'][:7]} {run['commit']}")
    else:
        run = {"algorithm": algorithm, "task": TASK, "commit": commit,
               "settings": RUNS[algorithm], "compile": algorithm in COMPILED,
               "segments": []}
    if not clean:
        sys.exit("error: metalearn/ or benchmarks/ has uncommitted edits, so the code that "
                 "runs is not the pinned commit; run from a clean worktree")
    return run


def evaluate_best(stem: Path, algorithm: str, suffix: str = ".best.pt") -> dict:
    """The best checkpoint's (or with ``suffix=".pt"`` the last one's) accuracy after
    0..K steps on the fixed test tasks."""
    import torch

    from metalearn.config import TrainConfig, build_learner, build_model, build_sampler
    from metalearn.evaluation import evaluate

    best = load_checkpoint(stem.with_suffix(suffix))
    cfg = TrainConfig.from_dict(best["config"])
    model = build_model(cfg)
    model.load_state_dict(best["model"])
    learner = build_learner(cfg, model, evaluation=True)
    if best.get("learner"):
        learner.learned.load_state_dict(best["learner"])
    torch.manual_seed(TEST_SEED)  # Reptile's inner mini-batches at test
    tasks = build_sampler(cfg, "test", seed=TEST_SEED, evaluation=True).sample(TEST_TASKS)
    out = {}
    for transductive in ((True, False) if algorithm == "reptile" else (True,)):
        ev = evaluate(learner, tasks, max_steps=TEST_STEPS[algorithm],
                      transductive=transductive, batch_size=25 if transductive else 5,
                      progress=False)
        key = "transductive" if transductive else "non_transductive"
        out[key] = {"steps": ev.steps, "accuracy": ev.mean, "ci95": ev.ci95}
    return {"iteration": best["iteration"], "best_validation": best["best"], **out}


def summary(stem: Path, run: dict) -> dict:
    log = read_jsonl(stem.with_suffix(".jsonl"))
    times = cumulative_seconds(log)
    curve = [{"iteration": r["iteration"], "seconds": round(t, 1), "accuracy": r["accuracy"],
              "ci95": r["ci95"]} for r, t in zip(log, times) if r["split"] == "val"]
    cpu = read_jsonl(stem.with_suffix(".cpu.jsonl"))
    iterations = [r["iteration"] for r in log if r["split"] == "train"][-1]
    return {"iterations": iterations, "wall_seconds": times[-1],
            "seconds_per_iteration": times[-1] / iterations,
            "wall_clock_budget": WALL_CLOCK.get(run["algorithm"]),
            "idle": run_idle_rate(stem),
            "restarts": len(run["segments"]) - 1,
            "cpu_shared_share": shared_share(cpu),
            "cpu_shared_rule": f"minutes in which other processes used > {SHARED_CORES} "
                               "cores, over the minutes monitored",
            "validation_curve": curve}


def remaining_seconds(stem: Path, algorithm: str) -> float | None:
    """What is left of the run's WALL_CLOCK budget (``None``: no budget): the budget less
    the iterations so far at the idle rate, or less the raw wall-clock before there is one."""
    if algorithm not in WALL_CLOCK:
        return None
    log = read_jsonl(stem.with_suffix(".jsonl"))
    if not log:
        return WALL_CLOCK[algorithm]
    idle = run_idle_rate(stem)
    spent = (log[-1]["iteration"] * idle["seconds_per_iteration"] if idle
             else cumulative_seconds(log)[-1])
    return WALL_CLOCK[algorithm] - spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algorithm", choices=sorted(RUNS))
    parser.add_argument("--status", action="store_true", help="print progress and exit")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder of the run's files (default: benchmarks/results/"
                             "reproductions of the main working tree)")
    parser.add_argument("--evaluate-last", action="store_true",
                        help="after the run: test its last checkpoint as well, the model the "
                             "reference code reports (writes <stem>.last.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few iterations and test tasks, to check the script (needs "
                             "--results)")
    args = parser.parse_args()
    if args.smoke:
        if args.results is None:
            parser.error("--smoke needs --results, so that it cannot touch the real runs")
        global TEST_TASKS
        TEST_TASKS = 25
        RUNS[args.algorithm].update(iterations=20, val_every=10, val_tasks=20)
    main_tree, commit, clean = repository(Path(__file__).resolve().parent)
    folder = args.results or main_tree / "benchmarks" / "results" / "reproductions"
    stem = folder / f"{args.algorithm}_{TASK}"
    if args.status:
        print(status(stem))
        return
    if args.evaluate_last:
        if not stem.with_suffix(".json").exists():
            parser.error(f"--evaluate-last tests a finished run, and {stem.name} has no "
                         f"{stem.name}.json yet; let the run end first")
        result = {"header": {**header(seed=RUNS[args.algorithm]["seed"]), "commit": commit},
                  "checkpoint": stem.with_suffix(".pt").name,
                  "test": evaluate_best(stem, args.algorithm, suffix=".pt")}
        atomic_write(stem.with_suffix(".last.json"),
                     lambda f: f.write(json.dumps(result, indent=2).encode()))
        print(json.dumps(result["test"], indent=2))
        return
    run_file = stem.with_suffix(".run.json")
    run = pin(run_file, args.algorithm, commit, clean)
    ckpt = stem.with_suffix(".pt")
    start = load_checkpoint(ckpt)["iteration"] if ckpt.exists() else 0
    run["segments"].append({"start_iteration": start,
                            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, lambda f: f.write(json.dumps(run, indent=2).encode()))

    import metalearn
    from metalearn.allocator import reuse_freed_memory
    from metalearn.kernels import kernel_settings

    reuse_freed_memory()  # as the metalearn command does
    CpuMonitor(stem.with_suffix(".cpu.jsonl")).start()
    settings = RUNS[args.algorithm]
    left = remaining_seconds(stem, args.algorithm)
    if start < settings["iterations"] and (left is None or left > 0):
        print(f"{stem.name}: iterations {start + 1}..{settings['iterations']} at "
              f"{commit[:7]}" + ("" if left is None else f", for {left / 3600:.2f} h"),
              flush=True)
        with kernel_settings(compile=args.algorithm in COMPILED):
            metalearn.train(checkpoint=ckpt, resume=ckpt.exists(), progress=False,
                            time_limit=left, **settings)
    result = {"header": {**header(seed=settings["seed"]), "commit": commit},
              "run": run, **summary(stem, run), "test": evaluate_best(stem, args.algorithm)}
    atomic_write(stem.with_suffix(".json"),
                 lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(status(stem), flush=True)


if __name__ == "__main__":
    main()
