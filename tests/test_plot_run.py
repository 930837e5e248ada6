"""metalearn plot: a run's curves from its JSON-lines log."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import metalearn
from metalearn.cli import main
from metalearn.plot_run import RunLogError, read_run_log


def _png_size(path):
    with Image.open(path) as img:
        return img.format, img.size


def test_plot_draws_the_log_that_train_writes(tmp_path, capsys):
    ckpt = tmp_path / "sine.pt"
    metalearn.train(dataset="sine", iterations=20, val_every=10, val_tasks=10,
                    checkpoint=ckpt, progress=False, log_every=5)
    assert main(["plot", str(ckpt.with_suffix(".jsonl"))]) == 0
    png = ckpt.with_suffix(".png")
    assert f"plot: {png}" in capsys.readouterr().out
    fmt, (w, h) = _png_size(png)
    assert fmt == "PNG" and w > 500 and h > 200


def test_plot_overlays_runs_with_labels(tmp_path):
    logs = []
    for name, acc in (("a", 0.5), ("b", 0.7)):
        log = tmp_path / f"{name}.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in [
            {"iteration": 50, "split": "train", "loss": 1.0, "accuracy": acc},
            {"iteration": 100, "split": "val", "accuracy": acc, "ci95": 0.02, "steps": 3},
            {"iteration": 200, "split": "val", "accuracy": acc + 0.1, "ci95": 0.02, "steps": 3},
        ]))
        logs.append(str(log))
    out = tmp_path / "figs" / "both.png"
    assert main(["plot", *logs, "--labels", "maml,fomaml", "--out", str(out)]) == 0
    assert _png_size(out)[0] == "PNG"


def test_a_cut_last_line_is_skipped_and_an_empty_log_refused(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text(json.dumps({"iteration": 10, "split": "val", "mse": 1.0}) + "\n{\"iter")
    train, val = read_run_log(log)
    assert (len(train), len(val)) == (0, 1)
    log.write_text("not json\n")
    with pytest.raises(RunLogError, match="holds no training or validation records"):
        read_run_log(log)


def test_plot_errors_name_the_cause(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["plot", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "no run log at" in err and "RUN.jsonl" in err
    assert not missing.with_suffix(".png").exists()
    log = tmp_path / "run.jsonl"
    log.write_text(json.dumps({"iteration": 10, "split": "val", "mse": 1.0}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(log), "--labels", "a,b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: metalearn plot" in err and "2 labels for 1 logs" in err
