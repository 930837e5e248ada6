"""Flooding in a meta-overfitting regime (issue #32): Omniglot 5-way 1-shot, MAML and FOMAML
meta-trained on a few of the 1,100 training characters.

    python benchmarks/flooding_regime.py pilot          # unflooded curves at a few class counts
    python benchmarks/flooding_regime.py sweep          # outer flood, inner flood, iFlood
    python benchmarks/flooding_regime.py regularisers   # weight decay, label smoothing, dropout,
                                                        # early stopping
    python benchmarks/flooding_regime.py summary        # test evaluation, selection, paired diffs
    python benchmarks/flooding_regime.py all            # the four in order
    python benchmarks/flooding_regime.py sweep --plan   # list the runs and their state only
    python benchmarks/flooding_regime.py all --quick --runs /tmp/fr --out-dir /tmp/fr  # smoke

The regime. ``--train-classes N`` (``TrainConfig.train_classes``) meta-trains on a fixed
subset of N characters (the same for every seed and setting, and nested across N: see
``metalearn.data.class_subset``); validation (100 characters) and test (423) keep their
whole splits. Everything else is the library's Omniglot 5-way 1-shot MAML setting (inner lr
0.4, Adam at 1e-3, one query per class in training) but for two choices. Meta-batch 8, not
32: an iteration costs about a third as much, the study is about 130 runs, and on a few
training characters 8 tasks per iteration still revisit each character hundreds of times
in a run. And 3 inner steps for MAML and 5 for FOMAML, as in ``flooding_sweep.py``,
because a batch flood below ln 5 cannot act at inner step 0 (see that script's docstring),
so with one inner step the inner flood would have nothing to act on. Validation and test
tasks have 5 queries per class (``--eval-queries``) to make the curves less noisy than 1
would; 100 validation tasks every 100 iterations.

The pilot's budget, 6,000 iterations on 5, 10 or 20 characters, comes from a shorter
pilot (``pilot --classes 10,20,50 --iterations 2000 --out flooding_regime_short``): at
2,000 iterations no run overfits yet; on 10 characters the validation accuracy has levelled
off (about 70%) while the training accuracy climbs past 90%, and on 20 and 50 it still
rises. At 6,000 iterations only 5 characters give both algorithms a clear peak and decline
while the training query loss falls towards 0; on 10 and 20 validation levels off.

``pilot`` trains MAML and FOMAML unflooded, one seed, at each ``--classes`` count, and writes
the curves (training query loss, the mean of the log records between validations;
validation accuracy) and per run the validation peak, its iteration, the final accuracy and
the drop between them, to ``{out}_pilot.json`` / ``.png``. A run "overfits" when the
validation accuracy ends at least ``--min-drop`` below its peak while the training query
loss is lower at the end than at the peak. ``--train-classes auto`` (the default of the
later phases) takes the count with the largest drop averaged over the algorithms, among
those where every algorithm overfits; give ``--train-classes N`` to choose yourself.

``sweep`` trains, per algorithm and seed, the unflooded run (b = 0, shared by every method
and by ``regularisers``), then the floods, in this order: ``outer`` (the query loss),
``inner`` (the support loss, flooding) and ``iflood`` (the support loss, iFlood). The
levels come from the first seed's unflooded run and are written once to ``levels_*.json``,
so that a resumed study keeps them: ``--levels`` (4) levels spaced geometrically between the
loss at the end of training (excluded: a flood there acts only once validation has fallen)
and the loss at the validation peak (included), the stretch over which the pilot's runs
overfit. For the outer flood the loss is the training query loss (at the end, the mean of
the log records of the last 10% of iterations; at the peak, of the records since the
previous validation); for the inner floods, the mean support loss of 200 fixed training
tasks at the inner steps whose gradient a flood can turn (1..K-1; step 0 too when K = 1),
under the final and the best-validation weights. Levels around the final loss alone (the
first plan, 0.5-4 times it) would be 0.0002-0.002 at 5 characters, where the training loss
gets only after validation has already declined. ``--outer-levels`` / ``--inner-levels``
give absolute levels instead.

``regularisers`` trains the same regime with ``--weight-decay`` (Adam's L2 term),
``--label-smoothing`` and ``--dropout`` levels, and with early stopping: ``--patience``
validations without improvement, its best-validation checkpoint tested.

Each run, as it finishes, tests its final checkpoint and its best-validation checkpoint
on 600 fixed test tasks (seed ``metalearn.bench.TEST_SEED``, ``metalearn.evaluate`` at the
training step count; inner-flooded runs also without the flood at test time) and keeps
the result in its ``.eval.json``, since the checkpoints are not committed. ``summary``
tests any finished run not yet tested, then gives per algorithm and method: the level
chosen on validation (mean over seeds of the final validation accuracy for final
checkpoints, of the best one for best checkpoints; ties to the smaller level, and b = 0
is a candidate), its test accuracy against b = 0 as a paired difference across seeds with
a 95% t-interval, against early stopping likewise, and for the floods how often the flood
was active (``inner_flood_active`` / ``outer_flood_active`` of the training log: the
share of meta-iterations whose meta-batch mean query loss was below b for the outer
flood, of tasks' inner steps whose support loss was for the inner flood, of examples for
iFlood; mean over training and over its last 10%). Writes
``{out}.json`` and ``{out}.png``.

Every run goes through ``metalearn.train(..., checkpoint=..., resume=True)`` in ``--runs``
(default ``benchmarks/results/flooding_regime/``): a killed study, started again with the
same command, resumes the run in progress exactly and skips the finished ones (a
``.record.json`` beside each finished run). Each run's file names carry a digest of its
config, so runs of different budgets never share files and identical runs (the pilot's
seed-0 run at the chosen N and the sweep's b = 0 run) are trained once. The logs
(``.jsonl``), records and tests (``.eval.json``) are small and meant to be committed
(``--commit`` commits them after every run); the checkpoints (``.pt``) are git-ignored.
Runs go one at a time, or ``--workers N`` at once, each in a single-threaded process of
its own (2 on a 2-core CPU: ``benchmarks/results/threads_vs_processes.json``).
``cpu.jsonl`` there records once a minute how many cores other processes used, and each
run's record the share of its session's minutes in which they used more than a quarter of
one (``cpu_shared_share``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from concurrent.futures import as_completed
from pathlib import Path

import torch
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    CpuMonitor,
    cpu_shared_within,
    header,
    mean_ci,
    paired,
    read_jsonl,
    utc_now,
    worker_pool,
)
from metalearn import evaluate, train  # noqa: E402
from metalearn.bench import TEST_SEED  # noqa: E402
from metalearn.checkpoint import atomic_write, load_checkpoint  # noqa: E402
from metalearn.config import (  # noqa: E402
    TrainConfig,
    build_learner,
    build_model,
    build_sampler,
)
from metalearn.training import NonFiniteError, companion_paths  # noqa: E402

ALGORITHMS = ("maml", "fomaml")
FLOODS = ("outer", "inner", "iflood")
REGULARISERS = ("weight_decay", "label_smoothing", "dropout", "early_stopping")
RUNS = RESULTS / "flooding_regime"
PROBE_SEED = 424_242  # the fixed training tasks of the support-loss probe
PROBE_TASKS = 200
DEFAULTS = dict(
    algorithms="maml,fomaml", classes="5,10,20", iterations=6000, val_every=100,
    val_tasks=100, eval_queries=5, meta_batch=8, inner_steps="maml=3,fomaml=5",
    seeds="0,1,2", levels=4, weight_decay="1e-4,1e-3,1e-2",
    label_smoothing="0.05,0.1,0.2", dropout="0.1,0.2,0.3", patience=5, test_tasks=600,
    log_every=10, min_drop=0.02, floods="outer,inner,iflood",
    regularisers="early_stopping,weight_decay,label_smoothing,dropout")
QUICK = dict(classes="10,20", iterations=4, val_every=2, val_tasks=8, eval_queries=3,
             meta_batch=4, inner_steps="maml=2,fomaml=2", seeds="0,1", levels=2,
             weight_decay="1e-3", label_smoothing="0.1", dropout="0.1", patience=1,
             test_tasks=16, log_every=1, min_drop=-1.0)


# -- statistics (t95, mean_ci, paired: benchmarks.common) ------------------------------
def select(by_level: dict) -> float:
    """The level with the highest mean over seeds of ``{level: {seed: value}}``, over the
    seeds every level has; ties go to the smaller level (towards no regularisation)."""
    common = set.intersection(*(set(v) for v in by_level.values()))
    if not common:
        raise ValueError("no seed has every level")
    mean = {b: sum(v[s] for s in common) / len(common) for b, v in by_level.items()}
    return max(sorted(mean), key=lambda b: (mean[b], -b))


# -- the training log ---------------------------------------------------------------------
def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_loss(record: dict) -> float:
    """The training query loss of a log record: before flooding where it was flooded."""
    return record.get("query_loss", record["loss"])


def curves(records: list[dict]) -> list[dict]:
    """Per validation: its accuracy and CI, and the means of the training records since the
    previous validation (query loss, accuracy, flood activity)."""
    out, window = [], []
    for r in records:
        if r.get("split") == "train":
            window.append(r)
        elif r.get("split") == "val":
            point = {"iteration": r["iteration"], "val_accuracy": r["accuracy"],
                     "val_ci95": r["ci95"]}
            if window:
                point["train_loss"] = sum(map(train_loss, window)) / len(window)
                point["train_accuracy"] = sum(w.get("accuracy", 0.0) for w in window) / len(
                    window)
                for key in ("inner_flood_active", "outer_flood_active"):
                    if key in window[0]:
                        point[key] = sum(w[key] for w in window) / len(window)
            out.append(point)
            window = []
    return out


def tail_mean(records: list[dict], key, fraction: float = 0.1) -> float | None:
    """Mean of ``key(record)`` over the training records of the last ``fraction`` of the
    iterations logged."""
    train_records = [r for r in records if r.get("split") == "train"]
    if not train_records:
        return None
    last = train_records[-1]["iteration"]
    start = last - max(1, round(fraction * last))
    tail = [r for r in train_records if r["iteration"] > start]
    values = [key(r) for r in tail]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def overfitting(points: list[dict], min_drop: float) -> dict:
    """Peak and end of the validation curve, and whether the run overfits: the accuracy ends
    (the mean of the last three validations, against their noise) ``min_drop`` or more below
    its peak while the training loss (of the last window) ends lower than at the peak."""
    if not points:
        return {"overfits": False}
    peak = max(points, key=lambda p: p["val_accuracy"])
    end = points[-3:]
    final = sum(p["val_accuracy"] for p in end) / len(end)
    out = {"peak_accuracy": peak["val_accuracy"], "peak_iteration": peak["iteration"],
           "final_accuracy": final, "drop": peak["val_accuracy"] - final,
           "train_loss_at_peak": peak.get("train_loss"),
           "train_loss_final": points[-1].get("train_loss")}
    out["overfits"] = bool(out["drop"] >= min_drop and out["train_loss_at_peak"] is not None
                           and out["train_loss_final"] is not None
                           and out["train_loss_final"] < out["train_loss_at_peak"])
    return out


# -- runs ---------------------------------------------------------------------------------
def per_algorithm(text: str, cast=int) -> dict:
    """``"N"`` for every algorithm, or ``"maml=N,fomaml=M"``."""
    if "=" not in text:
        return {a: cast(text) for a in ALGORITHMS}
    return {k: cast(v) for k, v in (x.split("=") for x in text.split(",") if x)}


def numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def level_tag(value: float) -> str:
    """A level as a file-name part without dots: 0.25 -> 0p25, 1e-05 -> 1e-05."""
    return f"{value:.3g}".replace(".", "p")


def base_config(args, algo: str, classes: int | None, seed: int) -> dict:
    return dict(dataset="omniglot", algorithm=algo, ways=5, shots=1, train_classes=classes,
                seed=seed, iterations=args.iterations, inner_steps=args.inner_steps[algo],
                meta_batch=args.meta_batch, val_every=args.val_every,
                val_tasks=args.val_tasks, eval_queries=args.eval_queries)


def spec(args, algo: str, classes: int | None, seed: int, method: str = "base",
         level: float = 0.0) -> dict:
    """One run: its method and level, and its config."""
    overrides = base_config(args, algo, classes, seed)
    if method == "outer":
        overrides["outer_flood"] = level
    elif method in ("inner", "iflood"):
        overrides.update(inner_flood=level,
                         flood_mode="instance" if method == "iflood" else "batch")
    elif method == "early_stopping":
        overrides["patience"] = int(level)
    elif method != "base":
        overrides[method] = level
    cfg = TrainConfig(**overrides).resolved()
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    tag = "base" if method == "base" else f"{method}-{level_tag(level)}"
    name = (f"{algo}_c{classes or 'all'}_{tag}_s{seed}_"
            f"{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    assert re.fullmatch(r"[A-Za-z0-9_+-]+", name), name  # no dots: Path.with_suffix is used
    return {"name": name, "algorithm": algo, "classes": classes, "seed": seed,
            "method": method, "level": level, "config": cfg}


def paths(args, name: str) -> dict[str, Path]:
    ckpt = args.runs / f"{name}.pt"
    best, log = companion_paths(ckpt)
    return {"ckpt": ckpt, "best": best, "log": log, "record": args.runs / f"{name}.record.json",
            "eval": args.runs / f"{name}.eval.json"}


def finished(args, s: dict) -> dict | None:
    """The record of a finished run with this config, or None."""
    p = paths(args, s["name"])["record"]
    if not p.is_file():
        return None
    record = json.loads(p.read_text())
    return record if record.get("config") == s["config"].to_dict() else None


def state_of(args, s: dict) -> str:
    record = finished(args, s)
    if record is not None:
        return "diverged" if "diverged" in record else "done"
    ckpt = paths(args, s["name"])["ckpt"]
    if ckpt.is_file():
        return f"at iteration {load_checkpoint(ckpt)['iteration']}"
    return "to do"


def run(args, s: dict, index: str = "") -> dict:
    """Train ``s`` to its end (resuming a killed run), or return its record if finished."""
    record = finished(args, s)
    what = f"[{index}] {s['name']}"
    if record is not None:
        print(f"{what}: finished earlier", flush=True)
        return record
    p = paths(args, s["name"])
    args.runs.mkdir(parents=True, exist_ok=True)
    resume = p["ckpt"].is_file()
    start = load_checkpoint(p["ckpt"])["iteration"] if resume else 0
    print(f"{what}: {'resuming at iteration ' + str(start) if resume else 'starting'} "
          f"({s['config'].iterations} iterations)", flush=True)
    t0, started = time.perf_counter(), utc_now()
    record = {"name": s["name"], "algorithm": s["algorithm"], "classes": s["classes"],
              "seed": s["seed"], "method": s["method"], "level": s["level"],
              "config": s["config"].to_dict()}
    try:
        # A killed run resumes exactly; a path holding only a dead run's log starts afresh.
        res = train(s["config"], checkpoint=p["ckpt"], resume=resume, overwrite=not resume,
                    progress=False, log_every=args.log_every)
    except NonFiniteError as err:  # a diverging run is a result, not a crash
        record["diverged"] = str(err)
    else:
        record.update(iteration=res.iteration, stopped_early=res.stopped_early,
                      best=res.best)
    seconds = time.perf_counter() - t0
    done = record.get("iteration", start) - start
    # The share of this session's minutes in which other processes used the CPU.
    shared = cpu_shared_within(read_jsonl(args.runs / "cpu.jsonl"), [[started, utc_now()]])
    record.update(session_seconds=seconds, session_iterations=done,
                  seconds_per_iteration=seconds / done if done else None,
                  threads=torch.get_num_threads(), cpu_shared_share=shared)
    if "diverged" not in record:
        # Tested now, while its checkpoints are on disk: they are git-ignored, so a study
        # continued from a fresh clone has only the committed logs, records and tests.
        # The record comes last: a run that has one has its test.
        evaluate_run(args, record, test_tasks(args))
    atomic_write(p["record"], lambda f: f.write(json.dumps(record, indent=1).encode()))
    points = curves(read_log(p["log"]))
    tail = (f"val peak {100 * max(q['val_accuracy'] for q in points):.1f}%, final "
            f"{100 * points[-1]['val_accuracy']:.1f}%" if points else "")
    print(f"{what}: {'DIVERGED' if 'diverged' in record else 'done'} in {seconds:.0f}s "
          f"({done} iterations) {tail}", flush=True)
    commit(args, [p["log"], p["record"], p["eval"], args.runs / "cpu.jsonl"],
           f"flooding_regime: run {s['name']}")
    return record


def run_all(args, specs: list[dict], phase: str) -> list[dict]:
    if args.plan:
        for i, s in enumerate(specs, 1):
            print(f"  [{i}/{len(specs)}] {s['name']}: {state_of(args, s)}")
        return []
    t0 = time.perf_counter()
    if args.workers > 1:
        return run_parallel(args, specs, phase, t0)
    out = []
    for i, s in enumerate(specs, 1):
        out.append(run(args, s, f"{phase} {i}/{len(specs)}"))
        print(f"  {phase}: {i}/{len(specs)} runs, {(time.perf_counter() - t0) / 60:.1f} min "
              "in this session", flush=True)
    return out


def run_parallel(args, specs: list[dict], phase: str, t0: float) -> list[dict]:
    """``--workers N``: the unfinished runs N at a time, each in a single-threaded process;
    this process commits (``--commit``) as each one ends. Records in ``specs``' order."""
    out = [finished(args, s) for s in specs]
    todo = [i for i, r in enumerate(out) if r is None]
    quiet = argparse.Namespace(**{**vars(args), "commit": False})
    with worker_pool(args.workers, malloc_reuse=not args.no_malloc_reuse) as pool:
        futures = {pool.submit(run, quiet, specs[i], f"{phase} {i + 1}/{len(specs)}"): i
                   for i in todo}
        for n, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            out[i] = future.result()
            p = paths(args, specs[i]["name"])
            commit(args, [p["log"], p["record"], p["eval"], args.runs / "cpu.jsonl"],
                   f"flooding_regime: run {specs[i]['name']}")
            print(f"  {phase}: {n}/{len(todo)} runs to do, {len(specs) - len(todo)} done "
                  f"before, {(time.perf_counter() - t0) / 60:.1f} min in this session",
                  flush=True)
    return out


