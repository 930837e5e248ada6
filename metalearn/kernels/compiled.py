"""``torch.compile`` for the regions differentiated at most once, behind one switch.

A first-order inner loop (FOMAML, Reptile, evaluation's adaptation) runs its forwards on
the native kernels (order 0, :mod:`metalearn.kernels`) and keeps no graph, so nothing
stops inductor from fusing its norm layers, activations and optimiser arithmetic and
dropping the per-operation dispatch, which is most of the cost of small tasks. The
twice-differentiated path (MAML's support forward) keeps its exact Functions and stays
eager.

The kernel contexts are entered *outside* the compiled function, so dynamo traces the
model's forwards as they are swapped (:func:`traced_region` marks the region, which
:class:`~metalearn.algorithms.functional_model.FunctionalModel` and the norm layers read
instead of their context variable).

Compiling costs time once per shape (inductor's on-disk cache makes later processes
fast); ``KernelSettings.compile`` switches it (``benchmarks/compile_regions.py`` measures
the cost, the speed-up and the iteration it pays off at). Where compiling fails (no C++
compiler, an operation dynamo cannot trace) the region runs eagerly from then on, after a
one-line notice. A region that unrolls more than :data:`MAX_UNROLLED_STEPS` inner steps
runs eagerly: inductor's compile time grows with the unrolled graph (10 steps take about
100 s cold, 50 steps had not compiled after 7 CPU-minutes), and such long adaptations are
evaluations, run rarely.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from metalearn.kernels import settings
from metalearn.kernels.norm_layers import batch_statistics, norm_functions

MAX_UNROLLED_STEPS = 10

# Each owner (a learner) keeps its compiled callables in ``owner._compiled`` by region name,
# False for a region that failed to compile; they go with the owner.
_FAILED_NOTICE = ("metalearn: torch.compile failed for {what} ({error}); running it eagerly "
                  "(set metalearn.kernels.kernel_settings(compile=False) to skip compiling)")


@contextmanager
def traced_region(model: nn.Module) -> Iterator[None]:
    """The order-0 kernels for ``model``, in a form dynamo can trace: BatchNorm and the other
    norms on the batch's statistics with the native kernels, convolutions native. Enter it
    around the call of a compiled function, not inside."""
    with settings.forward_of_order(0), batch_statistics(model), norm_functions(model), \
            settings.traced():
        yield


def run(owner: Any, model: nn.Module, name: str, fn: Callable, *args: Any, steps: int) -> Any:
    """``fn(*args)`` compiled (once per ``owner`` and ``name``), in :func:`traced_region`;
    eagerly where compiling is off or failed, or where ``fn`` unrolls more than
    :data:`MAX_UNROLLED_STEPS` inner ``steps``.

    ``fn`` must keep no graph (call it under ``torch.no_grad()`` or differentiate inside it
    with ``torch.func``) and read no Python state that changes between calls other than what
    dynamo guards on (attributes, shapes, dtypes).
    """
    cache = owner.__dict__.setdefault("_compiled", {})
    compiled = cache.get(name)
    if (not settings.current_settings().compile or compiled is False
            or steps > MAX_UNROLLED_STEPS):
        return fn(*args)
    if compiled is None:
        compiled = cache[name] = torch.compile(fn, dynamic=False)
    try:
        with traced_region(model):
            return compiled(*args)
    except Exception as error:  # noqa: BLE001 - any failure of the compiler: run eagerly
        cache[name] = False
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(_FAILED_NOTICE.format(what=f"{type(owner).__name__}.{name}",
                                    error=f"{type(error).__name__}: {first_line[:200]}"),
              file=sys.stderr)
        return fn(*args)
