"""Hyperparameter search: grid and random points, ranking, resume, atomic output, CLI."""

import json
import math
from pathlib import Path

import pytest

import metalearn.training as training_module
from metalearn.checkpoint import load_checkpoint
from metalearn.cli import main
from metalearn.config import TrainConfig
from metalearn.search import SearchResult, grid_points, parse_space, search
from metalearn.training import train

TINY = dict(dataset="sine", iterations=12, val_every=6, val_tasks=8, meta_batch=4)


def test_grid_is_the_product_in_order_and_random_draws_are_distinct_grid_points():
    space = {"inner_lr": [0.01, 0.02, 0.04], "inner_steps": [1, 2]}
    grid = grid_points(space)
    assert grid == [{"inner_lr": a, "inner_steps": b} for a in (0.01, 0.02, 0.04) for b in (1, 2)]
    drawn = grid_points(space, trials=4, seed=3)
    assert len(drawn) == 4 and all(p in grid for p in drawn)
    assert len({json.dumps(p) for p in drawn}) == 4
    assert drawn == grid_points(space, trials=4, seed=3)
    assert drawn != grid_points(space, trials=4, seed=4) or drawn != grid[:4]
    with pytest.raises(ValueError, match="grid has 6 points"):
        grid_points(space, trials=7)


@pytest.mark.parametrize("spec, message", [
    ("inner_lr", "NAME=V1,V2"),
    ("learning_rate=0.1", "not a setting"),
    ("seed=0,1", "--seeds"),
    ("iterations=10,20", "whole search"),
    ("ways=5,20", "whole search"),
    ("inner_steps=1.5", "integers"),
    ("inner_lr=fast", "numbers"),
    ("first_order=maybe", "true or false"),
    ("inner_lr=0.1,0.1", "twice"),
])
def test_bad_search_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_space([spec])


def test_specs_parse_to_the_fields_types():
    assert parse_space(["inner-lr=0.1,1e-2", "inner_steps=1,5", "first_order=true,false",
                        "outer_optimizer=adam,sgd"]) == {
        "inner_lr": [0.1, 0.01], "inner_steps": [1, 5], "first_order": [True, False],
        "outer_optimizer": ["adam", "sgd"]}
    with pytest.raises(ValueError, match="given twice"):
        parse_space(["inner_lr=0.1", "inner_lr=0.2"])


def test_each_trial_is_the_run_train_gives_and_the_ranking_sorts_them():
    base = TrainConfig(**TINY)
    space = {"inner_lr": [0.001, 0.05], "inner_steps": [1, 2]}
    result = search(base, space, progress=False)
    assert len(result.trials) == 4
    for trial in result.trials:
        alone = train(TrainConfig(**TINY, **trial["point"]), progress=False)
        assert trial["best"]["value"] == pytest.approx(alone.best["value"], rel=1e-6)
    values = [row["value"] for row in result.ranking()]
    assert values == sorted(values)  # MSE: lower first
    assert result.best["point"] == result.ranking()[0]["point"]
    assert {json.dumps(r["point"]) for r in result.ranking()} == \
        {json.dumps(p) for p in grid_points(space)}


def test_accuracy_ranks_higher_first_and_seeds_are_averaged():
    def trial(lr, seed, value):
        return {"point": {"inner_lr": lr}, "seed": seed, "best": {"value": value, "ci95": 0.1}}

    result = SearchResult("accuracy", True, [trial(0.1, 0, 0.5), trial(0.1, 1, 0.7),
                                             trial(0.4, 0, 0.8), trial(0.4, 1, 0.2)])
    ranking = result.ranking()
    assert [r["point"]["inner_lr"] for r in ranking] == [0.1, 0.4]
    assert ranking[0]["value"] == pytest.approx(0.6) and ranking[1]["value"] == pytest.approx(0.5)
    assert ranking[0]["seeds"] == 2 and ranking[0]["ci95"] is None
    nan_first = SearchResult("mse", False, [
        {"point": {"inner_lr": 1.0}, "seed": 0, "best": None}, trial(0.1, 0, 3.0)])
    assert nan_first.ranking()[0]["point"] == {"inner_lr": 0.1}
    assert math.isnan(nan_first.ranking()[1]["value"])


def test_search_uses_the_validation_split_only(monkeypatch):
    splits = []
    real = training_module.build_sampler

    def recording(cfg, split, *args, **kwargs):
        splits.append(split)
        return real(cfg, split, *args, **kwargs)

    monkeypatch.setattr(training_module, "build_sampler", recording)
    search(TrainConfig(**TINY), {"inner_lr": [0.01, 0.02]}, seeds=[0, 1], progress=False)
    assert set(splits) == {"train", "val"}