def commit(args, files: list[Path], message: str) -> None:
    """``--commit``: commit these files (only these) on the current branch."""
    if not args.commit:
        return
    files = [str(Path(f).resolve()) for f in files if f.is_file()]
    if not files:
        return
    root = Path(__file__).resolve().parent.parent
    added = subprocess.run(["git", "add", "--", *files], cwd=root)
    done = added.returncode == 0 and subprocess.run(
        ["git", "commit", "-q", "-m", message, "--", *files], cwd=root).returncode == 0
    if not done:
        print(f"  (--commit: could not commit {len(files)} file(s); go on)", flush=True)


# -- pilot --------------------------------------------------------------------------------
def pilot_specs(args) -> list[dict]:
    seed = args.seeds[0]
    return [spec(args, a, c, seed) for c in args.classes for a in args.algorithms]


def pilot(args) -> dict | None:
    specs = pilot_specs(args)
    print(f"pilot: {len(specs)} unflooded runs, classes {args.classes}, seed {args.seeds[0]}, "
          f"{args.iterations} iterations", flush=True)
    run_all(args, specs, "pilot")
    if args.plan:
        return None
    rows = []
    for s in specs:
        record = finished(args, s)
        points = curves(read_log(paths(args, s["name"])["log"]))
        rows.append({"algorithm": s["algorithm"], "classes": s["classes"], "seed": s["seed"],
                     "name": s["name"], "diverged": "diverged" in record,
                     "overfitting": overfitting(points, args.min_drop),
                     "seconds_per_iteration": record.get("seconds_per_iteration"),
                     "curve": points})
    choice = choose_classes(rows, args.algorithms)
    for r in rows:
        o = r["overfitting"]
        if "peak_accuracy" in o:
            print(f"  {r['algorithm']:6s} {r['classes']} classes: val peak "
                  f"{100 * o['peak_accuracy']:.1f}% at {o['peak_iteration']}, final "
                  f"{100 * o['final_accuracy']:.1f}% (drop {100 * o['drop']:.1f}); train loss "
                  f"{o['train_loss_at_peak']:.3g} at the peak, {o['train_loss_final']:.3g} at "
                  f"the end; {'overfits' if o['overfits'] else 'does not overfit'}")
    print(f"  chosen class count: {choice}", flush=True)
    payload = {"header": study_header(args), "rows": rows, "chosen_classes": choice,
               "min_drop": args.min_drop}
    path = args.out_dir / f"{args.out}_pilot.json"
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1).encode()))
    plot_pilot(rows, args.out_dir / f"{args.out}_pilot.png")
    commit(args, [path, path.with_suffix(".png")], "flooding_regime: pilot curves")
    print(f"wrote {path}")
    return payload


