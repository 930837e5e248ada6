"""Run configuration with the papers' defaults, and the factories that build from it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from metalearn.algorithms import ANIL, FOMAML, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from metalearn.algorithms.base import MetaLearner
from metalearn.models import MLP, Conv4, ResNet12

DATASETS = ("sine", "omniglot", "mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100")
OUTER_OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm as the harness knows it: the one place for its options and defaults.

    Args:
        family: whose paper settings it starts from (``PAPER_DEFAULTS``): ``"maml"`` or
            ``"reptile"``.
        build: ``build(cfg, model, loss_options, evaluation)``, the learner.
        options: the options that only some algorithms use (``VARIANT_OPTIONS``) which
            this one does, with its defaults (``None``: unset, the learner's own default).
        defaults: its own defaults of shared settings, over the family's.
        dataset_defaults: per dataset, defaults over both.

    Example:
        >>> from metalearn.config import ALGORITHM_SPECS
        >>> spec = ALGORITHM_SPECS["mamlpp"]
        >>> spec.family, spec.defaults, spec.dataset_defaults["omniglot"]["inner_lr"]
        ('maml', {'inner_steps': 5}, 0.1)
    """

    family: str
    build: Callable[..., MetaLearner]
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    dataset_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


# Settings that only some algorithms use: set for another one, they are an error, not
# silently ignored.
VARIANT_OPTIONS = ("first_order", "anil_inner", "imaml_lambda", "cg_steps",
                   "imaml_inner_solve", "cg_damping", "lam_damping", "lslr",
                   "multi_step_loss", "msl_iterations", "first_order_iterations",
                   "per_step_bn", "memory_saving", "inner_batch", "inner_optimizer",
                   "inner_adam_state",
                   "eval_inner_batch", "outer_flood")
_OUTER = {"outer_flood": None}  # every learner with an outer loss
# MAML++ (Antoniou et al. 2019) trains with 5 inner steps; the reference code anneals the
# multi-step loss over 10 epochs of 500 iterations; its cosine meta-lr anneal is
# ``schedule="cosine"``. iMAML (Rajeswaran et al. 2019): the reference code's lam and CG
# steps; 16 inner steps, as its paper's GD variant takes for 5-way Omniglot (the caption of
# its Table 2, which also gives lambda 2 and 5 CG steps). On Omniglot: the paper's lambda
# 2, and the inner lr that won a validation search at that lambda
# (benchmarks/results/imaml_inner_lr_search.json); MAML's 0.4 leaves the proximal inner
# problem unconverged (see docs/algorithms/imaml.md).
# MAML++ on Omniglot: the reference code's 5w1s config (HowToTrainYourMAMLPytorch,
# experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json): LSLR rates start at 0.1,
# 8 tasks per meta-batch, 100 epochs of 500 iterations with the meta learning rate annealed
# by a cosine, 5 steps in training and evaluation. MAML's 0.4 over 5 steps overshoots.
_MAMLPP_OMNIGLOT = dict(inner_lr=0.1, meta_batch=8, iterations=50_000, schedule="cosine",
                        eval_steps=5)
Builder = Callable[["TrainConfig", nn.Module, dict, bool], MetaLearner]


def _maml(cfg: TrainConfig, model: nn.Module, loss: dict, evaluation: bool) -> MetaLearner:
    return MAML(model, cfg.inner_lr, cfg.inner_steps, memory_saving=bool(cfg.memory_saving),
                outer_flood=cfg.outer_flood, **loss)


def _fomaml(cfg: TrainConfig, model: nn.Module, loss: dict, evaluation: bool) -> MetaLearner:
    return FOMAML(model, cfg.inner_lr, cfg.inner_steps, outer_flood=cfg.outer_flood, **loss)


def _reptile(cfg: TrainConfig, model: nn.Module, loss: dict, evaluation: bool) -> MetaLearner:
    batch = cfg.eval_inner_batch if evaluation else cfg.inner_batch
    return Reptile(model, cfg.inner_lr, cfg.inner_steps, inner_batch=batch,
                   inner_optimizer=cfg.inner_optimizer,
                   adam_state=cfg.inner_adam_state or "carried", **loss)


