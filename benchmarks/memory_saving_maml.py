"""MAML with memory_saving=True against the normal mode: memory, time and gradient per inner step.

    python benchmarks/memory_saving_maml.py [--steps 1,2,...,10] [--repeats 3]
    python benchmarks/memory_saving_maml.py --quick          # steps 1,2 on 4 tasks, to /tmp

Omniglot 5-way 1-shot, Conv4, meta-batch 32, 15 queries per class, inner steps 1..10. For
each inner-step count and mode (``normal``: the unrolled second-order graph;
``memory_saving``: each inner step an autograd node that keeps only its fast weights and
recomputes its activations in the backward):

* ``saved_bytes``: the peak of what autograd saves for backward (``metalearn.memory_profile``);
* ``peak_bytes``: the true peak of allocated memory during one meta-iteration, above what
  was allocated when it started (model, batch). On CUDA ``torch.cuda.max_memory_allocated``
  minus ``memory_allocated`` before; on CPU the running sum of the allocation and free
  events that ``torch.profiler`` records with ``profile_memory=True`` (every allocation by
  torch's CPU allocator, on every thread), whose maximum is the peak;
* ``seconds_per_iteration``: the median over ``--repeats`` meta-iterations after a warm-up;
* per step count, ``max_relative_grad_difference``: the largest difference between the two
  modes' meta-gradients relative to the largest meta-gradient entry, and
  ``max_relative_grad_difference_per_tensor``: the largest of each tensor's difference
  relative to its own largest entry, over the tensors whose gradient is not rounding noise
  (largest entry above 1e-3 of the overall largest: this leaves out the conv biases in
  front of BatchNorm, whose true gradient is 0).

Writes benchmarks/results/memory_saving_maml.{json,png}; ``--quick`` writes under /tmp
unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, header, omniglot_5w1s_batch  # noqa: E402
from metalearn import MAML, TaskBatch, memory_profile  # noqa: E402
from metalearn.checkpoint import atomic_write  # noqa: E402
from metalearn.models import Conv4  # noqa: E402

MODES = {"normal": False, "memory_saving": True}
SETUP = "omniglot 5w1s Conv4, 15 queries/class"


def _step(learner: MAML, batch: TaskBatch) -> None:
    for p in learner.model.parameters():
        p.grad = None
    learner.step(batch)


def peak_bytes(learner: MAML, batch: TaskBatch) -> tuple[int | None, str]:
    """Peak bytes allocated by one ``learner.step(batch)`` above those allocated before it.

    Args:
        learner: the meta-learner; its model's grads are reset first.
        batch: a task batch on the model's device.

    Returns:
        ``(bytes, method)``; bytes is ``None`` where the profiler gives no memory events.

    Example:
        >>> from metalearn import MAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> nbytes, method = peak_bytes(MAML(MLP(), 0.01, 1), SineTasks(seed=0).sample(2))
        >>> nbytes > 0, method
        (True, 'torch.profiler memory events')
    """
    device = next(learner.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(learner, batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(learner, batch)
    try:
        # Kineto's raw "[memory]" events: +bytes per allocation, -bytes per free.
        # prof.events() would fold the allocations into their ops and lose the timeline.
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None, "unavailable"
    events.sort(key=lambda e: e.start_ns())
    running = itertools.accumulate(e.nbytes() for e in events)
    return max(itertools.chain([0], running)), "torch.profiler memory events"


def meta_gradient(learner: MAML, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """The meta-gradient of one step of ``learner`` on ``batch``, by parameter name.

    Args:
        learner: the meta-learner; its model's grads are reset first and after.
        batch: a task batch on the model's device.

    Example:
        >>> from metalearn import MAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> grads = meta_gradient(MAML(MLP(), 0.01, 1), SineTasks(seed=0).sample(2))
        >>> grads["0.weight"].shape
        torch.Size([40, 1])
    """
    _step(learner, batch)
    grads = {n: p.grad.detach().clone() for n, p in learner.model.named_parameters()}
    for p in learner.model.parameters():
        p.grad = None
    return grads


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``max |a - b|`` over all entries, relative to the largest ``|a|`` entry.

    Relative to the whole gradient, not tensor by tensor: Conv4's conv biases sit in front
    of BatchNorm, so their true gradient is 0 and their own scale is rounding noise.

    Args:
        a: the reference gradients by name.
        b: the gradients to compare, same names and shapes.

    Example:
        >>> import torch
        >>> max_relative_difference({"w": torch.tensor([2.0, 0.0])},
        ...                         {"w": torch.tensor([2.0, 0.5])})
        0.25
    """
    scale = max(g.abs().max().item() for g in a.values())
    return max((a[n] - b[n]).abs().max().item() for n in a) / scale


