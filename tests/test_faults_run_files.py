"""Issue #33 for a run's files: one run per checkpoint path (lock, no silent overwrite),
the path checked before training, temp files of a killed save removed. Each test fails on
the code before the issue; two use real processes (two runs at once, a kill mid-save)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from metalearn import training
from metalearn.checkpoint import load_checkpoint
from metalearn.cli import main
from metalearn.training import train

FAST = dict(dataset="sine", iterations=20, val_every=10, val_tasks=10, meta_batch=5)
CLI_FAST = ["train", "--iterations", "20", "--val-every", "10", "--val-tasks", "10",
            "--meta-batch", "5", "--no-progress", "--no-malloc-reuse"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def refuse_to_build(monkeypatch):
    """Make any training that gets past the path checks fail loudly."""
    def built(*args, **kwargs):
        raise AssertionError("training started: the model was built")

    monkeypatch.setattr(training, "build_model", built)


# --- one run per checkpoint path --------------------------------------------------------


def test_fresh_run_on_an_existing_run_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "a.pt"
    train(progress=False, checkpoint=path, **FAST)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"checkpoint=.*a\.pt already holds a run \(a\.pt, "
                                         r"a\.best\.pt, a\.jsonl\); pass resume=True"):
        train(progress=False, checkpoint=path, **FAST)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    result = train(progress=False, checkpoint=path, overwrite=True, **{**FAST, "seed": 1})
    records = [json.loads(x) for x in path.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["split"] == "val"] == [10, 20]  # not appended
    assert load_checkpoint(path.with_suffix(".best.pt"))["best"] == result.best
    assert load_checkpoint(path)["config"]["seed"] == 1
    with pytest.raises(ValueError, match="contradict"):
        train(progress=False, checkpoint=path, resume=True, overwrite=True, **FAST)


def test_cli_fresh_run_on_an_existing_run_exits_2_naming_the_flags(tmp_path, capsys):
    path = tmp_path / "a.pt"
    assert main([*CLI_FAST, "--checkpoint", str(path)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*CLI_FAST, "--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"metalearn train: error: --checkpoint {path} already holds a run" in err
    assert "--resume to continue it, --overwrite to replace it" in err
    assert main([*CLI_FAST, "--checkpoint", str(path), "--overwrite"]) == 0


def test_a_second_run_on_a_locked_path_is_refused_naming_the_holder(tmp_path, monkeypatch):
    from metalearn.run_files import CheckpointBusyError, claim_checkpoint, lock_path

    path = tmp_path / "a.pt"
    refuse_to_build(monkeypatch)
    with claim_checkpoint(path):  # held as a running train() holds it
        assert lock_path(path).read_text().strip() == str(os.getpid())
        with pytest.raises(CheckpointBusyError, match=rf"in use by another run \(PID "
                                                      rf"{os.getpid()}, lock file"):
            train(progress=False, checkpoint=path, **FAST)
    assert listing(tmp_path) == []  # the lock file goes with the lock


def test_two_concurrent_processes_on_one_checkpoint(tmp_path):
    path = tmp_path / "a.pt"
    lock = tmp_path / "a.pt.lock"
    args = [sys.executable, "-m", "metalearn", "train", "--iterations", "100000",
            "--val-every", "5", "--val-tasks", "5", "--meta-batch", "5", "--no-progress",
            "--checkpoint", str(path)]
    first = subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) or not path.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        assert lock.read_text().strip() == str(first.pid)
        t0 = time.time()
        second = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert f"in use by another run (PID {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert time.time() - t0 < 60  # refused at once, not after training
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead run's lock: a resume starts at once, the stale file is reused.
    assert lock.exists()
    assert args[5] == "100000"
    resumed = subprocess.run([*args[:5], "20", *args[6:], "--resume"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # One run's log: each record once, in order (two runs' logs would interleave).
    records = [(r["iteration"], r["split"]) for r in map(
        json.loads, path.with_suffix(".jsonl").read_text().splitlines())]
    assert records == sorted(set(records), key=lambda r: (r[0], r[1] == "val"))
    assert not lock.exists()


# --- paths checked before training ------------------------------------------------------


def bad_paths(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    return {
        "directory": (tmp_path / "folder", "names a directory"),
        "parent is a file": (tmp_path / "file" / "sub" / "a.pt", "is a file, not a folder"),
        "name too long": (tmp_path / ("n" * 237 + ".pt"), "the file name is 240 bytes"),
        "checkpoint named like its log": (tmp_path / "a.jsonl", "same file as the log"),
    }


CASES = ["directory", "parent is a file", "name too long", "checkpoint named like its log"]


@pytest.mark.parametrize("case", CASES)
def test_bad_path_is_a_clear_error_before_training(tmp_path, monkeypatch, case):
    path, message = bad_paths(tmp_path)[case]
    before = listing(tmp_path)
    refuse_to_build(monkeypatch)
    with pytest.raises(ValueError, match=message) as info:
        train(progress=False, checkpoint=path, **FAST)
    assert f"checkpoint={path}" in str(info.value)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("resume", [False, True])
def test_cli_bad_path_exits_2_before_training(tmp_path, monkeypatch, capsys, case, resume):
    path, message = bad_paths(tmp_path)[case]
    before = listing(tmp_path)
    refuse_to_build(monkeypatch)
    with pytest.raises(SystemExit) as info:
        main([*CLI_FAST, "--checkpoint", str(path), *(["--resume"] if resume else [])])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert f"metalearn train: error: --checkpoint {path}" in err and message in err
    assert "Traceback" not in err and listing(tmp_path) == before


def test_read_only_folder_is_a_clear_error_before_training(tmp_path, monkeypatch, capsys):
    from metalearn import run_files

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the folder read-only for the check
        real = os.access
        monkeypatch.setattr(run_files.os, "access", lambda p, *a, **k: str(p) != str(folder)
                            and real(p, *a, **k))
    refuse_to_build(monkeypatch)
    try:
        with pytest.raises(ValueError, match=rf"checkpoint={folder}/a.pt: the folder {folder} "
                                             "is not writable"):
            train(progress=False, checkpoint=folder / "a.pt", **FAST)
        with pytest.raises(SystemExit) as info:
            main([*CLI_FAST, "--checkpoint", str(folder / "sub" / "a.pt")])
        assert info.value.code == 2
        assert "choose another --checkpoint" in capsys.readouterr().err
        assert listing(folder) == []
    finally:
        folder.chmod(0o755)


def test_unwritable_folder_found_by_the_probe_leaves_no_folders(tmp_path, monkeypatch):
    # What only writing can tell (a read-only mount, say): the probe's temp file fails.
    from metalearn import run_files

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_files.tempfile, "mkstemp", no_space)
    refuse_to_build(monkeypatch)
    with pytest.raises(ValueError, match="cannot write in .*No space left on device"):
        train(progress=False, checkpoint=tmp_path / "new" / "deeper" / "a.pt", **FAST)
    assert listing(tmp_path) == []


# --- temp files of a killed save ---------------------------------------------------------


KILL_DURING_SECOND_SAVE = """
import os, signal, sys, torch
real = torch.save
def save(obj, f, *a, **k):
    if obj.get("iteration") == 20 and "optimizer" in obj:  # the latest state at iteration 20
        f.write(b"partial")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
