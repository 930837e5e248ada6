"""The meta-training loop: sample, step, update, validate, checkpoint, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.losses import LossFn, LossShapeError, describe_callable
from metalearn.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    non_finite_entries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_digest,
)
from metalearn.config import (
    TrainConfig,
    build_learner,
    build_model,
    build_optimizer,
    build_sampler,
    build_schedule,
)
from metalearn.data.task_batch import TaskBatch
from metalearn.distributed import DistContext
from metalearn.evaluation import EvaluationResult, Metric, default_metric, evaluate
from metalearn.run_files import claim_checkpoint

# 2: the same entries as 1, plus the content digest that save_checkpoint adds.
# 3: the entries of 2, plus "user": what identifies the model, samplers, loss and metric a
#    run was given (UserObjects.describe). Runs of built-in objects only still write 2, so
#    code that reads format 2 resumes them, and refuses a run of objects it cannot build.
CHECKPOINT_FORMAT = 3
BUILTIN_CHECKPOINT_FORMAT = 2
# Settings that may differ between a run and its resumption.
# memory_saving changes how the meta-gradient is computed, not its value.
RESUMABLE_CHANGES = {"device", "data_root", "iterations", "patience", "memory_saving"}


class NonFiniteError(RuntimeError):
    """The loss or the meta-gradient stopped being finite."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and learner, and the run's record."""

    model: nn.Module
    learner: MetaLearner
    config: TrainConfig
    iteration: int
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    stopped_early: bool = False


def validation_metric(dataset: str) -> tuple[str, bool]:
    """The metric validation reports for ``dataset``, and whether higher is better."""
    return ("mse", False) if dataset == "sine" else ("accuracy", True)


def companion_paths(checkpoint: Path) -> tuple[Path, Path]:
    """The best-model file and the JSON-lines log that live beside a checkpoint."""
    return checkpoint.with_suffix(".best.pt"), checkpoint.with_suffix(".jsonl")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _meta_parameters(learner: MetaLearner) -> dict[str, nn.Parameter]:
    """What the outer optimiser updates: the model's trainable parameters, then the learned
    inner-loop state's (Meta-SGD's and MAML++'s learning rates), in that order."""
    return {n.removeprefix("model."): p for n, p in learner.named_parameters()
            if p.requires_grad}


_SAMPLER_PROTOCOL = ("sample(n) -> TaskBatch, state_dict() -> dict of tensors and plain "
                     "values, load_state_dict(state)")
# The types a checkpoint can hold and load back with weights_only=True.
_CHECKPOINTABLE = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device,
                   torch.Size)


