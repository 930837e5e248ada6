"""The GPU check: tests on the device, peak CUDA memory per inner-step count, and speed.

    python benchmarks/gpu_check.py                      # on a machine with CUDA
    python benchmarks/gpu_check.py --device cpu --quick # the dry run, anywhere

Made to run in one call of under 10 minutes on one GPU, and to write everything it found
to one JSON file even when a part fails:

1. ``tests/test_device.py`` (every learner's meta-gradient on the device against the CPU
   in float64, MAML against the per-task loop, evaluation, memory profile, train and
   resume) and the algorithm test files, with ``METALEARN_TEST_DEVICE`` set: pass/fail
   counts and the failures' names.
2. Memory per inner-step count, the evaluator's figure: ``metalearn.memory_profile`` of
   MAML, memory-saving MAML, FOMAML, Reptile and iMAML on the Omniglot 5-way 1-shot Conv4
   workload (meta-batch 32, 15 queries per class) at 1, 2, 5 and 10 inner steps: peak CUDA
   memory (``torch.cuda.max_memory_allocated``), the autograd graph's saved bytes, and
   seconds per meta-iteration. Synthetic images of Omniglot's shape are used where the
   data is not there (memory and time do not depend on the pixels).
3. Speed against learn2learn 0.2.0, if it imports there (``benchmarks/peers/speed.py``'s
   workloads and comparison); otherwise metalearn's seconds per meta-iteration alone, and
   the reason.

Writes benchmarks/results/{--out}.json (default ``gpu_check``; ``--device cpu`` writes
``gpu_check_dry_run`` unless told otherwise).

The lent GPU machines carry their own PyTorch (2.11 with CUDA 13, Python 3.12, as the
device tool's notes list it), not the project's pin, and cannot download one: run the
script with their ``python3`` from the repository root, no install needed. With torch 2.11.0
in a venv here (``pip install torch==2.11.0``, then ``pip install -e ".[dev]"``), the dry run
and ``TEST_FILES`` on the CPU (``METALEARN_TEST_DEVICE=cpu``) pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import header, interleaved_medians, write_json  # noqa: E402

TEST_FILES = ["tests/test_device.py", "tests/test_maml.py", "tests/test_memory_saving_maml.py",
              "tests/test_norm_layers.py", "tests/test_task_convolution.py"]
ALGORITHMS = ("maml", "maml-memory-saving", "fomaml", "reptile", "imaml")


def run_tests(device: str, files: list[str], timeout: int) -> dict:
    env = {**os.environ, "METALEARN_TEST_DEVICE": device, "MPLBACKEND": "Agg"}
    report = Path(ROOT / ".gpu_check_junit.xml")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={report}", *files], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        tail, code = proc.stdout[-3000:], proc.returncode
    except subprocess.TimeoutExpired as err:
        tail, code = f"timed out after {timeout} s: {str(err.stdout or '')[-2000:]}", None
    out = {"files": files, "returncode": code, "seconds": time.perf_counter() - t0,
           "output_tail": tail}
    if report.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        out.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors",
                                                       "skipped")})
        out["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
        report.unlink()
    return out


def workload(queries: int, device: torch.device):
    """Omniglot 5w1s meta-batch 32, or synthetic images of its shape; and which it is."""
    try:
        from benchmarks.common import omniglot_5w1s_batch

        return omniglot_5w1s_batch(queries, 32).to(device), "omniglot"
    except Exception as err:  # the data is not on this machine
        from metalearn.data import TaskBatch

        g = torch.Generator().manual_seed(0)
        y = torch.arange(5).repeat(32, 1)
        batch = TaskBatch(torch.rand(32, 5, 1, 28, 28, generator=g), y,
                          torch.rand(32, 5 * queries, 1, 28, 28, generator=g),
                          torch.arange(5).repeat_interleave(queries).repeat(32, 1))
        return batch.to(device), f"synthetic ({type(err).__name__})"


def learner_for(name: str, steps: int):
    from metalearn import FOMAML, IMAML, MAML, Reptile
    from metalearn.models import Conv4

    torch.manual_seed(0)
    model = Conv4(ways=5)
    make = {"maml": lambda: MAML(model, 0.4, steps),
            "maml-memory-saving": lambda: MAML(model, 0.4, steps, memory_saving=True),
            "fomaml": lambda: FOMAML(model, 0.4, steps),
            "reptile": lambda: Reptile(model, 0.4, steps),
            "imaml": lambda: IMAML(model, 0.025, steps, lam=2.0, cg_steps=5)}[name]
    return model, make()


def memory_per_step(device: torch.device, steps: list[int], repeats: int) -> dict:
    from metalearn import memory_profile

    batch, source = workload(15, device)
    rows = []
    for name in ALGORITHMS:
        model, learner = learner_for(name, 1)
        learner.to(device)
        for r in memory_profile(learner, batch, inner_steps=steps, repeats=repeats):
            rows.append({**r, "algorithm": name})
            peak = r["cuda_peak_bytes"]
            print(f"memory {name:19s} k={r['inner_steps']:2d}  saved "
                  f"{r['saved_bytes'] / 2**20:8.1f} MiB  cuda peak "
                  f"{'-' if peak is None else f'{peak / 2**20:.1f} MiB':>12}  "
                  f"{r['seconds_per_iteration']:.4f} s/it", flush=True)
    return {"data": source, "queries_per_class": 15, "meta_batch": 32, "rows": rows}


def speed(device: torch.device, repeats: int) -> dict:
    cases = (("maml", 1), ("maml", 5), ("fomaml", 5), ("reptile", 5))
    try:
        import learn2learn  # noqa: F401

        from benchmarks.peers.speed import l2l_step  # the peer's loop, as speed.py times it
        peer = None
    except Exception as err:
        l2l_step, peer = None, f"learn2learn not importable here: {type(err).__name__}: {err}"
    rows = []
    for queries in (1, 15):
        batch, source = workload(queries, device)
        for algo, steps in cases:
            model, learner = learner_for(algo, steps)
            learner.to(device)

            def ours(model=model, learner=learner, batch=batch):
                model.zero_grad(set_to_none=True)
                learner.step(batch)

            fns = {"metalearn": ours}
            if l2l_step is not None:
                import copy

                theirs_model = copy.deepcopy(model)
                fns["learn2learn"] = (lambda m=theirs_model, b=batch, a=algo, s=steps:
                                      l2l_step(m, b, a, s))
            t = interleaved_medians(fns, repeats)
            row = {"queries_per_class": queries, "algorithm": algo, "inner_steps": steps,
                   "data": source, "metalearn_seconds": t["metalearn"]}
            if "learn2learn" in t:
                row.update(learn2learn_seconds=t["learn2learn"],
                           speedup=t["learn2learn"] / t["metalearn"])
            rows.append(row)
            print(f"speed ({'a' if queries == 1 else 'b'}) {algo:7s} k={steps}  "
                  + "  ".join(f"{k} {v:.4f}s" for k, v in t.items()), flush=True)
    return {"peer": peer or "learn2learn 0.2.0", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and repeats and only tests/test_device.py (the dry "
                             "run's scale)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu for "
                     "the dry run")
    out = args.out or ("gpu_check" if device.type == "cuda" else "gpu_check_dry_run")
    h = header(seed=0)
    result: dict = {"header": h}
    parts = (("tests", lambda: run_tests(args.device, TEST_FILES[:1] if args.quick
                                         else TEST_FILES, 240)),
             ("memory", lambda: memory_per_step(device, [1, 2] if args.quick else [1, 2, 5, 10],
                                                1 if args.quick else 3)),
             ("speed", lambda: speed(device, 1 if args.quick else 5)))
    for name, part in parts:
        t0 = time.perf_counter()
        try:
            result[name] = part()
        except Exception as err:  # record it and go on: the other parts still count
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        result[name]["part_seconds"] = time.perf_counter() - t0
        write_json(f"{out}.json", result)  # after every part: a timeout keeps what was done
    if device.type == "cuda":
        h["cuda_device"] = torch.cuda.get_device_name(device)
    print(json.dumps({k: v.get("error", "ok") for k, v in result.items() if k != "header"}))
    print(f"wrote {write_json(f'{out}.json', result)}")


if __name__ == "__main__":
    main()