def choose_classes(rows: list[dict], algorithms) -> int | None:
    """The class count with the largest drop averaged over the algorithms, among those where
    every algorithm overfits; None if there is none."""
    by_count: dict = {}
    for r in rows:
        by_count.setdefault(r["classes"], {})[r["algorithm"]] = r["overfitting"]
    good = {c: sum(o["drop"] for o in v.values()) / len(v) for c, v in by_count.items()
            if set(v) >= set(algorithms) and all(o["overfits"] for o in v.values())}
    return max(good, key=lambda c: (good[c], c)) if good else None


def resolve_classes(args) -> int | None:
    if args.train_classes != "auto":
        return None if args.train_classes == "all" else int(args.train_classes)
    path = args.out_dir / f"{args.out}_pilot.json"
    if not path.is_file():
        sys.exit(f"--train-classes auto needs the pilot's {path}; run the pilot first or give "
                 "--train-classes N")
    choice = json.loads(path.read_text())["chosen_classes"]
    if choice is None and args.quick:  # a smoke run's budget overfits nothing
        return args.classes[0]
    if choice is None:
        sys.exit(f"the pilot ({path}) found no class count where every algorithm overfits; "
                 "lengthen it (--iterations), try fewer classes (--classes), or give "
                 "--train-classes N")
    return choice


