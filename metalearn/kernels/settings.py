"""The kernel package's two switches: the process-wide settings, and the order of the forward
running now (set only by :func:`metalearn.kernels.layers_for`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSettings:
    """How convolutions run under ``vmap`` over tasks (``metalearn/kernels/task_convolution.py``).

    Args:
        tasks_as_groups: merge small per-task batches into one grouped convolution recorded
            as this package's Functions, whose double backward is one grouped convolution
            per term (``False``: leave them to vmap's own rule and torch's double backward,
            which loops over the groups; ``benchmarks/studies/grouped_double_backward.py``
            times both).
        per_task_min_batch: the per-task batch from which convolutions run task by task with
            the native kernel on CPU (``benchmarks/studies/task_convolution_crossover.py``
            chose 32: about even at 20 images, 1.8x faster at 40).
        compile: run the regions differentiated at most once (first-order inner loops,
            evaluation's adaptation) through ``torch.compile``
            (:mod:`metalearn.kernels.compiled`).

    Example:
        >>> from metalearn.kernels import KernelSettings, current_settings
        >>> current_settings() == KernelSettings()  # the defaults, outside kernel_settings
        True
        >>> KernelSettings(compile=True).per_task_min_batch
        32
    """

    tasks_as_groups: bool = True
    per_task_min_batch: int = 32
    compile: bool = False


_settings = KernelSettings()
# True while a forward of order 0 runs: the native kernels serve it.
_NATIVE: ContextVar[bool] = ContextVar("native_kernels", default=False)
# True while a compiled region runs (metalearn.kernels.compiled): a plain global, which
# dynamo reads as a constant, where it cannot trace a ContextVar.
_TRACED = False


def current_settings() -> KernelSettings:
    """The settings in effect."""
    return _settings


@contextmanager
def kernel_settings(**changes) -> Iterator[KernelSettings]:
    """Change :class:`KernelSettings` for the block (process-wide, like ``torch.backends``
    flags), and restore them on exit. For benchmarks that compare kernel choices; the
    results are the same to round-off.

    Example:
        >>> from metalearn.kernels import current_settings, kernel_settings
        >>> with kernel_settings(tasks_as_groups=False):
        ...     current_settings().tasks_as_groups
        False
        >>> current_settings().tasks_as_groups
        True
    """
    global _settings
    fields = {f.name for f in dataclasses.fields(KernelSettings)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise TypeError(f"unknown kernel settings {unknown}; choose from {sorted(fields)}")
    before = _settings
    _settings = dataclasses.replace(_settings, **changes)
    try:
        yield _settings
    finally:
        _settings = before


def native_kernels() -> bool:
    """Whether the forward running now is of order 0 (the native kernels serve it)."""
    return _TRACED or _NATIVE.get()


def in_traced_region() -> bool:
    """Whether a compiled region runs now, its kernel contexts already entered."""
    return _TRACED


@contextmanager
def traced() -> Iterator[None]:
    global _TRACED
    before, _TRACED = _TRACED, True
    try:
        yield
    finally:
        _TRACED = before


@contextmanager
def forward_of_order(order: int) -> Iterator[None]:
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0, 1 or 2, got {order!r}")
    token = _NATIVE.set(order == 0)
    try:
        yield
    finally:
        _NATIVE.reset(token)
