"""ResNet-12, the backbone of MetaOptNet (Lee et al. 2019) and of many few-shot papers since."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drop square blocks of a feature map in training.

    Seeds are drawn with probability ``gamma`` so that about ``drop_rate`` of the units are
    dropped; each seed zeroes a ``block_size`` × ``block_size`` block, and the rest is
    scaled up by ``units / kept units``, as in MetaOptNet's code. MetaOptNet raises the rate
    linearly from 0 over its first 40,000 forwards; here it is constant (a counter in the
    forward would be state that ``vmap`` over tasks cannot update). The mask is drawn with
    tensor ops only, so every task of a ``vmap`` draws its own. Identity in eval mode.

    Args:
        drop_rate: fraction of units to drop, in [0, 1).
        block_size: side of the dropped squares (clipped to the feature map).

    Example:
        >>> import torch
        >>> from metalearn.models.resnet12 import DropBlock
        >>> block = DropBlock(0.3, block_size=3).eval()
        >>> x = torch.ones(2, 4, 10, 10)
        >>> torch.equal(block(x), x)
        True
    """

    def __init__(self, drop_rate: float, block_size: int) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        h, w = x.shape[-2:]
        size = min(self.block_size, h, w)
        gamma = self.drop_rate / size**2 * h * w / ((h - size + 1) * (w - size + 1))
        seeds = torch.bernoulli(torch.full_like(x[..., : h - size + 1, : w - size + 1], gamma))
        # A seed at (i, j) drops the block [i, i + size) x [j, j + size).
        dropped = F.max_pool2d(F.pad(seeds, (size - 1,) * 4), size, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    """3 × [conv 3×3 (no bias), BatchNorm, LeakyReLU 0.1], with the last LeakyReLU after
    adding a [conv 1×1, BatchNorm] shortcut; then 2×2 max-pooling and, in training,
    dropout or DropBlock.

    Args:
        in_channels: input channels.
        out_channels: output channels of every convolution.
        drop_rate: dropout probability after the block (0 disables it).
        drop_block: use :class:`DropBlock` instead of dropout.
        block_size: DropBlock's block side.

    Example:
        >>> import torch
        >>> from metalearn.models.resnet12 import ResidualBlock
        >>> ResidualBlock(3, 8)(torch.zeros(2, 3, 10, 10)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0,
                 drop_block: bool = False, block_size: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.relu = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        if drop_rate == 0:
            self.drop: nn.Module = nn.Identity()
        elif drop_block:
            self.drop = DropBlock(drop_rate, block_size)
        else:
            self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu(out + self.shortcut(x))
        return self.drop(self.pool(out))


class ResNet12(nn.Module):
    """ResNet-12 as in MetaOptNet (Lee et al. 2019, "Meta-Learning with Differentiable Convex
    Optimization"; the variant with 64-160-320-640 filters), with a linear classifier.

    Four :class:`ResidualBlock`\\ s (each 3 × [conv 3×3, BatchNorm, LeakyReLU 0.1] with a
    [conv 1×1, BatchNorm] shortcut and 2×2 max-pooling), global average pooling, then
    ``nn.Linear(channels[-1], ways)``: the layout of learn2learn's ``ResNet12`` (84×84
    inputs end at 5×5, averaged to a 640-dim embedding). For 5 ways at 84×84 it has
    12,427,525 parameters (12,424,320 in the body, 3,205 in the classifier).

    Initialisation as in MetaOptNet's code: convolutions Kaiming-normal with fan-out (gain
    √2), BatchNorm weight 1 and bias 0, the classifier PyTorch's default. Dropout is off by
    default; with ``drop_rate > 0`` the first two blocks use dropout and the last two
    :class:`DropBlock`, as MetaOptNet does (there with rate 0.1 and blocks of 5).

    BatchNorm normalises with the current batch's statistics inside the learners, as for
    every model (see :func:`metalearn.export.export` for plain PyTorch).

    Args:
        ways: number of output classes.
        in_channels: image channels.
        channels: output channels of the four blocks.
        avg_pool: average the last feature map to one vector; ``False`` flattens it (the
            16,000-dim embedding of Lee et al. at 84×84), which needs ``image_size``.
        image_size: input height and width; sizes the classifier when ``avg_pool=False``.
        drop_rate: dropout / DropBlock rate after each block (0 disables both).
        dropblock_size: DropBlock's block side.

    Example:
        >>> import torch
        >>> from metalearn.models import ResNet12
        >>> net = ResNet12(ways=5, channels=(8, 8, 16, 16))  # a narrow one for a quick check
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 5])
        >>> sum(p.numel() for p in ResNet12(ways=5).parameters())
        12427525
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        avg_pool: bool = True,
        image_size: int = 84,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
    ) -> None:
        super().__init__()
        if ways < 1:
            raise ValueError(f"ways must be >= 1, got {ways}")
        channels = tuple(channels)
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"channels must be 4 positive numbers, got {channels}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        size = image_size
        for _ in range(4):
            size //= 2
        if not avg_pool and size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 max-pools; "
                             "use at least 16")
        blocks, width = [], in_channels
        for i, c in enumerate(channels):
            blocks.append(ResidualBlock(width, c, drop_rate, drop_block=i >= 2,
                                        block_size=dropblock_size))
            width = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1) if avg_pool else nn.Identity(),
                                  nn.Flatten())
        self.classifier = nn.Linear(width if avg_pool else width * size * size, ways)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))