# -- sweep --------------------------------------------------------------------------------
@torch.no_grad()
def support_level(s: dict, ckpt: Path) -> float:
    """Mean support loss of PROBE_TASKS fixed training tasks at the inner steps whose
    gradient a flood can turn (1..K-1; 0 when K = 1), under the checkpoint's weights."""
    cfg = s["config"]
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    learner = build_learner(cfg, model)
    tasks = build_sampler(cfg, "train", seed=PROBE_SEED).sample(PROBE_TASKS)
    path = learner.adapt(tasks.support_x, tasks.support_y, trajectory=True)
    steps = range(1, cfg.inner_steps) if cfg.inner_steps > 1 else range(1)

    def task_loss(p, x, y):
        return learner.loss.per_example(learner.fmodel(p, x), y).mean()

    return sum(vmap(task_loss, randomness="different")(path[k], tasks.support_x,
                                                       tasks.support_y).mean().item()
               for k in steps) / len(steps)


def geometric_levels(end: float, peak: float, n: int) -> list[float]:
    """``n`` levels spaced geometrically above ``end`` up to ``peak``: end·r^i, i = 1..n.

    A run with no loss range to span (``peak`` below twice ``end``: it did not overfit, as
    in a smoke run) gets levels up to 4·end instead.

    >>> geometric_levels(0.001, 0.1, 2)
    [0.01, 0.1]
    """
    if n < 1 or end <= 0:
        raise ValueError(f"need n >= 1 levels above a positive loss, got n={n}, end={end}")
    peak = peak if peak >= 2 * end else 4 * end
    ratio = (peak / end) ** (1 / n)
    return [float(f"{end * ratio ** i:.3g}") for i in range(1, n + 1)]


def flood_levels(args, algo: str, classes: int | None) -> dict:
    """The levels of each flood for ``algo``, from the first seed's unflooded run: between
    its losses at the end and at the validation peak. Written once to ``levels_*.json`` and
    read back, so that a resumed study keeps them."""
    s = spec(args, algo, classes, args.seeds[0])
    path = args.runs / f"levels_{s['name']}.json"
    key = {"levels": args.levels, "outer_levels": args.outer_levels,
           "inner_levels": args.inner_levels}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return saved
    record = finished(args, s)
    if record is None or "diverged" in record:
        sys.exit(f"the unflooded run {s['name']} must finish before the flood levels are set")
    p = paths(args, s["name"])
    records = read_log(p["log"])
    peak_it = record["best"]["iteration"]
    at_peak = next(q for q in curves(records) if q["iteration"] == peak_it)
    query = {"end": tail_mean(records, train_loss), "peak": at_peak["train_loss"]}
    support = {"end": support_level(s, p["ckpt"]), "peak": support_level(s, p["best"])}
    out = {"key": key, "run": s["name"], "peak_iteration": peak_it,
           "train_query_loss": query, "support_loss": support,
           "outer": args.outer_levels or geometric_levels(query["end"], query["peak"],
                                                          args.levels),
           "inner": args.inner_levels or geometric_levels(support["end"], support["peak"],
                                                          args.levels)}
    out["iflood"] = out["inner"]
    atomic_write(path, lambda f: f.write(json.dumps(out, indent=1).encode()))
    commit(args, [path], f"flooding_regime: flood levels of {algo}")
    print(f"  {algo} levels: outer {out['outer']} (training query loss {query['end']:.3g} at "
          f"the end, {query['peak']:.3g} at the validation peak, iteration {peak_it}), inner "
          f"and iFlood {out['inner']} (support loss {support['end']:.3g}, "
          f"{support['peak']:.3g})", flush=True)
    return out


