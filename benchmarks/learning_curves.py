"""Validation accuracy against meta-iterations, from the JSON-lines logs of training runs.

    python benchmarks/learning_curves.py [LOG.jsonl ...] [--out learning_curves_omniglot_5w1s]

``metalearn.train`` logs every validation as ``{"iteration", "split": "val", "accuracy",
"ci95", ...}`` in ``<checkpoint stem>.jsonl``. The logs of the runs behind
``compare_omniglot_5w1s*.json`` are kept in benchmarks/results/training_logs/ (copied from
the runs' folders); by default this plots all the 5w1s ones, with the 95% CI over the
validation tasks as a band. Writes benchmarks/results/{--out}.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from metalearn.checkpoint import atomic_write  # noqa: E402


def validation_curve(path: Path) -> tuple[list[int], list[float], list[float]]:
    """(iterations, accuracies, CI half-widths) of the log's validation records."""
    its, acc, ci = [], [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; train() trims these on resume
        if record.get("split") == "val":
            its.append(record["iteration"])
            acc.append(100 * record["accuracy"])
            ci.append(100 * record.get("ci95", 0.0))
    return its, acc, ci


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="*", type=Path)
    parser.add_argument("--out", default="learning_curves_omniglot_5w1s")
    args = parser.parse_args()
    logs = args.logs or sorted((RESULTS / "training_logs").glob("omniglot_5w1s_*.jsonl"))
    if not logs:
        parser.error("no logs given and none in benchmarks/results/training_logs/")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for path in logs:
        its, acc, ci = validation_curve(path)
        if not its:
            print(f"{path}: no validation records, skipped")
            continue
        name = path.stem.removeprefix("omniglot_5w1s_")
        (line,) = ax.plot(its, acc, marker=".", label=name)
        ax.fill_between(its, [a - c for a, c in zip(acc, ci)], [a + c for a, c in zip(acc, ci)],
                        color=line.get_color(), alpha=0.15)
        print(f"{name:10s} " + "  ".join(f"{i}:{a:.1f}" for i, a in zip(its, acc)))
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("validation accuracy % (95% CI band)")
    ax.set_title("Omniglot 5-way 1-shot, reduced budgets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{args.out}.png"
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
