"""Try every bad input we know of and print the message each gets, as a Markdown table.

    python benchmarks/bad_inputs.py > benchmarks/results/bad_inputs.md

The bad-input table of docs/faults.md is this output; tests/ checks each case separately.
Root may write in a read-only folder, so run as root the read-only-folder case runs the
command in this process with ``os.access`` denying that folder, as it is for other users.
Paths under the temporary folder print as <tmp>, process ids as <pid>.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from metalearn import ANIL, MAML, Reptile, train
from metalearn.checkpoint import load_checkpoint, save_checkpoint
from metalearn.data import OmniglotTasks, SineTasks, TaskBatch
from metalearn.data.array_cache import digest_path, load_array, save_array
from metalearn.models import MLP, Conv4
from metalearn.run_files import claim_checkpoint


class _ReturnsTuple(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.fc(x), x


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(1, 8), torch.nn.Linear(8, 1)

    def forward(self, x):
        h = self.body(x)
        return self.head(torch.relu(h) if h.mean() > 0 else h)


def _one_query_into_batch_norm():
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 1))
    maml, batch = MAML(model, 0.01, 1), SineTasks().sample(1)
    maml.predict(maml.adapt(batch.support_x[0], batch.support_y[0]), batch.query_x[0, :1])


def python_case(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the point is to show what is raised
        return f"{type(err).__name__}: " + " ".join(str(err).split())
    return "(no error)"


def warning_case(fn) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return "; ".join(f"{w.category.__name__}: {w.message}" for w in caught) or "(no warning)"


def read_only_case(folder: Path, *args: str) -> str:
    """The command on a read-only ``folder``; as root (who may write there anyway) run in
    this process with ``os.access`` saying what it says to other users."""
    if os.geteuid() != 0:
        return cli_case(*args)
    from metalearn.cli import main

    real, err = os.access, io.StringIO()
    os.access = lambda p, *a, **k: str(p) != str(folder) and real(p, *a, **k)
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.access = real
    lines = err.getvalue().strip().splitlines()
    start = next((i for i, x in enumerate(lines) if "error:" in x), 0)
    return f"exit {code}: " + " ".join(x.strip() for x in lines[start:] if x.strip())


def cli_case(*args: str) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "metalearn", *args], capture_output=True,
                       text=True, timeout=300, env=env)
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
    good = sys.argv[1] if len(sys.argv) > 1 else str(tmp / "sine_maml.pt")
    if len(sys.argv) == 1:
        train(dataset="sine", iterations=2, val_every=2, val_tasks=5, progress=False,
              checkpoint=good)
    # A checkpoint with 4 bytes changed inside a tensor, and one whose weights are NaN.
    state = load_checkpoint(good)
    raw = bytearray(Path(good).read_bytes())
    at = raw.find(state["model"]["2.weight"].numpy().tobytes()) + 100
    raw[at: at + 4] = b"\x01\x02\x03\x04"
    (tmp / "edited.pt").write_bytes(bytes(raw))
    state["model"]["0.weight"].fill_(float("nan"))
    save_checkpoint(tmp / "nan.pt", state)
    # Decoded-image caches (small stand-ins for the Omniglot one): damaged in three ways.
    shape = (4, 20, 28, 28)
    for name in ("pixels", "empty", "nodigest"):
        save_array(tmp / f"{name}.npy", np.zeros(shape, np.uint8))
    raw = bytearray((tmp / "pixels.npy").read_bytes())
    raw[-20000:] = b"\xff" * 20000
    (tmp / "pixels.npy").write_bytes(bytes(raw))
    (tmp / "empty.npy").write_bytes(b"")
    digest_path(tmp / "nodigest.npy").unlink()
    (tmp / "folder").mkdir()
    (tmp / "file").write_text("x")
    readonly = tmp / "readonly"
    readonly.mkdir(mode=0o555)
    run = tmp / "run.pt"
    train(dataset="sine", iterations=2, val_every=2, val_tasks=5, progress=False,
          checkpoint=run)

    def cache(name: str):
        return lambda: load_array(tmp / f"{name}.npy", shape, np.uint8,
                                  what="the Omniglot cache", source="the zips")

    def busy() -> str:
        with claim_checkpoint(run, resume=True):  # as a running `train --resume` holds it
            return cli_case("train", "--iterations", "2", "--checkpoint", str(run))

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
        ("model that returns a tuple", lambda: MAML(_ReturnsTuple(), 0.01, 1).step(
            SineTasks().sample(2))),
        ("one query per task into BatchNorm", lambda: _one_query_into_batch_norm()),
        ("ANIL without inner_params on a model fx cannot trace", lambda: ANIL(
            _DataDependent(), 0.01, 1)),
        ("corrupt checkpoint", lambda: load_checkpoint(tmp / "corrupt.pt")),
        ("checkpoint with 4 bytes changed in a tensor", lambda: load_checkpoint(
            tmp / "edited.pt")),
        ("checkpoint with NaN weights", lambda: load_checkpoint(tmp / "nan.pt")),
        ("train(checkpoint=<a directory>)", lambda: train(
            dataset="sine", progress=False, checkpoint=tmp / "folder")),
        ("train(checkpoint=<a run's checkpoint>) without resume or overwrite", lambda: train(
            dataset="sine", progress=False, checkpoint=run)),
        ("NaN loss before the first checkpoint", lambda: train(
            dataset="sine", inner_lr=1e30, inner_steps=3, progress=False,
            checkpoint=tmp / "diverged.pt")),
    ]
    rows = [(what, python_case(fn)) for what, fn in cases]
    rows += [
        ("decoded-image cache with pixel bytes overwritten", warning_case(cache("pixels"))),
        ("decoded-image cache of 0 bytes", warning_case(cache("empty"))),
        ("decoded-image cache without its digest file", warning_case(cache("nodigest"))),
    ]
    rows += [
        ("CLI: unknown algorithm", cli_case("train", "--algorithm", "mamal")),
        ("CLI: --ways 0", cli_case("train", "--ways", "0")),
        ("CLI: --inner-lr -1", cli_case("train", "--inner-lr", "-1")),
        ("CLI: --inner-steps -2", cli_case("train", "--inner-steps", "-2")),
        ("CLI: --shots 10 --queries 15 on omniglot", cli_case(
            "train", "--dataset", "omniglot", "--shots", "10", "--queries", "15",
            "--iterations", "1", "--checkpoint", str(tmp / "x.pt"))),
        ("CLI: unknown flag", cli_case("train", "--bogus")),
        ("CLI: abbreviated flag", cli_case("train", "--iteration", "5")),
        ("CLI: an option of another algorithm", cli_case("train", "--algorithm", "maml",
                                                         "--lslr")),
        ("CLI: wrong data root", cli_case("train", "--dataset", "omniglot", "--data-root",
                                          str(tmp / "nowhere"), "--iterations", "1",
                                          "--checkpoint", str(tmp / "y.pt"))),
        ("CLI: corrupt checkpoint", cli_case("eval", "--checkpoint", str(tmp / "corrupt.pt"))),
        ("CLI: checkpoint of another config", cli_case(
            "train", "--inner-lr", "0.05", "--iterations", "2", "--checkpoint",
            str(good), "--resume")),
        ("CLI: eval of a checkpoint with NaN weights", cli_case(
            "eval", "--checkpoint", str(tmp / "nan.pt"))),
        ("CLI: --checkpoint names a directory", cli_case(
            "train", "--iterations", "2", "--checkpoint", str(tmp / "folder"))),
        ("CLI: --resume on a directory", cli_case(
            "train", "--iterations", "2", "--checkpoint", str(tmp / "folder"), "--resume")),
        ("CLI: --checkpoint under a regular file", cli_case(
            "train", "--iterations", "2", "--checkpoint", str(tmp / "file" / "run.pt"))),
        ("CLI: --checkpoint in a read-only folder", read_only_case(
            readonly, "train", "--iterations", "2", "--no-malloc-reuse", "--checkpoint",
            str(readonly / "run.pt"))),
        ("CLI: --checkpoint with a 240-byte file name", cli_case(
            "train", "--iterations", "2", "--checkpoint", str(tmp / ("n" * 237 + ".pt")))),
        ("CLI: fresh run on a --checkpoint that holds a run", cli_case(
            "train", "--iterations", "2", "--checkpoint", str(run))),
        ("CLI: --resume --overwrite", cli_case(
            "train", "--iterations", "2", "--checkpoint", str(run), "--resume", "--overwrite")),
        ("CLI: second run on a --checkpoint in use", busy()),
        ("CLI: --outer-lr 1e9 --val-every 1 (diverges)", cli_case(
            "train", "--outer-lr", "1e9", "--val-every", "1", "--val-tasks", "5",
            "--iterations", "5", "--checkpoint", str(tmp / "diverge.pt"))),
    ]
    print("| bad input | what you get |")
    print("|---|---|")
    for what, msg in rows:
        msg = msg.replace("|", "\\|").replace(str(tmp), "<tmp>").replace("n" * 237, "n…n")
        msg = re.sub(rf"PID {os.getpid()}\b", "PID <pid>", msg)
        print(f"| {what} | {msg} |")


if __name__ == "__main__":
    main()