import metalearn
metalearn.train(dataset="sine", iterations=30, val_every=10, val_tasks=10, meta_batch=5,
                progress=False, checkpoint=sys.argv[1])
"""


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    path = tmp_path / "a.pt"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, str(path)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    orphans = [p for p in listing(tmp_path) if p.endswith(".tmp")]
    assert len(orphans) == 1 and orphans[0].startswith(".a.pt.")
    assert load_checkpoint(path)["iteration"] == 10
    resumed = train(progress=False, checkpoint=path, resume=True, **{**FAST, "iterations": 30})
    assert resumed.iteration == 30
    assert listing(tmp_path) == ["a.best.pt", "a.jsonl", "a.pt"]


def test_a_result_header_says_when_the_code_differs_from_its_commit(tmp_path, monkeypatch):
    # A copy of run_record.py in a repository of its own: committed, then edited.
    import shutil

    from metalearn import run_record
    repo = tmp_path / "repo"
    repo.mkdir()
    copy = repo / "run_record.py"
    shutil.copy(run_record.__file__, copy)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(run_record, "__file__", str(copy))
    clean = run_record.run_header([])
    assert clean["commit"] and clean["uncommitted_changes"] is False
    results = repo / "benchmarks" / "results" / "r.json"
    results.parent.mkdir(parents=True)
    results.write_text("{}")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "a result"], check=True)
    results.write_text('{"rewritten": true}')  # an output of a benchmark, not code
    assert run_record.run_header([])["uncommitted_changes"] is False
    copy.write_text(copy.read_text() + "\n# edited\n")
    (repo / "untracked.txt").write_text("not part of the code")
    assert run_record.run_header([])["uncommitted_changes"] is True
