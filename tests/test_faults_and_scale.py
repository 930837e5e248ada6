"""Multi-process meta-batches (torchrun, gloo) and surviving a real SIGKILL or Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metalearn.checkpoint import CheckpointError, load_checkpoint
from metalearn.models import MLP

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def cli(*args, ranks=None, timeout=300):
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "metalearn", *args]
    else:
        cmd = [sys.executable, "-m", "metalearn", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def final_params(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("algorithm, extra", [
    ("maml", []),
    # The batch outer flood turns on the whole meta-batch's mean: the ranks all-reduce it
    # (a level below the mean of a 2-task shard, and above the meta-batch's, at times).
    ("maml", ["--outer-flood", "6"]),
    ("reptile", ["--inner-batch", "4", "--schedule", "constant"]),
    # Adam's state carried across tasks: the ranks fold their tasks' terms together.
    ("reptile", ["--inner-batch", "4", "--schedule", "constant", "--inner-optimizer", "adam",
                 "--inner-lr", "0.001", "--outer-lr", "1.0"]),
])
def test_two_gloo_ranks_equal_one_process(tmp_path, algorithm, extra):
    args = ["train", "--algorithm", algorithm, "--iterations", "8", "--meta-batch", "5",
            "--val-every", "4", "--val-tasks", "7", "--no-progress", *extra]
    one = cli(*args, "--checkpoint", str(tmp_path / "one.pt"))
    assert one.returncode == 0, one.stderr
    two = cli(*args, "--checkpoint", str(tmp_path / "two.pt"), ranks=2)
    assert two.returncode == 0, two.stderr
    a, b = final_params(tmp_path / "one.pt"), final_params(tmp_path / "two.pt")
    torch.manual_seed(0)  # the run's initial weights: seed 0, then the model is built
    initial = MLP().state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    assert max((a[n] - initial[n]).abs().max().item() for n in a) > 1e-3  # training moved
    # Only rank 0 wrote: one log, no stray files from rank 1.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["one.pt", "one.best.pt", "one.jsonl", "two.pt", "two.best.pt", "two.jsonl"])
    lines = (tmp_path / "two.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one.jsonl").read_text().splitlines())
    # The ranks validated 4 and 3 of the 7 tasks; the gathered result is one process's.
    def val(name):
        records = [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
        return [(r["iteration"], r["mse"], r["ci95"]) for r in records if r["split"] == "val"]
    assert len(val("one.jsonl")) == 2
    for (i, m, c), (j, n, d) in zip(val("one.jsonl"), val("two.jsonl"), strict=True):
        assert i == j and n == pytest.approx(m, rel=1e-5) and d == pytest.approx(c, rel=1e-4)


def wait_for_checkpoint(path, at_least, proc, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if load_checkpoint(path)["iteration"] >= at_least:
                return
        except CheckpointError:
            pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


TRAIN = ["train", "--iterations", "150", "--meta-batch", "100", "--inner-steps", "3",
         "--val-every", "10", "--val-tasks", "10", "--no-progress"]


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "killed.pt"
    proc = subprocess.Popen([sys.executable, "-m", "metalearn", *TRAIN, "--checkpoint",
                             str(ckpt)], env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(ckpt, 30, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["iteration"]
    assert 30 <= killed_at < 150, killed_at  # really interrupted mid-way
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = cli(*TRAIN, "--checkpoint", str(ckpt), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    clean = cli(*TRAIN, "--checkpoint", str(tmp_path / "clean.pt"))
    assert clean.returncode == 0, clean.stderr
    a, b = final_params(ckpt), final_params(tmp_path / "clean.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # The log holds every record once, as an uninterrupted run's does.
    def records(path):
        return [(r["iteration"], r["split"], r.get("loss"), r.get("mse"))
                for r in map(json.loads, path.read_text().splitlines())]

    assert records(tmp_path / "killed.jsonl") == records(tmp_path / "clean.jsonl")


def test_ctrl_c_keeps_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "int.pt"
    # A shell's background job (nohup ... &) starts with SIGINT ignored, and Python keeps an
    # ignored SIGINT: give the child the default disposition, as a terminal's would have.
    proc = subprocess.Popen([sys.executable, "-m", "metalearn", *TRAIN, "--checkpoint",
                             str(ckpt)], env=ENV, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_checkpoint(ckpt, 10, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert load_checkpoint(ckpt)["iteration"] >= 10