@dataclass
class UserObjects:
    """The model, task samplers, loss and metric of the user's that a run is given; each one
    that is ``None`` is built from the config as usual. See :func:`train`.

    Example:
        >>> from metalearn.training import UserObjects
        >>> from metalearn.models import MLP
        >>> UserObjects(model=MLP()).describe()["model"][0]
        'class metalearn.models.mlp.MLP'
    """

    model: nn.Module | None = None
    train_sampler: Any = None
    val_sampler: Any = None
    loss: LossFn | None = None
    metric: Metric | None = None

    @property
    def given(self) -> bool:
        """Whether any object is the user's."""
        return any(v is not None for v in (self.model, self.train_sampler, self.val_sampler,
                                           self.loss, self.metric))

    def check(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the argument that is not what it must be."""
        if self.model is not None and not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.train_sampler is not None:
            _check_sampler(self.train_sampler, "train_sampler", stateful=True)
            if self.val_sampler is None:
                raise ValueError(
                    "train_sampler= needs val_sampler= too: validation (the best checkpoint, "
                    "early stopping) needs held-out tasks of the same kind; give a sampler of "
                    "validation tasks, e.g. the same class with other data or another seed")
        if self.val_sampler is not None:
            _check_sampler(self.val_sampler, "val_sampler", stateful=False)
        if self.loss is not None and not callable(self.loss):
            raise TypeError(f"loss must be a per-example loss, loss(outputs, targets) -> (n,), "
                            f"got {type(self.loss).__name__}")
        if self.metric is not None and not isinstance(self.metric, Metric):
            raise TypeError(f"metric must be a metalearn.evaluation.Metric, got "
                            f"{type(self.metric).__name__}; wrap a function as "
                            "Metric(name, fn, higher_is_better=...)")

    def check_config(self, cfg: TrainConfig) -> None:
        """Refuse settings that would build an object the user replaced, and so do nothing."""
        if self.model is not None:
            for name, default in (("dropout", 0.0), ("init", "xavier")):
                if getattr(cfg, name) != default:
                    raise ValueError(
                        f"{name}={getattr(cfg, name)!r} configures the built-in model, but "
                        f"model= is your own; build that into your model and leave {name} at "
                        f"{default!r}")
        if self.train_sampler is not None and cfg.train_classes is not None:
            raise ValueError(f"train_classes={cfg.train_classes} restricts the built-in "
                             "training sampler, but train_sampler= is your own; draw from "
                             "the classes you want in it (FewShotTasks(classes=...)) and "
                             "leave train_classes unset")
        if self.loss is not None and cfg.label_smoothing:
            raise ValueError("label_smoothing applies to the built-in cross-entropy, but loss= "
                             "is your own; smooth inside your loss and leave label_smoothing "
                             "at 0")

    def describe(self, val_tasks: TaskBatch | None = None) -> dict | None:
        """What identifies the user's objects (``None`` if there are none): the model's
        class and its parameters' and buffers' names, shapes and dtypes; each sampler's,
        loss's and metric's :func:`~metalearn.algorithms.losses.describe_callable`; and a
        digest of the validation tasks drawn from ``val_sampler``."""
        if not self.given:
            return None
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = model_fingerprint(self.model)
        for name in ("train_sampler", "val_sampler", "loss"):
            obj = getattr(self, name)
            if obj is not None:
                out[name] = describe_callable(obj)
        if self.metric is not None:
            m = self.metric
            out["metric"] = (f"{m.name} ({'higher' if m.higher_is_better else 'lower'} is "
                             f"better): {describe_callable(m.fn)}")
        if val_tasks is not None and self.val_sampler is not None:
            out["val_tasks"] = state_digest({"tasks": [val_tasks.support_x, val_tasks.support_y,
                                                       val_tasks.query_x, val_tasks.query_y]})
        return out


def model_fingerprint(model: nn.Module) -> list[str]:
    """The model's class, and each parameter's and buffer's name, shape and dtype (and
    whether a parameter is trained): what a checkpoint of it must match.

    Example:
        >>> from torch import nn
        >>> from metalearn.training import model_fingerprint
        >>> model_fingerprint(nn.Linear(2, 3))[1:]
        ['parameter weight (3, 2) torch.float32', 'parameter bias (3,) torch.float32']
    """
    cls = type(model)
    rows = [f"class {cls.__module__}.{cls.__qualname__}"]
    for name, p in model.named_parameters():
        kind = "parameter" if p.requires_grad else "frozen parameter"
        rows.append(f"{kind} {name} {tuple(p.shape)} {p.dtype}")
    rows += [f"buffer {name} {tuple(b.shape)} {b.dtype}" for name, b in model.named_buffers()]
    return rows


def _check_sampler(sampler: Any, name: str, stateful: bool) -> None:
    needs = ("sample", "state_dict", "load_state_dict") if stateful else ("sample",)
    missing = [m for m in needs if not callable(getattr(sampler, m, None))]
    if missing:
        raise TypeError(
            f"{name} must be a task sampler with "
            f"{_SAMPLER_PROTOCOL if stateful else 'sample(n) -> TaskBatch'}; "
            f"{type(sampler).__name__} has no {', '.join(m + '()' for m in missing)}"
            + (" (the run saves the sampler's state in its checkpoints, so that a resumed "
               "run draws the tasks an uninterrupted one would)" if stateful else ""))
    if stateful:
        _check_checkpointable(sampler.state_dict(), f"{name}.state_dict()")


def _check_checkpointable(obj: Any, where: str) -> None:
    """Refuse what a checkpoint could not load back (``weights_only``): tensors, plain
    values and dicts, lists and tuples of them only."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_checkpointable(k, f"{where} key")
            _check_checkpointable(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_checkpointable(v, f"{where}[{i}]")
    elif not isinstance(obj, _CHECKPOINTABLE):
        raise TypeError(
            f"{where} holds a {type(obj).__name__}, which a checkpoint cannot hold; return "
            "tensors and plain values (int, float, str, bool, None) in dicts, lists and "
            "tuples, e.g. a torch.Generator's get_state() or a numpy state as a tensor")


def _draw(sampler: Any, n: int, name: str) -> TaskBatch:
    """``n`` tasks from a user's sampler, checked."""
    batch = sampler.sample(n)
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"{name}.sample({n}) returned {type(batch).__name__}; it must return a "
                        "metalearn.data.TaskBatch of n tasks")
    if len(batch) != n:
        raise ValueError(f"{name}.sample({n}) returned {len(batch)} tasks; it must return "
                         f"exactly the {n} asked for")
    return batch


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _check_fit(learner: MetaLearner, task: TaskBatch, objects: UserObjects,
               metric: Metric) -> None:
    """Run the model, the loss and the metric once on one task, so that outputs that do not
    fit the targets fail now, in the words of the arguments, not deep in the first step."""
    sx, sy, qx, qy = task.support_x[0], task.support_y[0], task.query_x[0], task.query_y[0]
    n = len(sx)
    params = learner.fmodel.params()
    devices = [sx.device] if sx.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # no RNG draw for the run
        try:
            out = learner.fmodel(params, sx, order=0)
        except Exception as err:
            raise ValueError(
                f"the model fails on one task's support inputs, shape {tuple(sx.shape)} "
                f"{sx.dtype} (one task's examples; the samplers' support_x is (tasks, "
                f"examples, ...)): {_first_line(err)}") from err
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != n:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model must return a tensor with one row per example, "
                             f"({n}, ...) for {n} support examples, got {got}")
        where = (f"the model's outputs, shape {tuple(out.shape)}, and one task's support "
                 f"targets, shape {tuple(sy.shape)} {sy.dtype}")
        if objects.loss is None and sy.dtype.is_floating_point and out.shape != sy.shape:
            raise ValueError(
                f"{where}, differ in shape, but the default loss for float targets (mean "
                f"squared error) needs them equal: give the model {tuple(sy.shape[1:])} "
                "outputs per example, or pass loss= a per-example loss for these shapes")
        if objects.loss is None and not sy.dtype.is_floating_point:
            if out.ndim != 2:
                raise ValueError(f"{where}: the default loss for integer labels "
                                 "(cross-entropy) needs logits of shape (n, classes)")
            if int(sy.max()) >= out.shape[1] or int(sy.min()) < 0:
                raise ValueError(
                    f"{where}: the labels range over [{int(sy.min())}, {int(sy.max())}] but "
                    f"the model has {out.shape[1]} outputs; build it with (at least) "
                    f"{int(sy.max()) + 1} outputs, one per class")
        try:
            learner.loss.outer(out, sy)
        except LossShapeError:  # already says what to return
            raise
        except Exception as err:
            raise ValueError(f"the loss fails on {where}: {_first_line(err)}") from err
        query = learner.fmodel(params, qx, order=0)
        try:
            value = torch.as_tensor(metric.fn(query, qy))
        except Exception as err:
            raise ValueError(f"the metric {metric.name!r} fails on the model's query outputs, "
                             f"shape {tuple(query.shape)}, and targets, shape "
                             f"{tuple(qy.shape)} {qy.dtype}: {_first_line(err)}") from err
        if value.numel() != 1:
            raise ValueError(f"the metric {metric.name!r} returned shape {tuple(value.shape)} "
                             "for one task; it must return one number per task")


