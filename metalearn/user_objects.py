"""The model, samplers, loss and metric a user gives :func:`metalearn.train`: their checks
before the first step, and what identifies them in a checkpoint so that a resumed run is
refused when they changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.losses import LossFn, LossShapeError, describe_callable
from metalearn.checkpoint import state_digest
from metalearn.config import TrainConfig
from metalearn.data.task_batch import TaskBatch
from metalearn.evaluation import Metric

_SAMPLER_PROTOCOL = ("sample(n) -> TaskBatch, state_dict() -> dict of tensors and plain "
                     "values, load_state_dict(state)")
# The types a checkpoint can hold and load back with weights_only=True.
_CHECKPOINTABLE = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device,
                   torch.Size)


@dataclass
class UserObjects:
    """The model, task samplers, loss and metric of the user's that a run is given; each one
    that is ``None`` is built from the config as usual. See :func:`metalearn.train`.

    Attributes:
        model: the network (``train(model=...)``).
        train_sampler: the training tasks: ``sample(n) -> TaskBatch``, ``state_dict()`` and
            ``load_state_dict(state)``.
        val_sampler: the validation tasks: ``sample(n) -> TaskBatch``.
        loss: a per-example loss ``loss(outputs, targets) -> (n,)``.
        metric: the validation :class:`~metalearn.evaluation.Metric`.

    Example:
        >>> from metalearn.user_objects import UserObjects
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
        >>> from metalearn.user_objects import model_fingerprint
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


def draw_tasks(sampler: Any, n: int, name: str) -> TaskBatch:
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


def check_fit(learner: MetaLearner, task: TaskBatch, objects: UserObjects,
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


def user_mismatch(saved: dict | None, current: dict | None) -> list[str]:
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
