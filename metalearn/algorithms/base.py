"""What every meta-learner shares: the model, the task losses, adapt/predict, input checks."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import vmap

from metalearn.algorithms.functional_model import FunctionalModel, Params
from metalearn.algorithms.losses import (
    TaskLoss,
    accuracy,
    flood_active,
    flood_from_mean,
    flooded_mean,
)
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


class MetaLearner(nn.Module):
    """Base class of the learners: an ``nn.Module`` holding the model and what is meta-learned.

    The interface every learner has:

    * :meth:`step` accumulates the meta-gradient of a :class:`~metalearn.data.TaskBatch`
      into the ``.grad`` of :meth:`meta_parameters` (as ``backward()`` would) and returns
      the metrics; an outer optimiser then steps. With flooding, the learners that use
      the shared :meth:`meta_loss` (MAML, FOMAML, Meta-SGD, ANIL) add how often the flood
      acted (see :meth:`step`).
    * :meth:`meta_loss` (the learners with a differentiable outer objective): the objective
      with its graph, and the per-task query metric.
    * :meth:`adapt` and :meth:`predict`: adapted weights for new tasks, and outputs under
      them.
    * :meth:`adapt_task`: the inner loop of one task, written for ``vmap`` with
      :func:`~metalearn.algorithms.inner_loop.inner_loop`; what each algorithm defines.
    * ``learner.parameters()`` are the model's and the learned inner-loop state's
      (``learner.learned``: Meta-SGD's rates, MAML++'s per-step rates and BatchNorm), so
      ``learner.state_dict()`` holds both.

    Args:
        model: any ``nn.Module``; it becomes the submodule ``learner.model``.
        inner_lr: the inner step size (alpha).
        inner_steps: inner steps during meta-training.
        first_order: take the inner gradients as constants in the meta-gradient.
        loss: a :class:`~metalearn.algorithms.losses.TaskLoss`; or give its options
            instead:
        **loss_options: ``loss_fn`` (a per-example loss of your own,
            ``loss_fn(outputs, targets) -> (n,)``, for the inner and the outer loss),
            ``inner_flood``, ``outer_flood``, ``flood_mode``, ``label_smoothing`` (see
            :class:`~metalearn.algorithms.losses.TaskLoss`).

    Example:
        A new algorithm is an ``adapt_task``; here MAML whose odd inner steps are half as
        long:

        >>> import torch
        >>> from metalearn.algorithms import MetaLearner, inner_loop, sgd
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> class HalfStepMAML(MetaLearner):
        ...     def adapt_task(self, params, x, y, steps, first_order, trajectory=False):
        ...         def loss(p, step, order):
        ...             return self.support_loss(p, x, y, order)
        ...         rate = sgd(lambda name, step: self.inner_lr * (0.5 if step % 2 else 1.0))
        ...         return inner_loop(loss, params, steps, rate, first_order=first_order,
        ...                           trajectory=trajectory)
        >>> learner = HalfStepMAML(MLP(), inner_lr=0.01, inner_steps=2)
        >>> metrics = learner.step(SineTasks(seed=0).sample(8))  # grads into .grad
        >>> sorted(metrics), all(p.grad is not None for p in learner.parameters())
        (['loss'], True)
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int,
                 first_order: bool = False, loss: TaskLoss | None = None,
                 **loss_options: Any) -> None:
        super().__init__()
        fmodel = FunctionalModel(model)  # checks the model first
        if loss is not None and loss_options:
            raise TypeError(f"give either loss= or its options {sorted(loss_options)}, not both")
        self.model = model
        self.fmodel = fmodel
        self.inner_lr = check_lr("inner_lr", inner_lr)
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.first_order = bool(first_order)
        self.loss = loss if loss is not None else TaskLoss(**loss_options)
        # What the learner meta-learns besides the model (empty for MAML).
        self.learned = nn.Module()
        # Random source of inner-loop draws (Reptile's mini-batches); None: torch's global.
        self.generator: torch.Generator | None = None
        self._num_outputs: int | None = None
        # Flood statistics of the last meta_loss, for step() to report (tensors, per batch).
        self._flood_stats: dict[str, torch.Tensor] = {}

    # -- losses -------------------------------------------------------------------------
    def support_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor,
                     order: int = 2) -> torch.Tensor:
        """The inner loss of one task's support set (flooded at the inner level)."""
        return self.loss.inner(self.fmodel(params, x, order), y)

    def query_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, order: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The outer loss of one task's query set at ``params``, and its metric (accuracy,
        or the loss itself for regression)."""
        out = self.fmodel(params, x, order)
        loss = self.loss.outer(out, y)
        return loss, (accuracy(out, y) if not y.dtype.is_floating_point else loss.detach())

    # -- the inner loop and the meta-gradient -------------------------------------------
    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool, trajectory: bool = False
                   ) -> Params | tuple[Params, list[Params]]:
        """The inner loop of one task (for ``vmap``), as :func:`~metalearn.algorithms.
        inner_loop.inner_loop` returns it."""
        raise NotImplementedError

    def _task_meta_loss(self, params: Params, sx: torch.Tensor, sy: torch.Tensor,
                        qx: torch.Tensor, qy: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        stats = {}
        if self.loss.inner_flood is not None and self.inner_steps > 0:
            fast, path = self.adapt_task(params, sx, sy, self.inner_steps, self.first_order,
                                         trajectory=True)
            # The weights each inner gradient was taken at: theta, then after steps 1..K-1.
            stats["inner_flood_active"] = self._inner_flood_active([params, *path[:-1]],
                                                                   sx, sy)
        else:
            fast = self.adapt_task(params, sx, sy, self.inner_steps, self.first_order)
        loss, metric, outer = self._query_terms(fast, qx, qy)
        return loss, metric, {**stats, **outer}

    def _query_terms(self, params: Params, x: torch.Tensor, y: torch.Tensor, order: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`query_loss`, and with an outer flood the query loss before flooding
        (``query_loss``) and, for iFlood, its activity (``outer_flood_active``, see
        :func:`~metalearn.algorithms.losses.flood_active`; the batch flood's is the
        meta-batch's, :meth:`_flood_meta_batch`)."""
        if self.loss.outer_flood is None:
            return (*self.query_loss(params, x, y, order), {})
        out = self.fmodel(params, x, order)
        losses = self.loss.per_example(out, y)
        level = self.loss.task_outer_level
        loss = flooded_mean(losses, level, self.loss.flood_mode)
        metric = accuracy(out, y) if not y.dtype.is_floating_point else loss.detach()
        stats = {"query_loss": losses.detach().mean()}
        if level is not None:
            stats["outer_flood_active"] = flood_active(losses, level, self.loss.flood_mode)
        return loss, metric, stats

    def _inner_flood_active(self, points: list[Params], x: torch.Tensor, y: torch.Tensor
                            ) -> torch.Tensor:
        """The inner flood's activity over the inner steps of one task: the mean of
        :func:`~metalearn.algorithms.losses.flood_active` of the support losses at the
        weights each step's gradient was taken at. One more forward of the support set per
        step, without gradient, its random draws (dropout) undone so training is unchanged."""
        level, mode = self.loss.inner_flood, self.loss.flood_mode
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            active = [flood_active(self.loss.per_example(
                self.fmodel({n: v.detach() for n, v in p.items()}, x, 0), y), level, mode)
                for p in points]
        return torch.stack(active).mean()

    def meta_loss(self, batch: TaskBatch, shard: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The outer objective with its graph, and the per-task query metric.

        By default the mean query loss after the inner loop, differentiated through it
        (unrolled, or first order), flooded at ``outer_flood`` in batch mode (the mean over
        the whole meta-batch when ``shard`` says ``batch`` is a part of it, see
        :meth:`step`). :meth:`step` differentiates it; the memory profile measures the
        graph it keeps.
        """
        loss, metric = self._meta_objective(batch)
        return self._flood_meta_batch(loss, shard, len(batch)), metric

    def _meta_objective(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`meta_loss` before the meta-batch flood; sets ``_flood_stats``."""
        self._check_batch(batch)
        losses, metric, stats = vmap(self._task_meta_loss, in_dims=(None, 0, 0, 0, 0),
                                     randomness="different")(
            self.fmodel.params(), batch.support_x, batch.support_y, batch.query_x,
            batch.query_y)
        self._flood_stats = {k: v.mean() for k, v in stats.items()}
        return losses.mean(), metric

    def forward(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.meta_loss(batch)

    def step(self, batch: TaskBatch, shard: tuple[int, int] | None = None) -> dict[str, float]:
        """Accumulate the meta-gradient of ``batch`` into ``.grad``; return metrics.

        ``shard``: ``(offset, total)`` when ``batch`` is the slice ``offset…`` of a
        meta-batch of ``total`` tasks split across processes (learners with random inner
        draws make them for the whole meta-batch, so the run matches one process).

        Metrics: ``loss`` (the outer objective, flooded if ``outer_flood`` is set) and, for
        classification, ``accuracy`` of the queries. With flooding, also how often the
        flood acted (see :func:`~metalearn.algorithms.losses.flood_active`):
        ``outer_flood_active``, 1.0 if the meta-batch's mean query loss was below the level
        (``flood_mode="batch"``) else 0.0, or the fraction of query examples below it
        (``"instance"``), with ``query_loss``, the query loss before flooding;
        ``inner_flood_active``, the fraction of the support losses below the inner level
        (of tasks, or of examples with iFlood) at every inner step (the weights its
        gradient is taken at), over tasks and steps.

        The batch-mode outer flood acts on the mean query loss of the whole meta-batch, so
        a step on a ``shard`` all-reduces that mean over the ``torch.distributed`` group
        before it differentiates (one scalar per step).
        """
        self._flood_stats = {}
        loss, metric = self.meta_loss(batch, shard)
        loss.backward()
        metrics = {"loss": loss.item()}
        if batch.is_classification:
            metrics["accuracy"] = metric.mean().item()
        metrics.update({k: v.item() for k, v in self._flood_stats.items()})
        self._flood_stats = {}
        return metrics

    # -- the meta-batch flood (outer_flood, flood_mode="batch") --------------------------
    def _meta_batch_mean(self, value: torch.Tensor, shard: tuple[int, int] | None,
                         count: int) -> torch.Tensor:
        """The whole meta-batch's mean of a per-shard mean ``value`` over ``count`` tasks."""
        if shard is None or count == shard[1]:
            return value
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"outer_flood in batch mode floods the mean query loss of the whole "
                f"meta-batch, but this step has {count} of its {shard[1]} tasks (shard="
                f"{shard}) and no torch.distributed process group to take the mean with; "
                "start the group (metalearn.distributed.DistContext.from_env) or step on "
                "the whole meta-batch")
        total = value.detach() * (count / shard[1])
        dist.all_reduce(total)
        return total

    def _meta_batch_flood(self, loss: torch.Tensor, shard: tuple[int, int] | None,
                          count: int) -> tuple[torch.Tensor, float] | None:
        """The meta-batch's mean query objective and its flood level, for a batch-mode
        outer flood (None without one); records ``outer_flood_active``."""
        level = self.loss.meta_batch_level
        if level is None:
            return None
        mean = self._meta_batch_mean(loss.detach(), shard, count)
        self._flood_stats["outer_flood_active"] = (mean < level).to(mean.dtype)
        return mean, level

    def _flood_meta_batch(self, loss: torch.Tensor, shard: tuple[int, int] | None,
                          count: int) -> torch.Tensor:
        """``loss`` (this shard's mean query objective) under the batch-mode outer flood:
        :func:`~metalearn.algorithms.losses.flood_from_mean` of the meta-batch's mean."""
        flood = self._meta_batch_flood(loss, shard, count)
        return loss if flood is None else flood_from_mean(loss, *flood)

    def _flooded_grads(self, grads: dict[str, torch.Tensor], loss: torch.Tensor,
                       shard: tuple[int, int] | None, count: int
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """For learners that build the meta-gradient without a graph: ``grads`` of the
        mean query objective ``loss`` under the batch-mode outer flood, and its value."""
        flood = self._meta_batch_flood(loss, shard, count)
        if flood is None:
            return grads, loss
        mean, level = flood
        sign = torch.sign(mean - level)
        return {n: sign * g for n, g in grads.items()}, (mean - level).abs() + level

    @property
    def memory_saving(self) -> bool:
        """Whether the inner steps' activations are recomputed in the outer backward
        (:class:`~metalearn.MAML` only)."""
        return False

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        if value:
            raise NotImplementedError(
                f"memory_saving=True is implemented for MAML's plain SGD inner loop only, not "
                f"for {type(self).__name__} (learned inner rates, a partial inner loop or a "
                "multi-step loss); use memory_saving=False")

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the outer optimiser updates: the trainable parameters of the model, then
        those of ``learned``."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- adaptation ---------------------------------------------------------------------
    def _adapt_batch(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                     steps: int, trajectory: bool):
        return self.fmodel.run_compiled(self, "adapt", self._adapt_region, params, support_x,
                                        support_y, steps, trajectory, steps=steps)

    def _adapt_region(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                      steps: int, trajectory: bool):
        def task(sx: torch.Tensor, sy: torch.Tensor):
            return self.adapt_task(params, sx, sy, steps, True, trajectory)

        return vmap(task, randomness="different")(support_x, support_y)

    # A learner whose meta-gradient does not flow through its adapted weights (Reptile,
    # iMAML) says why here, and adapt(differentiable=True) refuses with it.
    _no_differentiable_adapt: str | None = None

    def outer_first_order(self) -> bool:
        """Whether the meta-gradient takes the inner gradients as constants now (MAML++
        also while its derivative-order annealing lasts)."""
        return self.first_order

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        trajectory: bool = False,
        differentiable: bool = False,
    ) -> Params | list[Params]:
        """Adapted ("fast") weights for one task or a batch of tasks.

        A batch has a leading task dimension: labels ``(B, n)`` or targets ``(B, n, d)``.
        One task's labels are ``(n,)`` or targets ``(n, d)``. With ``trajectory=True`` the
        result is the list of weights after 0, 1, ..., ``steps`` inner steps, from one run
        of the loop.

        Which to use:

        * ``differentiable=False`` (default): detached weights, for evaluation and
          inference with :meth:`predict`. No graph is kept, so it is cheap.
        * ``differentiable=True``: weights that keep the autograd graph to the
          meta-parameters (the model's and ``learner.learned``'s), for an outer loop of
          your own (learn2learn's ``clone()``/``adapt()`` habit): compute a query loss
          from :meth:`predict` and call ``backward()``, and the meta-parameters get the
          learner's meta-gradient, the one :meth:`step` accumulates. It is second order
          for MAML, Meta-SGD, ANIL and MAML++ unless the learner is first order
          (``first_order=True``, FOMAML, MAML++'s early ``first_order_iterations``), in
          which case the inner gradients are constants, as in :meth:`step`. Reptile,
          GradientCombination and iMAML refuse it: their update is not the gradient of a
          loss through the adapted weights (use :meth:`step`).

        Args:
            support_x: support inputs, ``(B, n, ...)`` or one task's ``(n, ...)``.
            support_y: support labels or targets, batched or not like ``support_x``.
            steps: inner steps (default: ``inner_steps``).
            trajectory: return the weights after every step count.
            differentiable: keep the graph to the meta-parameters (see above).

        Example:
            >>> import torch
            >>> import torch.nn.functional as F
            >>> from metalearn import MAML
            >>> from metalearn.data import SineTasks
            >>> from metalearn.models import MLP
            >>> maml = MAML(MLP(), inner_lr=0.01, inner_steps=1)
            >>> batch = SineTasks(seed=0).sample(4)
            >>> fast = maml.adapt(batch.support_x, batch.support_y, differentiable=True)
            >>> loss = F.mse_loss(maml.predict(fast, batch.query_x), batch.query_y)
            >>> loss.backward()       # the second-order MAML meta-gradient
            >>> maml.model[0].weight.grad.shape
            torch.Size([40, 1])
            >>> maml.adapt(batch.support_x, batch.support_y)["0.weight"].requires_grad
            False
        """
        steps = self.inner_steps if steps is None else check_steps("steps", steps)
        if differentiable and self._no_differentiable_adapt:
            raise NotImplementedError(self._no_differentiable_adapt)
        batched = support_y.ndim == (2 if not support_y.dtype.is_floating_point else 3)
        if not batched:
            support_x, support_y = support_x.unsqueeze(0), support_y.unsqueeze(0)
        self._check_inputs(support_x, support_y, "support")
        params = self.fmodel.params()
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            if differentiable:
                out = self._adapt_batch_differentiable(params, support_x, support_y, steps,
                                                       trajectory)
            else:
                out = self._adapt_batch(params, support_x, support_y, steps, trajectory)
            if not trajectory:
                return out if batched else {k: v[0] for k, v in out.items()}
            start = {k: v.expand(len(support_x), *v.shape) for k, v in params.items()}
            if not differentiable:
                start = {k: v.clone() for k, v in start.items()}
            path = [self._start_of_trajectory(start), *out[1]]
        return path if batched else [{k: v[0] for k, v in f.items()} for f in path]

    def _adapt_batch_differentiable(self, params: Params, support_x: torch.Tensor,
                                    support_y: torch.Tensor, steps: int, trajectory: bool):
        first_order = self.outer_first_order()

        def task(sx: torch.Tensor, sy: torch.Tensor):
            return self.adapt_task(params, sx, sy, steps, first_order, trajectory)

        return vmap(task, randomness="different")(support_x, support_y)

    def _start_of_trajectory(self, start: Params) -> Params:
        """The weights before any inner step, per task (MAML++ puts in its step-0 BatchNorm)."""
        return start

    def predict(self, fast: Params, x: torch.Tensor) -> torch.Tensor:
        """Outputs for ``x`` under adapted weights from :meth:`adapt` (batched or not).

        One task's weights take that task's inputs ``(n, ...)``; a batch of tasks' weights
        take ``(B, n, ...)``. BatchNorm normalises with the statistics of the ``n`` inputs
        of a task, as in meta-training (transductive); predict a task's queries together,
        not one at a time. Differentiable when ``fast`` is
        (``adapt(..., differentiable=True)``).
        """
        reference = self.fmodel.params()
        name = next(iter(reference))
        batched = fast[name].ndim != reference[name].ndim
        if x.ndim >= 1 + batched:
            self._check_not_alone(x.shape[int(batched)], "predict")
        # A graph kept for a later backward needs the exact kernels (order 2 serves any use).
        order = 2 if torch.is_grad_enabled() and any(v.requires_grad for v in fast.values()) \
            else 0
        if not batched:
            return self.fmodel(fast, x, order=order)
        return vmap(self.fmodel, in_dims=(0, 0, None), randomness="different")(fast, x, order)

    # -- checks -------------------------------------------------------------------------
    def _check_not_alone(self, examples: int, which: str) -> None:
        """Refuse one example per task to a model with BatchNorm, whose batch statistics
        would be that example's own (BatchNorm1d fails inside torch)."""
        if examples != 1:
            return
        norms = [n for n, m in self.model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            raise ValueError(
                f"{which} got one example per task, but the model's BatchNorm layer {norms[0]!r} "
                "normalises with the statistics of the examples it is given, as in "
                "meta-training, and one example has none to give (BatchNorm1d fails, "
                "BatchNorm2d would normalise the image by itself). Predict a task's queries "
                "together, or each query with the task's support set, as evaluate("
                "transductive=False) does: learner.predict(fast, torch.cat([support_x, "
                "query]))[-1:]")

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
        if x.ndim >= 2:
            self._check_not_alone(x.shape[1], f"the {which} set")
        if not y.dtype.is_floating_point:
            if self._num_outputs is None:
                with torch.no_grad():
                    self._num_outputs = self.fmodel(self.fmodel.params(), x[0],
                                                    order=0).shape[-1]
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
        ref = next(iter(self.fmodel.params().values()))
        for name, t in self.learned.named_parameters():
            if t.device != ref.device or t.dtype != ref.dtype:
                raise ValueError(
                    f"learned {name} is {t.dtype} on {t.device} but the model is {ref.dtype} "
                    f"on {ref.device}; move the whole learner (learner.to({str(ref.device)!r}, "
                    f"{ref.dtype})), or build the learner after moving the model")

    def _accumulate(self, grads: Params) -> None:
        """Add ``grads`` into ``p.grad``, as ``backward()`` would."""
        for name, p in self.fmodel.params().items():
            g = grads[name].detach()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
