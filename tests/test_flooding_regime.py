"""benchmarks/flooding_regime.py: the studies' statistics (benchmarks.common) and its selection
against hand computations, the reading of training logs, and a resumable smoke run of the
whole study on a tiny budget."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import flooding_regime as fr
from benchmarks.common import mean_ci, paired, t95


def test_paired_difference_and_its_t_interval_by_hand():
    a = {0: 0.80, 1: 0.83, 2: 0.78, 5: 0.5}  # seed 5 has no partner: left out
    b = {0: 0.79, 1: 0.80, 2: 0.79}
    d = paired(a, b)
    # differences 0.01, 0.03, -0.01: mean 0.01, sample std sqrt((0 + 0.0004 + 0.0004) / 2)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert d["mean"] == pytest.approx(0.01)
    assert d["std"] == pytest.approx(0.02)
    assert d["ci95"] == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert (d["low"], d["high"]) == pytest.approx((0.01 - d["ci95"], 0.01 + d["ci95"]))
    assert paired({0: 1.0}, {0: 0.5})["ci95"] is None  # one seed: no interval
    assert mean_ci([])["mean"] is None


@pytest.mark.parametrize("df, exact", [(1, 12.706), (3, 3.182), (11, 2.201), (20, 2.086),
                                       (30, 2.042), (100, 1.984)])
def test_t_quantiles(df, exact):
    assert t95(df) == pytest.approx(exact, abs=0.003)


def test_selection_takes_the_best_mean_over_common_seeds_and_the_smaller_level_on_ties():
    by_level = {0.0: {0: 0.5, 1: 0.6}, 0.1: {0: 0.6, 1: 0.6, 2: 0.0}, 0.2: {0: 0.6, 1: 0.6}}
    assert fr.select(by_level) == 0.1  # 0.6 = 0.6 > the others; seed 2 is not common
    assert fr.select({0.0: {0: 0.5}, 1.0: {0: 0.9}}) == 1.0
    with pytest.raises(ValueError, match="no seed"):
        fr.select({0.0: {0: 0.5}, 1.0: {1: 0.9}})


def _log():
    """Training records every 10 iterations, validations every 20; the third window's
    records carry a flooded run's query_loss (the loss before flooding)."""
    records = []
    for it, loss, acc in ((10, 2.0, 0.3), (20, 1.0, 0.5), (30, 0.8, 0.6), (40, 0.4, 0.8),
                          (50, 0.2, 0.9), (60, 0.1, 1.0)):
        records.append({"iteration": it, "split": "train", "loss": loss, "accuracy": acc})
        if it % 20 == 0:
            val = {20: 0.50, 40: 0.60, 60: 0.55}[it]
            records.append({"iteration": it, "split": "val", "accuracy": val, "ci95": 0.01})
    records[3]["query_loss"] = 0.7  # (30, ...): flooded loss 0.8, before flooding 0.7
    return records


def test_curves_average_the_training_records_between_validations():
    points = fr.curves(_log())
    assert [p["iteration"] for p in points] == [20, 40, 60]
    assert points[0]["train_loss"] == pytest.approx(1.5)
    assert points[1]["train_loss"] == pytest.approx((0.7 + 0.4) / 2)  # query_loss preferred
    assert points[2]["train_accuracy"] == pytest.approx(0.95)
    assert fr.tail_mean(_log(), fr.train_loss, fraction=0.34) == pytest.approx(0.15)
    o = fr.overfitting(points, min_drop=0.02)
    assert o["peak_iteration"] == 40 and o["drop"] == pytest.approx(0.6 - 0.55)
    assert o["overfits"] is True  # the loss keeps falling while validation falls
    assert fr.overfitting(points, min_drop=0.1)["overfits"] is False