def _metasgd(cfg: TrainConfig, model: nn.Module, loss: dict, evaluation: bool) -> MetaLearner:
    return MetaSGD(model, cfg.inner_lr, cfg.inner_steps, first_order=cfg.first_order,
                   outer_flood=cfg.outer_flood, **loss)


def _anil(cfg: TrainConfig, model: nn.Module, loss: dict, evaluation: bool) -> MetaLearner:
    inner = [n.strip() for n in cfg.anil_inner.split(",")] if cfg.anil_inner else None
    return ANIL(model, cfg.inner_lr, cfg.inner_steps, inner_params=inner,
                first_order=cfg.first_order, outer_flood=cfg.outer_flood, **loss)


def _mamlpp(cfg: TrainConfig, model: nn.Module, loss: dict, evaluation: bool) -> MetaLearner:
    return MAMLPlusPlus(model, cfg.inner_lr, cfg.inner_steps, first_order=cfg.first_order,
                        lslr=cfg.lslr, multi_step_loss=cfg.multi_step_loss,
                        msl_iterations=cfg.msl_iterations,
                        first_order_iterations=cfg.first_order_iterations,
                        per_step_bn=cfg.per_step_bn, outer_flood=cfg.outer_flood, **loss)


def _imaml(cfg: TrainConfig, model: nn.Module, loss: dict, evaluation: bool) -> MetaLearner:
    # The reference code tests with lam 0: plain steps, no pull-back.
    pullback = cfg.imaml_inner_solve == "pullback"
    lam = 0.0 if pullback and evaluation else cfg.imaml_lambda
    return IMAML(model, cfg.inner_lr, cfg.inner_steps, lam=lam,
                 cg_steps=0 if evaluation else cfg.cg_steps,
                 inner_solve=cfg.imaml_inner_solve, cg_damping=cfg.cg_damping,
                 lam_damping=cfg.lam_damping, outer_flood=cfg.outer_flood, **loss)


ALGORITHM_SPECS: dict[str, AlgorithmSpec] = {
    "maml": AlgorithmSpec("maml", _maml, {**_OUTER, "memory_saving": None}),
    "fomaml": AlgorithmSpec("maml", _fomaml, dict(_OUTER)),
    "reptile": AlgorithmSpec("reptile", _reptile, {"inner_batch": None, "inner_optimizer": None,
                                                   "inner_adam_state": None,
                                                   "eval_inner_batch": None}),
    "metasgd": AlgorithmSpec("maml", _metasgd, {**_OUTER, "first_order": False}),
    "anil": AlgorithmSpec("maml", _anil, {**_OUTER, "first_order": False, "anil_inner": None}),
    "mamlpp": AlgorithmSpec("maml", _mamlpp, {**_OUTER, "first_order": False, "lslr": True,
                                              "multi_step_loss": True, "msl_iterations": 5000,
                                              "first_order_iterations": 0,
                                              "per_step_bn": True},
                            defaults={"inner_steps": 5},
                            # The reference code's Omniglot 5w1s config (see _MAMLPP_OMNIGLOT).
                            dataset_defaults={"omniglot": _MAMLPP_OMNIGLOT}),
    "imaml": AlgorithmSpec("maml", _imaml, {**_OUTER, "imaml_lambda": 1.0, "cg_steps": 5,
                                            "imaml_inner_solve": "proximal",
                                            "cg_damping": 0.0, "lam_damping": 0.0},
                           defaults={"inner_steps": 16},
                           dataset_defaults={"omniglot": dict(imaml_lambda=2.0,
                                                              inner_lr=0.025)}),
}

ALGORITHMS = tuple(ALGORITHM_SPECS)
BACKBONES = ("conv4", "resnet12")



@dataclass(frozen=True)
class ImageBenchmark:
    """A benchmark of RGB images: its sampler in :mod:`metalearn.data` and what the model
    and the checks need to know (the entries of ``BENCHMARKS``).

    Attributes:
        sampler: the name of its task sampler class in :mod:`metalearn.data`.
        name: its name in messages.
        image_size: the side of its square images.
        val_classes: the classes of its smallest split, the most ways every split allows.
        per_class: images per class, where fixed (``None`` for tieredImageNet).

    Example:
        >>> from metalearn.config import BENCHMARKS
        >>> BENCHMARKS["mini-imagenet"].sampler, BENCHMARKS["mini-imagenet"].image_size
        ('MiniImageNetTasks', 84)
    """

    sampler: str
    name: str
    image_size: int
    val_classes: int  # the smallest split's classes: the most ways every split allows
    per_class: int | None  # images per class, where fixed


