"""Omniglot episode sampling speed: 5-way 1-shot 15-query episodes per second.

Reports the median of several timed repeats at a meta-batch of 32 and at a large batch,
and, as the ceiling for large batches, how fast this machine can fill freshly allocated
memory (each batch is new float32 memory: 80 images x 784 px x 4 B = 251 KB per episode).
Prints the results and writes them to ``benchmarks/results/sampling_speed.json``.

Run (the data are found as by :class:`metalearn.data.OmniglotTasks`)::

    METALEARN_DATA=/path/to/data python benchmarks/sampling_speed.py [--repeats 7] [--threads 1]

Timings need an otherwise idle machine: with torch's default of one thread per core, a
busy core stalls every parallel copy, and small batches slow down many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from metalearn.data import OmniglotTasks

RESULTS = Path(__file__).parent / "results" / "sampling_speed.json"


def episodes_per_second(tasks: OmniglotTasks, batch: int, repeats: int, seconds: float) -> dict:
    """Median episodes/s over ``repeats`` timings of about ``seconds`` each."""
    tasks.sample(batch)  # warm-up
    t0 = time.perf_counter()
    tasks.sample(batch)
    calls = max(1, round(seconds / max(time.perf_counter() - t0, 1e-6)))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            tasks.sample(batch)
        rates.append(batch * calls / (time.perf_counter() - t0))
    return {
        "batch_size": batch,
        "calls_per_repeat": calls,
        "repeats": repeats,
        "episodes_per_s_median": statistics.median(rates),
        "episodes_per_s_all": [round(r) for r in rates],
    }


def fresh_memory_fill_gb_s(nbytes: int, repeats: int) -> float:
    """GB/s of allocating and filling new memory (page faults included), median."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.empty(nbytes // 4).fill_(1.0)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one repeat")
    parser.add_argument("--large-batch", type=int, default=1024)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tasks = OmniglotTasks(split="train", ways=5, shots=1, queries=15, seed=0)
    setup_s = time.perf_counter() - t0
    runs = [
        episodes_per_second(tasks, b, args.repeats, args.seconds) for b in (32, args.large_batch)
    ]
    episode_bytes = 5 * (1 + 15) * 28 * 28 * 4
    fill = fresh_memory_fill_gb_s(args.large_batch * episode_bytes, args.repeats)
    result = {
        "benchmark": "OmniglotTasks.sample, 5-way 1-shot 15-query, split=train, rotate=True",
        "runs": runs,
        "setup_s": setup_s,
        "fresh_memory_fill_gb_s": fill,
        "fresh_memory_ceiling_episodes_per_s": fill * 1e9 / episode_bytes,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for r in runs:
        print(
            f"batch {r['batch_size']:5d}: {r['episodes_per_s_median']:10,.0f} episodes/s "
            f"(median of {r['repeats']})"
        )
    print(
        f"setup (load + rotation table): {setup_s:.2f} s; filling fresh memory: {fill:.2f} GB/s "
        f"= at most {result['fresh_memory_ceiling_episodes_per_s']:,.0f} episodes/s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
