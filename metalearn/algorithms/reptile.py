"""Reptile (Nichol, Achiam and Schulman 2018), batched over tasks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.inner_loop import Update, adam, inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss, accuracy
from metalearn.data.task_batch import TaskBatch

INNER_OPTIMIZERS = ("sgd", "adam")
SAMPLINGS = ("cycle", "replacement")
ADAM_STATES = ("carried", "task")


def minibatch_indices(
    num_tasks: int, size: int, batch: int, steps: int, sampling: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices ``(num_tasks, steps, batch)`` of each task's inner mini-batches.

    ``"cycle"`` walks through fresh permutations of the task's data, so a mini-batch may
    straddle two passes (as in the reference code); ``"replacement"`` draws every
    mini-batch independently, without repeats inside one mini-batch.
    """
    if sampling == "cycle":
        passes = math.ceil(steps * batch / size)
        perms = torch.rand(num_tasks, passes, size, generator=generator).argsort(-1)
        return perms.reshape(num_tasks, -1)[:, : steps * batch].reshape(num_tasks, steps, batch)
    if sampling == "replacement":
        draws = torch.rand(num_tasks, steps, size, generator=generator).argsort(-1)
        return draws[..., :batch]
    raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")


def _moment_key(moment: str, name: str) -> str:
    """The buffer holding Adam's carried moment ``"m"`` or ``"v"`` of parameter ``name``
    (buffer names cannot contain dots)."""
    return f"adam_{moment}__{name.replace('.', '__')}"


