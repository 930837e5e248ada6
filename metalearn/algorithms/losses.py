"""Per-example task losses and the flooding regularisers applied to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOOD_MODES = ("batch", "instance")


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


class TaskLoss:
    """The loss of a task's examples, and its flooding, for the inner and the outer loop.

    Args:
        inner_flood: flood level b of the inner (support) loss; ``None`` or 0 is off.
        outer_flood: flood level of the outer (query) loss; ``None`` or 0 is off.
        flood_mode: ``"batch"`` (flooding, Ishida et al. 2020) or ``"instance"`` (iFlood,
            Xie et al. 2022); applies to both levels.
        label_smoothing: label smoothing of the cross-entropy (classification only).

    Example:
        >>> import torch
        >>> from metalearn.algorithms.losses import TaskLoss
        >>> loss = TaskLoss(inner_flood=0.4)
        >>> out, y = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
        >>> float(loss.inner(out, y)) > float(loss.outer(out, y))   # flooded below 0.4
        True
    """

    def __init__(self, inner_flood: float | None = None, outer_flood: float | None = None,
                 flood_mode: str = "batch", label_smoothing: float = 0.0) -> None:
        self.flood_mode = flood_mode
        self.inner_flood = check_flood(inner_flood, flood_mode, "inner_flood")
        self.outer_flood = check_flood(outer_flood, flood_mode, "outer_flood")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def per_example(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return per_example_loss(outputs, targets, self.label_smoothing)

    def inner(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The support loss the inner loop descends."""
        return flooded_mean(self.per_example(outputs, targets), self.inner_flood,
                            self.flood_mode)

    def outer(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The query loss the meta-gradient differentiates."""
        return flooded_mean(self.per_example(outputs, targets), self.outer_flood,
                            self.flood_mode)