BENCHMARKS: dict[str, ImageBenchmark] = {
    "mini-imagenet": ImageBenchmark("MiniImageNetTasks", "miniImageNet", 84, 16, 600),
    "tiered-imagenet": ImageBenchmark("TieredImageNetTasks", "tieredImageNet", 84, 97, None),
    "cifar-fs": ImageBenchmark("CIFARFSTasks", "CIFAR-FS", 32, 16, 600),
    "fc100": ImageBenchmark("FC100Tasks", "FC100", 32, 20, 600),
}

# MAML on miniImageNet (Finn et al. 2017, §5.2 and the reference code's README): 5 inner
# steps at 0.01, 10 at test, 15 queries per class, Adam at 1e-3, 60,000 iterations, 32-filter
# Conv4 with max-pooling; meta-batch 4 for 1-shot and 2 for 5-shot (the paper's; the README's
# 5-shot command says 4), see SHOT_DEFAULTS. tieredImageNet, CIFAR-FS and FC100: no MAML
# paper setting; ours is miniImageNet's.
_MAML_IMAGES = dict(ways=5, shots=1, queries=15, inner_lr=0.01, inner_steps=5, eval_steps=10,
                    outer_optimizer="adam", outer_lr=1e-3, iterations=60_000)
# Reptile on Mini-ImageNet (Nichol et al. 2018, the supervised-reptile README's commands):
# 15 train shots, inner Adam at 1e-3 for 8 steps on batches of 10, meta step 1 annealed
# linearly to 0 over 100,000 iterations of 5 tasks, 50 test steps; test inner batch 5 for
# 1-shot and 15 for 5-shot (SHOT_DEFAULTS). The other image benchmarks: ours, the same.
_REPTILE_IMAGES = dict(ways=5, shots=15, queries=1, meta_batch=5, inner_lr=1e-3, inner_steps=8,
                       inner_batch=10, inner_optimizer="adam", outer_optimizer="sgd",
                       outer_lr=1.0, schedule="linear", iterations=100_000, eval_shots=1,
                       eval_steps=50)

# The papers' settings: MAML (Finn et al. 2017) and Reptile (Nichol et al. 2018).
PAPER_DEFAULTS: dict[tuple[str, str], dict] = {
    ("sine", "maml"): dict(shots=10, queries=10, meta_batch=25, inner_lr=0.01, inner_steps=1,
                           outer_optimizer="adam", outer_lr=1e-3, iterations=70_000),
    ("omniglot", "maml"): dict(ways=5, shots=1, meta_batch=32, inner_lr=0.4, inner_steps=1,
                               outer_optimizer="adam", outer_lr=1e-3, iterations=60_000),
    # Our setting (no paper anchor for Reptile on sine): a meta step of 1.0 diverged on
    # 5-shot tasks and 0.1 barely learned in 3,000 iterations (see the closing notes).
    ("sine", "reptile"): dict(shots=10, queries=10, meta_batch=25, inner_lr=0.02, inner_steps=5,
                              outer_optimizer="sgd", outer_lr=0.3, schedule="linear",
                              iterations=30_000),
    ("omniglot", "reptile"): dict(ways=5, shots=10, queries=1, meta_batch=5, inner_lr=1e-3,
                                  inner_steps=5, inner_batch=10, inner_optimizer="adam",
                                  outer_optimizer="sgd", outer_lr=1.0, schedule="linear",
                                  iterations=100_000, eval_shots=1, eval_steps=50,
                                  eval_inner_batch=5),
    **{(d, "maml"): _MAML_IMAGES for d in BENCHMARKS},
    **{(d, "reptile"): _REPTILE_IMAGES for d in BENCHMARKS},
}
# Paper defaults that depend on the shots, filled in after them (an unset value only).
SHOT_DEFAULTS: dict[tuple[str, str], dict[str, Callable[[dict], Any]]] = {
    **{(d, "maml"): {"meta_batch": lambda v: 4 if v["shots"] < 5 else 2} for d in BENCHMARKS},
    **{(d, "reptile"): {"eval_inner_batch": lambda v: 5 if v["eval_shots"] < 5 else 15}
       for d in BENCHMARKS},
}


