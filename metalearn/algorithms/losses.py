"""Per-example task losses and the flooding regularisers applied to them."""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

FLOOD_MODES = ("batch", "instance")
# A per-example loss: loss_fn(outputs (n, ...), targets (n, ...)) -> losses (n,).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_example_loss(
    outputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Loss of each example: cross-entropy for integer labels, else mean squared error.

    Returns a tensor of shape ``(n,)`` whose mean is the usual batch loss.
    """
    if targets.dtype.is_floating_point:
        return (outputs - targets).pow(2).reshape(outputs.shape[0], -1).mean(1)
    return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=label_smoothing)


def flooded_mean(losses: torch.Tensor, level: float | None, mode: str = "batch") -> torch.Tensor:
    """Mean of per-example ``losses``, flooded at ``level``.

    ``"batch"`` is flooding (Ishida et al. 2020): ``|L − b| + b`` with ``L`` the mean loss.
    ``"instance"`` is iFlood (Xie et al. 2022): ``mean_i(|ℓ_i − b| + b)``.
    ``level=None`` means no flooding. Below the level the gradient changes sign; the value
    is continuous, and the second derivatives are those of the loss itself.

    Example:
        >>> import torch
        >>> from metalearn.algorithms.losses import flooded_mean
        >>> flooded_mean(torch.tensor([0.1, 0.5]), 0.4, "batch")   # |0.3 - 0.4| + 0.4
        tensor(0.5000)
        >>> flooded_mean(torch.tensor([0.1, 0.5]), 0.4, "instance")  # (0.7 + 0.5) / 2
        tensor(0.6000)
    """
    if level is None:
        return losses.mean()
    if mode == "batch":
        return (losses.mean() - level).abs() + level
    if mode == "instance":
        return ((losses - level).abs() + level).mean()
    raise ValueError(f"unknown flood_mode {mode!r}; choose one of {FLOOD_MODES}")


def flood_from_mean(loss: torch.Tensor, mean: torch.Tensor, level: float) -> torch.Tensor:
    """``loss`` flooded by the sign of another value: ``|mean − b| + b`` in value, and
    ``sign(mean − b)`` times the gradient of ``loss``.

    The meta-batch flood of the outer loss (``flood_mode="batch"``): ``mean`` is the mean
    query loss of the whole meta-batch, ``loss`` the part of it this call differentiates (a
    process's share of the tasks). With ``mean = loss.detach()`` it is ``|loss − b| + b``.

    Example:
        >>> import torch
        >>> from metalearn.algorithms.losses import flood_from_mean
        >>> x = torch.tensor(0.3, requires_grad=True)
        >>> y = flood_from_mean(2 * x, torch.tensor(0.5), 0.8)   # 0.5 < 0.8: gradient flips
        >>> y.backward()
        >>> round(y.item(), 6), x.grad.item()   # |0.5 - 0.8| + 0.8, then -2
        (1.1, -2.0)
    """
    mean = mean.detach()
    sign = torch.sign(mean - level)
    return sign * loss + ((mean - level).abs() + level - sign * loss).detach()


def flood_active(losses: torch.Tensor, level: float | None, mode: str = "batch"
                 ) -> torch.Tensor:
    """How much of :func:`flooded_mean` at ``level`` is below the flood, where it turns the
    gradient around: ``"batch"``, 1.0 if the mean loss is below ``level`` else 0.0;
    ``"instance"``, the fraction of examples whose loss is below it. 0.0 with no flood.
    Strictly below: at the level itself the flooded gradient is 0, not reversed.

    Example:
        >>> import torch
        >>> from metalearn.algorithms.losses import flood_active
        >>> losses = torch.tensor([0.1, 0.5, 0.2, 0.9])   # mean 0.425
        >>> float(flood_active(losses, 0.4, "batch")), float(flood_active(losses, 0.4, "instance"))
        (0.0, 0.5)
    """
    losses = losses.detach()
    if level is None:
        return losses.new_zeros(())
    if mode == "batch":
        return (losses.mean() < level).to(losses.dtype)
    if mode == "instance":
        return (losses < level).to(losses.dtype).mean()
    raise ValueError(f"unknown flood_mode {mode!r}; choose one of {FLOOD_MODES}")


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose arg-max output equals the label."""
    return (outputs.argmax(-1) == targets).to(outputs.dtype).mean()


def check_flood(level: float | None, mode: str, name: str = "inner_flood") -> float | None:
    """Validate a flood level and mode; 0 means off, as in the papers' sweeps."""
    if mode not in FLOOD_MODES:
        raise ValueError(f"unknown flood_mode {mode!r}; choose one of {FLOOD_MODES}")
    if level is None:
        return None
    level = float(level)
    if not torch.isfinite(torch.tensor(level)) or level < 0:
        raise ValueError(f"{name} must be a finite level >= 0 (or None to disable), got {level}")
    return level or None


class LossShapeError(ValueError):
    """A per-example loss that does not return one value per example."""


def check_per_example(losses: Any, outputs: torch.Tensor, loss_fn: Any) -> torch.Tensor:
    """``losses`` if it is one loss per example, shape ``(n,)`` for ``n`` outputs; else a
    :class:`LossShapeError` that says how to write ``loss_fn``."""
    n = outputs.shape[0] if outputs.ndim else None
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        got = (f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor)
               else type(losses).__name__)
        raise LossShapeError(
            f"the loss {describe_callable(loss_fn)} returned {got} for {n} examples; it must "
            f"return one loss per example, shape ({n},): compute it with reduction='none' "
            "and average any other dimension (e.g. .mean(-1) over the labels of a "
            "multi-label BCE)")
    return losses


