"""MAML (Finn et al. 2017) and its first-order approximation, batched over tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import grad, vjp, vmap

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.losses import accuracy, flooded_mean, per_example_loss
from metalearn.algorithms.norm_layers import differentiated_at_most_once
from metalearn.data.task_batch import TaskBatch


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning with exact second-order meta-gradients.

    The inner loop takes ``inner_steps`` SGD steps on each task's support set; the outer
    objective is the mean query loss at the adapted weights. All tasks of a batch run as
    one ``torch.func.vmap`` computation, and :meth:`step` backpropagates through the inner
    loop, accumulating the meta-gradient into ``p.grad`` like ``backward()``.

    Args:
        model: any ``nn.Module``; BatchNorm layers use the current batch's statistics.
        inner_lr: step size of the inner SGD (alpha).
        inner_steps: inner SGD steps during meta-training (0 gives joint training).
        first_order: treat inner gradients as constants (FOMAML).
        inner_flood: flood level b of the inner (support) loss; ``None`` or 0 is off.
        flood_mode: ``"batch"`` (flooding, Ishida et al. 2020) or ``"instance"``
            (iFlood, Xie et al. 2022); applies to the inner and outer flood levels.
        outer_flood: flood level of the outer (query) loss; ``None`` or 0 is off.
        label_smoothing: label smoothing of the cross-entropy (classification only).
        memory_saving: keep only each inner step's fast weights, not its activations, and
            recompute the activations of one step at a time during the outer backward
            (activation checkpointing across inner steps). The meta-gradient is the same
            exact second-order one (to rounding); the memory kept per inner step shrinks
            to one copy of the weights per task, for about one more inner forward and
            backward per step. Needs ``first_order=False`` (first order keeps no inner
            graph anyway: ``ValueError``); subclasses that change the inner loop or the
            query loss (Meta-SGD, ANIL, MAML++) raise ``NotImplementedError``. With
            dropout the masks are reproduced by restoring the RNG state. :meth:`adapt`
            and :meth:`predict` are unaffected.

    Example:
        >>> import torch
        >>> from metalearn import MAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> maml = MAML(model, inner_lr=0.01, inner_steps=1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> tasks = SineTasks(shots=10, seed=0)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     metrics = maml.step(tasks.sample(25))
        ...     opt.step()
        >>> sorted(metrics)
        ['loss']
        >>> saving = MAML(model, inner_lr=0.01, inner_steps=5, memory_saving=True)
        >>> sorted(saving.step(tasks.sample(25)))
        ['loss']
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        inner_flood: float | None = None,
        flood_mode: str = "batch",
        outer_flood: float | None = None,
        label_smoothing: float = 0.0,
        memory_saving: bool = False,
    ) -> None:
        super().__init__(
            model, inner_lr, inner_steps, inner_flood, flood_mode, outer_flood, label_smoothing
        )
        self.first_order = bool(first_order)
        self.memory_saving = memory_saving

    @property
    def memory_saving(self) -> bool:
        """Whether :meth:`meta_loss` recomputes inner-step activations in the backward."""
        return self._memory_saving

    @memory_saving.setter
    def memory_saving(self, value: bool) -> None:
        # Checked on every assignment: MAML++ overrides meta_loss, so a flag set after
        # construction would otherwise be ignored there without a word.
        if value:
            self._check_memory_saving()
        self._memory_saving = bool(value)

    def _check_memory_saving(self) -> None:
        if self.first_order:
            raise ValueError(
                "memory_saving=True needs second-order MAML (first_order=False): first-order "
                "MAML keeps no inner graph, so its memory is already flat in inner_steps")
        cls = type(self)
        changed = [m for m in ("_adapt_task", "_task_query_loss", "_query_loss", "meta_loss")
                   if getattr(cls, m) is not getattr(MAML, m)]
        if changed:
            raise NotImplementedError(
                f"memory_saving=True is implemented for MAML's plain SGD inner loop only; "
                f"{cls.__name__} overrides {', '.join(changed)} (learned inner rates, a "
                "partial inner loop or a multi-step loss), so use memory_saving=False")

    def _adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        inner_grad = grad(self.inner_loss)
        fast, path = params, []
        for _ in range(steps):
            if self.first_order:
                # The outer graph never sees the inner gradient: it is a constant shift.
                with torch.no_grad(), differentiated_at_most_once():
                    g = inner_grad(fast, x, y)
            else:
                g = inner_grad(fast, x, y)
            fast = {k: fast[k] - self.inner_lr * g[k] for k in fast}
            self._track(fast, path)
        return self._finish(fast, path)

    def _query_loss(
        self, fast: Params, qx: torch.Tensor, qy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fmodel(fast, qx)
        loss = flooded_mean(per_example_loss(out, qy, self.label_smoothing),
                            self.outer_flood, self.flood_mode)
        acc = accuracy(out, qy) if not qy.dtype.is_floating_point else loss.detach()
        return loss, acc

    def _task_query_loss(
        self, params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
        qy: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fast = self._adapt_task(params, sx, sy, self.inner_steps)
        return self._query_loss(fast, qx, qy)

    def _batched_inner_grad(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, shared: bool
    ) -> Params:
        """Every task's inner-loss gradient; ``shared``: ``params`` are theta, not per task."""
        in_dims = (None if shared else 0, 0, 0)
        return vmap(grad(self.inner_loss), in_dims=in_dims, randomness="different")(
            params, x, y)

    def _meta_loss_memory_saving(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.fmodel.params()
        names = tuple(params)
        fast = tuple(params.values())
        for k in range(self.inner_steps):
            # Outside vmap: one autograd node per inner step for the whole batch of tasks.
            fast = _InnerStep.apply(self, names, k == 0, batch.support_x, batch.support_y,
                                    *fast)
            fast = (fast,) if isinstance(fast, torch.Tensor) else fast
        in_dims = (0 if self.inner_steps else None, 0, 0)
        return vmap(self._query_loss, in_dims=in_dims, randomness="different")(
            dict(zip(names, fast)), batch.query_x, batch.query_y)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The outer objective with its autograd graph, and the per-task query metric.

        ``step`` differentiates it; the memory profile measures the graph it keeps.
        """
        self._check_batch(batch)
        if self.memory_saving:
            self._check_memory_saving()  # first_order may have been set since
            losses, metric = self._meta_loss_memory_saving(batch)
            return losses.mean(), metric
        losses, metric = vmap(
            self._task_query_loss, in_dims=(None, 0, 0, 0, 0), randomness="different"
        )(self.fmodel.params(), batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return losses.mean(), metric

    def step(self, batch: TaskBatch) -> dict[str, float]:
        """Accumulate the meta-gradient of ``batch`` into ``p.grad``; return metrics."""
        loss, metric = self.meta_loss(batch)
        loss.backward()
        metrics = {"loss": loss.item()}
        if batch.is_classification:
            metrics["accuracy"] = metric.mean().item()
        return metrics


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device
                  ) -> Iterator[None]:
    """Run with the RNG state ``state`` (from :func:`_rng_state`), then restore the current one."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _InnerStep(torch.autograd.Function):
    """One inner SGD step of every task, ``fast - lr * grad``, keeping no activations.

    Applied outside ``vmap`` to the batched fast weights (``[T, ...]`` each; theta itself
    when ``shared``, for the first step). The forward saves only its inputs; the backward
    recomputes the step's graph once to get ``v - lr * H v`` with ``H`` each task's
    inner-loss Hessian: a vector-Jacobian product of the vmapped inner gradient.
    """

    @staticmethod
    def forward(ctx, learner: MAML, names: tuple[str, ...], shared: bool, x: torch.Tensor,
                y: torch.Tensor, *fast: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.learner, ctx.names, ctx.shared = learner, names, shared
        # Dropout in the recomputation must draw the masks of this forward.
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x, y, *fast)
        # torch.func.grad ignores the no_grad that autograd.Function runs forward under.
        g = learner._batched_inner_grad(dict(zip(names, fast)), x, y, shared)
        return tuple(p - learner.inner_lr * g[n] for n, p in zip(names, fast))

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, y, *fast = ctx.saved_tensors
        learner, names, shared = ctx.learner, ctx.names, ctx.shared

        def inner_grad(params: Params) -> Params:
            return learner._batched_inner_grad(params, x, y, shared)

        with _replayed_rng(ctx.rng, x.device):
            _, hvp = vjp(inner_grad, dict(zip(names, fast)))
        v = dict(zip(names, cotangents))
        (hv,) = hvp(v)
        # With shared theta the vjp already sums H_t v_t over tasks; so must the identity.
        lr = learner.inner_lr
        grads = [(v[n].sum(0) if shared else v[n]) - lr * hv[n] for n in names]
        return (None, None, None, None, None, *grads)


class FOMAML(MAML):
    """First-order MAML: :class:`MAML` with ``first_order=True``.

    The meta-gradient is the query-loss gradient at the adapted weights, as if the inner
    updates did not depend on the initialisation. Memory stays flat in ``inner_steps``.

    Args:
        model, inner_lr, inner_steps, inner_flood, flood_mode, outer_flood,
        label_smoothing: as for :class:`MAML`.

    Example:
        >>> import torch
        >>> from metalearn import FOMAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> fomaml = FOMAML(model, inner_lr=0.01, inner_steps=5)
        >>> metrics = fomaml.step(SineTasks(seed=0).sample(25))
        >>> model[0].weight.grad.shape
        torch.Size([40, 1])
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int, **kwargs) -> None:
        if "first_order" in kwargs:
            raise TypeError("FOMAML is first-order by definition; use MAML(first_order=...)")
        super().__init__(model, inner_lr, inner_steps, first_order=True, **kwargs)