def _integer(low: int) -> Callable[[Any], bool]:
    return lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= low


def _finite(low: float, strict: bool) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if strict else v >= low))
    return ok


def _one_of(choices: tuple) -> Callable[[Any], bool]:
    return lambda v: v in choices


_FLAG = (lambda v: isinstance(v, bool), "True or False")
# Every setting's rule, in one place (None, where allowed, means unset).
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (_integer(1), "an integer >= 1") for name in (
        "ways", "shots", "queries", "meta_batch", "iterations", "eval_shots", "eval_queries",
        "val_every", "val_tasks", "patience", "inner_batch", "eval_inner_batch",
        "msl_iterations", "train_classes")},
    **{name: (_integer(0), "an integer >= 0") for name in (
        "inner_steps", "eval_steps", "cg_steps", "first_order_iterations")},
    **{name: (_finite(0, True), "a finite number > 0") for name in (
        "inner_lr", "outer_lr", "imaml_lambda", "outer_eps")},
    **{name: (_finite(0, False), "a finite number >= 0") for name in (
        "weight_decay", "dropout", "label_smoothing", "inner_flood", "outer_flood",
        "cg_damping", "lam_damping")},
    "imaml_inner_solve": (_one_of(("proximal", "pullback")), "one of ('proximal', 'pullback')"),
    "outer_optimizer": (_one_of(OUTER_OPTIMIZERS), f"one of {OUTER_OPTIMIZERS}"),
    "schedule": (_one_of(SCHEDULES), f"one of {SCHEDULES}"),
    "inner_optimizer": (_one_of(("sgd", "adam")), "one of ('sgd', 'adam')"),
    "inner_adam_state": (_one_of(("carried", "task")), "one of ('carried', 'task')"),
    "flood_mode": (_one_of(("batch", "instance")), "one of ('batch', 'instance')"),
    "init": (_one_of(("xavier", "he")), "one of ('xavier', 'he')"),
    "backbone": (_one_of(BACKBONES), f"one of {BACKBONES}"),
    **{name: _FLAG for name in ("first_order", "lslr", "multi_step_loss", "per_step_bn",
                                "memory_saving")},
}
# What resolution gives an algorithm that does not use the option: set to it, the option
# changes nothing, so it is no error (a resolved config can be resolved again).
_NEUTRAL = {"inner_optimizer": "sgd", "first_order": False, "memory_saving": False}


