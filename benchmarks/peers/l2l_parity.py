"""Meta-gradient parity of metalearn's MAML/FOMAML with learn2learn 0.2.0.

From identical initial weights and on identical task batches, computes the meta-gradient
of the mean query loss twice:

* metalearn: ``MAML(model, inner_lr, inner_steps)`` / ``FOMAML(...)``, ``learner.step(batch)``
  (all tasks in one ``torch.func.vmap``; the gradient is accumulated into ``p.grad``);
* learn2learn: ``l2l.algorithms.MAML(model, lr, first_order=...)``, one ``clone()`` per task,
  ``adapt(support loss)`` ``inner_steps`` times, query losses averaged over the tasks,
  ``backward()``.

and reports ``max |a - b| / max |b|`` over all parameters (a = metalearn, b = learn2learn).

Setups: Conv4 on real Omniglot 5-way 1-shot episodes (15 and 1 queries per class,
inner lr 0.4) and the 1-40-40-1 MLP on sine regression (10 shots, 10 queries, inner lr
0.01); MAML with 1 and 5 inner steps and FOMAML with 5; float32 and float64.

BatchNorm: metalearn normalises with the statistics of the current batch and never touches
the running buffers. For learn2learn every BatchNorm gets ``track_running_stats=False`` and
its running buffers removed, so it computes the same function (in train or eval mode).

Two controls show that the check can fail: learn2learn's first-order gradient against
metalearn's second-order one, and learn2learn with BatchNorm left on its running
statistics (eval mode), the usual way to get this comparison wrong.

``--sampling-speed`` adds an episode-sampling comparison (metalearn ``OmniglotTasks`` vs
learn2learn ``TaskDataset`` over an in-memory tensor dataset). ``--smoke`` runs it with
tiny counts only to show that it works; its rates are then neither printed nor saved.

Run with the peer venv made by ``setup_learn2learn.sh``::

    METALEARN_DATA=/work/shared/data benchmarks/peers/.venv-l2l/bin/python \\
        benchmarks/peers/l2l_parity.py

Writes ``benchmarks/results/l2l_parity.json`` (atomically) and prints a table. Exits 1
if a parity case is outside its tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import learn2learn as l2l
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import metalearn
from metalearn import FOMAML, MAML
from metalearn.data import OmniglotTasks, SineTasks, TaskBatch
from metalearn.models import MLP, Conv4

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "l2l_parity.json"

# Round-off tolerances on max|a-b| / max|b|. The two libraries evaluate the same function
# with different operation orders (vmap vs a per-task loop, hand-written vs native
# BatchNorm affine), so float32 agrees to round-off amplified by the depth of the
# (second-order) graph, and float64 to about 1e9 times less.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}

CASES = (  # (name, inner_steps, first_order)
    ("MAML", 1, False),
    ("MAML", 5, False),
    ("FOMAML", 5, True),
)


# -- the two meta-gradients ------------------------------------------------------------
def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """metalearn's task loss: cross-entropy for labels, else MSE (mean over everything)."""
    return F.mse_loss(out, y) if y.dtype.is_floating_point else F.cross_entropy(out, y)