def _user_mismatch(saved: dict | None, current: dict | None) -> list[str]:
    """What differs between the user's objects of a checkpointed run and of this one."""
    if saved == current:
        return []
    names = {"model": "model=", "train_sampler": "train_sampler=", "val_sampler":
             "val_sampler=", "loss": "loss=", "metric": "metric="}
    if saved is None:
        given = ", ".join(names[k] for k in current if k in names)
        return [f"the checkpoint's run used built-in objects only; this one is given {given}"]
    if current is None:
        given = ", ".join(names[k] for k in saved if k in names)
        return [f"the checkpoint's run was given {given}; pass the same objects to resume it"]
    out = []
    for key in sorted(set(saved) | set(current)):
        was, now = saved.get(key), current.get(key)
        if was == now:
            continue
        if key == "val_tasks" and was is not None and now is not None:
            out.append("val_sampler: it drew other validation tasks than the checkpoint's run "
                       "did; build it with the same data, settings and seed")
        elif key == "model" and was is not None and now is not None:
            gone = [r for r in was if r not in now]
            new = [r for r in now if r not in was]
            out.append(f"model: the checkpoint's model has "
                       f"{'; '.join(gone[:3]) or 'nothing else'}{' ...' if len(gone) > 3 else ''}"
                       f" where this one has {'; '.join(new[:3]) or 'nothing'}"
                       f"{' ...' if len(new) > 3 else ''}")
        elif was is None:
            out.append(f"{key}: the checkpoint's run used the built-in one, this one {now!r}")
        elif now is None:
            out.append(f"{key}: the checkpoint's run was given {was!r}, this one uses the "
                       "built-in one")
        else:
            out.append(f"{key}: checkpoint {was!r} vs now {now!r}")
    return out


