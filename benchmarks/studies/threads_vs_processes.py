"""Two cores, one long run or two: throughput of the study workloads by thread count.

    python benchmarks/studies/threads_vs_processes.py [--workloads overlap-k8,maml-mb8,...]
        [--seconds 60] [--out threads_vs_processes]

The long studies still to run (the Reptile §6.2 overlap study, the flooding study) are many
runs of small tasks. A run at torch's default two intra-op threads on this 2-core machine
may leave the second core mostly idle: most operations of a 5-way Omniglot task are too
small for torch to split. Two runs at once with the default threads oversubscribe the
cores and slow each other several-fold. This measures a third way: two runs at once, each
with one thread. For each workload, with the same seed and data:

* ``1x2``: one process, two threads (the default);
* ``1x1``: one process, one thread;
* ``2x1``: two processes at once, one thread each (timed over the same window: each
  warms up, waits for the other, then times).

Each process runs the workload's meta-iterations for ``--seconds`` after a warm-up
(compiling, where the workload compiles) and reports the median seconds per iteration.
Throughput is iterations per second over all processes; the ratio ``2x1 / 1x2`` is what
running two single-threaded runs at once would gain. Needs an otherwise idle machine.

Workloads (meta-training steps exactly as the study scripts run them):

* ``overlap-k8``: ``reptile_ablations.py --study d`` FOMAML shared tail, cycling, 8 inner
  SGD steps on mini-batches of 25, meta-batch 1, compiled;
* ``overlap-k4``: the same with 4 inner steps;
* ``maml-mb8``: ``flooding_regime.py``'s MAML, Omniglot 5-way 1-shot, meta-batch 8, 3
  inner steps at 0.4, Adam;
* ``reptile-5w1s``: ``reproduce_omniglot.py reptile``'s step, meta-batch 5, 5 inner Adam
  steps on mini-batches of 10 (10 shots), compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
WORKLOADS = ("overlap-k8", "overlap-k4", "maml-mb8", "reptile-5w1s")
MODES = {"1x2": (1, 2), "1x1": (1, 1), "2x1": (2, 1)}  # (processes, threads each)


def _step_fn(workload: str):
    """A callable running one meta-iteration of ``workload``, built after torch's threads
    are set."""
    import torch

    sys.path.insert(0, str(ROOT))
    from metalearn import MAML, GradientCombination, Reptile
    from metalearn.data import OmniglotTasks
    from metalearn.kernels import kernel_settings
    from metalearn.models import Conv4

    torch.manual_seed(0)
    model = Conv4(ways=5)
    if workload.startswith("overlap-"):
        from benchmarks.reptile_ablations import INNER_LR, META_STEP, PoolSampler, study_d_runs

        steps = int(workload[len("overlap-k"):])
        (run,) = [r for r in study_d_runs() if r.name == f"fomaml-shared-cycle-k{steps}-b25"]
        learner = GradientCombination(model, INNER_LR, run.steps, inner_batch=run.batch,
                                      use=run.use, tail=run.tail, sampling=run.sampling,
                                      generator=torch.Generator().manual_seed(17))
        opt = torch.optim.SGD(model.parameters(), lr=META_STEP * INNER_LR)
        sampler, meta_batch, compile_ = PoolSampler(run, 0), 1, True
    elif workload == "maml-mb8":
        learner = MAML(model, 0.4, 3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sampler = OmniglotTasks(split="train", ways=5, shots=1, queries=1, seed=0,
                                progress=False)
        meta_batch, compile_ = 8, False
    elif workload == "reptile-5w1s":
        learner = Reptile(model, 1e-3, 5, inner_batch=10, inner_optimizer="adam")
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sampler = OmniglotTasks(split="train", ways=5, shots=10, queries=1, seed=0,
                                progress=False)
        meta_batch, compile_ = 5, True
    else:
        raise SystemExit(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    kernel_settings(compile=compile_)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        learner.step(sampler.sample(meta_batch))
        opt.step()

    return step


def worker(workload: str, threads: int, seconds: float, barrier: Path | None, peers: int,
           rank: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    step = _step_fn(workload)
    for _ in range(5):  # warm-up: compiling, caches, the allocator
        step()
    if barrier is not None:  # start timing together with the other processes
        (barrier / f"ready{rank}").touch()
        while len(list(barrier.glob("ready*"))) < peers:
            time.sleep(0.01)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"iterations": len(times), "median_seconds": statistics.median(times),
            "iterations_per_second": len(times) / sum(times)}


def measure(workload: str, mode: str, seconds: float) -> dict:
    processes, threads = MODES[mode]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, __file__, "--worker", workload, "--threads", str(threads),
               "--seconds", str(seconds), "--barrier", barrier, "--peers", str(processes)]
        procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env, stdout=subprocess.PIPE,
                                  text=True) for r in range(processes)]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{workload} {mode}: a worker failed")
    each = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    return {"mode": mode, "processes": processes, "threads": threads, "each": each,
            "median_seconds": statistics.median(e["median_seconds"] for e in each),
            "iterations_per_second": sum(e["iterations_per_second"] for e in each)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="timed seconds per process and mode, after the warm-up")
    parser.add_argument("--out", default="threads_vs_processes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.seconds, args.barrier,
                                args.peers, args.rank)))
        return

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import header, write_json

    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(WORKLOADS)}")
    results = []
    for workload in workloads:
        row = {"workload": workload, "modes": {}}
        for mode in MODES:
            row["modes"][mode] = m = measure(workload, mode, args.seconds)
            print(f"{workload:13s} {mode}: {m['median_seconds'] * 1e3:8.1f} ms/it per process, "
                  f"{m['iterations_per_second']:6.2f} it/s in all", flush=True)
        base = row["modes"]["1x2"]["iterations_per_second"]
        row["throughput_vs_1x2"] = {mode: m["iterations_per_second"] / base
                                    for mode, m in row["modes"].items()}
        results.append(row)
    path = write_json(f"{args.out}.json",
                      {"header": header(), "seconds": args.seconds, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