def test_seeds_give_each_point_every_seed_and_points_share_them():
    result = search(TrainConfig(**TINY), {"inner_lr": [0.01, 0.02]}, seeds=[3, 5],
                    progress=False)
    assert [(t["point"]["inner_lr"], t["seed"]) for t in result.trials] == [
        (0.01, 3), (0.01, 5), (0.02, 3), (0.02, 5)]
    with pytest.raises(ValueError, match="distinct"):
        search(TrainConfig(**TINY), {"inner_lr": [0.01]}, seeds=[1, 1], progress=False)


def test_a_bad_value_fails_before_any_trial_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(training_module, "train", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"trial \{'inner_steps': -1\}"):
        search(TrainConfig(**TINY), {"inner_steps": [1, -1]}, progress=False)
    assert calls == []


def test_resume_reuses_finished_trials_and_runs_only_new_ones(tmp_path, monkeypatch):
    out = tmp_path / "search.json"
    base = TrainConfig(**TINY)
    first = search(base, {"inner_lr": [0.01, 0.02]}, out=out, progress=False)
    calls = []
    real = training_module.train

    def counting(cfg, **kwargs):
        calls.append(cfg.inner_lr)
        return real(cfg, **kwargs)

    monkeypatch.setattr(training_module, "train", counting)
    again = search(base, {"inner_lr": [0.01, 0.02, 0.04]}, out=out, resume=True,
                   progress=False)
    assert calls == [0.04]
    assert again.trials[:2] == json.loads(json.dumps(first.trials))
    # Different shared settings: nothing is reused.
    search(TrainConfig(**{**TINY, "iterations": 6}), {"inner_lr": [0.01]}, out=out,
           resume=True, progress=False)
    assert calls == [0.04, 0.01]


def test_an_interrupted_search_leaves_the_finished_trials_and_no_temp_files(tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "search.json"
    real = training_module.train

    def interrupted(cfg, **kwargs):
        if cfg.inner_lr == 0.02:
            raise KeyboardInterrupt
        return real(cfg, **kwargs)

    monkeypatch.setattr(training_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(TrainConfig(**TINY), {"inner_lr": [0.01, 0.02]}, out=out, progress=False)
    saved = json.loads(out.read_text())
    assert [t["point"] for t in saved["trials"]] == [{"inner_lr": 0.01}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.json"]


def test_resume_refuses_a_file_that_is_not_a_search_result(tmp_path):
    out = tmp_path / "search.json"
    out.write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="not a search result"):
        search(TrainConfig(**TINY), {"inner_lr": [0.01]}, out=out, resume=True,
               progress=False)


def test_cli_search_ranks_writes_json_and_points_at_the_winner(tmp_path, capsys):
    out, runs = tmp_path / "s.json", tmp_path / "runs"
    rc = main(["search", "--grid", "inner_lr=0.001,0.05", "--iterations", "12",
               "--val-every", "6", "--val-tasks", "8", "--meta-batch", "4", "--runs",
               str(runs), "--out", str(out), "--no-progress"])
    assert rc == 0
    saved = json.loads(out.read_text())
    assert len(saved["trials"]) == 2 and saved["metric"] == "mse"
    assert saved["header"]["space"] == {"inner_lr": [0.001, 0.05]}
    assert saved["header"]["base"]["iterations"] == 12 and "commit" in saved["header"]
    text = capsys.readouterr().out
    winner = [t for t in saved["trials"] if t["point"] == saved["best"]["point"]][0]
    assert f"metalearn eval --checkpoint {winner['checkpoint']}" in text
    assert sorted(p.name for p in runs.glob("*.best.pt")) == sorted(
        Path(t["checkpoint"]).name for t in saved["trials"])


def test_a_grown_grid_resumed_keeps_every_trials_own_checkpoint(tmp_path):
    out, runs = tmp_path / "s.json", tmp_path / "runs"
    base = TrainConfig(**TINY)
    search(base, {"inner_lr": [0.01, 0.02]}, runs=runs, out=out, progress=False)
    grown = search(base, {"inner_lr": [0.005, 0.01, 0.02]}, runs=runs, out=out, resume=True,
                   progress=False)
    assert len({t["checkpoint"] for t in grown.trials}) == 3
    for trial in grown.trials:
        saved = load_checkpoint(trial["checkpoint"])
        assert saved["config"]["inner_lr"] == trial["point"]["inner_lr"]
        assert saved["best"] == trial["best"]


@pytest.mark.parametrize("argv, message", [
    (["--grid", "learning_rate=0.1"], "not a setting"),
    (["--grid", "inner_lr=0.1,0.2", "--trials", "3"], "grid has 2 points"),
    (["--grid", "inner_steps=-1"], "inner_steps"),
    ([], "--grid"),
])
def test_cli_search_bad_input_is_a_usage_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--iterations", "2", "--no-progress", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: metalearn search" in err and message in err
