"""The kernels a model's layers run on inside the learners, behind one door.

torch 2.13 gets some derivatives wrong or slow under ``vmap`` over tasks: the second
derivative of the native affine BatchNorm, InstanceNorm and LayerNorm is wrong (up to 1e-2
relative in float64), and the double backward of a grouped convolution loops over its
groups. This package swaps such layers of a user's model for ``autograd.Function``\\ s that
are exact and fast at the order of derivative asked for, and computes the normalisation
functions a model's code calls itself (``F.batch_norm`` and the like) the same way.
Nothing outside :class:`metalearn.algorithms.functional_model.FunctionalModel` calls
:func:`layers_for`:
an algorithm only says how its forward will be differentiated,
``fmodel(params, x, order=...)``:

==========  ===================================================================  ===================
``order``   the forward's result is                                              layers
==========  ===================================================================  ===================
2           differentiated twice: a second-order inner step (MAML's support      exact Functions
            forward), iMAML's Hessian-vector products
1           differentiated once, by a backward that runs later: a query loss     the same Functions,
            under the outer backward                                             which keep the
                                                                                 smallest graph
0           differentiated at most once, at once, with no graph kept             native kernels
            (``torch.func.grad`` under ``torch.no_grad``: first-order inner
            steps, Reptile, iMAML's inner solve), or not at all (evaluation)
==========  ===================================================================  ===================

The native kernels' first derivatives are exact under ``vmap`` and they are the fastest,
but for a graph that is kept (order 1) vmap's own batch-norm rule saves a normalised copy
of the input, so the Functions serve there too. ``tests/test_norm_layers.py`` and
``tests/test_task_convolution.py`` check every path against a per-task loop over the
native layers; :func:`kernel_settings` is the public switch for benchmarks that compare
kernel choices, and for ``compile=True``: the regions of order 0 run through
``torch.compile`` (:mod:`metalearn.kernels.compiled`), worth it for long runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from metalearn.kernels.norm_layers import batch_statistics, norm_functions
from metalearn.kernels.settings import (
    KernelSettings,
    current_settings,
    forward_of_order,
    kernel_settings,
)
from metalearn.kernels.task_convolution import per_task_convolutions

__all__ = ["layers_for", "KernelSettings", "kernel_settings", "current_settings"]


@contextmanager
def layers_for(model: nn.Module, order: int) -> Iterator[None]:
    """Run ``model``'s forwards inside the block on the kernels for ``order`` (table above).

    BatchNorm also uses the current batch's statistics without touching its running
    buffers, as the MAML papers do (transductive BatchNorm), and ``vmap`` needs. The same
    holds for ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` called by the
    model's own code (:func:`~metalearn.kernels.norm_layers.norm_functions`).
    """
    with (forward_of_order(order), batch_statistics(model), norm_functions(model),
          per_task_convolutions(model)):
        yield
