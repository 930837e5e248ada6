"""The four-block convolutional network of Finn et al. (2017) for Omniglot."""

from __future__ import annotations

import torch
from torch import nn

from metalearn.models.init import initialize


class Conv4(nn.Module):
    """4 × [conv 3×3, stride 2, padding 1, BatchNorm, ReLU], then a linear classifier.

    This is the MAML Omniglot network: no max-pooling, strided convolutions, and
    BatchNorm that normalises with the statistics of the current batch.
    With ``max_pool=True`` it becomes the MiniImagenet variant (stride 1, 2×2 max-pool).

    Args:
        ways: number of output classes.
        in_channels: image channels.
        hidden: filters per convolution.
        image_size: input height and width, used to size the classifier.
        init: ``"he"`` or ``"xavier"``. Xavier by default, as in the MAML
            reference code.
        max_pool: use stride 1 and 2×2 max-pooling instead of stride 2.
        dropout: dropout probability before the classifier (0 disables it).

    Example:
        >>> import torch
        >>> from metalearn.models import Conv4
        >>> Conv4(ways=5)(torch.zeros(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        init: str = "xavier",
        max_pool: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if ways < 1:
            raise ValueError(f"ways must be >= 1, got {ways}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            stride = 1 if max_pool else 2
            blocks += [
                nn.Conv2d(channels, hidden, 3, stride=stride, padding=1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
            ]
            if max_pool:
                blocks.append(nn.MaxPool2d(2))
            channels = hidden
            size = (size + 1) // 2 if not max_pool else size // 2
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(hidden * size * size, ways)
        initialize(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x).flatten(1)))
