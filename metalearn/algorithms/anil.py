"""ANIL (Raghu et al. 2020): almost no inner loop, only the head adapts to each task."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.inner_loop import inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss

InnerSelection = str | Sequence[str] | Callable[[str], bool] | None


def _is_shape_query(node: fx.Node) -> bool:
    """Whether ``node`` only reads a tensor's shape (``x.size(0)``, ``x.shape[1]``)."""
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _is_shape_query(node.args[0])
    return False


def output_layer_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of the layer that produces the model's output.

    The model is traced once with ``torch.fx`` (symbolically, no data). From its output, the
    trace is followed back through parameter-free operations (activations, reshapes,
    dropout, pooling) to the first module or operation that uses trainable parameters:
    that is the head. Its declaration order does not matter.

    Raises:
        ValueError: the model cannot be traced (data-dependent control flow), returns more
            than one tensor, or ends in several branches with parameters (a residual sum):
            then the head must be named with ``inner_params``.

    Example:
        >>> from torch import nn
        >>> from metalearn.algorithms.anil import output_layer_parameters
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head = nn.Linear(4, 2)  # declared first, applied last
        ...         self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
        ...     def forward(self, x):
        ...         return self.head(self.body(x))
        >>> output_layer_parameters(Net())
        ['head.weight', 'head.bias']
    """
    fix = ("pass inner_params= with the head's parameter names or module prefix, e.g. "
           "ANIL(model, ..., inner_params=\"classifier\")")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types for code it cannot trace
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"ANIL could not find the head of {type(model).__name__}: with inner_params=None "
            f"it traces the model with torch.fx to find the layer that produces the output, "
            f"and the trace failed ({type(err).__name__}: {reason}); {fix}") from None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0]
    while True:
        if not isinstance(node, fx.Node):
            raise ValueError(
                f"ANIL could not find the head of {type(model).__name__}: its forward returns "
                f"a {type(node).__name__}, not one tensor; {fix}")
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            own = [f"{node.target}.{n}" for n, _ in module.named_parameters()]
            own = [n for n in own if n in trainable]
            if own:
                return own
        used = [a.target for a in node.all_input_nodes
                if a.op == "get_attr" and a.target in trainable]
        if used:  # e.g. F.linear(x, self.weight, self.bias)
            return used
        inputs = [a for a in node.all_input_nodes
                  if a.op != "get_attr" and not _is_shape_query(a)]
        if node.op == "placeholder" or not inputs:
            raise ValueError(
                f"ANIL could not find the head of {type(model).__name__}: no layer with "
                f"trainable parameters produces its output; {fix}")
        if len(inputs) > 1:
            raise ValueError(
                f"ANIL could not find the head of {type(model).__name__}: its output comes "
                f"from {node.op} {node.target} of several branches "
                f"({', '.join(str(a.target) for a in inputs)}), so no one layer is the head; "
                f"{fix}")
        node = inputs[0]


def select_parameters(model: nn.Module, inner_params: InnerSelection) -> tuple[str, ...]:
    """The trainable parameter names that ``inner_params`` selects, in the model's order.

    ``inner_params`` is a name or prefix, a sequence of them, a predicate on names, or
    ``None`` for the parameters of the layer that produces the output
    (:func:`output_layer_parameters`). A prefix matches whole name components:
    ``"classifier"`` selects ``classifier.weight`` but not ``classifier2.weight``.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if inner_params is None:
        chosen = set(output_layer_parameters(model))
    elif callable(inner_params):
        chosen = {n for n in trainable if inner_params(n)}
    else:
        prefixes = (inner_params,) if isinstance(inner_params, str) else tuple(inner_params)
        chosen = {n for n in trainable
                  if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)}
    names = tuple(n for n in trainable if n in chosen)
    if not names:
        raise ValueError(
            f"inner_params={inner_params!r} selects none of the model's trainable parameters "
            f"({', '.join(trainable)}); give names, prefixes such as the head module's name, "
            "or a predicate on names")
    return names


class ANIL(MetaLearner):
    """ANIL: the inner loop adapts only the head; the body is learned in the outer loop.

    The inner SGD steps update only the selected ("inner") parameters; the rest (the body)
    stays at theta for every task and gets its meta-gradient from the query loss, by
    default second order through the head's adaptation. Works with any model: the head is
    chosen by parameter name. The forward pass still runs the whole model at every inner
    step (nothing assumes the head is the last layer), but the inner backward only needs
    the head's gradients.

    Args:
        model: any ``nn.Module``.
        inner_lr: step size of the head's inner SGD.
        inner_steps: inner SGD steps during meta-training.
        inner_params: which parameters adapt: a name or prefix (``"classifier"``), a
            sequence of them, or a predicate on names; ``None`` (default) takes the
            parameters of the layer that produces the model's output, found by tracing
            the model with ``torch.fx`` (:func:`output_layer_parameters`: ``classifier``
            in :class:`~metalearn.models.Conv4`, the output ``Linear`` of an MLP); a model
            that cannot be traced must name its head.
        first_order: treat the head's inner gradients as constants.
        loss: as for :class:`~metalearn.MAML`.
        **loss_options: as for :class:`~metalearn.MAML`.

    Example:
        >>> import torch
        >>> from metalearn import ANIL
        >>> from metalearn.data import SineTasks
        >>> from metalearn.models import MLP
        >>> model = MLP()
        >>> anil = ANIL(model, inner_lr=0.01, inner_steps=5)
        >>> anil.inner_names
        ('4.weight', '4.bias')
        >>> batch = SineTasks(seed=0).sample(4)
        >>> fast = anil.adapt(batch.support_x, batch.support_y)
        >>> torch.equal(fast["0.weight"][0], model[0].weight)  # the body does not adapt
        True
        >>> metrics = anil.step(batch)
        >>> bool(model[0].weight.grad.abs().sum() > 0)         # but it is meta-learned
        True
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int,
                 inner_params: InnerSelection = None, first_order: bool = False,
                 loss: TaskLoss | None = None, **loss_options: Any) -> None:
        super().__init__(model, inner_lr, inner_steps, first_order, loss, **loss_options)
        self.inner_names = select_parameters(model, inner_params)

    def adapt_task(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int,
                   first_order: bool, trajectory: bool = False):
        body = {k: v for k, v in params.items() if k not in self.inner_names}
        head = {k: params[k] for k in self.inner_names}

        def loss(h: Params, step: int, order: int) -> torch.Tensor:
            return self.support_loss({**body, **h}, x, y, order)

        out = inner_loop(loss, head, steps, sgd(self.inner_lr), first_order=first_order,
                         trajectory=trajectory)
        if not trajectory:
            return {**body, **out}
        head, path = out
        return {**body, **head}, [{**body, **h} for h in path]