def max_relative_difference_per_tensor(a: dict[str, torch.Tensor],
                                       b: dict[str, torch.Tensor]) -> float:
    """The largest ``max |a_n - b_n| / max |a_n|`` over tensors ``n`` that are not ~0.

    Tensors whose largest entry is below 1e-3 of the overall largest are left out: their
    gradient is rounding noise (Conv4's conv biases in front of BatchNorm).

    Args:
        a: the reference gradients by name.
        b: the gradients to compare, same names and shapes.

    Example:
        >>> import torch
        >>> max_relative_difference_per_tensor(
        ...     {"w": torch.tensor([2.0]), "v": torch.tensor([0.5]), "c": torch.tensor([1e-9])},
        ...     {"w": torch.tensor([2.0]), "v": torch.tensor([0.25]), "c": torch.tensor([1.0])})
        0.5
    """
    scale = max(g.abs().max().item() for g in a.values())
    return max((a[n] - b[n]).abs().max().item() / a[n].abs().max().item()
               for n in a if a[n].abs().max().item() > 1e-3 * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,2,3,4,5,6,7,8,9,10")
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="steps 1,2 on 4 tasks; writes under /tmp unless --out")
    parser.add_argument("--out", type=Path, help="results JSON (the PNG goes beside it); "
                        "default benchmarks/results/memory_saving_maml.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.tasks = "1,2", 4
        args.out = args.out or Path(tempfile.gettempdir()) / "memory_saving_maml_quick.json"
    out = args.out or RESULTS / "memory_saving_maml.json"
    steps = [int(s) for s in args.steps.split(",")]
    t0 = time.perf_counter()
    device = torch.device(args.device)
    batch = omniglot_5w1s_batch(15, args.tasks).to(device)
    learners = {}
    for mode, saving in MODES.items():
        torch.manual_seed(0)  # the same initial weights in both modes
        learners[mode] = MAML(Conv4(ways=5).to(device), 0.4, 1, memory_saving=saving)

    rows, summary = [], []
    for k in steps:
        # Both modes at each k in turn, so slow drifts of the machine hit both alike.
        by_mode = {}
        for mode, learner in learners.items():
            (record,) = memory_profile(learner, batch, inner_steps=[k], repeats=args.repeats)
            learner.inner_steps = k
            peak, method = peak_bytes(learner, batch)
            by_mode[mode] = {"setup": SETUP, "meta_batch": args.tasks, "mode": mode,
                             **record, "peak_bytes": peak, "peak_method": method}
            by_mode[mode]["grads"] = meta_gradient(learner, batch)
            learner.inner_steps = 1
        normal, saving = by_mode["normal"], by_mode["memory_saving"]
        a, b = normal.pop("grads"), saving.pop("grads")
        diff, per_tensor = max_relative_difference(a, b), max_relative_difference_per_tensor(a, b)
        rows += [normal, saving]
        summary.append({
            "inner_steps": k,
            "saved_ratio": saving["saved_bytes"] / normal["saved_bytes"],
            "peak_ratio": (saving["peak_bytes"] / normal["peak_bytes"]
                           if saving["peak_bytes"] and normal["peak_bytes"] else None),
            "time_ratio": saving["seconds_per_iteration"] / normal["seconds_per_iteration"],
            "max_relative_grad_difference": diff,
            "max_relative_grad_difference_per_tensor": per_tensor,
        })
        for r in (normal, saving):
            peak = f"{r['peak_bytes'] / 2**20:8.1f}" if r["peak_bytes"] is not None else "     n/a"
            print(f"k={k:2d} {r['mode']:13s} saved {r['saved_bytes'] / 2**20:8.1f} MiB  "
                  f"peak {peak} MiB  {r['seconds_per_iteration']:.4f} s/it", flush=True)
        print(f"k={k:2d} time x{summary[-1]['time_ratio']:.2f}  "
              f"max rel grad diff {diff:.1e} (per tensor {per_tensor:.1e})", flush=True)
    h = header(seed=0)
    h["wall_seconds"] = time.perf_counter() - t0
    h["quick"] = args.quick
    h["torch_threads"] = torch.get_num_threads()
    payload = {"header": h, "rows": rows, "summary": summary}
    atomic_write(out, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    plot(rows, summary, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows: list[dict], summary: list[dict], path: Path) -> None:
    """Saved and peak MiB, and seconds per meta-iteration, against inner steps, per mode.

    Args:
        rows: the per-mode records of :func:`main`.
        summary: the per-step ratios of :func:`main`.
        path: where the PNG goes (written atomically).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> rows = [{"mode": m, "inner_steps": 1, "saved_bytes": 2**20, "peak_bytes": 2**21,
        ...          "seconds_per_iteration": 0.1, "meta_batch": 4} for m in MODES]
        >>> out = Path(tempfile.mkdtemp()) / "plot.png"
        >>> plot(rows, [{"inner_steps": 1, "time_ratio": 1.0}], out)
        >>> out.stat().st_size > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    metrics = (("saved_bytes", "saved for backward (MiB)", 2**20),
               ("peak_bytes", "peak allocated above start (MiB)", 2**20),
               ("seconds_per_iteration", "seconds per meta-iteration", 1))
    for ax, (key, title, unit) in zip(axes, metrics):
        for mode in MODES:
            sel = [r for r in rows if r["mode"] == mode and r.get(key) is not None]
            ax.plot([r["inner_steps"] for r in sel], [r[key] / unit for r in sel], marker="o",
                    label=mode)
        ax.set_title(f"{title}\n{SETUP}, meta-batch {rows[0]['meta_batch']}", fontsize=9)
        ax.set_xlabel("inner steps")
        ax.grid(alpha=0.3)
        ax.legend()
    ratio = axes[2].twinx()
    ratio.plot([s["inner_steps"] for s in summary], [s["time_ratio"] for s in summary],
               color="grey", linestyle="--", label="time ratio (right axis)")
    ratio.set_ylabel("memory_saving / normal time", color="grey")
    lines = axes[2].get_lines() + ratio.get_lines()
    axes[2].legend(lines, [line.get_label() for line in lines], loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
