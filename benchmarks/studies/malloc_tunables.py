"""What glibc's allocator settings do to a meta-iteration on CPU.

    python benchmarks/studies/malloc_tunables.py [--rounds 2] [--repeats 3]

torch's CPU tensors come from ``malloc``; glibc serves blocks above its mmap threshold
(at most 32 MB) with fresh ``mmap`` pages and unmaps them on free, so every large
activation of a batched meta-iteration (up to 128 MB here) is page-faulted in again, at
a few GB/s. With ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``
(``TUNED`` below) every block comes from the heap and freed memory is kept for reuse; the
price is that the process keeps its peak memory until it exits. The third setting makes
the same change at run time, through ``metalearn.allocator.reuse_freed_memory()`` (what the
``metalearn`` command does by default). The tunables are read when a process starts, so
each measurement is a child process; children run one at a time, the settings taking turns
round by round. Omniglot 5w1s, Conv4, meta-batch 32, at 1
and 15 queries per class. Run it on an idle machine. Writes
benchmarks/results/malloc_tunables.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
WORKLOADS = (("maml", 1), ("maml", 5), ("fomaml", 5), ("anil", 1))


def child(repeats: int, call: bool) -> None:
    if call:
        from metalearn.allocator import reuse_freed_memory

        assert reuse_freed_memory(), "mallopt refused"
    from benchmarks.common import interleaved_medians, omniglot_5w1s_batch, seeded_conv4_learner

    fns = {}
    for queries in (1, 15):
        batch = omniglot_5w1s_batch(queries)
        for algo, steps in WORKLOADS:
            model, learner = seeded_conv4_learner(algo, steps)

            def run(model=model, learner=learner, batch=batch):
                model.zero_grad(set_to_none=True)
                learner.step(batch)

            fns[f"{queries}/{algo}/{steps}"] = run
    print(json.dumps(interleaved_medians(fns, repeats=repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--call", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.repeats, args.call)
        return
    from benchmarks.common import header, write_json

    if os.environ.get("GLIBC_TUNABLES"):
        parser.error("GLIBC_TUNABLES is set; run this without it (it sets it for the children)")
    t_start = time.perf_counter()
    # "tuned" sets the tunables at process start, "reuse_freed_memory" the same through
    # mallopt at run time (metalearn.allocator, what the command line does).
    settings = {"default": (None, False), "tuned": (TUNED, False),
                "reuse_freed_memory": (None, True)}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for r in range(args.rounds):
        for name, (tunables, call) in settings.items():
            env = dict(os.environ)
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--repeats", str(args.repeats),
                 *(["--call"] if call else [])],
                env=env, check=True, capture_output=True, text=True, cwd=ROOT)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)
    rows = []
    for key in runs["default"][0]:
        queries, algo, steps = key.split("/")
        t = {name: statistics.median(run[key] for run in runs[name]) for name in settings}
        rows.append({"queries_per_class": int(queries), "algorithm": algo,
                     "inner_steps": int(steps), "default_seconds": t["default"],
                     "tuned_seconds": t["tuned"], "speedup": t["default"] / t["tuned"],
                     "reuse_freed_memory_seconds": t["reuse_freed_memory"],
                     "reuse_freed_memory_speedup": t["default"] / t["reuse_freed_memory"]})
        print(f"({'a' if queries == '1' else 'b'}) {algo}-{steps}: default {t['default']:.3f}s "
              f"tuned {t['tuned']:.3f}s  x{t['default'] / t['tuned']:.2f}  "
              f"reuse_freed_memory() {t['reuse_freed_memory']:.3f}s "
              f"x{t['default'] / t['reuse_freed_memory']:.2f}", flush=True)
    h = header(seed=0)
    h.update(wall_seconds=time.perf_counter() - t_start, tuned=TUNED, rounds=args.rounds,
             repeats=args.repeats)
    print(f"wrote {write_json('malloc_tunables.json', {'header': h, 'rows': rows})}")


if __name__ == "__main__":
    main()
