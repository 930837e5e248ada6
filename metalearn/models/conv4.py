"""The four-block convolutional network of Finn et al. (2017) for Omniglot and miniImageNet."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metalearn.models.init import initialize


class Conv4(nn.Module):
    """4 × [conv 3×3, stride 2, padding 1, BatchNorm, ReLU], then a linear classifier.

    This is the MAML Omniglot network (Finn et al. 2017, "Model-Agnostic Meta-Learning
    for Fast Adaptation of Deep Networks"): no max-pooling, strided convolutions, and
    BatchNorm that normalises with the statistics of the current batch; 113,221 parameters
    for 5 ways at 28×28. It differs from the MAML reference code in one respect: the
    classifier reads the flattened last feature map (2×2×64 = 256 inputs at 28×28, as in
    the iMAML reference code), where the MAML code averages that map (64 inputs). With
    ``max_pool=True`` the convolutions have stride 1 and each block ends in 2×2
    max-pooling, as in the paper's miniImageNet network, which :meth:`mini_imagenet`
    builds in full.

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

    @classmethod
    def mini_imagenet(cls, ways: int, **overrides: Any) -> Conv4:
        """MAML's miniImageNet network: 84×84×3 inputs, 32 filters, 2×2 max-pooling.

        Finn et al. (2017) use 32 filters per layer on miniImageNet, following Ravi and
        Larochelle (2017), to reduce overfitting; the feature map ends at 5×5 (84 → 42 →
        21 → 10 → 5), so the classifier sees 800 features. Xavier initialisation, as in
        the MAML reference code. 32,901 parameters for 5 ways.

        Args:
            ways: number of output classes.
            **overrides: other :class:`Conv4` arguments (e.g. ``hidden`` or
                ``image_size`` for a smaller test network, ``dropout``).

        Example:
            >>> import torch
            >>> from metalearn.models import Conv4
            >>> net = Conv4.mini_imagenet(ways=5)
            >>> net(torch.zeros(2, 3, 84, 84)).shape, sum(p.numel() for p in net.parameters())
            (torch.Size([2, 5]), 32901)
        """
        options = dict(in_channels=3, hidden=32, image_size=84, max_pool=True, init="xavier")
        return cls(ways, **{**options, **overrides})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x).flatten(1)))
