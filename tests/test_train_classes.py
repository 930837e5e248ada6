"""train_classes / --train-classes: meta-training on a fixed subset of the training classes."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from metalearn.config import OMITTED_WHEN_UNSET, TrainConfig, build_sampler
from metalearn.data.few_shot import SUBSET_SEED, class_subset
from metalearn.data.omniglot import split_classes
from tests import benchmark_fixtures as fx


def test_the_subset_is_fixed_nested_and_in_the_splits_order():
    classes = torch.arange(100, 200)
    small = class_subset(classes, 10, ways=5)
    assert torch.equal(small, class_subset(classes, 10, ways=5))  # no hidden state
    assert small.tolist() == sorted(small.tolist()) and len(set(small.tolist())) == 10
    assert set(small.tolist()) <= set(classes.tolist())
    # The documented rule: the first n of randperm(len(classes)) seeded with SUBSET_SEED.
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(SUBSET_SEED))
    assert set(small.tolist()) == {100 + int(i) for i in perm[:10]}
    assert set(small.tolist()) <= set(class_subset(classes, 40, ways=5).tolist())  # nested
    assert torch.equal(class_subset(classes, 100, ways=5), classes)  # all: the split itself


@pytest.mark.parametrize("n, match", [(4, "subset=4 must be >= ways=5"),
                                      (101, "subset=101 must be .* <= 100")])
def test_a_subset_outside_ways_and_the_split_is_refused(n, match):
    with pytest.raises(ValueError, match=match):
        class_subset(torch.arange(100), n, ways=5)
    with pytest.raises(TypeError, match="subset must be an integer"):
        class_subset(torch.arange(100), 10.0, ways=5)


def test_omniglot_draws_only_the_subset_whatever_the_seed(omniglot_images):
    cfg = TrainConfig(dataset="omniglot", train_classes=20).resolved()
    expected = class_subset(split_classes("train"), 20, ways=5)
    for seed in (0, 1, 7):
        sampler = build_sampler(cfg, "train", seed=seed)
        assert torch.equal(sampler.classes, expected)
        sampler.sample(200)
        drawn = set(sampler.last_classes.unique().tolist())
        assert drawn == set(expected.tolist())  # 200 tasks of 5 reach all 20
    # Validation and test keep their whole splits; a run without it, all 1,100 characters.
    assert build_sampler(cfg, "val", seed=0).num_classes == 100
    assert build_sampler(cfg, "test", seed=0).num_classes == 423
    full = TrainConfig(dataset="omniglot").resolved()
    assert build_sampler(full, "train", seed=0).num_classes == 1100


def test_omniglot_sampler_checks_the_subset_before_reading_files(monkeypatch):
    import metalearn.data.omniglot as omniglot

    def no_files(*args, **kwargs):
        raise AssertionError("files read before the check")

    monkeypatch.setattr(omniglot, "load_images", no_files)
    with pytest.raises(ValueError, match="subset=2000 must be .* <= 1100"):
        omniglot.OmniglotTasks(split="train", subset=2000)


def test_a_benchmark_sampler_draws_only_the_subset(tmp_path, monkeypatch):
    from metalearn.data import MiniImageNetTasks, image_sets

    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(image_sets, "_ALLOW_SUBSET", True)
    fx.mini_pickles(tmp_path / "mini-imagenet", classes=6)
    whole = MiniImageNetTasks(tmp_path, "train", ways=2, shots=1, queries=1)
    sampler = MiniImageNetTasks(tmp_path, "train", ways=2, shots=1, queries=1, subset=3)
    assert torch.equal(sampler.classes, class_subset(whole.classes, 3, ways=2))
    sampler.sample(100)
    assert set(sampler.last_classes.unique().tolist()) == set(sampler.classes.tolist())
    with pytest.raises(ValueError, match="subset=65 must be .* <= 64"):
        MiniImageNetTasks(tmp_path, "train", ways=2, shots=1, queries=1, subset=65)


@pytest.mark.parametrize("values, match", [
    (dict(dataset="sine", train_classes=10), "sine tasks have none"),
    (dict(dataset="omniglot", train_classes=4), r"= 4 must be >= ways = 5 .* <= 1100"),
    (dict(dataset="omniglot", train_classes=1101), r"= 1101 must be .* <= 1100"),
    (dict(dataset="cifar-fs", train_classes=65), r"<= 64, the classes of the cifar-fs"),
    (dict(dataset="omniglot", train_classes=0), "train_classes must be an integer >= 1"),
])
def test_the_config_refuses_a_bad_count_naming_the_flag(values, match):
    with pytest.raises(ValueError, match=match) as info:
        TrainConfig(**values).resolved()
    if values.get("train_classes"):
        assert "--train-classes" in str(info.value) or "integer" in str(info.value)


def test_the_cli_sets_it_and_reports_a_bad_value(capsys):
    from metalearn.cli import _config_from, build_parser, main

    args = build_parser().parse_args(["train", "--dataset", "omniglot", "--train-classes",
                                      "50"])
    assert _config_from(args).train_classes == 50
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "sine", "--train-classes", "10", "--iterations", "1"])
    assert exit_info.value.code == 2
    assert "train_classes (--train-classes)" in capsys.readouterr().err


def test_configs_without_it_are_saved_as_before():
    cfg = TrainConfig(dataset="omniglot").resolved()
    saved = cfg.to_dict()
    # The settings added after runs were saved are left out while unset, so such a config
    # saves (and keys a search trial) exactly as before they existed.
    assert not set(OMITTED_WHEN_UNSET) & set(saved)
    before = {f.name: getattr(cfg, f.name) for f in fields(cfg)
              if f.name not in OMITTED_WHEN_UNSET}
    assert json.dumps(saved, sort_keys=True) == json.dumps(before, sort_keys=True)
    assert TrainConfig.from_dict(saved) == cfg
    restricted = TrainConfig(dataset="omniglot", train_classes=100).resolved()
    assert restricted.to_dict()["train_classes"] == 100
    assert TrainConfig.from_dict(restricted.to_dict()) == restricted


def test_a_checkpoint_from_before_resumes_and_a_changed_count_is_refused(tmp_path):
    from metalearn import train
    from metalearn.checkpoint import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "run.pt"
    cfg = TrainConfig(iterations=2, val_every=2, val_tasks=2, meta_batch=2)
    train(cfg, checkpoint=ckpt, progress=False)
    state = load_checkpoint(ckpt)
    assert "train_classes" not in state["config"]  # as a checkpoint saved before it existed
    save_checkpoint(ckpt, state)
    res = train(TrainConfig(iterations=4, val_every=2, val_tasks=2, meta_batch=2),
                checkpoint=ckpt, resume=True, progress=False)
    assert res.iteration == 4
    # A missing key reads as None; a count set now where the checkpoint had none differs.
    from metalearn.training import _config_mismatch

    saved = TrainConfig(dataset="omniglot").resolved().to_dict()
    now = TrainConfig(dataset="omniglot", train_classes=100).resolved().to_dict()
    assert _config_mismatch(saved, saved) == []
    assert _config_mismatch(saved, now) == ["train_classes: checkpoint None vs now 100"]


def test_train_refuses_it_with_a_sampler_of_the_users():
    from metalearn import train
    from metalearn.data import SineTasks

    cfg = TrainConfig(dataset="omniglot", train_classes=50, iterations=1)
    with pytest.raises(ValueError, match="train_classes=50 restricts the built-in"):
        train(cfg, train_sampler=SineTasks(), val_sampler=SineTasks(seed=1), progress=False)
