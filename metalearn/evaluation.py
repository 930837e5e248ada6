"""Few-shot evaluation: performance after 0..K inner steps on a fixed set of test tasks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import vmap
from tqdm import tqdm

from metalearn.data.task_batch import TaskBatch


@dataclass
class EvaluationResult:
    """Per-step mean and 95% confidence interval of a metric over test tasks.

    Args:
        metric: ``"accuracy"`` (classification, fraction of correct queries) or ``"mse"``
            (regression, mean squared error over queries and output dimensions).
        steps: the inner-step counts 0, 1, ..., K.
        mean: the metric's mean over tasks, one per step count.
        ci95: half-width of the 95% confidence interval, ``1.96 * std / sqrt(n)`` with the
            population std (ddof=0, numpy's default, as in the MAML reference code).
        per_task: the metric of every task after every step count, ``(num_tasks, K + 1)``.
        num_tasks: n, the number of test tasks.

    Example:
        >>> import torch
        >>> from metalearn.evaluation import EvaluationResult
        >>> r = EvaluationResult("mse", [0], [0.5], [0.1], torch.tensor([[0.4], [0.6]]), 2)
        >>> r.to_dict(include_per_task=False)["mean"]
        [0.5]
    """

    metric: str
    steps: list[int]
    mean: list[float]
    ci95: list[float]
    per_task: torch.Tensor
    num_tasks: int

    @classmethod
    def from_per_task(cls, metric: str, per_task: torch.Tensor) -> EvaluationResult:
        """Summarise a ``(num_tasks, K + 1)`` table of per-task values."""
        values = per_task.to(torch.float64)
        n = values.shape[0]
        std = values.std(0, correction=0)  # ddof=0, like np.std in the MAML code
        return cls(
            metric=metric,
            steps=list(range(values.shape[1])),
            mean=values.mean(0).tolist(),
            ci95=(1.96 * std / math.sqrt(n)).tolist(),
            per_task=values,
            num_tasks=n,
        )

    def to_dict(self, include_per_task: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict; ``per_task`` as a list of rows, one per task."""
        out: dict[str, Any] = {
            "metric": self.metric,
            "steps": list(self.steps),
            "mean": list(self.mean),
            "ci95": list(self.ci95),
            "num_tasks": self.num_tasks,
        }
        if include_per_task:
            out["per_task"] = self.per_task.tolist()
        return out

    def __str__(self) -> str:
        percent = self.metric == "accuracy"
        unit = " (%)" if percent else ""
        lines = [f"{self.metric}{unit} over {self.num_tasks} tasks, mean ± 95% CI",
                 f"{'steps':>5}  {self.metric}"]
        for s, m, c in zip(self.steps, self.mean, self.ci95):
            value = f"{100 * m:6.2f} ± {100 * c:.2f}" if percent else f"{m:.4g} ± {c:.2g}"
            lines.append(f"{s:>5}  {value}")
        return "\n".join(lines)


def format_metric(metric: str, value: float, ci95: float | None = None) -> str:
    """One unit everywhere people read results: accuracy in percent, MSE as a number.

    Example:
        >>> from metalearn.evaluation import format_metric
        >>> format_metric("accuracy", 0.9512, 0.0123), format_metric("mse", 0.4567)
        ('95.12% ± 1.23', '0.4567')
    """
    if metric == "accuracy":
        text = f"{100 * value:.2f}%"
        return text if ci95 is None else f"{text} ± {100 * ci95:.2f}"
    text = f"{value:.4g}"
    return text if ci95 is None else f"{text} ± {ci95:.2g}"


def _check_args(tasks: TaskBatch, max_steps: int, batch_size: int) -> None:
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a TaskBatch, got {type(tasks).__name__}")
    if len(tasks) == 0:
        raise ValueError("tasks is empty: evaluate needs at least one test task")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer >= 0, got {max_steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _predict_each_query_alone(learner: Any, fast: dict, support_x: torch.Tensor,
                              query_x: torch.Tensor) -> torch.Tensor:
    """Outputs ``(B, q, ...)`` with every query forwarded together with its support set only.

    This is the non-transductive setting of the Reptile paper: BatchNorm sees the support
    examples plus one query, so queries cannot inform each other's predictions.
    """

    def one_query(f: dict, sx: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return learner.fmodel(f, torch.cat([sx, q.unsqueeze(0)]), order=0)[-1]

    over_queries = vmap(one_query, in_dims=(None, None, 0), randomness="different")
    return vmap(over_queries, randomness="different")(fast, support_x, query_x)


@dataclass(frozen=True)
class Metric:
    """How evaluation and validation score one task's query predictions.

    Args:
        name: what results and logs call it (``"accuracy"`` is shown in percent).
        fn: ``fn(outputs, targets)``, one task's query outputs ``(q, ...)`` and targets
            ``(q, ...)`` to a number (a float or a 0-d tensor).
        higher_is_better: which way is better, for the best checkpoint and early stopping.

    The defaults are :data:`ACCURACY` for integer labels and :data:`MSE` for float targets;
    a learner with a ``loss_fn`` of its own is scored on float targets by that loss
    (:func:`default_metric`). Float targets that are not regression (multi-hot labels, say)
    want a metric of their own.

    Example:
        >>> import torch
        >>> from metalearn.evaluation import Metric
        >>> def exact_match(out, y):  # multi-label: every label of the example right
        ...     return ((out > 0).float() == y).all(-1).float().mean()
        >>> subset = Metric("exact match", exact_match, higher_is_better=True)
        >>> float(subset.fn(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]])))
        1.0
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], Any]
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Metric name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"Metric fn must be callable fn(outputs, targets) -> number, got "
                            f"{type(self.fn).__name__}")


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).to(torch.float64).mean()


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


ACCURACY = Metric("accuracy", _accuracy, higher_is_better=True)
MSE = Metric("mse", _mse, higher_is_better=False)


def default_metric(classification: bool, loss: Any = None) -> Metric:
    """The metric for tasks with integer labels (``classification``) or float targets.

    Integer labels: :data:`ACCURACY`. Float targets: :data:`MSE`, or, when ``loss`` (a
    :class:`~metalearn.algorithms.losses.TaskLoss`) has a ``loss_fn`` of the user's, the
    mean of that per-example loss (``"loss"``, lower is better): a user loss on float
    targets says they need not be regression.

    Example:
        >>> from metalearn.evaluation import default_metric
        >>> default_metric(True).name, default_metric(False).name
        ('accuracy', 'mse')
    """
    if classification:
        return ACCURACY
    if loss is not None and getattr(loss, "loss_fn", None) is not None:
        return Metric("loss", lambda out, y: loss.unsmoothed(out, y).mean(),
                      higher_is_better=False)
    return MSE


def _task_metric(out: torch.Tensor, y: torch.Tensor, metric: Metric | None = None
                 ) -> torch.Tensor:
    """Per-task values ``(B,)`` from outputs ``(B, q, ...)`` and targets ``(B, q[, d])``;
    ``metric`` defaults to accuracy for integer labels and MSE for float targets."""
    if metric is None:
        metric = MSE if y.dtype.is_floating_point else ACCURACY
    if metric is MSE:
        return (out - y).pow(2).flatten(1).mean(1)
    if metric is ACCURACY:
        return (out.argmax(-1) == y).to(torch.float64).mean(1)
    values = []
    for i in range(len(out)):  # a plain loop: a user's metric need not be vmappable
        v = metric.fn(out[i], y[i])
        v = torch.as_tensor(v).detach()
        if v.numel() != 1:
            raise ValueError(f"metric {metric.name!r} returned shape {tuple(v.shape)} for one "
                             "task; it must return one number per task (a float or a 0-d "
                             "tensor)")
        values.append(v.to(device=out.device, dtype=torch.float64).reshape(()))
    return torch.stack(values)


def evaluate(
    learner: Any,
    tasks: TaskBatch | Any,
    max_steps: int = 10,
    transductive: bool = True,
    batch_size: int = 25,
    progress: bool = True,
    *,
    num_tasks: int | None = None,
    metric: Metric | None = None,
) -> EvaluationResult:
    """Accuracy (classification), MSE (regression) or a metric of yours after
    0..``max_steps`` inner steps.

    Every task is adapted once on its support set with ``learner.adapt(...,
    trajectory=True)``, and its query set is scored with the weights after each step count,
    following the MAML paper's protocol: mean over tasks and a 95% confidence interval
    ``1.96 * std / sqrt(n)`` (population std, ddof=0, as ``np.std`` in the MAML reference
    code). Pass the same fixed tasks (e.g. 600 from a seeded sampler) to every learner.

    The model runs in eval mode (dropout off) and every module's train/eval mode is
    restored afterwards; BatchNorm layers still normalise with batch statistics.

    Args:
        learner: a meta-learner (``MAML``, ``FOMAML``, ``Reptile``, ...), with the model and
            loss of your own if you like (``TrainResult.learner`` from
            :func:`~metalearn.train`).
        tasks: the test tasks, a :class:`~metalearn.data.TaskBatch`; or a task sampler
            (anything with ``sample(n) -> TaskBatch``) to draw ``num_tasks`` of them from,
            ``batch_size`` at a time, so that only one chunk is in memory (600 miniImageNet
            tasks with 15 queries per class would take 4 GB at once); the tasks are then
            fixed by the sampler's state, ``num_tasks`` and ``batch_size``. Processed
            ``batch_size`` tasks at a time, each chunk moved to the model's device (and its
            floating-point dtype).
        max_steps: K, the largest inner-step count scored.
        transductive: ``True`` predicts each task's query set in one forward pass, so
            BatchNorm uses the query set's statistics (the MAML protocol). ``False``
            predicts every query from a forward pass of the support set plus that query
            alone (the Reptile paper's non-transductive setting); it costs about
            ``num_support + 1`` times more compute, so use a smaller ``batch_size``.
            The two agree for models without BatchNorm.
        batch_size: tasks per chunk; bounds memory, does not change the result (up to
            float rounding, and except for random adaptation such as Reptile's
            mini-batches, whose draws depend on the chunk).
        progress: show a tqdm progress bar over the chunks.
        num_tasks: how many tasks to draw when ``tasks`` is a sampler.
        metric: a :class:`Metric` of yours; default :func:`default_metric` of the tasks'
            targets and the learner's loss (accuracy for integer labels; MSE for float
            targets, or the mean of the learner's ``loss_fn`` if it has one).

    Returns:
        An :class:`EvaluationResult`.

    Example:
        >>> import torch
        >>> from metalearn import MAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.evaluation import evaluate
        >>> from metalearn.models import MLP
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> maml = MAML(MLP(), inner_lr=0.01, inner_steps=1)
        >>> result = evaluate(maml, SineTasks(seed=1).sample(20), max_steps=3, progress=False)
        >>> result.metric, result.steps, tuple(result.per_task.shape)
        ('mse', [0, 1, 2, 3], (20, 4))
    """
    first, chunks, count = _task_chunks(tasks, num_tasks, batch_size)
    _check_args(first, max_steps, batch_size)
    if metric is None:
        metric = default_metric(first.is_classification, getattr(learner, "loss", None))
    elif not isinstance(metric, Metric):
        raise TypeError(f"metric must be a metalearn.evaluation.Metric, got "
                        f"{type(metric).__name__}; wrap a function as Metric(name, fn, "
                        "higher_is_better=...)")
    model = learner.model
    reference = next(iter(learner.fmodel.params().values()))
    device, dtype = reference.device, reference.dtype
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    rows = []
    try:
        for chunk in tqdm(chunks, total=count, desc="evaluate", unit="chunk",
                          disable=not progress):
            chunk = chunk.to(device, dtype=dtype)
            path = learner.adapt(chunk.support_x, chunk.support_y, steps=max_steps,
                                 trajectory=True)
            with torch.no_grad():
                per_step = []
                for fast in path:
                    if transductive:
                        out = learner.predict(fast, chunk.query_x)
                    else:
                        out = _predict_each_query_alone(learner, fast, chunk.support_x,
                                                        chunk.query_x)
                    per_step.append(_task_metric(out, chunk.query_y, metric))
            rows.append(torch.stack(per_step, 1).cpu())
    finally:
        for m, training in modes:
            m.training = training
    return EvaluationResult.from_per_task(metric.name, torch.cat(rows))


def _task_chunks(tasks: Any, num_tasks: int | None, batch_size: int
                 ) -> tuple[TaskBatch, Iterator[TaskBatch], int]:
    """The first chunk, an iterator over all chunks (the first included) and their count:
    slices of a ``TaskBatch``, or ``num_tasks`` tasks drawn ``batch_size`` at a time from
    a sampler."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(tasks, TaskBatch):
        if num_tasks is not None:
            raise ValueError("num_tasks is for drawing from a sampler; tasks is already a "
                             "TaskBatch (slice it, tasks[:n], to use fewer)")
        starts = range(0, len(tasks), batch_size)
        return tasks, (tasks[s:s + batch_size] for s in starts), len(starts)
    _check_sampler(tasks, num_tasks)
    first = _draw(tasks, min(batch_size, num_tasks))

    def chunks() -> Iterator[TaskBatch]:
        yield first
        for start in range(batch_size, num_tasks, batch_size):
            yield _draw(tasks, min(batch_size, num_tasks - start))

    return first, chunks(), -(-num_tasks // batch_size)


def _check_sampler(tasks: Any, num_tasks: int | None) -> None:
    if not callable(getattr(tasks, "sample", None)):
        raise TypeError(f"tasks must be a TaskBatch or a sampler with sample(n) -> TaskBatch, "
                        f"got {type(tasks).__name__}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"tasks is a sampler: give num_tasks, an integer >= 1, for how many "
                         f"tasks to draw from it (got {num_tasks!r})")


def _draw(tasks: Any, n: int) -> TaskBatch:
    """``n`` tasks drawn from the sampler ``tasks``, checked."""
    drawn = tasks.sample(n)
    if not isinstance(drawn, TaskBatch):
        raise TypeError(f"tasks.sample({n}) returned {type(drawn).__name__}, not a "
                        "TaskBatch")
    if len(drawn) != n:
        raise ValueError(f"tasks.sample({n}) returned {len(drawn)} tasks; a sampler must "
                         "return as many as asked for")
    return drawn