@dataclass
class TrainConfig:
    """Everything that defines a meta-training run; ``None`` fields take paper defaults.

    :meth:`resolved` fills the unset fields from the paper of the algorithm's family on the
    dataset (``PAPER_DEFAULTS``) and checks every value; the command line's flags are these
    fields with dashes (``--meta-batch`` is ``meta_batch``).

    Attributes:
        dataset: ``"sine"``, ``"omniglot"``, ``"mini-imagenet"``, ``"tiered-imagenet"``,
            ``"cifar-fs"`` or ``"fc100"``.
        algorithm: ``"maml"``, ``"fomaml"``, ``"reptile"``, ``"metasgd"``, ``"anil"``,
            ``"mamlpp"`` or ``"imaml"``.
        ways: classes per task (the image datasets).
        shots: support examples per class (per task for sine).
        queries: query examples per class (per task for sine); default: ``shots``.
        meta_batch: tasks per meta-iteration.
        iterations: meta-iterations.
        inner_lr: the inner step size (Reptile with Adam: its learning rate).
        inner_steps: inner steps in meta-training.
        inner_batch: Reptile: examples per inner mini-batch (default: the support set).
        inner_optimizer: Reptile: ``"sgd"`` or ``"adam"``.
        inner_adam_state: Reptile with Adam: ``"carried"`` (default: the moments carried
            across tasks, as in the reference code) or ``"task"`` (fresh for every task).
        inner_flood: flood level b of the inner loss (``None`` or 0: off).
        flood_mode: ``"batch"`` (flooding, Ishida et al. 2020) or ``"instance"``
            (iFlood, Xie et al. 2022).
        outer_flood: flood level b of the meta-training (query) loss.
        outer_optimizer: ``"sgd"``, ``"momentum"``, ``"adagrad"`` or ``"adam"``.
        outer_lr: the meta learning rate (Reptile: the meta step size epsilon).
        outer_eps: the outer Adam's epsilon (default 1e-8; iMAML's reference code uses
            1e-3).
        weight_decay: the outer optimiser's L2 term.
        schedule: the meta learning rate over the run: ``"constant"``, ``"linear"`` (to 0)
            or ``"cosine"``.
        init: the network's initialisation, ``"xavier"`` or ``"he"``.
        dropout: dropout probability in the network.
        backbone: ``None`` for the dataset's network (the sine MLP, a Conv4), or
            ``"conv4"`` / ``"resnet12"`` for the RGB benchmarks.
        label_smoothing: label smoothing of the classification losses.
        eval_shots: support examples per class at validation and test (default: ``shots``).
        eval_queries: query examples per class at validation and test (default:
            ``queries``).
        eval_steps: inner steps at validation and test (default: ``inner_steps``, at
            least 1).
        eval_inner_batch: Reptile: inner mini-batch at validation and test.
        val_every: meta-iterations between validations.
        val_tasks: fixed validation tasks.
        patience: stop after this many validations without improvement (``None``: never).
        seed: the run's seed (weights, task draws).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        data_root: the folder holding the dataset's folder (default: ``$METALEARN_DATA``,
            then ``~/.cache/metalearn``).
        first_order: Meta-SGD, ANIL, MAML++: a first-order meta-gradient.
        anil_inner: ANIL: comma-separated names or prefixes of the parameters the inner
            loop adapts (default: the last layer's).
        imaml_lambda: iMAML: the proximal strength lambda.
        cg_steps: iMAML: conjugate-gradient steps (0: first order).
        imaml_inner_solve: iMAML: ``"proximal"`` (the paper's inner problem) or
            ``"pullback"`` (its reference code's plain steps, then one pull-back step).
        cg_damping: iMAML: added times the identity to the CG matrix.
        lam_damping: iMAML: the Hessian term is divided by lambda plus this.
        lslr: MAML++: per-layer, per-step learned inner learning rates.
        multi_step_loss: MAML++: the query loss after every inner step, weighted.
        msl_iterations: MAML++: iterations over which the multi-step loss anneals to the
            last step.
        first_order_iterations: MAML++: first order for this many iterations, then second.
        per_step_bn: MAML++: per-step BatchNorm weights and biases.
        memory_saving: MAML: recompute each inner step's activations in the backward (the
            same meta-gradient, less memory).
        train_classes: meta-train on a fixed subset of this many classes of the training
            split (``None``: all); validation and test unchanged.

    Example:
        >>> from metalearn.config import TrainConfig
        >>> cfg = TrainConfig(dataset="omniglot").resolved()
        >>> cfg.meta_batch, cfg.inner_lr, cfg.inner_steps, cfg.outer_optimizer
        (32, 0.4, 1, 'adam')
    """

    dataset: str = "sine"
    algorithm: str = "maml"
    ways: int = 5
    shots: int | None = None
    queries: int | None = None
    meta_batch: int | None = None
    iterations: int | None = None
    inner_lr: float | None = None
    inner_steps: int | None = None
    inner_batch: int | None = None
    inner_optimizer: str | None = None
    inner_adam_state: str | None = None
    inner_flood: float | None = None
    flood_mode: str = "batch"
    outer_flood: float | None = None
    outer_optimizer: str | None = None
    outer_lr: float | None = None
    outer_eps: float | None = None
    weight_decay: float = 0.0
    schedule: str | None = None
    init: str = "xavier"
    dropout: float = 0.0
    # None: the dataset's network (the sine MLP, a Conv4); "resnet12" for the RGB benchmarks.
    backbone: str | None = None
    label_smoothing: float = 0.0
    eval_shots: int | None = None
    eval_queries: int | None = None
    eval_steps: int | None = None
    eval_inner_batch: int | None = None
    val_every: int = 500
    val_tasks: int = 100
    patience: int | None = None
    seed: int = 0
    device: str = "cpu"
    data_root: str | None = None
    # Options of some algorithms only (ALGORITHM_SPECS; an error for the others).
    first_order: bool | None = None
    anil_inner: str | None = None
    imaml_lambda: float | None = None
    cg_steps: int | None = None
    imaml_inner_solve: str | None = None
    cg_damping: float | None = None
    lam_damping: float | None = None
    lslr: bool | None = None
    multi_step_loss: bool | None = None
    msl_iterations: int | None = None
    first_order_iterations: int | None = None
    per_step_bn: bool | None = None
    # MAML only: recompute inner-step activations in the backward (same meta-gradient, less
    # memory). None is off, so configs saved before this option existed stay unchanged.
    memory_saving: bool | None = None
    # Meta-train on a fixed subset of this many classes of the training split (None: all);
    # validation and test unchanged. See train_split_classes and build_sampler.
    train_classes: int | None = None

    def resolved(self) -> TrainConfig:
        """A copy with the paper defaults filled in and every value checked."""
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        spec = ALGORITHM_SPECS[self.algorithm]
        values = asdict(self)
        for name in VARIANT_OPTIONS:
            if name not in spec.options and values[name] not in (None, _NEUTRAL.get(name)):
                users = [a for a, sp in ALGORITHM_SPECS.items() if name in sp.options]
                which = f"{users[0]!r}" if len(users) == 1 else f"one of {tuple(users)}"
                raise ValueError(f"{name} applies to algorithm={which} only, not to "
                                 f"{self.algorithm!r}; leave it unset")
        # The algorithm's own settings first, then the paper defaults of its family.
        own = {**spec.options, **spec.defaults, **spec.dataset_defaults.get(self.dataset, {})}
        for source in (own, PAPER_DEFAULTS[(self.dataset, spec.family)]):
            for key, value in source.items():
                if values.get(key) is None:
                    values[key] = value
        values["inner_optimizer"] = values["inner_optimizer"] or "sgd"
        if values["inner_optimizer"] == "adam" and self.algorithm == "reptile":
            values["inner_adam_state"] = values["inner_adam_state"] or "carried"
        values["queries"] = values["queries"] or values["shots"]
        values["schedule"] = values["schedule"] or "constant"
        values["eval_shots"] = values["eval_shots"] or values["shots"]
        values["eval_queries"] = values["eval_queries"] or values["queries"]
        values["eval_steps"] = values["eval_steps"] or max(values["inner_steps"], 1)
        for key, rule in SHOT_DEFAULTS.get((self.dataset, spec.family), {}).items():
            if values[key] is None:
                values[key] = rule(values)
        cfg = TrainConfig(**values)
        cfg._check()
        return cfg

    def _check_value(self, name: str) -> None:
        """Check one setting against its rule in ``FIELD_RULES`` (``None`` is unset)."""
        ok, rule = FIELD_RULES[name]
        value = getattr(self, name)
        if value is not None and not ok(value):
            raise ValueError(f"{name} must be {rule}, got {value!r}")

    def _check(self) -> None:
        for name in FIELD_RULES:
            self._check_value(name)
        if self.dataset == "omniglot":
            for shots, queries, which in ((self.shots, self.queries, ""),
                                          (self.eval_shots, self.eval_queries, "eval_")):
                if shots + queries > 20:
                    raise ValueError(
                        f"{which}shots + {which}queries = {shots} + {queries} = "
                        f"{shots + queries}, but each Omniglot character has only 20 drawings; "
                        "lower them")
            if self.ways > 100:
                raise ValueError(f"ways={self.ways} exceeds the 100 classes of the Omniglot "
                                 "validation split; use ways <= 100")
        if self.dataset in BENCHMARKS:
            bench = BENCHMARKS[self.dataset]
            for shots, queries, which in ((self.shots, self.queries, ""),
                                          (self.eval_shots, self.eval_queries, "eval_")):
                if bench.per_class is not None and shots + queries > bench.per_class:
                    raise ValueError(
                        f"{which}shots + {which}queries = {shots} + {queries} = "
                        f"{shots + queries}, but each {bench.name} class has only "
                        f"{bench.per_class} images; lower them")
            if self.ways > bench.val_classes:
                raise ValueError(f"ways={self.ways} exceeds the {bench.val_classes} classes of "
                                 f"the {bench.name} validation split; use ways <= "
                                 f"{bench.val_classes}")
        if self.outer_eps is not None and self.outer_optimizer != "adam":
            raise ValueError(f"outer_eps is Adam's epsilon; it applies to outer_optimizer="
                             f"'adam' only, not {self.outer_optimizer!r}: leave it unset")
        if self.backbone == "conv4" and self.dataset == "sine":
            raise ValueError("backbone='conv4' is for images; sine uses the MLP: leave "
                             "backbone unset")
        if self.backbone == "resnet12":
            if self.dataset not in BENCHMARKS:
                raise ValueError(f"backbone='resnet12' is for the RGB benchmarks "
                                 f"{tuple(BENCHMARKS)}, not {self.dataset!r}; leave backbone "
                                 "unset for the dataset's own network")
            if self.init != "xavier":
                raise ValueError("init applies to the Conv4 and the MLP; ResNet12 keeps its "
                                 "paper's initialisation: leave init unset")
        if self.train_classes is not None:
            if self.dataset == "sine":
                raise ValueError("train_classes (--train-classes) picks classes of a "
                                 "class-split dataset; sine tasks have none: leave it unset")
            available = train_split_classes(self.dataset)
            if not self.ways <= self.train_classes <= available:
                raise ValueError(
                    f"train_classes (--train-classes) = {self.train_classes} must be >= ways "
                    f"= {self.ways} (a task needs {self.ways} distinct classes) and <= "
                    f"{available}, the classes of the {self.dataset} training split")
        if self.algorithm == "reptile" and self.inner_steps == 0:
            raise ValueError("inner_steps must be >= 1 for reptile: with none, phi = theta "
                             "and the update theta + epsilon * (phi - theta) changes nothing")

    def to_dict(self) -> dict:
        """The settings as a dict; those of ``OMITTED_WHEN_UNSET`` only when set, so the
        saved configs (checkpoints, search trial keys, result files) of runs that do not
        use them are the same as before they existed."""
        values = asdict(self)
        for name in OMITTED_WHEN_UNSET:
            if values[name] is None:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = upgraded(values)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)