def sweep(args) -> None:
    classes = resolve_classes(args)
    bases = [spec(args, a, classes, seed) for a in args.algorithms for seed in args.seeds]
    print(f"sweep at {classes} classes: the unflooded runs first ({len(bases)})", flush=True)
    run_all(args, bases, "sweep b=0")
    if args.plan:
        for a in args.algorithms:
            if finished(args, spec(args, a, classes, args.seeds[0])) is None:
                print(f"  {a}: the flood levels come from its first unflooded run, not yet "
                      "finished")
                return
    levels = {a: flood_levels(args, a, classes) for a in args.algorithms}
    for flood in args.floods:  # outer first, then inner and iFlood
        specs = [spec(args, a, classes, seed, flood, b) for a in args.algorithms
                 for seed in args.seeds for b in levels[a][flood]]
        print(f"sweep {flood}: {len(specs)} runs", flush=True)
        run_all(args, specs, f"sweep {flood}")


def regulariser_specs(args, classes) -> list[dict]:
    values = {"weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
              "dropout": args.dropout, "early_stopping": [args.patience]}
    return [spec(args, a, classes, seed, method, v) for method in args.regularisers
            for a in args.algorithms for seed in args.seeds for v in values[method]]


def regularisers(args) -> None:
    classes = resolve_classes(args)
    bases = [spec(args, a, classes, seed) for a in args.algorithms for seed in args.seeds]
    specs = regulariser_specs(args, classes)
    print(f"regularisers at {classes} classes: {len(bases)} unflooded runs (shared with the "
          f"sweep), then {len(specs)}", flush=True)
    run_all(args, bases + specs, "regularisers")


# -- summary ------------------------------------------------------------------------------
def test_tasks(args):
    cfg = TrainConfig(dataset="omniglot", shots=1, eval_queries=args.eval_queries).resolved()
    return build_sampler(cfg, "test", seed=TEST_SEED, evaluation=True).sample(args.test_tasks)


def evaluate_run(args, record: dict, tasks) -> dict:
    """Test accuracy of the run's final and best-validation checkpoints (cached)."""
    p = paths(args, record["name"])
    key = {"config": record["config"], "iteration": record["iteration"],
           "test_tasks": args.test_tasks, "test_seed": TEST_SEED,
           "eval_queries": args.eval_queries}
    if p["eval"].is_file():
        cached = json.loads(p["eval"].read_text())
        if cached.get("key") == key:
            return cached
    cfg = TrainConfig.from_dict(record["config"])
    out = {"key": key}
    for which in ("final", "best"):
        state = load_checkpoint(p["ckpt" if which == "final" else "best"])
        variants = {"": cfg}
        if cfg.inner_flood:  # the flood at test time, and without it
            variants["_unflooded"] = TrainConfig(**dict(cfg.to_dict(), inner_flood=None))
        for suffix, c in variants.items():
            model = build_model(c)
            model.load_state_dict(state["model"])
            learner = build_learner(c, model, evaluation=True)
            learner.learned.load_state_dict(state["learner"])
            ev = evaluate(learner, tasks, max_steps=c.eval_steps, progress=False)
            out[which + suffix] = {"accuracy": ev.mean[c.eval_steps],
                                   "ci95": ev.ci95[c.eval_steps], "curve": ev.mean,
                                   "iteration": state["iteration"]}
    atomic_write(p["eval"], lambda f: f.write(json.dumps(out, indent=1).encode()))
    return out


def run_row(args, s: dict, tasks) -> dict | None:
    """A finished run's numbers: validation (final, best), test (final, best), activity."""
    record = finished(args, s)
    if record is None:
        return None
    row = {k: s[k] for k in ("name", "algorithm", "classes", "seed", "method", "level")}
    if "diverged" in record:
        row["diverged"] = record["diverged"]
        return row
    records = read_log(paths(args, s["name"])["log"])
    points = curves(records)
    ev = evaluate_run(args, record, tasks)
    row.update(val_final=points[-1]["val_accuracy"], val_best=record["best"]["value"],
               best_iteration=record["best"]["iteration"], iteration=record["iteration"],
               stopped_early=record.get("stopped_early", False),
               test_final=ev["final"]["accuracy"], test_best=ev["best"]["accuracy"],
               test_final_task_ci95=ev["final"]["ci95"],
               test_best_task_ci95=ev["best"]["ci95"],
               train_loss_final=tail_mean(records, train_loss),
               seconds_per_iteration=record.get("seconds_per_iteration"), curve=points)
    if "final_unflooded" in ev:
        row["test_final_unflooded"] = ev["final_unflooded"]["accuracy"]
        row["test_best_unflooded"] = ev["best_unflooded"]["accuracy"]
    key = {"outer": "outer_flood_active", "inner": "inner_flood_active",
           "iflood": "inner_flood_active"}.get(s["method"])
    if key:
        row["active_mean"] = tail_mean(records, lambda r: r.get(key), fraction=1.0)
        row["active_last10"] = tail_mean(records, lambda r: r.get(key))
    return row


def method_summary(rows: list[dict], base: dict, early: dict, method: str) -> dict:
    """Selection on validation and paired differences for one algorithm and method.

    ``base``/``early``: ``{seed: row}`` of the unflooded and the early-stopping runs."""
    ok = [r for r in rows if "diverged" not in r]
    by_level: dict = {0.0: {s: r for s, r in base.items()}}
    for r in ok:
        by_level.setdefault(r["level"], {})[r["seed"]] = r
    # Chosen among the levels finished for every seed of b = 0 (a study in progress, or a
    # level with a diverged run, is left out of the choice and listed in per_level).
    complete = {b: v for b, v in by_level.items() if set(base) <= set(v)}
    out = {"method": method, "levels": sorted(by_level), "diverged": len(rows) - len(ok),
           "complete_levels": sorted(complete)}
    for which in ("final", "best"):
        chosen = select({b: {s: r[f"val_{which}"] for s, r in v.items()}
                         for b, v in complete.items()})
        picked = {s: r[f"test_{which}"] for s, r in by_level[chosen].items()}
        entry = {"selected_level": chosen,
                 "test": mean_ci(list(picked.values())),
                 "diff_vs_b0": paired(picked, {s: r[f"test_{which}"] for s, r in base.items()}),
                 "diff_vs_early_stopping": paired(picked, {s: r["test_best"]
                                                           for s, r in early.items()})}
        out[which] = entry
    out["per_level"] = []
    for b, v in sorted(by_level.items()):
        cell = {"level": b, "seeds": sorted(v),
                **{f"{k}": mean_ci([r[k] for r in v.values()])
                   for k in ("val_final", "val_best", "test_final", "test_best")},
                "diff_final_vs_b0": paired({s: r["test_final"] for s, r in v.items()},
                                           {s: r["test_final"] for s, r in base.items()})}
        for k in ("active_mean", "active_last10", "test_final_unflooded",
                  "test_best_unflooded"):
            values = [r[k] for r in v.values() if r.get(k) is not None]
            if values:
                cell[k] = mean_ci(values)
        out["per_level"].append(cell)
    return out


