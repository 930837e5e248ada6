"""What every meta-learner shares: the task loss, input checks, and adapt/predict."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import vmap

from metalearn.algorithms.functional_model import FunctionalModel, Params
from metalearn.algorithms.losses import check_flood, flooded_mean, per_example_loss
from metalearn.algorithms.norm_layers import differentiated_at_most_once
from metalearn.data.task_batch import TaskBatch


def check_lr(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_steps(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


class MetaLearner:
    """Base class: holds the model, the inner loss and the shared checks.

    Subclasses implement ``_adapt_task`` (the inner loop of one task, written for
    ``vmap``) and ``step``.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        inner_flood: float | None = None,
        flood_mode: str = "batch",
        outer_flood: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        self.fmodel = FunctionalModel(model)
        self.model = model
        self.inner_lr = check_lr("inner_lr", inner_lr)
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.flood_mode = flood_mode
        self.inner_flood = check_flood(inner_flood, flood_mode, "inner_flood")
        self.outer_flood = check_flood(outer_flood, flood_mode, "outer_flood")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self._num_outputs: int | None = None
        self._record_trajectory = False

    # -- losses -------------------------------------------------------------------------
    def task_loss(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, flood: float | None = None
    ) -> torch.Tensor:
        """Mean loss of one task's examples under ``params``, flooded at ``flood``."""
        losses = per_example_loss(self.fmodel(params, x), y, self.label_smoothing)
        return flooded_mean(losses, flood, self.flood_mode)

    def inner_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task_loss(params, x, y, self.inner_flood)

    # -- adaptation ---------------------------------------------------------------------
    def _adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        raise NotImplementedError

    def _adapt_batch(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int
    ) -> Params:
        """The inner loop of every task in the batch, as one vmapped computation."""
        return vmap(self._adapt_task, in_dims=(None, 0, 0, None), randomness="different")(
            params, support_x, support_y, steps
        )

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        trajectory: bool = False,
    ) -> Params | list[Params]:
        """Adapted ("fast") weights for one task or a batch of tasks.

        A batch has a leading task dimension: labels ``(B, n)`` or targets ``(B, n, d)``.
        One task's labels are ``(n,)`` or targets ``(n, d)``. The result is detached: use
        it with :meth:`predict` for evaluation. With ``trajectory=True`` the result is the
        list of weights after 0, 1, ..., ``steps`` inner steps, from one run of the loop.
        """
        steps = self.inner_steps if steps is None else check_steps("steps", steps)
        batched = support_y.ndim == (2 if not support_y.dtype.is_floating_point else 3)
        if not batched:
            support_x, support_y = support_x.unsqueeze(0), support_y.unsqueeze(0)
        self._check_inputs(support_x, support_y, "support")
        params = self.fmodel.params()
        self._record_trajectory = trajectory
        try:
            with torch.no_grad(), differentiated_at_most_once():
                fast = self._adapt_batch(params, support_x, support_y, steps)
        finally:
            self._record_trajectory = False
        if not trajectory:
            return fast if batched else {k: v[0] for k, v in fast.items()}
        path = [{k: v.expand(len(support_x), *v.shape).clone() for k, v in params.items()}]
        path += fast
        return path if batched else [{k: v[0] for k, v in f.items()} for f in path]

    def _track(self, fast: Params, path: list[Params]) -> None:
        """Inside the inner loop: remember ``fast`` when a trajectory was asked for."""
        if self._record_trajectory:
            path.append(fast)

    def _finish(self, fast: Params, path: list[Params]) -> Params | list[Params]:
        return path if self._record_trajectory else fast

    def predict(self, fast: Params, x: torch.Tensor) -> torch.Tensor:
        """Outputs for ``x`` under adapted weights from :meth:`adapt` (batched or not)."""
        reference = self.fmodel.params()
        name = next(iter(reference))
        with differentiated_at_most_once():
            if fast[name].ndim == reference[name].ndim:
                return self.fmodel(fast, x)
            return vmap(self.fmodel, randomness="different")(fast, x)

    # -- checks -------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor, which: str) -> None:
        ref = next(iter(self.fmodel.params().values()))
        if x.device != ref.device:
            raise ValueError(
                f"{which} inputs are on {x.device} but the model is on {ref.device}; "
                f"move the batch with batch.to({str(ref.device)!r})"
            )
        if x.dtype.is_floating_point and x.dtype != ref.dtype:
            raise ValueError(
                f"{which} inputs are {x.dtype} but the model's parameters are {ref.dtype}; "
                f"cast with batch.to(device, dtype={ref.dtype})"
            )
        if not y.dtype.is_floating_point:
            if self._num_outputs is None:
                with torch.no_grad():
                    self._num_outputs = self.fmodel(self.fmodel.params(), x[0]).shape[-1]
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self._num_outputs:
                raise ValueError(
                    f"{which} labels range over [{lo}, {hi}] but the model has "
                    f"{self._num_outputs} outputs; labels must be in [0, {self._num_outputs - 1}]"
                    " (is the model built for this many ways?)"
                )

    def _check_batch(self, batch: TaskBatch) -> None:
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"step() needs a TaskBatch, got {type(batch).__name__}")
        batch.validate()
        self._check_inputs(batch.support_x, batch.support_y, "support")
        self._check_inputs(batch.query_x, batch.query_y, "query")

    def _accumulate(self, grads: Params) -> None:
        """Add ``grads`` into ``p.grad``, as ``backward()`` would."""
        for name, p in self.fmodel.params().items():
            g = grads[name].detach()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