def batch_statistics_only(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` always normalise with the batch's statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return model


def metalearn_grads(model: nn.Module, batch: TaskBatch, inner_lr: float, steps: int,
                    first_order: bool) -> tuple[dict[str, torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    if first_order:
        learner = FOMAML(model, inner_lr=inner_lr, inner_steps=steps)
    else:
        learner = MAML(model, inner_lr=inner_lr, inner_steps=steps)
    loss = learner.step(batch)["loss"]
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, loss


def l2l_grads(model: nn.Module, batch: TaskBatch, inner_lr: float, steps: int,
              first_order: bool) -> tuple[dict[str, torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)
    total = 0.0
    for i in range(len(batch)):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(task_loss(learner(batch.support_x[i]), batch.support_y[i]))
        total = total + task_loss(learner(batch.query_x[i]), batch.query_y[i])
    meta_loss = total / len(batch)
    meta_loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, meta_loss.item()


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """max|a-b| / max|b| over all parameters, and the same per parameter."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    per_param = {}
    for n in b:
        per_param[n] = {
            "max_abs_diff": (a[n] - b[n]).abs().max().item(),
            "max_abs_l2l": b[n].abs().max().item(),
        }
    max_diff = max(v["max_abs_diff"] for v in per_param.values())
    max_ref = max(v["max_abs_l2l"] for v in per_param.values())
    return {"max_rel_diff": max_diff / max_ref, "max_abs_diff": max_diff,
            "max_abs_grad_l2l": max_ref, "per_param": per_param}


# -- setups ------------------------------------------------------------------------------
def make_setups(args, seed: int) -> list[dict]:
    setups = []
    for q in args.omniglot_queries:
        tasks = OmniglotTasks(split="train", ways=5, shots=1, queries=q, seed=seed,
                              progress=False)
        setups.append({
            "name": f"omniglot_5w1s_{q}q",
            "description": f"Conv4(ways=5), Omniglot train split, 5-way 1-shot {q}-query, "
                           f"{args.omniglot_tasks} tasks, inner lr 0.4",
            "make_model": lambda: Conv4(ways=5),
            "batch": tasks.sample(args.omniglot_tasks),
            "inner_lr": 0.4,
        })
    sine = SineTasks(shots=10, queries=10, seed=seed)
    setups.append({
        "name": "sine_10s_10q",
        "description": f"MLP 1-40-40-1, sine regression, 10 shots 10 queries, "
                       f"{args.sine_tasks} tasks, inner lr 0.01",
        "make_model": lambda: MLP(),
        "batch": sine.sample(args.sine_tasks),
        "inner_lr": 0.01,
    })
    return setups


def prebn_biases(model: nn.Module) -> set[str]:
    """Biases of layers followed directly by a BatchNorm: their exact gradient is zero
    (batch statistics remove any constant shift), so both libraries return round-off."""
    names, prev = set(), None
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and prev is not None:
            if getattr(prev[1], "bias", None) is not None:
                names.add(f"{prev[0]}.bias")
        if len(list(m.children())) == 0:
            prev = (name, m)
    return names


def run_setup(setup: dict, dtypes: list[torch.dtype], seed: int) -> tuple[list[dict], list[dict]]:
    rows, controls, grads = [], [], {}
    for dtype in dtypes:
        torch.manual_seed(seed)
        ml_model = setup["make_model"]().to(dtype)  # float64: the float32 init, cast
        l2l_model = batch_statistics_only(copy.deepcopy(ml_model))  # identical weights
        ml_model.train()
        l2l_model.train()
        skip = prebn_biases(ml_model)
        batch = setup["batch"].to("cpu", dtype=dtype)
        lr = setup["inner_lr"]
        dname = str(dtype).removeprefix("torch.")
        for name, steps, first_order in CASES:
            a, loss_a = metalearn_grads(ml_model, batch, lr, steps, first_order)
            b, loss_b = l2l_grads(l2l_model, batch, lr, steps, first_order)
            grads[(dname, name, steps)] = (a, b)
            cmp = compare(a, b)
            rest = compare({k: v for k, v in a.items() if k not in skip},
                           {k: v for k, v in b.items() if k not in skip})
            tol = TOLERANCE[dtype]
            rows.append({
                "seed": seed, "setup": setup["name"], "algorithm": name, "inner_steps": steps,
                "dtype": dname,
                "max_rel_diff": cmp["max_rel_diff"], "tolerance": tol,
                "ok": bool(cmp["max_rel_diff"] <= tol),
                "max_rel_diff_without_prebn_biases": rest["max_rel_diff"],
                "prebn_biases": sorted(skip),
                "max_abs_diff": cmp["max_abs_diff"],
                "max_abs_grad_l2l": cmp["max_abs_grad_l2l"],
                "meta_loss_metalearn": loss_a, "meta_loss_l2l": loss_b,
                "per_param": cmp["per_param"],
            })
        # Control 1: first- vs second-order, 5 steps (must differ by far more than round-off).
        a_so, _ = grads[(dname, "MAML", 5)]
        _, b_fo = grads[(dname, "FOMAML", 5)]
        controls.append({
            "seed": seed, "setup": setup["name"], "dtype": dname,
            "control": "metalearn MAML-5 (second order) vs learn2learn first_order=True, 5 steps",
            "max_rel_diff": compare(a_so, b_fo)["max_rel_diff"],
        })
        # Control 2: learn2learn with BatchNorm on its running statistics (eval mode, 0/1).
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ml_model.modules()):
            torch.manual_seed(seed)
            ml_model2 = setup["make_model"]().to(dtype)
            naive = copy.deepcopy(ml_model2).eval()
            a, _ = metalearn_grads(ml_model2, batch, lr, 1, False)
            b, _ = l2l_grads(naive, batch, lr, 1, False)
            controls.append({
                "seed": seed, "setup": setup["name"], "dtype": dname,
                "control": "MAML-1, learn2learn model left in eval mode with BatchNorm running "
                           "statistics (not made equivalent)",
                "max_rel_diff": compare(a, b)["max_rel_diff"],
            })
    # With both dtypes: how far each library's float32 result is from the float64 one.
    if {"float32", "float64"} <= {str(d).removeprefix("torch.") for d in dtypes}:
        for r in rows:
            if r["dtype"] != "float32":
                continue
            a32, b32 = grads[("float32", r["algorithm"], r["inner_steps"])]
            _, b64 = grads[("float64", r["algorithm"], r["inner_steps"])]
            b64 = {k: v.float() for k, v in b64.items()}
            r["metalearn_fp32_vs_l2l_fp64"] = compare(a32, b64)["max_rel_diff"]
            r["l2l_fp32_vs_l2l_fp64"] = compare(b32, b64)["max_rel_diff"]
            # Two float32 results cannot agree more closely than their own round-off: when
            # learn2learn's float32 gradient is itself further than the tolerance from the
            # float64 one, metalearn's passes if its own float32 error is at most twice that.
            if not r["ok"] and (r["metalearn_fp32_vs_l2l_fp64"]
                                <= 2 * r["l2l_fp32_vs_l2l_fp64"]):
                r["ok"] = True
                r["ok_by"] = ("metalearn's float32 error (vs float64) is at most 2x "
                              "learn2learn's own float32 error")
    return rows, controls


# -- episode sampling (a timing: run it on an idle machine) -----------------------------
def sampling_speed(seed: int, batch_size: int, batches: int, repeats: int,
                   smoke: bool) -> dict:
    """5-way 1-shot 15-query episodes/s: metalearn ``OmniglotTasks`` vs learn2learn
    ``TaskDataset`` (NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels) over an
    in-memory ``TensorDataset`` of the same images.

    learn2learn's dataset holds the train split's characters in all four rotations as
    4400 classes of 20 float32 images (ink 1.0), as metalearn's rotation table does; an
    l2l episode is split into support and query per class by position after
    ``ConsecutiveLabels``, and ``batch_size`` episodes are stacked into one batch like
    metalearn's ``TaskBatch``. (A small difference: l2l may draw two rotations of one
    character in an episode, metalearn draws distinct characters.)
    """
    from metalearn.data.omniglot import split_classes
    from metalearn.data.omniglot_archive import load_images

    ways, shots, queries = 5, 1, 15
    ml_tasks = OmniglotTasks(split="train", ways=ways, shots=shots, queries=queries,
                             seed=seed, progress=False)
    t0 = time.perf_counter()
    base = load_images(progress=False)[split_classes("train")]  # (1100, 20, 28, 28) uint8
    rot = torch.stack([torch.rot90(base, k, dims=(-2, -1)) for k in range(4)], dim=1)
    images = (rot.reshape(-1, 1, 28, 28).float() / 255).contiguous()  # (88000, 1, 28, 28)
    labels = torch.arange(images.shape[0] // 20).repeat_interleave(20)
    labels_to_indices = {c: list(range(c * 20, c * 20 + 20)) for c in range(len(labels) // 20)}
    ds = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels),
                              labels_to_indices=labels_to_indices)
    transforms = [
        l2l.data.transforms.NWays(ds, ways),
        l2l.data.transforms.KShots(ds, shots + queries),
        l2l.data.transforms.LoadData(ds),
        l2l.data.transforms.RemapLabels(ds),
        l2l.data.transforms.ConsecutiveLabels(ds),
    ]
    l2l_tasks = l2l.data.TaskDataset(ds, task_transforms=transforms, num_tasks=-1)
    l2l_setup_s = time.perf_counter() - t0

    def l2l_batch(b: int) -> TaskBatch:
        sx, sy, qx, qy = [], [], [], []
        for _ in range(b):
            x, y = l2l_tasks.sample()  # (ways * (shots + queries), ...), grouped by class
            x = x.view(ways, shots + queries, 1, 28, 28)
            y = y.view(ways, shots + queries)
            sx.append(x[:, :shots].reshape(-1, 1, 28, 28))
            sy.append(y[:, :shots].reshape(-1))
            qx.append(x[:, shots:].reshape(-1, 1, 28, 28))
            qy.append(y[:, shots:].reshape(-1))
        return TaskBatch(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))

    samplers = {"metalearn OmniglotTasks": ml_tasks.sample, "learn2learn TaskDataset": l2l_batch}
    out = {"episode": "5-way 1-shot 15-query, train split, rotations", "batch_size": batch_size,
           "batches_per_repeat": batches, "repeats": repeats, "samplers": {}}
    if not smoke:
        out["l2l_dataset_setup_s"] = l2l_setup_s
    for name, sample in samplers.items():
        b = sample(batch_size)  # warm-up, and a check of what each sampler returns
        assert tuple(b.support_x.shape) == (batch_size, ways * shots, 1, 28, 28), b.support_x.shape
        assert tuple(b.query_x.shape) == (batch_size, ways * queries, 1, 28, 28), b.query_x.shape
        for t in range(batch_size):
            assert sorted(b.support_y[t].tolist()) == list(range(ways)), b.support_y[t]
            assert set(b.query_y[t].tolist()) == set(range(ways)), b.query_y[t]
        assert 0.0 <= b.support_x.min() and b.support_x.max() <= 1.0
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(batches):
                sample(batch_size)
            rates.append(batch_size * batches / (time.perf_counter() - t0))
        out["samplers"][name] = {"checked": True}
        if not smoke:
            out["samplers"][name].update(episodes_per_s_median=statistics.median(rates),
                                         episodes_per_s_all=rates)
    if smoke:
        out["smoke"] = ("ran with tiny counts only to show that both samplers work and return "
                        "the same episode layout; no timing recorded")
    return out


# -- reporting ---------------------------------------------------------------------------
def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.rstrip("\n")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def print_table(rows: list[dict], controls: list[dict]) -> None:
    def e(x: float | None) -> str:
        return f"{x:.2e}" if x is not None else "-"

    head = (f"{'seed':>4} {'setup':<18} {'algorithm':<6} {'steps':>5} {'dtype':<7} {'rel diff':>9} "
            f"{'tol':>6} {'ok':<3} {'w/o preBN b':>11} {'ml32~fp64':>9} {'l2l32~fp64':>10} "
            f"{'meta-loss ml':>12} {'meta-loss l2l':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['seed']:>4} {r['setup']:<18} {r['algorithm']:<6} {r['inner_steps']:>5} "
              f"{r['dtype']:<7} "
              f"{r['max_rel_diff']:>9.2e} {r['tolerance']:>6.0e} {'yes' if r['ok'] else 'NO':<3} "
              f"{e(r['max_rel_diff_without_prebn_biases']):>11} "
              f"{e(r.get('metalearn_fp32_vs_l2l_fp64')):>9} "
              f"{e(r.get('l2l_fp32_vs_l2l_fp64')):>10} "
              f"{r['meta_loss_metalearn']:>12.6f} {r['meta_loss_l2l']:>13.6f}")
    print("rel diff = max|metalearn - l2l| / max|l2l| over all parameters; w/o preBN b: the "
          "same without the conv biases\nthat feed a BatchNorm (exact gradient 0, both give "
          "round-off); ml32~fp64, l2l32~fp64: each library's\nfloat32 meta-gradient against "
          "learn2learn's float64 one (same metric)")
    print("\ncontrols (must differ by far more than the tolerances):")
    for c in controls:
        print(f"  {c['seed']:>4} {c['setup']:<18} {c['dtype']:<8} {c['max_rel_diff']:>10.2e}  "
              f"{c['control']}")


def print_float32_summary(rows: list[dict]) -> None:
    """Each library's float32 error against float64, worst and median over the seeds."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if "metalearn_fp32_vs_l2l_fp64" in r:
            cases.setdefault((r["setup"], r["algorithm"], r["inner_steps"]), []).append(r)
    if not cases:
        return
    print("\nfloat32 error against float64 over the seeds (median / worst):")
    for (setup, algo, steps), rs in cases.items():
        ml = sorted(r["metalearn_fp32_vs_l2l_fp64"] for r in rs)
        lt = sorted(r["l2l_fp32_vs_l2l_fp64"] for r in rs)
        print(f"  {setup:<18} {algo}-{steps:<3} metalearn {statistics.median(ml):.2e} / "
              f"{ml[-1]:.2e}   learn2learn {statistics.median(lt):.2e} / {lt[-1]:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the weights and the batches; every case runs at each "
                             "(float32 MAML-5 round-off varies 20x from batch to batch)")
    parser.add_argument("--omniglot-tasks", type=int, default=32, help="tasks per batch")
    parser.add_argument("--omniglot-queries", type=int, nargs="+", default=[15, 1])
    parser.add_argument("--sine-tasks", type=int, default=25, help="tasks per batch")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                        choices=["float32", "float64"])
    parser.add_argument("--sampling-speed", action="store_true",
                        help="also compare episode sampling speed (needs an idle machine)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --sampling-speed: tiny counts, check only, no timings")
    parser.add_argument("--speed-batch-size", type=int, default=32)
    parser.add_argument("--speed-batches", type=int, default=20)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows, controls = [], []
    dtypes = [getattr(torch, d) for d in args.dtypes]
    for seed in args.seed:
        setups = make_setups(args, seed)
        for setup in setups:
            r, c = run_setup(setup, dtypes, seed)
            rows += r
            controls += c
            print(f"done: seed {seed} {setup['name']}", file=sys.stderr)
    print_table(rows, controls)
    print_float32_summary(rows)

    speed = None
    if args.sampling_speed:
        if args.smoke:
            speed = sampling_speed(args.seed[0], batch_size=4, batches=2, repeats=1, smoke=True)
            print("\nsampling speed: smoke run OK (both samplers checked; no timing recorded)")
        else:
            speed = sampling_speed(args.seed[0], args.speed_batch_size, args.speed_batches,
                                   args.speed_repeats, smoke=False)
            print("\nsampling speed (episodes/s, median):")
            for name, s in speed["samplers"].items():
                print(f"  {name:<26} {s['episodes_per_s_median']:12,.0f}")

    result = {
        "benchmark": "meta-gradient parity: metalearn MAML/FOMAML vs learn2learn MAML",
        "metric": "max |a - b| / max |b| over all parameters; a = metalearn, b = learn2learn",
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "git_commit": git("rev-parse", "HEAD"),
        "metalearn_uncommitted_changes": (git("status", "--porcelain", "--", "metalearn") or "")
        .splitlines(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "learn2learn": l2l.__version__,
            "metalearn": metalearn.__version__,
            "numpy": np.__version__,
        },
        "settings": {
            "seeds": args.seed,
            "init": "the models' defaults (Xavier-uniform, zero biases, BatchNorm 1/0), "
                    "torch.manual_seed(seed); learn2learn gets a deepcopy",
            "batchnorm": "batch statistics in both (learn2learn: track_running_stats=False, "
                         "running buffers removed)",
            "setups": [{"name": s["name"], "description": s["description"]} for s in setups],
        },
        "tolerances": {str(k).removeprefix("torch."): v for k, v in TOLERANCE.items()},
        "all_ok": all(r["ok"] for r in rows),
        "results": rows,
        "controls": controls,
        "sampling_speed": speed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    if not result["all_ok"]:
        print("PARITY FAILED: some cases are outside their tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