@dataclass
class _OnDisk:
    """What the run has saved so far, for the message of a non-finite stop."""

    checkpoint: Path | None
    iteration: int | None = None  # of the latest checkpoint written or resumed from
    best_iteration: int | None = None

    def kept(self) -> str:
        if self.checkpoint is None:
            return "nothing was saved (no checkpoint path)"
        if self.iteration is None:
            return f"no checkpoint was written yet, so there is none at {self.checkpoint}"
        kept = f"the checkpoint {self.checkpoint} (iteration {self.iteration}) is kept"
        if self.best_iteration is not None:
            best = companion_paths(self.checkpoint)[0]
            kept += f", and the best model {best} (iteration {self.best_iteration})"
        else:
            kept += ", with no best model (no validation value so far was finite)"
        return kept


def _check_finite(it: int, metrics: dict, params: dict[str, nn.Parameter],
                  on_disk: _OnDisk) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    for name, p in params.items():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            bad.append(f"grad of {name}")
    if bad:
        raise NonFiniteError(
            f"non-finite {', '.join(bad)} at iteration {it}; {on_disk.kept()}. "
            "Lower the learning rates, or check the flood level and the data."
        )


def _check_finite_state(it: int, model: nn.Module, learner: MetaLearner,
                        on_disk: _OnDisk) -> None:
    """Refuse to save a model an update made non-finite (finite gradients can still
    overflow): a checkpoint on disk is one that can be loaded again."""
    bad = non_finite_entries({"model": model.state_dict(), "learner": _learner_state(learner)})
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(
            f"non-finite {', '.join(bad[:3])}{more} after the update of iteration {it}; "
            f"{on_disk.kept()}. Lower the learning rates, or check the flood level and the data."
        )


def _learner_state(learner: MetaLearner) -> dict:
    """The learned inner-loop state (empty for MAML); the model is saved on its own."""
    return learner.learned.state_dict()


def _config_mismatch(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]


