"""Training and validation curves of runs, drawn from their JSON-lines logs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from metalearn.checkpoint import atomic_write


class RunLogError(ValueError):
    """A run log that cannot be plotted: missing, unreadable, or without records."""


def read_run_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """The train and validation records of a run's JSON-lines log (``<checkpoint>.jsonl``).

    A last line cut short by a kill is skipped, as :func:`metalearn.train` does on resume.

    Raises:
        RunLogError: the file is missing, or holds no train or validation records.

    Example:
        >>> import json, tempfile, pathlib
        >>> from metalearn.plot_run import read_run_log
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "run.jsonl"
        >>> _ = log.write_text(json.dumps({"iteration": 10, "split": "train", "loss": 1.0})
        ...                    + "\\n" + '{"iteration": 20, "spl')
        >>> train, val = read_run_log(log)
        >>> len(train), len(val)
        (1, 0)
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise RunLogError(f"no run log at {path}; a run trained with --checkpoint RUN.pt "
                          "writes its log to RUN.jsonl beside it") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RunLogError(f"cannot read the run log {path}: {err}") from None
    train, val = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "iteration" in record:
            {"train": train, "val": val}.get(record.get("split"), []).append(record)
    if not train and not val:
        raise RunLogError(f"{path} holds no training or validation records; is it the "
                          "JSON-lines log of a metalearn run (<checkpoint>.jsonl)?")
    return train, val


def _metric(records: list[dict]) -> str | None:
    for name in ("accuracy", "mse"):
        if any(name in r for r in records):
            return name
    return None


def _scaled(name: str, value: float) -> float:
    return 100.0 * value if name == "accuracy" else value


def plot_runs(logs: list[str | os.PathLike], out: str | os.PathLike,
              labels: list[str] | None = None) -> Path:
    """Draw the training loss and the validation metric (with its 95% CI) of each run.

    Left: the training query loss against meta-iterations. Right: the validation accuracy
    (in %) or MSE against meta-iterations, with the CI as a band. Several logs overlay, so
    runs compare at a glance. The PNG is written atomically.

    Args:
        logs: JSON-lines logs (``<checkpoint>.jsonl``, written by :func:`metalearn.train`).
        out: the PNG to write.
        labels: one legend label per log (default: each file's stem).

    Returns:
        The path of the PNG.

    Raises:
        RunLogError: a log is missing or holds no records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not logs:
        raise RunLogError("give at least one run log")
    labels = labels or [Path(p).stem for p in logs]
    if len(labels) != len(logs):
        raise RunLogError(f"{len(labels)} labels for {len(logs)} logs; give one per log")
    runs = [(label, *read_run_log(p)) for label, p in zip(labels, logs)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    val_metric = None
    for label, train, val in runs:
        points = [(r["iteration"], r["loss"]) for r in train
                  if "loss" in r and math.isfinite(r["loss"])]
        if points:
            ax1.plot(*zip(*points), label=label, linewidth=1)
        name = _metric(val)
        if name is None:
            continue
        val_metric = val_metric or name
        rows = [r for r in val if name in r]
        its = [r["iteration"] for r in rows]
        mean = [_scaled(name, r[name]) for r in rows]
        ci = [_scaled(name, r.get("ci95", 0.0)) for r in rows]
        steps = {r.get("steps") for r in rows} - {None}
        suffix = f" ({', '.join(map(str, sorted(steps)))} steps)" if steps else ""
        line, = ax2.plot(its, mean, marker=".", label=label + suffix)
        ax2.fill_between(its, [m - c for m, c in zip(mean, ci)],
                         [m + c for m, c in zip(mean, ci)], color=line.get_color(), alpha=0.2)
    ax1.set_xlabel("meta-iteration")
    ax1.set_ylabel("training query loss")
    ax1.set_title("training")
    ax2.set_xlabel("meta-iteration")
    ax2.set_ylabel({"accuracy": "validation accuracy (%)", "mse": "validation MSE",
                    None: "validation"}[val_metric])
    ax2.set_title("validation (mean, 95% CI)")
    for ax in (ax1, ax2):
        if ax.has_data():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out
