"""benchmarks/reptile_ablations.py: a run stopped part-way continues from its last
validation exactly as if it had not stopped."""

from __future__ import annotations

import pytest
import torch

from benchmarks import reptile_ablations as ra
from benchmarks.common import cpu_shared_within


class Stop(Exception):
    pass


def test_a_stopped_run_continues_exactly(omniglot_images, tmp_path, monkeypatch):
    (run,) = [r for r in ra.study_d_runs() if r.name == "fomaml-shared-cycle-k2-b25"]
    val = ra.eval_tasks("val", 2, 1, seed=1)
    test = ra.eval_tasks("test", 2, 1, seed=2)
    key = {"commit": "abc", "device": "cpu", "compile": False, "val_tasks": 2}

    def train(partial=None, partial_key=key):
        return ra.train_run(run, 0, 6, val, test, 2, "cpu", 1, partial, partial_key)

    whole = train()
    partial = tmp_path / "run.pt"
    sample, calls = ra.PoolSampler.sample, []

    def stop_at_the_fifth_iteration(self, n):
        calls.append(n)
        if len(calls) == 5:
            raise Stop
        return sample(self, n)

    with monkeypatch.context() as m:
        m.setattr(ra.PoolSampler, "sample", stop_at_the_fifth_iteration)
        with pytest.raises(Stop):
            train(partial)
    assert torch.load(partial, weights_only=False)["iteration"] == 4  # the last validation
    resumed = train(partial)
    assert not partial.exists()  # gone once the run is done
    assert resumed["test"] == whole["test"]
    for a, b in zip(resumed["curve"], whole["curve"], strict=True):
        assert (a["iteration"], a["accuracy"], a["train_loss"]) == (
            b["iteration"], b["accuracy"], b["train_loss"])

    # A state saved under other settings (another commit, say) is not continued.
    with monkeypatch.context() as m:
        calls.clear()
        m.setattr(ra.PoolSampler, "sample", stop_at_the_fifth_iteration)
        with pytest.raises(Stop):
            train(partial)
    other = train(partial, {**key, "commit": "def"})
    assert other["test"] == whole["test"] and not partial.exists()


def test_cpu_sharing_counts_the_minutes_within_the_runs_segments():
    cpu = [{"utc": f"2026-01-01T00:0{m}:00+00:00", "seconds": 60.0, "other_cores": o}
           for m, o in enumerate([0.0, 1.0, 1.0, 0.0, 0.1, 1.5])]
    segments = [["2026-01-01T00:00:30+00:00", "2026-01-01T00:02:00+00:00"],  # minutes 1, 2
                ["2026-01-01T00:03:00+00:00", "2026-01-01T00:04:10+00:00"]]  # minutes 3, 4
    assert cpu_shared_within(cpu, segments) == 0.5
    assert cpu_shared_within(cpu, [["2026-01-02T00:00:00+00:00"] * 2]) is None


def test_workers_train_the_same_runs_as_one_process(omniglot_images, tmp_path):
    """``--workers 2`` trains the runs two at a time in single-threaded processes: the same
    runs, in the plan's order in the file, with the same results up to float rounding."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(ra.__file__)
    out = {}
    for workers in (1, 2):
        subprocess.run([sys.executable, str(script), "--quick", "--study", "d",
                        "--configs", "fomaml-*-cycle-k2-b25", "--workers", str(workers),
                        "--out-dir", str(tmp_path / f"w{workers}")],
                       check=True, capture_output=True)
        out[workers] = json.loads((tmp_path / f"w{workers}" / "reptile_ablations_d.json")
                                  .read_text())
    one, two = out[1], out[2]
    assert (two["header"]["workers"], two["header"]["threads"]) == (2, 1)
    assert [r["config"] for r in two["results"]] == [r["config"] for r in one["results"]] == [
        "fomaml-shared-cycle-k2-b25", "fomaml-separate-cycle-k2-b25"]
    for a, b in zip(one["results"], two["results"], strict=True):
        assert a["test"]["accuracy"] == pytest.approx(b["test"]["accuracy"], abs=1e-6)
        for ca, cb in zip(a["curve"], b["curve"], strict=True):
            assert ca["train_loss"] == pytest.approx(cb["train_loss"], rel=1e-4)


def test_the_cpu_monitor_counts_its_workers_as_its_own(tmp_path):
    """A study's worker processes (and theirs) are its own work: their CPU time is not
    "other"."""
    import os
    import subprocess
    import sys
    import time

    from benchmarks.common import CpuMonitor

    flag, stop = tmp_path / "done", tmp_path / "stop"
    busy = ("import time, pathlib\n"
            "while time.process_time() < 0.5: pass\n"
            f"pathlib.Path({str(flag)!r}).touch()\n"
            "end = time.monotonic() + 60\n"
            f"while not pathlib.Path({str(stop)!r}).exists() and time.monotonic() < end:\n"
            "    time.sleep(0.05)\n")
    before = CpuMonitor._own()
    # The busy process is a grandchild, as a worker's compiler processes are.
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                              f"subprocess.run([sys.executable, '-c', {busy!r}])"])
    try:
        for _ in range(600):
            if flag.exists():
                break
            time.sleep(0.1)
        after = CpuMonitor._own()  # the child is alive: its time is counted live
    finally:
        stop.touch()
        child.wait(timeout=60)
    assert (after - before) / os.sysconf("SC_CLK_TCK") >= 0.4


def test_status_says_which_runs_are_done_in_progress_or_to_do(tmp_path):
    import argparse
    import json

    args = argparse.Namespace(configs="fomaml-*-cycle-k2-b25", out_dir=tmp_path, name="s")
    (tmp_path / "s.json").write_text(json.dumps({"results": [
        {"config": "fomaml-shared-cycle-k2-b25", "seed": 0,
         "test": {"accuracy": [0.2, 0.5], "ci95": [0.01, 0.02]}}]}))
    (tmp_path / "s.partial").mkdir()
    torch.save({"iteration": 4, "key": {"iterations": 10}},
               tmp_path / "s.partial" / "fomaml-separate-cycle-k2-b25-seed0.pt")
    lines = [" ".join(line.split()) for line in ra.status(args, "d", [0, 1]).splitlines()]
    assert lines[1:] == [
        "fomaml-shared-cycle-k2-b25 seed 0: done, test 50.00 ± 2.00%",
        "fomaml-separate-cycle-k2-b25 seed 0: at iteration 4 of 10",
        "fomaml-shared-cycle-k2-b25 seed 1: to do",
        "fomaml-separate-cycle-k2-b25 seed 1: to do",
        "3 not done"]