# Settings added after runs were saved that to_dict() leaves out while unset (a saved config
# without one reads back as None: from_dict's default, and the resume check's .get()).
OMITTED_WHEN_UNSET = ("train_classes", "backbone", "imaml_inner_solve", "cg_damping",
                      "lam_damping", "inner_adam_state", "outer_eps")


def upgraded(saved: dict) -> dict:
    """A saved config as this version reads it: Reptile with Adam saved before
    ``inner_adam_state`` existed restarted Adam for every task, so it reads as ``"task"``."""
    if (saved.get("algorithm") == "reptile" and saved.get("inner_optimizer") == "adam"
            and "inner_adam_state" not in saved):
        return {**saved, "inner_adam_state": "task"}
    return saved


def train_split_classes(dataset: str) -> int:
    """The classes of ``dataset``'s training split (Omniglot: characters, before rotation)."""
    import metalearn.data
    from metalearn.data.omniglot import split_classes

    if dataset == "omniglot":
        return len(split_classes("train"))
    return len(getattr(metalearn.data, BENCHMARKS[dataset].sampler)._splits["train"])


def build_model(cfg: TrainConfig) -> nn.Module:
    """The paper's network for the dataset: the sine MLP, the Omniglot Conv4, or for the
    RGB benchmarks the miniImageNet Conv4 of MAML (32 filters, max-pooling), or the
    :class:`~metalearn.models.ResNet12` with ``backbone="resnet12"``."""
    if cfg.dataset == "sine":
        return MLP(init=cfg.init, dropout=cfg.dropout)
    if cfg.backbone == "resnet12":
        return ResNet12(cfg.ways, image_size=BENCHMARKS[cfg.dataset].image_size,
                        drop_rate=cfg.dropout)
    if cfg.dataset in BENCHMARKS:
        return Conv4(ways=cfg.ways, in_channels=3, hidden=32,
                     image_size=BENCHMARKS[cfg.dataset].image_size, max_pool=True,
                     init=cfg.init, dropout=cfg.dropout)
    return Conv4(ways=cfg.ways, init=cfg.init, dropout=cfg.dropout)