def summary(args) -> dict:
    classes = resolve_classes(args)
    tasks = test_tasks(args)
    result = {"header": study_header(args), "train_classes": classes, "algorithms": {}}
    missing = 0  # planned runs not finished yet (a summary of a study in progress)
    methods = [*args.floods, *(m for m in args.regularisers if m != "early_stopping")]
    for algo in args.algorithms:
        base = {}
        for seed in args.seeds:
            row = run_row(args, spec(args, algo, classes, seed), tasks)
            missing += row is None
            if row is not None and "diverged" not in row:
                base[seed] = row
        if not base:
            print(f"  {algo}: no finished unflooded run; nothing to summarise")
            continue
        early = {}
        if "early_stopping" in args.regularisers:
            for seed in args.seeds:
                row = run_row(args, spec(args, algo, classes, seed, "early_stopping",
                                         args.patience), tasks)
                missing += row is None
                if row is not None and "diverged" not in row:
                    early[seed] = row
        levels_path = args.runs / f"levels_{spec(args, algo, classes, args.seeds[0])['name']}.json"
        levels = json.loads(levels_path.read_text()) if levels_path.is_file() else {}
        entry = {"base": list(base.values()), "early_stopping": list(early.values()),
                 "levels": levels, "methods": {},
                 "early_stopping_vs_b0_final": paired(
                     {s: r["test_best"] for s, r in early.items()},
                     {s: r["test_final"] for s, r in base.items()}),
                 "b0_best_vs_b0_final": paired({s: r["test_best"] for s, r in base.items()},
                                               {s: r["test_final"] for s, r in base.items()})}
        for method in methods:
            if method in FLOODS:
                values = levels.get(method, [])
            else:
                values = getattr(args, method)
            rows = [run_row(args, spec(args, algo, classes, seed, method, b), tasks)
                    for seed in args.seeds for b in values]
            missing += sum(r is None for r in rows) + (method in FLOODS and not values)
            rows = [r for r in rows if r is not None]
            if rows:
                entry["methods"][method] = method_summary(rows, base, early, method)
                entry["methods"][method]["runs"] = rows
        result["algorithms"][algo] = entry
    # Complete: every run of every flood and regulariser finished (none left out by flags).
    result["header"].update(
        runs_missing=missing,
        complete=(missing == 0 and set(args.floods) == set(FLOODS)
                  and set(args.regularisers) == set(REGULARISERS)))
    pilot_path = args.out_dir / f"{args.out}_pilot.json"
    if pilot_path.is_file():
        result["pilot"] = json.loads(pilot_path.read_text())
    print_summary(result)
    print("\n" + markdown_results(result))
    path = args.out_dir / f"{args.out}.json"
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=1).encode()))
    plot_summary(result, args.out_dir / f"{args.out}.png")
    commit(args, [path, path.with_suffix(".png"), *args.runs.glob("*.eval.json")],
           "flooding_regime: summary")
    print(f"wrote {path}")
    return result