def _trim_log(path: Path, iteration: int) -> None:
    """Drop log records past ``iteration`` (a resumed run writes them again), and a last
    line cut short by a kill."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))


def train(
    config: TrainConfig | None = None,
    *,
    model: nn.Module | None = None,
    train_sampler: Any = None,
    val_sampler: Any = None,
    loss: LossFn | None = None,
    metric: Metric | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log_every: int = 50,
    **overrides,
) -> TrainResult:
    """Meta-train a model as configured, with validation, checkpoints and early stopping.

    The model, the task samplers, the loss and the validation metric are built from the
    config, or are your own: give any of ``model``, ``train_sampler`` (with
    ``val_sampler``), ``loss`` and ``metric``, and the run does with them all it does with
    the built-in ones (validation with a CI, the best checkpoint, early stopping, exact
    resume, the non-finite stop, torchrun). What the config's fields mean then:

    * ``model=``: trained in place (moved to ``device`` first); seed its initialisation
      yourself. ``init`` and ``dropout`` configure the built-in model only, so they must
      stay at their defaults. The algorithm and its settings apply as usual.
    * ``train_sampler=``/``val_sampler=``: ``dataset``, ``ways``, ``shots``, ``queries``,
      ``eval_shots``, ``eval_queries`` and ``data_root`` no longer say what the tasks are
      (the samplers do); ``dataset`` still picks the paper defaults of the settings left
      unset (``"sine"``: the MAML sine settings; set ``meta_batch``, ``inner_lr`` and so on
      for your task). ``meta_batch`` tasks are drawn from ``train_sampler`` per iteration;
      ``val_tasks`` from ``val_sampler`` once, before the first iteration, as the fixed
      validation set. ``seed`` seeds torch's, numpy's and Python's global generators
      (dropout, Reptile's mini-batches), not your samplers: seed those yourself.
    * ``loss=``: replaces the default cross-entropy (integer labels) / MSE (float targets)
      in the inner and the outer loss of every algorithm; ``inner_flood``,
      ``outer_flood`` and ``flood_mode`` flood it; ``label_smoothing`` must stay 0.
    * The validation metric: ``metric=``; by default accuracy for integer labels, MSE for
      float targets, or, for float targets with ``loss=``, that loss (lower is better).
      Float targets that are labels (multi-hot, scored by BCE) want a ``metric=`` of
      their own, e.g. an F1 or exact match.

    Every checkpoint records what identifies your objects (the model's class and its
    parameters' names, shapes and dtypes; each sampler's ``fingerprint``, else its
    ``repr`` if its class defines one, else its class; the loss's and the metric's names
    or ``repr``; a digest of the validation tasks), and ``resume=True`` refuses a run
    whose objects differ, naming what differs. Give your sampler a ``fingerprint``
    (attribute or method returning its settings as a string) or a ``__repr__`` so that its
    settings are checked too.

    Args:
        config: the run's :class:`~metalearn.config.TrainConfig`; ``overrides`` replace
            its fields (``train(dataset="sine", iterations=100)`` works without one).
        model: an ``nn.Module`` of yours instead of the dataset's network.
        train_sampler: training tasks of yours: any object with ``sample(n) ->
            TaskBatch`` of ``n`` tasks, and ``state_dict()`` / ``load_state_dict(state)``
            for its random state (tensors and plain values only, what a checkpoint holds),
            so that a resumed run draws what an uninterrupted one would.
        val_sampler: validation tasks of yours (needed with ``train_sampler``); only
            ``sample(n)`` is used. Draw them from data the training tasks do not use.
        loss: a per-example loss ``loss(outputs, targets) -> (n,)`` for one task's
            ``n`` examples (BCE with multi-hot targets, focal, class-weighted CE, ...).
        metric: a :class:`~metalearn.evaluation.Metric` to validate with.
        checkpoint: path of the latest-state checkpoint, written atomically at every
            validation; the best model goes to ``<stem>.best.pt`` and a JSON-lines log to
            ``<stem>.jsonl`` beside it. ``None`` writes nothing. The path is checked before
            anything is built, and locked for the run (``<checkpoint>.lock``); see
            :func:`metalearn.run_files.claim_checkpoint`.
        resume: continue from ``checkpoint`` (model, optimiser, schedule, iteration,
            sampler and RNG states), so the result equals an uninterrupted run.
        overwrite: start afresh on a ``checkpoint`` that already holds a run, deleting its
            checkpoint, best model and log first; without it (or ``resume``) such a path is
            refused.
        progress: show a tqdm progress bar.
        log_every: iterations between log records.

    Raises:
        metalearn.run_files.CheckpointPathError: a ``checkpoint`` that cannot be written,
            or that holds another run without ``resume`` or ``overwrite``.
        metalearn.run_files.CheckpointBusyError: another live run holds ``checkpoint``.
        NonFiniteError: the loss, a gradient or the model stopped being finite.
        TypeError, ValueError: an object that is not what its argument must be (a sampler
            without ``sample``, a model whose outputs do not fit the targets or the loss),
            named in the message; checked before the first iteration.
        metalearn.checkpoint.CheckpointError: resuming a checkpoint of another run.

    Example:
        >>> import metalearn
        >>> result = metalearn.train(dataset="sine", iterations=20, val_every=10,
        ...                          val_tasks=10, progress=False)
        >>> result.iteration, sorted(result.best)
        (20, ['ci95', 'iteration', 'metric', 'value'])

        Your own model, loss and tasks (here: sine waves as 2 outputs, and an L1 loss):

        >>> import torch
        >>> from torch import nn
        >>> from metalearn.data import SineTasks, TaskBatch
        >>> class TwoSines(SineTasks):
        ...     def sample(self, n):
        ...         b = super().sample(n)
        ...         return TaskBatch(b.support_x, b.support_y.repeat(1, 1, 2), b.query_x,
        ...                          b.query_y.repeat(1, 1, 2))
        >>> net = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> result = metalearn.train(
        ...     model=net, train_sampler=TwoSines(seed=0), val_sampler=TwoSines(seed=1),
        ...     loss=lambda out, y: (out - y).abs().mean(-1), iterations=20, val_every=10,
        ...     val_tasks=10, progress=False)
        >>> result.model is net, result.best["metric"]
        (True, 'loss')
    """
    objects = UserObjects(model, train_sampler, val_sampler, loss, metric)
    objects.check()
    cfg = dataclasses.replace(config or TrainConfig(), **overrides).resolved()
    objects.check_config(cfg)
    ctx = DistContext.from_env(cfg.device)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    # Before anything is built: a bad path fails now, not at the first save. Only rank 0
    # writes, so only rank 0 checks and locks.
    with claim_checkpoint(ckpt, companion_paths, resume=resume, overwrite=overwrite,
                          writer=ctx.is_main):
        return _train(cfg, ctx, ckpt, resume, progress, log_every, objects)


@dataclass
class _Run:
    """Everything one run trains with, and where it stands (setup, resume, state to save)."""

    cfg: TrainConfig
    ctx: DistContext
    model: nn.Module
    learner: MetaLearner
    eval_learner: MetaLearner
    meta_params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    sampler: object
    learner_rng: torch.Generator
    val_shard: object
    metric: Metric
    user: dict | None  # UserObjects.describe(): None for a run of built-in objects only
    iteration: int = 0
    best: dict | None = None
    stale: int = 0

    @classmethod
    def build(cls, cfg: TrainConfig, ctx: DistContext, objects: UserObjects | None = None
              ) -> _Run:
        objects = objects or UserObjects()
        device = ctx.device
        _seed_everything(cfg.seed)
        model = (objects.model if objects.model is not None else build_model(cfg)).to(device)
        learner = build_learner(cfg, model, loss_fn=objects.loss)
        # Reptile's mini-batch draws get their own stream, so validation cannot shift them.
        learner.generator = torch.Generator().manual_seed(cfg.seed + 17)
        # The evaluation learner shares any learned inner-loop state with the training one.
        eval_learner = build_learner(cfg, model, evaluation=True, share=learner,
                                     loss_fn=objects.loss)
        meta_params = _meta_parameters(learner)
        optimizer = build_optimizer(cfg, list(meta_params.values()))
        schedule = build_schedule(cfg, optimizer)
        sampler = (objects.train_sampler if objects.train_sampler is not None
                   else build_sampler(cfg, "train", seed=cfg.seed))
        # A fixed validation set: the same tasks at every validation and on resume.
        if objects.val_sampler is not None:
            val_tasks = _draw(objects.val_sampler, cfg.val_tasks, "val_sampler")
        else:
            val_tasks = build_sampler(cfg, "val", seed=cfg.seed + 1_000_003,
                                      evaluation=True).sample(cfg.val_tasks)
        user = objects.describe(val_tasks)
        # A no-op for the built-in data; a user's data take the model's dtype (float64, say).
        val_tasks = val_tasks.to(device, dtype=_model_dtype(model))
        metric = objects.metric or default_metric(val_tasks.is_classification, learner.loss)
        if objects.given:
            _check_fit(learner, val_tasks[:1], objects, metric)
        # Each rank validates its share of the tasks; the gathered table is one process's.
        val_offset, val_count = ctx.shard(cfg.val_tasks, "val_tasks")
        return cls(cfg, ctx, model, learner, eval_learner, meta_params, optimizer, schedule,
                   sampler, learner.generator, val_tasks[val_offset: val_offset + val_count],
                   metric, user)

    def restore(self, ckpt: Path) -> None:
        """Continue from ``ckpt``: the state of every object and the run's standing."""
        state = load_checkpoint(ckpt)
        mismatch = (_config_mismatch(state.get("config", {}), self.cfg.to_dict())
                    + _user_mismatch(state.get("user"), self.user))
        if mismatch:
            raise CheckpointError(f"checkpoint {ckpt} was written by a different run:\n  "
                                  + "\n  ".join(mismatch))
        try:
            self.model.load_state_dict(state["model"])
            self.learner.learned.load_state_dict(state["learner"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            self.learner_rng.set_state(state["learner_rng"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {ckpt} does not fit this model/config: "
                                  f"{str(err).splitlines()[0]}") from None
        self.iteration, self.best = state["iteration"], state.get("best")
        self.stale = state.get("stale", 0)

    def state(self) -> dict:
        """The latest-state checkpoint: enough to resume exactly."""
        return self._with_user({
            "format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(),
            "iteration": self.iteration, "model": self.model.state_dict(),
            "learner": _learner_state(self.learner), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "sampler": self.sampler.state_dict(),
            "rng": rng_state(), "learner_rng": self.learner_rng.get_state(), "best": self.best,
            "stale": self.stale,
        })

    def best_state(self) -> dict:
        """The best-model checkpoint: the model and learned state, no optimiser."""
        return self._with_user({"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(),
                                "iteration": self.iteration, "model": self.model.state_dict(),
                                "learner": _learner_state(self.learner), "best": self.best})

    def _with_user(self, state: dict) -> dict:
        """Format 3 with the user's objects' identity; format 2, unchanged, without."""
        if self.user is None:
            return {**state, "format": BUILTIN_CHECKPOINT_FORMAT}
        return {**state, "user": self.user}

    def meta_step(self, on_disk: _OnDisk) -> dict[str, float]:
        """One meta-iteration: this rank's share of a meta-batch, the gradients summed
        across ranks, the outer update."""
        cfg, ctx = self.cfg, self.ctx
        offset, count = ctx.shard(cfg.meta_batch)
        weight = count / cfg.meta_batch
        self.optimizer.zero_grad(set_to_none=True)
        if self.user is not None and "train_sampler" in self.user:
            batch = _draw(self.sampler, cfg.meta_batch, "train_sampler")
        else:
            batch = self.sampler.sample(cfg.meta_batch)
        batch = batch[offset: offset + count]
        shard = (offset, cfg.meta_batch) if ctx.world_size > 1 else None
        metrics = self.learner.step(batch.to(ctx.device, dtype=_model_dtype(self.model)),
                                    shard=shard)
        self.ctx.reduce_gradients(self.meta_params.values(), weight)
        metrics = ctx.reduce_metrics(metrics, weight)
        _check_finite(self.iteration, metrics, self.meta_params, on_disk)
        self.optimizer.step()
        self.schedule.step()
        return metrics

    def validate(self) -> tuple[EvaluationResult, bool]:
        """Score the validation tasks; whether this is the best model so far."""
        cfg = self.cfg
        result = evaluate(self.eval_learner, self.val_shard, max_steps=cfg.eval_steps,
                          progress=False, metric=self.metric)
        self.model.train()
        result = EvaluationResult.from_per_task(
            result.metric, self.ctx.gather_tasks(result.per_task, cfg.val_tasks))
        value, ci = result.mean[-1], result.ci95[-1]
        higher_is_better = self.metric.higher_is_better
        # A non-finite value is never best (nor an improvement for patience).
        improved = math.isfinite(value) and (
            self.best is None or (value > self.best["value"] if higher_is_better
                                  else value < self.best["value"]))
        if improved:
            self.best = {"iteration": self.iteration, "metric": result.metric, "value": value,
                         "ci95": ci}
            self.stale = 0
        else:
            self.stale += 1
        return result, improved


class _Log:
    """The run's records, kept in memory and appended to its JSON-lines file (rank 0)."""

    def __init__(self, path: Path | None) -> None:
        self.history: list[dict] = []
        self.file = open(path, "a") if path else None  # noqa: SIM115 - closed in close()

    def __call__(self, record: dict) -> None:
        self.history.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _data_name(cfg: TrainConfig, sampler: Any, objects: UserObjects | None) -> str:
    if objects is None or objects.train_sampler is None:
        return cfg.dataset
    return type(sampler).__name__


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.requires_grad).dtype


def _train(cfg: TrainConfig, ctx: DistContext, ckpt: Path | None, resume: bool,
           progress: bool, log_every: int, objects: UserObjects | None = None) -> TrainResult:
    run = _Run.build(cfg, ctx, objects)
    writes = ckpt is not None and ctx.is_main  # only rank 0 writes
    best_path, log_path = companion_paths(ckpt) if writes else (None, None)
    on_disk = _OnDisk(ckpt)
    if resume:
        if ckpt is None:
            raise ValueError("resume=True needs a checkpoint path")
        run.restore(ckpt)
        on_disk.iteration = run.iteration
        on_disk.best_iteration = run.best["iteration"] if run.best else None
        if log_path is not None:
            _trim_log(log_path, run.iteration)
    if writes:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    log = _Log(log_path)
    bar = tqdm(total=cfg.iterations, initial=run.iteration,
               disable=not (progress and ctx.is_main), dynamic_ncols=True,
               desc=f"{cfg.algorithm} {_data_name(cfg, run.sampler, objects)}")
    stopped_early = False
    t0 = time.perf_counter()
    try:
        run.model.train()
        while run.iteration < cfg.iterations:
            run.iteration += 1
            it = run.iteration
            metrics = run.meta_step(on_disk)
            bar.update(1)
            if it % log_every == 0 or it == cfg.iterations:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
                log({"iteration": it, "split": "train", **metrics,
                     "lr": run.schedule.get_last_lr()[0], "seconds": time.perf_counter() - t0})
            if it % cfg.val_every == 0 or it == cfg.iterations:
                _check_finite_state(it, run.model, run.learner, on_disk)
                result, improved = run.validate()
                log({"iteration": it, "split": "val", result.metric: result.mean[-1],
                     "ci95": result.ci95[-1], "steps": cfg.eval_steps})
                if improved and best_path:
                    save_checkpoint(best_path, run.best_state())
                    on_disk.best_iteration = it
                if writes:
                    save_checkpoint(ckpt, run.state())
                    on_disk.iteration = it
                if cfg.patience is not None and run.stale >= cfg.patience:
                    stopped_early = True
                    break
    finally:
        bar.close()
        log.close()
    ctx.close()  # not in finally: after a failure, a barrier could wait forever
    return TrainResult(run.model, run.learner, cfg, run.iteration, log.history, run.best,
                       stopped_early)