def build_learner(cfg: TrainConfig, model: nn.Module, evaluation: bool = False,
                  share: MetaLearner | None = None, loss_fn: Callable | None = None
                  ) -> MetaLearner:
    """The configured algorithm around ``model``; ``evaluation`` uses the eval inner batch.

    ``share``: a learner built from the same config whose learned inner-loop state
    (Meta-SGD's and MAML++'s ``learned`` module) the new learner uses, the same tensors.
    Pass the training learner when building its evaluation learner.
    ``loss_fn``: a per-example loss of the user's instead of the default one
    (:class:`~metalearn.algorithms.losses.TaskLoss`); the config's flooding applies to it.
    """
    loss = dict(inner_flood=cfg.inner_flood, flood_mode=cfg.flood_mode,
                label_smoothing=cfg.label_smoothing)
    if loss_fn is not None:
        loss["loss_fn"] = loss_fn
    learner = ALGORITHM_SPECS[cfg.algorithm].build(cfg, model, loss, evaluation)
    if share is not None:
        if share.model is not model:
            raise ValueError("share= must be a learner of the same model")
        learner.learned = share.learned
    return learner


def build_sampler(cfg: TrainConfig, split: str, seed: int, evaluation: bool = False):
    """A seeded task sampler for ``split`` ("train", "val" or "test").

    ``cfg.train_classes`` restricts the "train" split (only) to a fixed subset of its
    classes, the same for every seed (:func:`~metalearn.data.few_shot.class_subset`).
    """
    import metalearn.data
    from metalearn.data import OmniglotTasks, SineTasks

    shots = cfg.eval_shots if evaluation else cfg.shots
    queries = cfg.eval_queries if evaluation else cfg.queries
    if cfg.dataset == "sine":
        return SineTasks(shots=shots, queries=queries, seed=seed)
    subset = {"subset": cfg.train_classes} if split == "train" and cfg.train_classes else {}
    if cfg.dataset in BENCHMARKS:
        sampler = getattr(metalearn.data, BENCHMARKS[cfg.dataset].sampler)
        return sampler(root=cfg.data_root, split=split, ways=cfg.ways, shots=shots,
                       queries=queries, seed=seed, **subset)
    return OmniglotTasks(root=cfg.data_root, split=split, ways=cfg.ways, shots=shots,
                         queries=queries, seed=seed, **subset)