class Reptile(MetaLearner):
    """Reptile: move the initialisation towards the weights each task adapts to.

    Each task runs ``inner_steps`` steps of SGD (or Adam with beta1 = 0, as in the
    reference code) on mini-batches of its support set, giving phi_i. :meth:`step`
    accumulates ``theta - mean_i phi_i`` into ``p.grad``, so plain SGD with learning
    rate epsilon applies the Reptile update ``theta += epsilon * mean_i(phi_i - theta)``.

    Adam's state is carried across tasks by default, as in the reference code (and
    learn2learn's Reptile example), where one Adam optimiser adapts every task in turn and
    only the weights are reset between tasks: its second moment is a running average over
    all the tasks seen, and test-time adaptation starts from it without changing it. The
    tasks of a meta-batch run in parallel here, so each starts from the state the
    meta-batch started with; after :meth:`step` the carried state is what the reference's
    sequential pass would leave given the same gradients (each task's K steps folded in,
    in task order). The state lives in ``learner.learned`` (buffers, so checkpoints and
    ``state_dict`` keep it). ``adam_state="task"`` starts every task from fresh moments
    instead.

    Args:
        model: any ``nn.Module``.
        inner_lr: inner learning rate.
        inner_steps: inner iterations k during meta-training (>= 1: with none, phi = theta
            and Reptile learns nothing).
        inner_batch: examples per inner mini-batch; ``None`` uses the whole support set.
        inner_optimizer: ``"sgd"`` or ``"adam"``.
        sampling: ``"cycle"`` through the data or draw with ``"replacement"``.
        adam_betas: Adam's (beta1, beta2); the paper's setting is beta1 = 0.
        adam_eps: Adam's epsilon.
        adam_state: ``"carried"`` (Adam's moments and step count carried across tasks and
            meta-iterations, as in the reference code) or ``"task"`` (fresh for every
            task); ignored for SGD.
        generator: random source of the mini-batches (default: torch's global one); also
            the attribute ``learner.generator``.
        loss: as for :class:`~metalearn.MAML`.
        **loss_options: as for :class:`~metalearn.MAML`, except ``outer_flood`` (Reptile
            has no outer loss).

    Example:
        >>> import torch
        >>> from metalearn import Reptile
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> reptile = Reptile(model, inner_lr=0.02, inner_steps=5, inner_batch=5)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the meta step size epsilon
        >>> opt.zero_grad()
        >>> metrics = reptile.step(SineTasks(shots=10, seed=0).sample(5))
        >>> opt.step()
    """

    _no_differentiable_adapt = (
        "Reptile's update theta - phi is not the gradient of a loss through the adapted "
        "weights, so adapt(differentiable=True) has no meta-gradient to keep; use step() "
        "for Reptile, or FOMAML/MAML for an outer loop of your own")

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        inner_steps: int,
        inner_batch: int | None = None,
        inner_optimizer: str = "sgd",
        sampling: str = "cycle",
        adam_betas: tuple[float, float] = (0.0, 0.999),
        adam_eps: float = 1e-8,
        adam_state: str = "carried",
        generator: torch.Generator | None = None,
        loss: TaskLoss | None = None,
        **loss_options: Any,
    ) -> None:
        if loss_options.get("outer_flood") is not None:
            raise TypeError("Reptile has no outer loss to flood: outer_flood does not apply")
        super().__init__(model, inner_lr, inner_steps, first_order=True, loss=loss,
                         **loss_options)
        if self.inner_steps == 0:
            raise ValueError(f"inner_steps must be >= 1 for {type(self).__name__}: with none, "
                             "phi = theta and the update theta + epsilon * (phi - theta) "
                             "changes nothing")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"unknown inner_optimizer {inner_optimizer!r}; choose one of {INNER_OPTIMIZERS}"
            )
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")
        if inner_batch is not None and (isinstance(inner_batch, bool) or inner_batch < 1):
            raise ValueError(f"inner_batch must be >= 1 or None, got {inner_batch!r}")
        b1, b2 = adam_betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or adam_eps <= 0:
            raise ValueError(f"adam_betas must lie in [0, 1) and adam_eps be > 0, got "
                             f"{adam_betas}, {adam_eps}")
        if adam_state not in ADAM_STATES:
            raise ValueError(f"unknown adam_state {adam_state!r}; choose one of {ADAM_STATES}")
        self.inner_batch = inner_batch
        self.inner_optimizer = inner_optimizer
        self.sampling = sampling
        self.adam_betas, self.adam_eps = (b1, b2), adam_eps
        self.adam_state = adam_state
        self.generator = generator
        if self.carries_adam_state:
            for name, p in self.fmodel.params().items():
                for moment in ("m", "v"):
                    self.learned.register_buffer(_moment_key(moment, name),
                                                 torch.zeros_like(p.detach()))
            self.learned.register_buffer("adam_t", torch.zeros((), dtype=torch.float64))

    @property
    def carries_adam_state(self) -> bool:
        """Whether Adam's state is carried across tasks (Adam with ``adam_state="carried"``)."""
        return self.inner_optimizer == "adam" and self.adam_state == "carried"

    def carried_state(self) -> tuple[Params, Params, torch.Tensor] | None:
        """The carried Adam state ``(m, v, t)`` that tasks start from, or ``None``."""
        if not self.carries_adam_state:
            return None
        buffers = dict(self.learned.named_buffers())
        names = self.fmodel.params()
        m = {n: buffers[_moment_key("m", n)] for n in names}
        v = {n: buffers[_moment_key("v", n)] for n in names}
        return m, v, buffers["adam_t"]

    def _fold_in(self, ends: tuple[Params, Params, torch.Tensor], steps: int,
                 shard: tuple[int, int] | None) -> None:
        """Update the carried state as the reference's sequential pass over the meta-batch's
        tasks would: for each moment x with decay beta, after B tasks of K steps,
        ``x = beta^(BK) x0 + sum_i beta^((B-1-i)K) (x_i - beta^K x0)``, where x_i is task
        i's moment after its K steps from x0; and t = t0 + BK."""
        m0, v0, t0 = self.carried_state()
        m_end, v_end, _ = ends
        count = next(iter(m_end.values())).shape[0]
        offset, total = shard or (0, count)
        index = torch.arange(offset, offset + count, device=t0.device, dtype=torch.float64)
        sums = []
        for x0, x_end, beta in ((m0, m_end, self.adam_betas[0]), (v0, v_end, self.adam_betas[1])):
            weights = (beta ** ((total - 1 - index) * steps))
            for n in x0:
                w = weights.to(x0[n].dtype).view(-1, *([1] * x0[n].dim()))
                sums.append((x0[n], beta, (w * (x_end[n] - beta ** steps * x0[n])).sum(0)))
        if shard is not None and count < total:
            # A meta-batch split over processes: the other ranks hold the other tasks' terms.
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                for _, _, part in sums:
                    dist.all_reduce(part)
        for x0, beta, part in sums:
            x0.mul_(beta ** (total * steps)).add_(part)
        t0.add_(total * steps)

    def update_rule(self) -> Update:
        """The inner optimiser: SGD, or Adam (its state given by the inner loop's caller)."""
        if self.inner_optimizer == "adam":
            return adam(self.inner_lr, self.adam_betas, self.adam_eps)
        return sgd(self.inner_lr)

    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool = True, trajectory: bool = False,
                   batches: torch.Tensor | None = None, start: Any = None,
                   return_state: bool = False):
        """The inner loop of one task; ``batches``: the mini-batch indices ``(steps, b)``,
        or ``None`` for the whole support set at every step; ``start``: the optimiser
        state to start from (``None``: fresh)."""
        def loss(p: Params, step: int, order: int) -> torch.Tensor:
            xb, yb = (x, y) if batches is None else (x[batches[step]], y[batches[step]])
            return self.support_loss(p, xb, yb, order)

        return inner_loop(loss, params, steps, self.update_rule(), first_order=True,
                          trajectory=trajectory, state=start, return_state=return_state)

    def _minibatches(self, tasks: int, size: int, steps: int, shard: tuple[int, int] | None,
                     device: torch.device) -> torch.Tensor | None:
        """Every task's mini-batch indices, drawn for the whole meta-batch and sliced to this
        process's ``shard``, so that a split run draws what one process would."""
        if self.inner_batch is None:
            return None
        if self.inner_batch > size:
            raise ValueError(
                f"inner_batch={self.inner_batch} exceeds the {size} support examples per "
                "task; lower inner_batch or raise shots"
            )
        offset, total = shard or (0, tasks)
        idx = minibatch_indices(total, size, self.inner_batch, steps, self.sampling,
                                self.generator)
        return idx[offset: offset + tasks].to(device)

    def _adapt_batch(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                     steps: int, trajectory: bool, shard: tuple[int, int] | None = None,
                     return_state: bool = False):
        """Every task's adapted weights; with ``return_state``, also every task's final
        optimiser state (batched over tasks)."""
        idx = self._minibatches(len(support_x), support_x.shape[1], steps, shard,
                                support_x.device)
        name = "adapt_with_state" if return_state else "adapt"
        return self.fmodel.run_compiled(self, name, self._adapt_region, params, support_x,
                                        support_y, idx, self.carried_state(), steps,
                                        trajectory, return_state, steps=steps)

    def _adapt_region(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                      idx: torch.Tensor | None, start: Any, steps: int, trajectory: bool,
                      return_state: bool):
        # The carried state enters unbatched: every task starts from it.
        def task(sx: torch.Tensor, sy: torch.Tensor, batches: torch.Tensor | None):
            return self.adapt_task(params, sx, sy, steps, True, trajectory, batches, start,
                                   return_state)

        return vmap(task, in_dims=(0, 0, None if idx is None else 0),
                    randomness="different")(support_x, support_y, idx)

    def meta_loss(self, batch: TaskBatch):
        raise NotImplementedError("Reptile's update is not the gradient of a loss: use step()")

    def step(self, batch: TaskBatch, shard: tuple[int, int] | None = None) -> dict[str, float]:
        """Accumulate ``theta - mean_i phi_i`` into ``p.grad``; return query metrics at phi."""
        self._check_batch(batch)
        params = self.fmodel.params()
        with torch.no_grad():
            if self.carries_adam_state:
                fast, ends = self._adapt_batch(params, batch.support_x, batch.support_y,
                                               self.inner_steps, False, shard, True)
                self._fold_in(ends, self.inner_steps, shard)
            else:
                fast = self._adapt_batch(params, batch.support_x, batch.support_y,
                                         self.inner_steps, False, shard)
            # An outer SGD step of size epsilon then makes theta + epsilon * mean(phi - theta).
            self._accumulate({k: params[k] - fast[k].mean(0) for k in params})
        return self._query_metrics(fast, batch)

    def _query_metrics(self, fast: Params, batch: TaskBatch) -> dict[str, float]:
        """Query loss (and accuracy) at the per-task weights ``fast``."""
        with torch.no_grad():
            out = self.predict(fast, batch.query_x)
            flat_out, flat_y = out.flatten(0, 1), batch.query_y.flatten(0, 1)
            metrics = {"loss": self.loss.unsmoothed(flat_out, flat_y).mean().item()}
            if batch.is_classification:
                metrics["accuracy"] = accuracy(flat_out, flat_y).item()
        return metrics