def test_the_class_count_is_the_one_with_the_largest_drop_where_all_overfit():
    def row(algo, classes, drop, overfits=True):
        return {"algorithm": algo, "classes": classes,
                "overfitting": {"drop": drop, "overfits": overfits}}

    rows = [row("maml", 50, 0.10), row("fomaml", 50, 0.02), row("maml", 100, 0.05),
            row("fomaml", 100, 0.05), row("maml", 200, 0.2), row("fomaml", 200, 0.2, False)]
    assert fr.choose_classes(rows, ["maml", "fomaml"]) == 50  # 0.06 > 0.05; 200 fails one
    assert fr.choose_classes(rows[:1], ["maml", "fomaml"]) is None


def test_method_summary_selects_on_validation_and_pairs_with_b0_and_early_stopping():
    def row(seed, level, val, test):
        return {"seed": seed, "level": level, "val_final": val, "val_best": val,
                "test_final": test, "test_best": test}

    base = {s: row(s, 0.0, 0.70, t) for s, t in enumerate((0.70, 0.72, 0.74))}
    early = {s: row(s, 5, 0.75, t) for s, t in enumerate((0.71, 0.74, 0.75))}
    rows = [row(s, 0.5, 0.80, base[s]["test_final"] + d) for s, d in enumerate((0.02, 0.03,
                                                                                 0.04))]
    rows += [row(s, 1.0, 0.60, 0.1) for s in range(3)]
    rows += [{"seed": 0, "level": 2.0, "diverged": "loss went nan"}]
    m = fr.method_summary(rows, base, early, "outer")
    assert m["final"]["selected_level"] == 0.5 and m["diverged"] == 1
    assert m["complete_levels"] == [0.0, 0.5, 1.0]  # 2.0 has no finished seed
    d = m["final"]["diff_vs_b0"]
    assert d["mean"] == pytest.approx(0.03) and d["ci95"] == pytest.approx(4.303 * 0.01 /
                                                                          math.sqrt(3))
    e = m["final"]["diff_vs_early_stopping"]  # 0.72-0.71, 0.75-0.74, 0.78-0.75
    assert e["mean"] == pytest.approx((0.01 + 0.01 + 0.03) / 3)


def test_run_names_have_no_dots_and_differ_with_the_config():
    args = fr.parse_args(["sweep", "--quick"])
    a = fr.spec(args, "maml", 50, 0, "outer", 0.25)
    b = fr.spec(args, "maml", 50, 0, "outer", 0.5)
    assert "." not in a["name"] and a["name"] != b["name"]
    assert a["config"].outer_flood == 0.25 and a["config"].train_classes == 50
    assert fr.spec(args, "maml", 50, 0)["name"] == fr.spec(args, "maml", 50, 0)["name"]
    iflood = fr.spec(args, "fomaml", 50, 1, "iflood", 0.1)["config"]
    assert (iflood.inner_flood, iflood.flood_mode) == (0.1, "instance")
    assert fr.spec(args, "maml", 50, 0, "early_stopping", 3)["config"].patience == 3