def evaluation_tasks(cfg: TrainConfig, split: str, seed: int, count: int) -> dict[str, Any]:
    """The fixed ``count`` tasks of ``split`` to score a model on, as keyword arguments of
    :func:`~metalearn.evaluation.evaluate` (``tasks=``, and ``num_tasks=`` for a sampler).

    Sine and Omniglot tasks are drawn at once (600 Omniglot 5-way 1-shot tasks with 15
    queries per class take 150 MB), which keeps the task sets of the committed results. The
    RGB benchmarks are drawn a chunk at a time while they are scored (600 miniImageNet tasks
    would take 4 GB at once).
    """
    sampler = build_sampler(cfg, split, seed=seed, evaluation=True)
    if cfg.dataset in BENCHMARKS:
        return {"tasks": sampler, "num_tasks": count}
    return {"tasks": sampler.sample(count)}


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The outer optimiser, with weight decay."""
    lr, wd = cfg.outer_lr, cfg.weight_decay
    if cfg.outer_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if cfg.outer_optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if cfg.outer_optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    eps = 1e-8 if cfg.outer_eps is None else cfg.outer_eps
    return torch.optim.Adam(params, lr=lr, weight_decay=wd, eps=eps)


def build_schedule(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant, linear to 0 (Reptile's meta step anneal), or cosine to 0."""
    total = cfg.iterations

    def factor(it: int) -> float:
        frac = min(it / total, 1.0)
        if cfg.schedule == "linear":
            return 1.0 - frac
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
