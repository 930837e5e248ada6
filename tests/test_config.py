"""The algorithm registry: each option belongs to the algorithms that use it, every value
has one rule, and resolving is idempotent."""

from __future__ import annotations

import pytest
import torch

from metalearn.config import (
    ALGORITHM_SPECS,
    FIELD_RULES,
    VARIANT_OPTIONS,
    TrainConfig,
    build_learner,
    build_model,
    build_optimizer,
)

SAMPLE = {"first_order": True, "anil_inner": "classifier", "imaml_lambda": 2.0, "cg_steps": 3,
          "lslr": False, "multi_step_loss": False, "msl_iterations": 10,
          "first_order_iterations": 5, "per_step_bn": False, "memory_saving": True,
          "inner_batch": 4, "inner_optimizer": "adam", "eval_inner_batch": 4,
          "outer_flood": 0.1, "imaml_inner_solve": "pullback", "cg_damping": 1.0,
          "lam_damping": 10.0, "inner_adam_state": "task"}


@pytest.mark.parametrize("algorithm", list(ALGORITHM_SPECS))
def test_an_option_of_another_algorithm_is_an_error(algorithm):
    spec = ALGORITHM_SPECS[algorithm]
    assert set(SAMPLE) == set(VARIANT_OPTIONS)
    for name in VARIANT_OPTIONS:
        cfg = TrainConfig(algorithm=algorithm, inner_steps=2, **{name: SAMPLE[name]})
        if name in spec.options:
            cfg.resolved()  # its own option: accepted
        else:
            with pytest.raises(ValueError, match=f"{name} applies to algorithm=.* only, not "
                                                 f"to '{algorithm}'"):
                cfg.resolved()


@pytest.mark.parametrize("algorithm", list(ALGORITHM_SPECS))
@pytest.mark.parametrize("dataset", ["sine", "omniglot"])
def test_resolving_is_idempotent_and_builds_the_learner(algorithm, dataset):
    cfg = TrainConfig(dataset=dataset, algorithm=algorithm).resolved()
    assert cfg.resolved() == cfg
    if dataset == "sine":
        learner = build_learner(cfg, build_model(cfg))
        assert learner.inner_steps == cfg.inner_steps


def test_every_rule_refuses_a_bad_value():
    bad = {"an integer >= 1": 0, "an integer >= 0": -1, "a finite number > 0": float("nan"),
           "a finite number >= 0": -0.5, "True or False": "yes"}
    for name, (_, rule) in FIELD_RULES.items():
        value = bad.get(rule, "no such choice")
        with pytest.raises(ValueError, match=f"{name} must be"):
            TrainConfig(**{"algorithm": "mamlpp" if name in ALGORITHM_SPECS["mamlpp"].options
                           else "reptile" if name in ALGORITHM_SPECS["reptile"].options
                           else "imaml" if name in ALGORITHM_SPECS["imaml"].options
                           else "maml", name: value})._check_value(name)


@pytest.mark.parametrize("command,flags,said", [
    ("train", ["--algorithm", "maml", "--lslr"],
     "--lslr applies to --algorithm 'mamlpp' only, not to 'maml'; leave it out"),
    # The field is multi_step_loss; its flag is --msl.
    ("train", ["--algorithm", "fomaml", "--no-msl"], "--msl applies to --algorithm 'mamlpp'"),
    ("bench", ["--algorithms", "maml", "--cg-steps", "3"], "--cg-steps applies to --algorithm"),
    ("search", ["--grid", "inner_lr=0.1,0.2", "--per-step-bn"], "--per-step-bn applies to"),
])
def test_the_cli_names_the_misplaced_option_by_its_flag(capsys, command, flags, said):
    from metalearn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: metalearn {command}" in err and said in err, err


def test_mamlpp_on_omniglot_takes_the_reference_codes_config():
    # HowToTrainYourMAMLPytorch, experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json:
    # init_inner_loop_learning_rate 0.1, batch_size 8, 100 epochs x 500 iterations, cosine
    # meta-lr annealing, 5 steps in training and evaluation, multi-step loss over 10 epochs.
    cfg = TrainConfig(dataset="omniglot", algorithm="mamlpp").resolved()
    got = {k: getattr(cfg, k) for k in ("inner_lr", "meta_batch", "iterations", "schedule",
                                        "inner_steps", "eval_steps", "msl_iterations",
                                        "outer_lr", "shots", "queries")}
    assert got == dict(inner_lr=0.1, meta_batch=8, iterations=50_000, schedule="cosine",
                       inner_steps=5, eval_steps=5, msl_iterations=5000, outer_lr=1e-3,
                       shots=1, queries=1)
    # A flag still wins over the dataset default.
    flagged = TrainConfig(dataset="omniglot", algorithm="mamlpp", inner_lr=0.4).resolved()
    assert flagged.inner_lr == 0.4


def test_backbone_resnet12_for_the_rgb_benchmarks_only():
    from metalearn.models import ResNet12

    cfg = TrainConfig(dataset="cifar-fs", backbone="resnet12", dropout=0.1).resolved()
    model = build_model(cfg)
    assert isinstance(model, ResNet12)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert TrainConfig(dataset="mini-imagenet").resolved().backbone is None  # Conv4
    with pytest.raises(ValueError, match="backbone='resnet12' is for the RGB benchmarks"):
        TrainConfig(dataset="omniglot", backbone="resnet12").resolved()
    with pytest.raises(ValueError, match="ResNet12 keeps its paper's initialisation"):
        TrainConfig(dataset="fc100", backbone="resnet12", init="he").resolved()
    with pytest.raises(ValueError, match="sine uses the MLP"):
        TrainConfig(dataset="sine", backbone="conv4").resolved()
    with pytest.raises(ValueError, match="backbone must be one of"):
        TrainConfig(dataset="fc100", backbone="vit").resolved()


def test_outer_eps_reaches_adam_and_is_refused_for_other_optimizers():
    cfg = TrainConfig(algorithm="imaml", outer_eps=1e-3).resolved()
    assert build_optimizer(cfg, build_model(cfg).parameters()).defaults["eps"] == 1e-3
    default = TrainConfig().resolved()
    assert build_optimizer(default, build_model(default).parameters()).defaults["eps"] == 1e-8
    assert "outer_eps" not in default.to_dict()  # saved configs of older runs unchanged
    with pytest.raises(ValueError, match="outer_eps is Adam's epsilon; it applies to "
                                         "outer_optimizer='adam' only, not 'sgd'"):
        TrainConfig(algorithm="reptile", outer_eps=1e-3).resolved()
