"""Hyperparameter search against the validation split: grid or random, one trial per run.

Every trial is a full :func:`~metalearn.training.train` run, scored by its best validation
value (the checkpoint training keeps). The test split is never touched: evaluate the winner
on it afterwards, once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from metalearn.checkpoint import atomic_write
from metalearn.config import TrainConfig
from metalearn.evaluation import Metric

SEARCH_FORMAT = 1
# Not hyperparameters: where and how a run executes, what the search itself controls, or
# what defines the task (validation values of different tasks do not compare).
NOT_SEARCHABLE = {"device", "data_root", "seed", "val_every", "val_tasks", "patience",
                  "iterations", "dataset", "ways", "shots", "eval_shots", "eval_queries"}
# Settings that do nothing once the user gives the object they would configure.
IGNORED_WITH = {"model": ("init", "dropout"), "train_sampler": ("queries",),
                "loss": ("label_smoothing",)}


@dataclass
class SearchResult:
    """What :func:`search` returns: every trial's record and the winning point.

    Attributes:
        metric: the validation metric the trials are ranked by (``"accuracy"``, ``"mse"``,
            or a :class:`~metalearn.evaluation.Metric`'s name).
        higher_is_better: the metric's direction.
        trials: one record per (point, seed): the point, the seed, the best validation
            value with its 95% CI and iteration, and the seconds it took.
        header: the command, commit, machine and versions of the search.
        best: the point with the best validation value averaged over seeds (a property).

    Example:
        >>> from metalearn.search import SearchResult
        >>> r = SearchResult("mse", higher_is_better=False, trials=[
        ...     {"point": {"inner_lr": 0.01}, "seed": 0, "best": {"value": 0.9, "ci95": 0.1}},
        ...     {"point": {"inner_lr": 0.02}, "seed": 0, "best": {"value": 0.7, "ci95": 0.1}}])
        >>> r.best["point"], r.best["value"]
        ({'inner_lr': 0.02}, 0.7)
    """

    metric: str
    higher_is_better: bool
    trials: list[dict] = field(default_factory=list)
    header: dict = field(default_factory=dict)

    @property
    def best(self) -> dict | None:
        """The first row of :meth:`ranking`, or ``None`` before any trial."""
        ranking = self.ranking()
        return ranking[0] if ranking else None

    def ranking(self) -> list[dict]:
        """Points with their seed-averaged validation value, best first."""
        by_point: dict[str, dict] = {}
        for t in self.trials:
            key = json.dumps(t["point"], sort_keys=True)
            entry = by_point.setdefault(key, {"point": t["point"], "values": [], "ci": []})
            entry["values"].append(t["best"]["value"] if t["best"] else math.nan)
            entry["ci"].append(t["best"]["ci95"] if t["best"] else math.nan)
        # One seed: that run's CI over validation tasks. Several: the mean has no CI here.
        rows = [{"point": e["point"], "value": sum(e["values"]) / len(e["values"]),
                 "ci95": e["ci"][0] if len(e["ci"]) == 1 else None,
                 "seeds": len(e["values"])} for e in by_point.values()]

        def key(row: dict) -> float:
            v = row["value"]
            if math.isnan(v):
                return math.inf
            return -v if self.higher_is_better else v

        return sorted(rows, key=key)  # stable: ties keep the search order

    def to_dict(self) -> dict:
        return {"format": SEARCH_FORMAT, "header": self.header, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "best": self.best,
                "ranking": self.ranking(), "trials": self.trials}


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def parse_value(name: str, text: str):
    """``text`` as the type of the :class:`TrainConfig` field ``name``."""
    kind = _field_types()[name]
    text = text.strip()
    if kind.startswith("bool"):
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name} takes true or false, got {text!r}")
    if kind.startswith("int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} takes integers, got {text!r}") from None
    if kind.startswith("float"):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name} takes numbers, got {text!r}") from None
    return text


def parse_space(specs: list[str]) -> dict[str, list]:
    """``["inner_lr=0.1,0.2", "inner-steps=1,5"]`` as ``{"inner_lr": [0.1, 0.2], ...}``."""
    space: dict[str, list] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not values.strip():
            raise ValueError(f"{spec!r} is not NAME=V1,V2,...; for example inner_lr=0.1,0.2")
        if name in space:
            raise ValueError(f"{name} is given twice; list all its values in one NAME=V1,V2")
        check_space({name: [None]})  # a known, searchable name before parsing its values
        space[name] = [parse_value(name, v) for v in values.split(",")]
        check_space({name: space[name]})
    return space


def check_space(space: dict[str, list]) -> None:
    """Raise ``ValueError`` naming a key that is not a searchable setting, or an empty or
    repeated value list."""
    known = _field_types()
    for name, values in space.items():
        if name not in known:
            raise ValueError(f"{name!r} is not a setting; searchable settings: "
                             f"{', '.join(sorted(set(known) - NOT_SEARCHABLE))}")
        if name == "seed":
            raise ValueError("seed is not a hyperparameter; average over seeds with seeds=[...]"
                             " (--seeds on the command line)")
        if name in NOT_SEARCHABLE:
            raise ValueError(f"{name} is set for the whole search, not searched; set it on "
                             "the base config")
        if not values:
            raise ValueError(f"{name} has no values to try")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"{name} lists a value twice: {values}")


def grid_points(space: dict[str, list], trials: int | None = None,
                seed: int = 0) -> list[dict]:
    """Every combination of the values, in the order given; or, with ``trials``, that many
    distinct combinations drawn at random (random search over the grid)."""
    names = list(space)
    points = [dict(zip(names, combo)) for combo in itertools.product(*space.values())]
    if trials is None:
        return points
    if not 1 <= trials <= len(points):
        raise ValueError(f"trials={trials}, but the grid has {len(points)} points; ask for "
                         f"1 to {len(points)} (or leave trials unset for the whole grid)")
    return random.Random(seed).sample(points, trials)


def search(
    base: TrainConfig,
    space: dict[str, list],
    *,
    trials: int | None = None,
    seeds: list[int] | None = None,
    runs: str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model: nn.Module | None = None,
    train_sampler: Any = None,
    val_sampler: Any = None,
    loss: Any = None,
    metric: Metric | None = None,
) -> SearchResult:
    """Train one run per point of ``space`` (and per seed), and rank them on validation.

    Every point is scored on the same validation tasks, defined by ``base`` (its
    ``eval_shots`` and ``eval_queries`` as resolved), even where a point changes a setting
    they would otherwise follow, such as ``queries``. Every point's settings are checked
    before the first trial runs, so a bad value fails at once.

    With a model, task samplers, a loss or a metric of your own (as for
    :func:`~metalearn.training.train`), every trial starts from the same state of them:
    a copy of ``model`` as given, and the samplers put back to the state they were given
    in (``load_state_dict``), so that every trial sees the same tasks and validation set.
    Both samplers need ``state_dict``/``load_state_dict`` here. ``out`` and ``resume``
    tell the objects' trials apart by what identifies them (their fingerprint).

    Args:
        base: the settings shared by all trials, including ``iterations``, ``val_every``,
            ``val_tasks`` and ``patience`` (early stopping applies within each trial).
        space: setting name -> values to try, e.g. ``{"inner_lr": [0.1, 0.4]}``.
        trials: draw this many distinct points at random instead of the whole grid.
        seeds: run every point with each of these seeds and average (default: base's seed).
            All points share the seeds, so they see the same batches and validation tasks.
        runs: folder for each trial's checkpoints and logs (``None`` keeps none).
        out: JSON file rewritten atomically after every trial.
        resume: reuse the trials already in ``out`` that were run with the same settings.
        progress: a progress bar over trials.
        model, train_sampler, val_sampler, loss, metric: objects of your own, as for
            :func:`~metalearn.training.train`; the ``model`` itself is not trained.

    Example:
        >>> from metalearn.config import TrainConfig
        >>> from metalearn.search import search
        >>> base = TrainConfig(dataset="sine", iterations=20, val_every=10, val_tasks=10)
        >>> result = search(base, {"inner_lr": [0.01, 0.02]}, progress=False)
        >>> len(result.trials), sorted(result.best)
        (2, ['ci95', 'point', 'seeds', 'value'])
    """
    from metalearn.training import train
    from metalearn.user_objects import UserObjects

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("search runs its trials one after another in one process; run it "
                           "without torchrun (each trial can then be rerun under torchrun)")
    objects = UserObjects(model, train_sampler, val_sampler, loss, metric)
    objects.check()
    objects.check_config(base)
    samplers = {name: s for name, s in (("train_sampler", train_sampler),
                                        ("val_sampler", val_sampler)) if s is not None}
    for name, sampler in samplers.items():
        if not (callable(getattr(sampler, "state_dict", None))
                and callable(getattr(sampler, "load_state_dict", None))):
            raise TypeError(f"{name} needs state_dict() and load_state_dict(state) in a search: "
                            "every trial starts it from the state it was given in, so that "
                            "all trials see the same tasks")
    check_space(space)
    for name, fields in IGNORED_WITH.items():
        for key in sorted(set(fields) & set(space)):
            if getattr(objects, name) is not None:
                raise ValueError(f"{key} does nothing with {name}= of your own; search its "
                                 f"settings by building one {name} per value instead")
    if not space:
        raise ValueError("the search space is empty; give at least one setting to vary")
    points = grid_points(space, trials, base.seed)
    # Every trial is validated on the same task definition, even where a searched setting
    # (queries, say) would otherwise move it.
    resolved = base.resolved()
    base = dataclasses.replace(base, eval_shots=resolved.eval_shots,
                               eval_queries=resolved.eval_queries)
    seeds = [base.seed] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    # Resolve every trial first: a bad value fails now, not hours into the search.
    configs = []
    for point in points:
        for s in seeds:
            try:
                configs.append((point, s, dataclasses.replace(base, **point, seed=s).resolved()))
            except ValueError as err:
                raise ValueError(f"trial {point} (seed {s}): {err}") from None
    initial = {name: copy.deepcopy(s.state_dict()) for name, s in samplers.items()}
    chosen = _validation_metric(objects, base, initial)
    user = objects.describe()
    header = _header(base, space, trials, seeds)
    if user is not None:
        header["user"] = user
    result = SearchResult(metric=chosen.name, higher_is_better=chosen.higher_is_better,
                          header=header)
    done = _load_done(out, configs, user) if resume else {}

    bar = tqdm(configs, disable=not progress, desc="search", dynamic_ncols=True)
    for point, s, cfg in bar:
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in point.items()) + f", seed={s}")
        key = _trial_key(cfg.to_dict(), user)
        if key in done:
            result.trials.append(done[key])
        else:
            ckpt = Path(runs) / f"{_trial_name(point, s, key)}.pt" if runs is not None else None
            t0 = time.perf_counter()
            for name, sampler in samplers.items():  # every trial from the same tasks
                sampler.load_state_dict(copy.deepcopy(initial[name]))
            # Files of this trial are from an attempt killed before it was recorded.
            run = train(cfg, checkpoint=ckpt, overwrite=True, progress=False,
                        model=copy.deepcopy(model) if model is not None else None,
                        train_sampler=train_sampler, val_sampler=val_sampler, loss=loss,
                        metric=metric)
            trial = {
                "point": point, "seed": s, "config": cfg.to_dict(), "best": run.best,
                "iterations": run.iteration, "stopped_early": run.stopped_early,
                "seconds": time.perf_counter() - t0,
                "checkpoint": str(ckpt.with_suffix(".best.pt")) if ckpt else None}
            if user is not None:
                trial["user"] = user
            result.trials.append(trial)
        if out is not None:
            payload = json.dumps(result.to_dict(), indent=2).encode()
            atomic_write(out, lambda f, p=payload: f.write(p))
    bar.close()
    for name, sampler in samplers.items():  # hand the samplers back as they were given
        sampler.load_state_dict(copy.deepcopy(initial[name]))
    return result


def _validation_metric(objects: Any, base: TrainConfig, initial: dict) -> Metric:
    """The metric every trial validates with, known before the first trial."""
    from metalearn.algorithms.losses import TaskLoss
    from metalearn.evaluation import default_metric
    from metalearn.training import validation_metric

    if objects.metric is not None:
        return objects.metric
    if objects.val_sampler is not None:
        # One task, to see its targets; the sampler is put back before the first trial.
        classification = objects.val_sampler.sample(1).is_classification
        objects.val_sampler.load_state_dict(copy.deepcopy(initial["val_sampler"]))
    else:
        classification = validation_metric(base.dataset)[0] == "accuracy"
    loss = TaskLoss(loss_fn=objects.loss) if objects.loss is not None else None
    return default_metric(classification, loss)


def _trial_key(config: dict, user: dict | None) -> str:
    """What a trial is: its resolved config, and what identifies the user's objects."""
    if user is None:
        return json.dumps(config, sort_keys=True)
    return json.dumps({"config": config, "user": user}, sort_keys=True)


def _trial_name(point: dict, seed: int, config_key: str) -> str:
    """A file stem that names the point and stays the same when the grid grows (so a
    resumed search never writes over an earlier trial's checkpoint)."""
    readable = "_".join(f"{k}={v}" for k, v in point.items()) + f"_seed{seed}"
    readable = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", readable)[:80]
    return f"{readable}_{hashlib.sha1(config_key.encode()).hexdigest()[:8]}"


def _header(base: TrainConfig, space: dict, trials: int | None, seeds: list[int]) -> dict:
    from metalearn.run_record import run_header

    return {**run_header(), "base": base.to_dict(), "space": space, "trials": trials,
            "seeds": seeds}


def _load_done(out: str | Path | None, configs: list, user: dict | None = None
               ) -> dict[str, dict]:
    """Trials in ``out`` whose full resolved config (and user objects) is one this search
    would run."""
    if out is None:
        raise ValueError("resume needs the out file of the earlier search")
    path = Path(out)
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        assert saved["format"] == SEARCH_FORMAT
        trials = saved["trials"]
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ValueError(f"{path} is not a search result of this version; move it away or "
                         "choose another out file") from None
    wanted = {_trial_key(cfg.to_dict(), user) for _, _, cfg in configs}
    by_key = {_trial_key(t["config"], t.get("user")): t for t in trials}
    return {k: t for k, t in by_key.items() if k in wanted}
