"""How much memory and time one meta-iteration takes, as a function of inner steps."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch._C._functorch as _functorch

from metalearn.data.task_batch import TaskBatch

StorageKey = tuple[Any, ...]


def storage_key(t: torch.Tensor) -> tuple[StorageKey, int]:
    """The (key, nbytes) of the storage behind ``t``, looking through functorch wrappers.

    Tensors saved inside ``vmap`` / ``torch.func.grad`` are BatchedTensor or
    GradTrackingTensor wrappers with no readable storage of their own; the memory they
    hold is that of the plain tensor at the bottom of the wrapper chain.
    """
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return ("tensor", id(t)), t.numel() * t.element_size()
    return (str(t.device), storage.data_ptr()), storage.nbytes()


@contextlib.contextmanager
def _hooks_allowed_in_torch_func() -> Iterator[None]:
    # torch.func.grad/vjp run under disable_saved_tensors_hooks, which raises if any hooks
    # are set, because hooks that build new tensors would break functorch's levels. Our
    # hooks only keep a reference and return the very same tensor (the gradients are
    # bitwise unchanged, see tests/test_memory.py), so we lift the ban while profiling.
    graph = torch.autograd.graph
    original = graph.disable_saved_tensors_hooks
    graph.disable_saved_tensors_hooks = lambda message: contextlib.nullcontext()
    try:
        yield
    finally:
        graph.disable_saved_tensors_hooks = original


class _Saved:
    """What the graph stores instead of a saved tensor: the tensor plus a refcount."""

    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor) -> None:
        # Keep a detached alias: holding ``tensor`` itself would, for a node's saved
        # output, make a cycle output -> grad_fn -> this object -> output that is never
        # freed. Autograd re-attaches the grad_fn when it unpacks.
        self.meter, self.tensor = meter, tensor.data
        self.key, nbytes = storage_key(tensor)
        meter._acquire(self.key, nbytes)

    def __del__(self) -> None:
        # Runs when the autograd node owning the saved tensor is freed.
        self.meter._release(self.key)


class SavedTensorMeter:
    """Bytes of distinct storages that autograd graphs save for backward, now and at peak.

    Inside the context every tensor that an autograd node saves (at any level, including
    the graphs that ``torch.func.grad`` builds inside ``vmap``) is counted by its
    underlying storage: a storage saved by many nodes, or through many views or functorch
    wrappers, counts once with its full ``nbytes``, and stops counting when the last node
    saving it is freed. ``current_bytes`` is that total now and ``peak_bytes`` its maximum
    since entering. Parameters saved by the graph count like any other storage.

    Example:
        >>> import torch
        >>> from metalearn.memory import SavedTensorMeter
        >>> x = torch.ones(100, requires_grad=True)
        >>> y = torch.ones(100, requires_grad=True)
        >>> with SavedTensorMeter() as meter:
        ...     z = (x * y).sum()   # mul saves x and y: 2 * 400 bytes
        ...     z.backward()        # frees the graph
        >>> meter.peak_bytes, meter.current_bytes
        (800, 0)
    """

    def __init__(self) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[StorageKey, int] = {}
        self._sizes: dict[StorageKey, int] = {}
        # Nodes may be freed on autograd's device threads during backward.
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()

    def _acquire(self, key: StorageKey, nbytes: int) -> None:
        with self._lock:
            count = self._refs.get(key, 0)
            if count == 0:
                self._sizes[key] = nbytes
                self.current_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self._refs[key] = count + 1

    def _release(self, key: StorageKey) -> None:
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key]
                self.current_bytes -= self._sizes.pop(key)

    def __enter__(self) -> SavedTensorMeter:
        self._stack.enter_context(_hooks_allowed_in_torch_func())
        self._stack.enter_context(
            torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t), lambda s: s.tensor)
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_inner_steps(inner_steps: Sequence[int]) -> list[int]:
    steps = list(inner_steps)
    if not steps:
        raise ValueError("inner_steps must list at least one inner-step count")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"inner_steps must be integers >= 0, got {s!r}")
    return steps


def memory_profile(
    learner: Any,
    batch: TaskBatch,
    inner_steps: Sequence[int] = (1, 2, 4, 8),
    repeats: int = 3,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Memory and time of one meta-iteration (``learner.step(batch)``) per inner-step count.

    The learner is profiled as it is, with ``learner.inner_steps`` set to each count in
    turn (and restored afterwards); profiling does not change the model: parameters,
    ``p.grad`` (the same tensor objects with the same values), ``learner.inner_steps``,
    torch's global RNG and a ``learner.generator`` are all left as they were.

    Each record holds:

    * ``algorithm``: the learner's class name, lower-cased (``"maml"``, ``"fomaml"``, ...).
    * ``inner_steps``: the inner-step count.
    * ``saved_bytes``: the peak, over one meta-iteration, of the total bytes of distinct
      storages that autograd nodes have saved for backward and that are still alive (see
      :class:`SavedTensorMeter`). It covers the outer graph and the inner graphs that
      ``torch.func.grad`` builds. For MAML the peak is the unrolled graph just before the
      outer backward, so it grows linearly with inner steps; FOMAML and Reptile free each
      inner graph after its step, so it stays flat. Measured on any device.
    * ``cuda_peak_bytes``: ``torch.cuda.max_memory_allocated`` over one meta-iteration on
      CUDA (everything allocated, including the model and the batch), else ``None``.
    * ``seconds_per_iteration``: median wall time of ``repeats`` meta-iterations, after one
      warm-up, with grads zeroed in between.

    Args:
        learner: a meta-learner (``MAML``, ``FOMAML``, ``Reptile``) with an
            ``inner_steps`` attribute and a ``step(batch)`` method.
        batch: the task batch of one meta-iteration; moved to ``device``.
        inner_steps: the inner-step counts to profile.
        repeats: timed meta-iterations per count (>= 1).
        device: where the model lives; ``None`` takes it from the model's parameters.
            The model is not moved: a different device raises ``ValueError``.

    Example:
        >>> from metalearn import MAML
        >>> from metalearn.data import SineTasks
        >>> from metalearn.memory import memory_profile
        >>> from metalearn.models import MLP
        >>> records = memory_profile(MAML(MLP(), 0.01, 1), SineTasks(seed=0).sample(4),
        ...                          inner_steps=(1, 2), repeats=1)
        >>> [r["inner_steps"] for r in records], records[0]["cuda_peak_bytes"]
        ([1, 2], None)
        >>> records[1]["saved_bytes"] > records[0]["saved_bytes"]
        True
    """
    steps = _check_inner_steps(inner_steps)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    params = list(learner.model.parameters())
    model_device = params[0].device
    if device is not None:
        wanted = torch.device(device)
        if wanted.type != model_device.type or wanted.index not in (None, model_device.index):
            raise ValueError(f"the model is on {model_device}, not on {wanted}; move it "
                             f"first (model.to({str(wanted)!r})) or pass device=None")
    device = model_device
    batch = batch.to(device)
    name = type(learner).__name__.lower()
    old_grads = [p.grad for p in params]
    old_steps = learner.inner_steps
    generator = learner.generator
    generator_state = generator.get_state() if isinstance(generator, torch.Generator) else None

    def iteration() -> None:
        for p in params:
            p.grad = None  # never accumulate into the caller's grad tensors
        learner.step(batch)

    records = []
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for k in steps:
                learner.inner_steps = k
                iteration()  # warm-up: lazy initialisation, caches, kernel selection
                with SavedTensorMeter() as meter:
                    iteration()
                cuda_peak = None
                if device.type == "cuda":
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    iteration()
                    _sync(device)
                    cuda_peak = torch.cuda.max_memory_allocated(device)
                times = []
                for _ in range(repeats):
                    _sync(device)
                    start = time.perf_counter()
                    iteration()
                    _sync(device)
                    times.append(time.perf_counter() - start)
                records.append({
                    "algorithm": name,
                    "inner_steps": k,
                    "saved_bytes": meter.peak_bytes,
                    "cuda_peak_bytes": cuda_peak,
                    "seconds_per_iteration": statistics.median(times),
                })
    finally:
        learner.inner_steps = old_steps
        for p, g in zip(params, old_grads):
            p.grad = g
        if generator_state is not None:
            generator.set_state(generator_state)
    return records
