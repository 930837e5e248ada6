"""The metalearn command: help, exit codes, train/eval/bench end to end."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "metalearn", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "MPLBACKEND": "Agg"})


@pytest.mark.parametrize("sub", ["train", "eval", "bench"])
def test_help_on_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([sub, "--help"])
    assert exit_info.value.code == 0
    assert "usage: metalearn " + sub in capsys.readouterr().out


def test_every_option_says_what_it_means():
    """#31: --help gives every option a one-line meaning, and the descriptions print as
    written (argparse does not %-format a description, so "%%" would show as it is)."""
    import argparse

    from metalearn.cli import build_parser

    (commands,) = [a for a in build_parser()._actions
                   if isinstance(a, argparse._SubParsersAction)]
    for name, parser in commands.choices.items():
        bare = [a.option_strings or a.dest for a in parser._actions
                if not isinstance(a, argparse._HelpAction) and not a.help]
        assert not bare, f"metalearn {name}: options without help: {bare}"
        assert "%%" not in (parser.description or ""), f"metalearn {name}: '%%' in description"


@pytest.mark.parametrize("argv, message", [
    (["train", "--algorithm", "mamal"], "invalid choice: 'mamal'"),
    (["train", "--ways", "0"], "must be >= 1, got 0"),
    (["train", "--inner-lr", "-0.1"], "must be a finite number > 0"),
    (["train", "--inner-steps", "-1"], "must be >= 0, got -1"),
    (["train", "--shots", "two"], "expected an integer, got 'two'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--dataset", "omniglot", "--shots", "10", "--queries", "15"],
     "only 20 drawings"),
    (["train", "--time-limit", "2d"], "expected a duration > 0 such as 3600, 90m or 2.5h"),
    (["train", "--time-limit", "0m"], "expected a duration > 0"),
    (["bench", "--algorithms", "maml,foo"], "unknown algorithm(s) ['foo']"),
    (["bench", "--inner-steps-list", "1,x"], "expected integers"),
    (["eval"], "the following arguments are required: --checkpoint"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_flags_exit_2_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: metalearn" in err and message in err and "Traceback" not in err


def test_missing_dataset_gives_the_data_location_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["train", "--dataset", "omniglot", "--data-root", str(tmp_path / "nothing"),
                 "--iterations", "1", "--checkpoint", str(tmp_path / "c.pt")])
    err = capsys.readouterr().err
    # The advice in the command's words: its flags, not the library's arguments.
    assert code == 1 and "add --download" in err and str(tmp_path / "nothing") in err
    assert "download=True" not in err and "root=" not in err


def test_resume_without_checkpoint_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", "--checkpoint", str(tmp_path / "none.pt")])
    assert exit_info.value.code == 2


def test_train_then_eval_end_to_end(tmp_path):
    ckpt = tmp_path / "s.pt"
    r = run_cli("train", "--iterations", "40", "--val-every", "20", "--val-tasks", "10",
                "--checkpoint", str(ckpt), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "trained 40 iterations" in r.stdout
    r = run_cli("train", "--iterations", "60", "--val-every", "20", "--val-tasks", "10",
                "--checkpoint", str(ckpt), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr and "trained 60 iterations" in r.stdout
    out = tmp_path / "eval.json"
    r = run_cli("eval", "--checkpoint", str(ckpt.with_suffix(".best.pt")), "--steps", "3",
                "--tasks", "50", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["metric"] == "mse" and len(result["mean"]) == 4 and len(result["ci95"]) == 4


def test_eval_of_a_corrupt_checkpoint_exits_1_without_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    r = run_cli("eval", "--checkpoint", str(bad))
    assert r.returncode == 1 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_bench_runs_end_to_end_on_sine(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--iterations", "20", "--tasks", "20", "--eval-steps", "2",
                "--inner-steps-list", "1,2", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    payload = json.loads(out.read_text())
    assert {"commit", "machine", "torch", "command"} <= set(payload["header"])
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert payload["header"]["malloc_reuse"] is glibc  # the CLI's default
    rows = payload["records"]
    assert {(x["algorithm"], x["train_inner_steps"]) for x in rows} == {
        (a, k) for a in ("maml", "fomaml", "reptile") for k in (1, 2)}
    for x in rows:
        assert {"mse", "ci95", "saved_bytes", "cuda_peak_bytes", "seconds_per_iteration"} <= set(x)
        assert x["cuda_peak_bytes"] is None
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "algorithm" in r.stdout and "maml" in r.stdout
    # The two meanings of steps are apart: test-time steps (capped by --eval-steps) and
    # the profiled meta-iteration's inner steps.
    assert "after test steps" in r.stdout and "a meta-iteration with inner steps" in r.stdout
    assert {x["test_steps"] for x in rows} == {1, 2}


def test_misspelled_and_abbreviated_flags_get_the_subcommand_usage(capsys):
    from metalearn.cli import build_parser, main

    for argv in (["train", "--iteration", "50"], ["bench", "--bogus"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"usage: metalearn {argv[0]}" in err and "unrecognized arguments" in err
    assert build_parser().parse_args(["bench"]).out == Path("runs") / "bench_results.json"


def test_no_malloc_reuse_leaves_the_allocator_alone(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--iterations", "2", "--tasks", "5", "--eval-steps", "1",
                "--inner-steps-list", "1", "--algorithms", "fomaml", "--out", str(out),
                "--no-progress", "--no-malloc-reuse")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["header"]["malloc_reuse"] is False


def test_time_limit_stops_train_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from tests.test_training import SecondPerIteration

    SecondPerIteration(monkeypatch)
    ckpt = tmp_path / "run.pt"
    argv = ["train", "--dataset", "sine", "--iterations", "30", "--val-every", "10",
            "--val-tasks", "10", "--no-progress", "--checkpoint", str(ckpt)]
    assert main([*argv, "--time-limit", "0.25m"]) == 0  # 15 s: stops at validation 20
    out = capsys.readouterr().out
    assert "trained 20 iterations" in out
    assert f"stopped at --time-limit after iteration 20 of 30; continue with --resume " \
           f"--checkpoint {ckpt}" in out
    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 30 iterations" in out and "--time-limit" not in out