def test_a_tiny_study_runs_end_to_end_and_skips_finished_runs(omniglot_images, tmp_path,
                                                              capsys):
    argv = ["all", "--quick", "--algorithms", "fomaml", "--classes", "10", "--floods", "outer",
            "--regularisers", "early_stopping", "--levels", "1", "--iterations", "2",
            "--val-every", "1", "--test-tasks", "4", "--runs", str(tmp_path),
            "--out-dir", str(tmp_path), "--no-malloc-reuse"]
    fr.main(argv)
    first = capsys.readouterr().out
    result = json.loads((tmp_path / "flooding_regime.json").read_text())
    entry = result["algorithms"]["fomaml"]
    assert result["train_classes"] == 10 and len(entry["base"]) == 2
    # Every run of the floods and regularisers asked for finished, but not all of them.
    assert result["header"]["runs_missing"] == 0 and not result["header"]["complete"]
    outer = entry["methods"]["outer"]
    assert outer["levels"][0] == 0.0 and len(outer["levels"]) == 2
    assert outer["per_level"][1]["active_mean"]["n"] == 2  # the activity of the flooded runs
    assert entry["early_stopping_vs_b0_final"]["n"] == 2
    assert (tmp_path / "flooding_regime.png").is_file()
    table = fr.markdown_table(result).splitlines()
    assert [row.split(" | ")[1] for row in table[2:]] == [
        "none (b = 0)", "none, best-validation checkpoint", "early stopping", "outer flood"]
    level = f"{outer['final']['selected_level']:g}" if outer["final"]["selected_level"] else \
        "0 (off)"
    assert table[-1].split(" | ")[2] == level
    best = fr.markdown_best_table(result).splitlines()
    assert [row.split(" | ")[1] for row in best[2:]] == ["none (b = 0)", "outer flood"]
    assert best[-1].split(" | ")[4] == fr.points(outer["best"]["diff_vs_b0"])
    levels = fr.markdown_levels_table(result).splitlines()
    assert len(levels) == 3 and levels[2].startswith("| FOMAML | outer flood | ")
    assert f"{outer['levels'][1]:g}: " in levels[2] and "active" in levels[2]
    assert (tmp_path / "flooding_regime_pilot.png").is_file()
    assert "starting" in first
    fr.main(argv)  # again: every run is finished, nothing is trained
    again = capsys.readouterr().out
    assert "starting" not in again and "finished earlier" in again


def test_workers_train_the_same_runs(omniglot_images, tmp_path):
    """``--workers 2``: the same runs as one process, each in a single-threaded worker, with
    the same logs up to float rounding."""
    logs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        fr.main(["sweep", "--quick", "--algorithms", "fomaml", "--train-classes", "10",
                 "--floods", "outer", "--levels", "1", "--iterations", "2",
                 "--val-every", "1", "--runs", str(out), "--out-dir", str(out),
                 "--no-malloc-reuse", "--workers", str(workers)])
        logs[workers] = {p.name: fr.read_log(p) for p in sorted(out.glob("*.jsonl"))
                         if p.name != "cpu.jsonl"}
        records = [json.loads(p.read_text()) for p in out.glob("*.record.json")]
        assert {r["threads"] for r in records} == ({1} if workers == 2 else
                                                   {torch.get_num_threads()})
        # Each run is tested as it ends: the summary needs no checkpoint of a finished run.
        tested = [json.loads(p.read_text()) for p in out.glob("*.eval.json")]
        assert len(tested) == len(records) == 4
        assert all(0 <= t[w]["accuracy"] <= 1 for t in tested for w in ("final", "best"))
    assert logs[1].keys() == logs[2].keys() and len(logs[1]) == 4  # 2 seeds x (b = 0, b)
    for name, log in logs[1].items():
        assert [r["iteration"] for r in log] == [r["iteration"] for r in logs[2][name]]
        for a, b in zip(log, logs[2][name], strict=True):
            if "loss" in a:
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_flood_levels_span_the_end_loss_to_the_peak_loss_geometrically():
    levels = fr.geometric_levels(0.0005, 0.168, 4)
    assert len(levels) == 4 and levels[-1] == pytest.approx(0.168)
    ratios = [b / a for a, b in zip([0.0005, *levels], levels)]
    assert ratios == pytest.approx([(0.168 / 0.0005) ** 0.25] * 4, rel=2e-3)
    assert fr.geometric_levels(0.01, 0.015, 2) == [0.02, 0.04]  # no range: up to 4x the end
    with pytest.raises(ValueError, match="positive"):
        fr.geometric_levels(0.0, 0.1, 4)


def test_the_docs_give_the_committed_summarys_tables():
    """docs/reproductions.md quotes the study's tables as the committed summary writes them
    (regenerate with ``summary``, which prints the block, when the results change)."""
    root = fr.Path(fr.__file__).resolve().parent.parent
    result = json.loads((root / "benchmarks/results/flooding_regime.json").read_text())
    docs = (root / "docs/reproductions.md").read_text()
    assert fr.markdown_results(result) in docs
    assert result["header"]["complete"] or result["header"]["runs_missing"] > 0