def pct(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    ci = f" ± {100 * stat['ci95']:.2f}" if stat.get("ci95") is not None else ""
    return f"{100 * stat['mean']:+.2f}{ci}"


def print_summary(result: dict) -> None:
    print(f"\nOmniglot 5w1s at {result['train_classes']} training classes; test accuracy "
          "differences in points, paired across seeds (± 95% t-interval)")
    for algo, e in result["algorithms"].items():
        base = mean_ci([r["test_final"] for r in e["base"]])
        print(f"  {algo}: b=0 final {100 * base['mean']:.2f}%; early stopping vs b=0 final "
              f"{pct(e['early_stopping_vs_b0_final'])}; b=0 best-val checkpoint vs final "
              f"{pct(e['b0_best_vs_b0_final'])}")
        for method, m in e["methods"].items():
            f, b = m["final"], m["best"]
            active = next((c.get("active_mean") for c in m["per_level"]
                           if c["level"] == f["selected_level"]), None)
            act = f", active {100 * active['mean']:.1f}%" if active else ""
            print(f"    {method:15s} final: b={f['selected_level']:g} vs b=0 "
                  f"{pct(f['diff_vs_b0'])}, vs early stopping "
                  f"{pct(f['diff_vs_early_stopping'])}{act}; best-val: b={b['selected_level']:g}"
                  f" vs b=0 {pct(b['diff_vs_b0'])}")


ALGORITHM_NAMES = {"maml": "MAML", "fomaml": "FOMAML"}
METHOD_NAMES = {"outer": "outer flood", "inner": "inner flood", "iflood": "inner iFlood",
                "weight_decay": "weight decay", "label_smoothing": "label smoothing",
                "dropout": "dropout"}


def points(stat: dict, signed: bool = True) -> str:
    """A mean ± 95% half-width in percentage points, as the docs' table writes it."""
    if not stat or stat.get("mean") is None:
        return "–"
    mean = f"{100 * stat['mean']:+.2f}" if signed else f"{100 * stat['mean']:.2f}"
    mean = mean.replace("-", "−")
    return mean + (f" ± {100 * stat['ci95']:.2f}" if stat.get("ci95") is not None else "")


def chosen_level(choice: dict) -> str:
    """The level chosen on validation as the tables write it (b = 0 as "0 (off)")."""
    return f"{choice['selected_level']:g}" if choice["selected_level"] else "0 (off)"


def markdown_table(result: dict) -> str:
    """The study's table for the docs: per algorithm, b = 0, early stopping and each method
    at the level chosen on validation (final checkpoints): its test accuracy, the paired
    differences against b = 0 and early stopping, and how often a flood acted."""
    lines = ["| algorithm | method | level chosen on validation | test accuracy, % | "
             "− b = 0, points | − early stopping, points | flood active: training / last "
             "10% |", "|---|---|---|---|---|---|---|"]
    for algo, e in result["algorithms"].items():
        name = ALGORITHM_NAMES.get(algo, algo)
        base = mean_ci([r["test_final"] for r in e["base"]])
        lines.append(f"| {name} | none (b = 0) | – | {points(base, False)} | – | – | – |")
        best = mean_ci([r["test_best"] for r in e["base"]])
        lines.append(f"| {name} | none, best-validation checkpoint | – | "
                     f"{points(best, False)} | {points(e['b0_best_vs_b0_final'])} | – | – |")
        if e["early_stopping"]:
            early = mean_ci([r["test_best"] for r in e["early_stopping"]])
            lines.append(f"| {name} | early stopping | – | {points(early, False)} | "
                         f"{points(e['early_stopping_vs_b0_final'])} | – | – |")
        for method, m in e["methods"].items():
            f = m["final"]
            cell = next(c for c in m["per_level"] if c["level"] == f["selected_level"])
            active = "–"
            if "active_mean" in cell:
                active = (f"{100 * cell['active_mean']['mean']:.0f}% / "
                          f"{100 * cell['active_last10']['mean']:.0f}%")
            lines.append(f"| {name} | {METHOD_NAMES.get(method, method)} | "
                         f"{chosen_level(f)} | "
                         f"{points(f['test'], False)} | {points(f['diff_vs_b0'])} | "
                         f"{points(f['diff_vs_early_stopping'])} | {active} |")
    return "\n".join(lines) + "\n"


def markdown_best_table(result: dict) -> str:
    """The same choice among best-validation checkpoints (each run's checkpoint at its best
    validation accuracy, the level chosen on the mean of those): its test accuracy and the
    paired differences against b = 0's best-validation checkpoint and early stopping."""
    lines = ["| algorithm | method | level chosen on validation | test accuracy, % | "
             "− b = 0, points | − early stopping, points |", "|---|---|---|---|---|---|"]
    for algo, e in result["algorithms"].items():
        name = ALGORITHM_NAMES.get(algo, algo)
        best = mean_ci([r["test_best"] for r in e["base"]])
        lines.append(f"| {name} | none (b = 0) | – | {points(best, False)} | – | – |")
        for method, m in e["methods"].items():
            b = m["best"]
            lines.append(f"| {name} | {METHOD_NAMES.get(method, method)} | "
                         f"{chosen_level(b)} | "
                         f"{points(b['test'], False)} | {points(b['diff_vs_b0'])} | "
                         f"{points(b['diff_vs_early_stopping'])} |")
    return "\n".join(lines) + "\n"


def markdown_levels_table(result: dict) -> str:
    """Every level of every method: the final checkpoints' test accuracy minus b = 0's, in
    points, paired over seeds (± 95% half-width), and for floods how often they acted over
    training; the levels from the lowest to the highest."""
    width = max((len(m["per_level"]) - 1 for e in result["algorithms"].values()
                 for m in e["methods"].values()), default=0)
    lines = ["| algorithm | method | " + " | ".join(f"level {i + 1}" for i in range(width))
             + " |", "|---|---|" + "---|" * width]
    for algo, e in result["algorithms"].items():
        name = ALGORITHM_NAMES.get(algo, algo)
        for method, m in e["methods"].items():
            cells = []
            for c in m["per_level"]:
                if not c["level"]:
                    continue
                active = (f", active {100 * c['active_mean']['mean']:.0f}%"
                          if "active_mean" in c else "")
                cells.append(f"{c['level']:g}: {points(c['diff_final_vs_b0'])}{active}")
            cells += [""] * (width - len(cells))
            lines.append(f"| {name} | {METHOD_NAMES.get(method, method)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_results(result: dict) -> str:
    """The docs' results block: what the summary covers and the three tables, each with the
    sentence that says what it shows (``tests`` check the docs hold it verbatim)."""
    h = result["header"]
    status = ("All runs are in." if h.get("complete") else
              f"The study is still running: {h.get('runs_missing')} runs are still to "
              "finish, and the tables cover those finished.")
    return (f"{status} Test accuracy on 600 tasks; differences in points, paired over the "
            "seeds, with 95% t-intervals.\n\n"
            "Each method at the level chosen on validation, final checkpoints (a level of "
            "\"0 (off)\": none of its levels beat b = 0, no regulariser, on validation):\n\n"
            + markdown_table(result)
            + "\nThe same choice among best-validation checkpoints (each run's checkpoint at "
            "its best validation accuracy):\n\n"
            + markdown_best_table(result)
            + "\nEvery level, final checkpoints, minus b = 0 (\"active\": the share of the "
            "training steps, or of the inner steps, at which the flood acted):\n\n"
            + markdown_levels_table(result))


# -- output -------------------------------------------------------------------------------
def study_header(args) -> dict:
    h = header(seed=None)
    h.update({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("func",)})
    h.update(test_seed=TEST_SEED, probe_seed=PROBE_SEED, probe_tasks=PROBE_TASKS,
             threads=1 if args.workers > 1 else torch.get_num_threads())
    return h


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pilot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    fig, axes = plt.subplots(2, len(algos), figsize=(5.5 * len(algos), 6.5), squeeze=False,
                             sharex="col")
    for j, algo in enumerate(algos):
        for r in (r for r in rows if r["algorithm"] == algo):
            c = r["curve"]
            x = [p["iteration"] for p in c]
            line, = axes[0][j].plot(x, [100 * p["val_accuracy"] for p in c],
                                    label=f"{r['classes']} characters")
            axes[1][j].plot([p["iteration"] for p in c if "train_loss" in p],
                            [p["train_loss"] for p in c if "train_loss" in p],
                            color=line.get_color())
        axes[0][j].set_title(f"{algo}: unflooded")
        axes[0][j].set_ylabel("validation accuracy %")
        axes[1][j].set_ylabel("training query loss")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("meta-iteration")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.suptitle("Omniglot 5-way 1-shot, meta-trained on N characters")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_summary(result: dict, path: Path) -> None:
    plt = _pyplot()
    algos = list(result["algorithms"])
    if not algos:
        return
    fig, axes = plt.subplots(2, len(algos), figsize=(6 * len(algos), 7), squeeze=False)
    for j, algo in enumerate(algos):
        e = result["algorithms"][algo]
        top, bottom = axes[0][j], axes[1][j]
        # Validation curves, the mean over seeds: b = 0 and each method at its chosen level.
        curves_of = {"b = 0": e["base"]}
        for method, m in e["methods"].items():
            b = m["final"]["selected_level"]
            if b:
                curves_of[f"{method} {b:g}"] = [r for r in m["runs"] if r["level"] == b]
        for label, runs in curves_of.items():
            runs = [r for r in runs if "curve" in r]
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            x = [p["iteration"] for p in runs[0]["curve"][:n]]
            y = [100 * sum(r["curve"][i]["val_accuracy"] for r in runs) / len(runs)
                 for i in range(n)]
            top.plot(x, y, lw=1.5 if label == "b = 0" else 1,
                     color="k" if label == "b = 0" else None, label=label)
        top.legend(fontsize=7)
        top.set_title(f"{algo}: validation accuracy %, mean over seeds\n(b = 0, and each "
                      "method at the level chosen on validation)", fontsize=9)
        top.set_xlabel("meta-iteration")
        # Blue: final checkpoints against b = 0's final one (and the two baselines that
        # pick a checkpoint on validation); orange: best-validation checkpoints against b =
        # 0's best-validation checkpoint.
        bars = []  # (label, final or None, best or None)
        for method, m in e["methods"].items():
            bars.append((f"{method.replace('_', chr(10))}\n{m['final']['selected_level']:g}"
                         f" / {m['best']['selected_level']:g}",
                         m["final"]["diff_vs_b0"], m["best"]["diff_vs_b0"]))
        bars.append(("b = 0 best-\nvalidation\ncheckpoint", e["b0_best_vs_b0_final"], None))
        if e["early_stopping_vs_b0_final"]["n"]:
            bars.append(("early\nstopping", e["early_stopping_vs_b0_final"], None))
        for k, (which, color) in enumerate(((1, "tab:blue"), (2, "tab:orange"))):
            xs = [i + (k - 0.5) * 0.4 for i, bar in enumerate(bars) if bar[which]]
            ds = [bar[which] for bar in bars if bar[which]]
            bottom.bar(xs, [100 * (d["mean"] or 0) for d in ds], width=0.4, color=color,
                       yerr=[100 * (d["ci95"] or 0) for d in ds], capsize=3,
                       label=("final checkpoints − b = 0's final" if k == 0 else
                              "best-validation checkpoints − b = 0's"))
        bottom.set_xticks(range(len(bars)), [bar[0] for bar in bars], fontsize=7)
        bottom.legend(fontsize=7)
        bottom.axhline(0, color="k", lw=0.8)
        bottom.set_ylabel("test accuracy difference (points;\n"
                          "paired over seeds, 95% t-interval)")
        bottom.set_title("level chosen on validation (final / best-validation checkpoints)",
                         fontsize=9)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle(f"Omniglot 5-way 1-shot, {result['train_classes']} training characters")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("phase", choices=("pilot", "sweep", "regularisers", "summary", "all"))
    d = "(default %(default)s)"
    parser.add_argument("--algorithms", help=f"{d}")
    parser.add_argument("--classes", help=f"pilot: training class counts {d}")
    parser.add_argument("--train-classes", default="auto", help="sweep, regularisers, summary: "
                        "N, 'all', or 'auto' (the pilot's choice) (default %(default)s)")
    parser.add_argument("--iterations", type=int, help=f"meta-iterations per run {d}")
    parser.add_argument("--val-every", type=int, help=f"{d}")
    parser.add_argument("--val-tasks", type=int, help=f"{d}")
    parser.add_argument("--eval-queries", type=int, help=f"validation and test queries per "
                        f"class {d}")
    parser.add_argument("--meta-batch", type=int, help=f"{d}")
    parser.add_argument("--inner-steps", help=f"K, or maml=K,fomaml=K {d}")
    parser.add_argument("--seeds", help=f"(the pilot uses the first) {d}")
    parser.add_argument("--floods", help=f"{d}")
    parser.add_argument("--levels", type=int, help=f"flood levels per flood, spaced "
                        f"geometrically between the unflooded run's losses at the end and at "
                        f"the validation peak {d}")
    parser.add_argument("--outer-levels", help="absolute outer flood levels instead")
    parser.add_argument("--inner-levels", help="absolute inner flood (and iFlood) levels "
                        "instead")
    parser.add_argument("--regularisers", help=f"{d}")
    parser.add_argument("--weight-decay", help=f"{d}")
    parser.add_argument("--label-smoothing", help=f"{d}")
    parser.add_argument("--dropout", help=f"{d}")
    parser.add_argument("--patience", type=int, help=f"early stopping: validations {d}")
    parser.add_argument("--test-tasks", type=int, help=f"{d}")
    parser.add_argument("--log-every", type=int, help=f"{d}")
    parser.add_argument("--min-drop", type=float, help=f"pilot: the validation drop that "
                        f"counts as overfitting {d}")
    parser.add_argument("--quick", action="store_true", help="a smoke run of tiny budgets")
    parser.add_argument("--plan", action="store_true", help="list the runs and their state; "
                        "train nothing")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished "
                        "run's log and record, and the result files (only those)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's "
                        "default)")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once, each "
                        "in a process of its own with one thread (default 1); 2 on a 2-core "
                        "CPU gives about 1.4x the throughput "
                        "(benchmarks/results/threads_vs_processes.json)")
    parser.add_argument("--no-malloc-reuse", action="store_true", help="leave glibc's "
                        "allocator as it is (by default freed memory is kept for reuse, as "
                        "the metalearn command does; see metalearn.allocator)")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--out", default="flooding_regime", help="result file stem")
    for name, value in DEFAULTS.items():  # shown in --help
        action = next(a for a in parser._actions if a.dest == name)
        action.default = value
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and args.threads:
        parser.error("--threads sets the threads of a single process; with --workers each "
                     "worker has one: leave --threads out")
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == DEFAULTS[name]:
                setattr(args, name, value)
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    args.floods = [f for f in args.floods.split(",") if f]
    args.regularisers = [r for r in args.regularisers.split(",") if r]
    bad = ((set(args.algorithms) - set(ALGORITHMS)) | (set(args.floods) - set(FLOODS))
           | (set(args.regularisers) - set(REGULARISERS)))
    if bad:
        parser.error(f"unknown {sorted(bad)}: algorithms {ALGORITHMS}, floods {FLOODS}, "
                     f"regularisers {REGULARISERS}")
    args.classes = [None if c == "all" else int(c) for c in args.classes.split(",") if c]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.inner_steps = per_algorithm(args.inner_steps)
    if args.levels < 1:
        parser.error(f"--levels must be at least 1, got {args.levels}")
    args.outer_levels = numbers(args.outer_levels) if args.outer_levels else None
    args.inner_levels = numbers(args.inner_levels) if args.inner_levels else None
    for name in ("weight_decay", "label_smoothing", "dropout"):
        setattr(args, name, numbers(getattr(args, name)))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.no_malloc_reuse:
        from metalearn.allocator import reuse_freed_memory

        reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.quick or args.plan):  # once a minute, how much others used the CPU
        args.runs.mkdir(parents=True, exist_ok=True)
        CpuMonitor(args.runs / "cpu.jsonl").start()
    phases = {"pilot": [pilot], "sweep": [sweep], "regularisers": [regularisers],
              "summary": [summary], "all": [pilot, sweep, regularisers, summary]}[args.phase]
    for phase in phases:
        if args.plan and phase is summary:
            continue
        phase(args)


if __name__ == "__main__":
    main()
