"""Try every bad input we know of and print the message each gets, as a Markdown table.

    python benchmarks/bad_inputs.py > benchmarks/results/bad_inputs.md

The README's bad-input table is this output; tests/ checks each case separately.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from metalearn import MAML, Reptile
from metalearn.checkpoint import load_checkpoint, save_checkpoint
from metalearn.data import OmniglotTasks, SineTasks, TaskBatch
from metalearn.models import MLP, Conv4


def python_case(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the point is to show what is raised
        return f"{type(err).__name__}: " + " ".join(str(err).split())
    return "(no error)"


def cli_case(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "metalearn", *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    err = r.stderr.strip().splitlines()
    # Skip the (wrapped) usage text: the message starts at the line naming the error.
    start = next((i for i, x in enumerate(err) if "error:" in x), 0)
    msg = " ".join(x.strip() for x in err[start:] if x.strip())
    return f"exit {r.returncode}: {msg}"


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    data = Path(os.environ.get("METALEARN_DATA", "../shared/data")) / "omniglot"
    truncated = tmp / "trunc" / "omniglot"
    truncated.mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        raw = (data / name).read_bytes()
        (truncated / name).write_bytes(raw[: len(raw) // 3])
    slip = tmp / "slip" / "omniglot"
    slip.mkdir(parents=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("images_background/../../evil.png", b"x")
    (slip / "images_background.zip").write_bytes(buf.getvalue())
    (slip / "images_evaluation.zip").write_bytes((data / "images_evaluation.zip").read_bytes())
    save_checkpoint(tmp / "sine.pt", {"format": 1, "config": {"dataset": "sine"},
                                      "model": MLP().state_dict(), "iteration": 1})
    (tmp / "corrupt.pt").write_bytes(b"\x00" * 64)
    good = sys.argv[1] if len(sys.argv) > 1 else None

    cases = [
        ("ways larger than the split", lambda: OmniglotTasks(split="val", ways=200)),
        ("shots + queries > 20", lambda: OmniglotTasks(shots=10, queries=15)),
        ("zero shots", lambda: SineTasks(shots=0)),
        ("negative ways", lambda: OmniglotTasks(ways=-5)),
        ("unknown split", lambda: OmniglotTasks(split="testing")),
        ("missing data (wrong root)", lambda: OmniglotTasks(root=tmp / "nowhere")),
        ("truncated zip", lambda: OmniglotTasks(root=tmp / "trunc")),
        ("zip-slip entry", lambda: OmniglotTasks(root=tmp / "slip")),
        ("TaskBatch with mismatched tasks", lambda: TaskBatch(
            torch.zeros(4, 5, 1), torch.zeros(4, 5, 1), torch.zeros(3, 5, 1),
            torch.zeros(3, 5, 1))),
        ("labels out of range", lambda: MAML(Conv4(3), 0.4, 1).step(TaskBatch(
            torch.zeros(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
            torch.zeros(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1)))),
        ("inner_lr = 0", lambda: MAML(MLP(), 0.0, 1)),
        ("inner_steps = -1", lambda: MAML(MLP(), 0.01, -1)),
        ("unknown flood_mode", lambda: MAML(MLP(), 0.01, 1, flood_mode="sample")),
        ("negative flood level", lambda: MAML(MLP(), 0.01, 1, inner_flood=-0.5)),
        ("NaN flood level", lambda: MAML(MLP(), 0.01, 1, inner_flood=float("nan"))),
        ("Reptile inner_batch > support", lambda: Reptile(MLP(), 0.01, 1, inner_batch=50)
         .step(SineTasks().sample(2))),
        ("model with no trainable parameters", lambda: MAML(MLP().requires_grad_(False),
                                                            0.01, 1)),
        ("corrupt checkpoint", lambda: load_checkpoint(tmp / "corrupt.pt")),
    ]
    rows = [(what, python_case(fn)) for what, fn in cases]
    rows += [
        ("CLI: unknown algorithm", cli_case("train", "--algorithm", "mamal")),
        ("CLI: --ways 0", cli_case("train", "--ways", "0")),
        ("CLI: --inner-lr -1", cli_case("train", "--inner-lr", "-1")),
        ("CLI: --inner-steps -2", cli_case("train", "--inner-steps", "-2")),
        ("CLI: --shots 10 --queries 15 on omniglot", cli_case(
            "train", "--dataset", "omniglot", "--shots", "10", "--queries", "15",
            "--iterations", "1", "--checkpoint", str(tmp / "x.pt"))),
        ("CLI: unknown flag", cli_case("train", "--bogus")),
        ("CLI: wrong data root", cli_case("train", "--dataset", "omniglot", "--data-root",
                                          str(tmp / "nowhere"), "--iterations", "1",
                                          "--checkpoint", str(tmp / "y.pt"))),
        ("CLI: corrupt checkpoint", cli_case("eval", "--checkpoint", str(tmp / "corrupt.pt"))),
        ("CLI: checkpoint of another config", cli_case(
            "train", "--inner-lr", "0.05", "--iterations", "2", "--checkpoint",
            str(good), "--resume") if good else "(pass a checkpoint path to try this)"),
    ]
    print("| bad input | what you get |")
    print("|---|---|")
    for what, msg in rows:
        msg = msg.replace("|", "\\|").replace(str(tmp), "<tmp>")
        print(f"| {what} | {msg} |")


if __name__ == "__main__":
    main()
