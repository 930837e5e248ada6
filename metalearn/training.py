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
from metalearn.algorithms.losses import LossFn
from metalearn.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    non_finite_entries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metalearn.config import (
    TrainConfig,
    build_learner,
    build_model,
    build_optimizer,
    build_sampler,
    build_schedule,
    upgraded,
)
from metalearn.distributed import DistContext
from metalearn.evaluation import EvaluationResult, Metric, default_metric, evaluate
from metalearn.run_files import claim_checkpoint
from metalearn.user_objects import UserObjects, check_fit, draw_tasks, user_mismatch

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
    """What :func:`train` returns: the trained model and learner, and the run's record.

    Attributes:
        model: the trained model (the one given as ``model=``, trained in place, or the
            built-in network); its weights are those at the last iteration, not the best.
        learner: the learner that trained it (with Meta-SGD's and MAML++'s learned state).
        config: the resolved :class:`~metalearn.config.TrainConfig` of the run.
        iteration: the meta-iterations done.
        history: the log's records, as in the JSON-lines log: ``{"split": "train", ...}``
            every ``log_every`` iterations (loss, and accuracy for classification),
            ``{"split": "val", ...}`` at each validation (the metric after the validation
            step count, with its 95% CI).
        best: the best validation: ``{"iteration", "metric", "value", "ci95"}``; ``None``
            before the first validation. Its weights are in ``<stem>.best.pt`` beside the
            checkpoint.
        stopped_early: stopped by ``patience``.
        out_of_time: stopped at ``time_limit`` (the checkpoint is written; ``resume=True``
            continues).

    Example:
        >>> import metalearn
        >>> r = metalearn.train(dataset="sine", iterations=10, val_every=5, val_tasks=5,
        ...                     log_every=5, progress=False)
        >>> r.iteration, [rec["split"] for rec in r.history], r.stopped_early
        (10, ['train', 'val', 'train', 'val'], False)
    """

    model: nn.Module
    learner: MetaLearner
    config: TrainConfig
    iteration: int
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    stopped_early: bool = False
    out_of_time: bool = False


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
    time_limit: float | None = None,
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
        time_limit: seconds this call may train (a job's wall-clock limit): past it, the
            run stops at the next validation, after writing its checkpoint, and returns
            with ``out_of_time`` set; ``resume=True`` continues it where it stopped. It
            overruns the limit by at most one validation interval. ``None``: no limit.

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
    _check_time_limit(time_limit)
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
        return _train(cfg, ctx, ckpt, resume, progress, log_every, objects, time_limit)


def _check_time_limit(time_limit: float | None) -> float | None:
    """``time_limit`` itself if it is ``None`` or a finite number of seconds > 0."""
    if time_limit is None:
        return None
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) \
            or not 0 < time_limit < float("inf"):
        raise ValueError(f"time_limit must be a number of seconds > 0 (or None for no "
                         f"limit), got {time_limit!r}")
    return time_limit


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
            val_tasks = draw_tasks(objects.val_sampler, cfg.val_tasks, "val_sampler")
        else:
            val_tasks = build_sampler(cfg, "val", seed=cfg.seed + 1_000_003,
                                      evaluation=True).sample(cfg.val_tasks)
        user = objects.describe(val_tasks)
        # A no-op for the built-in data; a user's data take the model's dtype (float64, say).
        val_tasks = val_tasks.to(device, dtype=_model_dtype(model))
        metric = objects.metric or default_metric(val_tasks.is_classification, learner.loss)
        if objects.given:
            check_fit(learner, val_tasks[:1], objects, metric)
        # Each rank validates its share of the tasks; the gathered table is one process's.
        val_offset, val_count = ctx.shard(cfg.val_tasks, "val_tasks")
        return cls(cfg, ctx, model, learner, eval_learner, meta_params, optimizer, schedule,
                   sampler, learner.generator, val_tasks[val_offset: val_offset + val_count],
                   metric, user)

    def restore(self, ckpt: Path) -> None:
        """Continue from ``ckpt``: the state of every object and the run's standing."""
        state = load_checkpoint(ckpt)
        mismatch = (_config_mismatch(upgraded(state.get("config", {})), self.cfg.to_dict())
                    + user_mismatch(state.get("user"), self.user))
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
            batch = draw_tasks(self.sampler, cfg.meta_batch, "train_sampler")
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
        self.path = path

    def __call__(self, record: dict) -> None:
        self.history.append(record)
        if self.path:
            # Opened per record, not held open: a file put in the log's place meanwhile
            # (a git checkout or stash of a run inside a repository) gets the records, where
            # a held handle would go on writing to the replaced, deleted file.
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _data_name(cfg: TrainConfig, sampler: Any, objects: UserObjects | None) -> str:
    if objects is None or objects.train_sampler is None:
        return cfg.dataset
    return type(sampler).__name__


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.requires_grad).dtype


def _train(cfg: TrainConfig, ctx: DistContext, ckpt: Path | None, resume: bool,
           progress: bool, log_every: int, objects: UserObjects | None = None,
           time_limit: float | None = None) -> TrainResult:
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
    stopped_early = out_of_time = False
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
                # Every rank stops together: their clocks differ.
                if time_limit is not None and it < cfg.iterations and ctx.any_rank(
                        time.perf_counter() - t0 >= time_limit):
                    out_of_time = True
                    break
    finally:
        bar.close()
    ctx.close()  # not in finally: after a failure, a barrier could wait forever
    return TrainResult(run.model, run.learner, cfg, run.iteration, log.history, run.best,
                       stopped_early, out_of_time)