def describe_callable(fn: Any) -> str:
    """A stable description of a loss, metric or sampler, for checking that a resumed run
    uses the same one: its ``fingerprint`` (attribute or method) if it has one; a
    function's module and qualified name; a ``functools.partial``'s function and
    arguments; an object's class and its own ``repr`` (memory addresses removed).

    The body of a function is not part of it: renaming a function counts as a change,
    editing its code does not.

    Example:
        >>> import functools
        >>> import torch.nn.functional as F
        >>> from metalearn.algorithms.losses import describe_callable
        >>> describe_callable(functools.partial(F.cross_entropy, reduction="none"))
        "functools.partial(torch.nn.functional.cross_entropy, reduction='none')"
    """
    own = getattr(fn, "fingerprint", None)
    if own is not None:
        return str(own() if callable(own) else own)
    if isinstance(fn, functools.partial):
        args = [describe_callable(fn.func), *map(_no_address, map(repr, fn.args)),
                *(f"{k}={_no_address(repr(v))}" for k, v in fn.keywords.items())]
        return f"functools.partial({', '.join(args)})"
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                       type)):
        return f"{getattr(fn, '__module__', None) or ''}.{fn.__qualname__}".lstrip(".")
    cls = type(fn)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__repr__ is object.__repr__:
        return name
    return f"{name}: {_no_address(repr(fn))}"


def _no_address(text: str) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


class TaskLoss:
    """The loss of a task's examples, and its flooding, for the inner and the outer loop.

    Args:
        loss_fn: a per-example loss of your own, ``loss_fn(outputs, targets) -> (n,)``
            for the ``n`` examples of one task (BCE with multi-hot targets, focal,
            class-weighted cross-entropy, ...), used for the inner and the outer loss,
            flooded as set below. ``None``: cross-entropy for integer labels, mean squared
            error for float targets. The shape of what it returns is checked.
        inner_flood: flood level b of the inner (support) loss; ``None`` or 0 is off.
        outer_flood: flood level of the outer (query) loss; ``None`` or 0 is off.
        flood_mode: ``"batch"`` (flooding, Ishida et al. 2020) or ``"instance"`` (iFlood,
            Xie et al. 2022); applies to both levels. Each loop's batch is flooded: the
            inner flood floods a task's support loss (the batch an inner step descends),
            the outer flood the mean query loss of the meta-batch (the batch an outer step
            descends; the learner applies it, see :func:`flood_from_mean`). iFlood floods
            every example of either.
        label_smoothing: label smoothing of the default cross-entropy (classification
            only; with ``loss_fn``, smooth inside it).

    Example:
        >>> import torch
        >>> from metalearn.algorithms.losses import TaskLoss
        >>> loss = TaskLoss(inner_flood=0.4)
        >>> out, y = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
        >>> float(loss.inner(out, y)) > float(loss.outer(out, y))   # flooded below 0.4
        True
        >>> import torch.nn.functional as F
        >>> def bce(out, y):  # multi-label: one loss per example, averaged over the labels
        ...     return F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(-1)
        >>> multi = TaskLoss(loss_fn=bce, outer_flood=0.1)
        >>> multi.outer(torch.zeros(3, 4), torch.ones(3, 4))  # log 2
        tensor(0.6931)
    """

    def __init__(self, inner_flood: float | None = None, outer_flood: float | None = None,
                 flood_mode: str = "batch", label_smoothing: float = 0.0,
                 loss_fn: LossFn | None = None) -> None:
        self.flood_mode = flood_mode
        self.inner_flood = check_flood(inner_flood, flood_mode, "inner_flood")
        self.outer_flood = check_flood(outer_flood, flood_mode, "outer_flood")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if loss_fn is not None:
            if isinstance(loss_fn, TaskLoss) or not callable(loss_fn):
                raise TypeError(
                    "loss_fn must be a callable loss_fn(outputs, targets) -> per-example "
                    f"losses (n,), got {type(loss_fn).__name__}"
                    + ("; set flooding with inner_flood/outer_flood/flood_mode instead of a "
                       "TaskLoss" if isinstance(loss_fn, TaskLoss) else ""))
            if label_smoothing:
                raise ValueError("label_smoothing applies to the default cross-entropy only, "
                                 "not to a loss_fn of your own; smooth the targets inside "
                                 "loss_fn and leave label_smoothing at 0")
        self.label_smoothing = label_smoothing
        self.loss_fn = loss_fn

    def per_example(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each example's loss, shape ``(n,)``: ``loss_fn``'s, or the default one."""
        if self.loss_fn is None:
            return per_example_loss(outputs, targets, self.label_smoothing)
        return check_per_example(self.loss_fn(outputs, targets), outputs, self.loss_fn)

    def unsmoothed(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each example's loss as metrics report it: ``loss_fn``'s, or the default one
        without label smoothing."""
        if self.loss_fn is None:
            return per_example_loss(outputs, targets)
        return self.per_example(outputs, targets)

    def inner(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The support loss the inner loop descends."""
        return flooded_mean(self.per_example(outputs, targets), self.inner_flood,
                            self.flood_mode)

    def outer(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One task's query loss as the meta-gradient differentiates it: iFlooded per
        example (``flood_mode="instance"``), or plain, its meta-batch's mean to be flooded
        by the learner (``"batch"``)."""
        return flooded_mean(self.per_example(outputs, targets), self.task_outer_level,
                            self.flood_mode)

    @property
    def task_outer_level(self) -> float | None:
        """The outer flood level applied within a task: iFlood's; ``None`` in batch mode,
        where the flood acts on the meta-batch's mean."""
        return self.outer_flood if self.flood_mode == "instance" else None

    @property
    def meta_batch_level(self) -> float | None:
        """The outer flood level applied to the meta-batch's mean query loss (batch mode)."""
        return self.outer_flood if self.flood_mode == "batch" else None
