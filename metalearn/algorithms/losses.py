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
