"""The fully connected regressor of Finn et al. (2017) for sine tasks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from metalearn.models.init import initialize


class MLP(nn.Sequential):
    """A ReLU multilayer perceptron, 1-40-40-1 by default (the MAML sine network).

    Args:
        in_features: input size.
        out_features: output size.
        hidden: sizes of the hidden layers.
        init: ``"he"`` or ``"xavier"``. The default is Xavier: with He init the
            sine net diverges at the paper's inner lr 0.01 (the reference code uses small
            weights).
        dropout: dropout probability after each hidden ReLU (0 disables it).

    Example:
        >>> import torch
        >>> from metalearn.models import MLP
        >>> MLP()(torch.zeros(10, 1)).shape
        torch.Size([10, 1])
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden: Sequence[int] = (40, 40),
        init: str = "xavier",
        dropout: float = 0.0,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        initialize(self, init)
