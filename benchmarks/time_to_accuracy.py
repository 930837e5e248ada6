"""Time to accuracy of the Omniglot 5-way 1-shot reproduction runs: wall-clock and
meta-iterations to reach each validation accuracy, one table and one plot (accuracy
against wall-clock).

    python benchmarks/time_to_accuracy.py [--levels 0.90,0.95,0.97,0.98]

Reads the logs of ``benchmarks/reproduce_omniglot.py`` in benchmarks/results/reproductions/
(``<algorithm>_omniglot_5w1s.jsonl``, with ``.cpu.jsonl`` beside each). A level counts as
reached at the first validation at or above it (500 fixed validation tasks, one query per
class; MAML and FOMAML scored after 3 inner steps, Reptile after 50, MAML++ after 5,
iMAML after 16). Wall-clock is cumulative across restarts
(``reproduce_omniglot.cumulative_seconds``). Every row also says which share of that
wall-clock another process shared the CPU, since a shared CPU inflates it. Writes
benchmarks/results/time_to_accuracy.{json,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, header, read_jsonl, shared_share, write_json  # noqa: E402
from benchmarks.reproduce_omniglot import (  # noqa: E402
    RUNS,
    TASK,
    cumulative_seconds,
    run_idle_rate,
)
from metalearn.checkpoint import atomic_write  # noqa: E402


def curve(stem: Path, seconds_per_iteration: float) -> list[dict]:
    """The run's validation records with their cumulative and idle-equivalent seconds."""
    log = read_jsonl(stem.with_suffix(".jsonl"))
    return [{"iteration": r["iteration"], "seconds": t, "accuracy": r["accuracy"],
             "idle_seconds": r["iteration"] * seconds_per_iteration}
            for r, t in zip(log, cumulative_seconds(log)) if r["split"] == "val"]


def first_reach(points: list[dict], level: float) -> dict | None:
    return next((p for p in points if p["accuracy"] >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--levels", default="0.90,0.95,0.97,0.98")
    parser.add_argument("--folder", type=Path, default=RESULTS / "reproductions")
    args = parser.parse_args()
    levels = [float(x) for x in args.levels.split(",")]
    rows, curves = [], {}
    for algorithm in RUNS:
        stem = args.folder / f"{algorithm}_{TASK}"
        idle = run_idle_rate(stem)
        if idle is None:
            continue
        points = curve(stem, idle["seconds_per_iteration"])
        if not points:
            continue
        curves[algorithm] = points
        last = points[-1]
        row = {"algorithm": algorithm, "iterations_so_far": last["iteration"],
               "of_iterations": RUNS[algorithm]["iterations"],
               "cpu_shared_share": shared_share(read_jsonl(stem.with_suffix(".cpu.jsonl"))),
               "idle": idle,
               "best_accuracy": max(p["accuracy"] for p in points), "reached": {}}
        for level in levels:
            hit = first_reach(points, level)
            row["reached"][f"{level:.2f}"] = (None if hit is None else
                                              {"iteration": hit["iteration"],
                                               "idle_seconds": round(hit["idle_seconds"], 1),
                                               "seconds": round(hit["seconds"], 1)})
        rows.append(row)
        cells = "  ".join(f"{k}: " + ("-" if v is None else
                                      f"{v['iteration']} it / {v['idle_seconds'] / 3600:.2f} h")
                          for k, v in row["reached"].items())
        print(f"{algorithm:8s} ({last['iteration']} of {row['of_iterations']} it)  {cells}")
    write_json("time_to_accuracy.json", {"header": header(), "levels": levels, "rows": rows,
                                         "curves": curves})
    plot(curves, levels, RESULTS / "time_to_accuracy.png")
    print(f"wrote {RESULTS / 'time_to_accuracy.json'} and .png")


def plot(curves: dict, levels: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        ax.plot([p["idle_seconds"] / 3600 for p in points],
                [100 * p["accuracy"] for p in points], label=name)
    for level in levels:
        ax.axhline(100 * level, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("idle-equivalent wall-clock (hours, 2-core CPU)")
    ax.set_ylabel("validation accuracy % (500 tasks)")
    ax.set_title("Omniglot 5-way 1-shot: validation against wall-clock")
    lowest = min((p["accuracy"] for points in curves.values() for p in points), default=0.8)
    ax.set_ylim(min(80, 5 * int(100 * lowest // 5)), 100)  # room for the slower starters
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
