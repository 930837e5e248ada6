"""Weight initialisation schemes shared by the built-in models."""

from __future__ import annotations

from torch import nn

INITS = ("he", "xavier")


def initialize(module: nn.Module, scheme: str = "he") -> nn.Module:
    """Initialise every conv and linear layer of ``module`` in place.

    ``"he"`` is Kaiming-normal with fan-in for ReLU nets; ``"xavier"`` is Glorot-uniform.
    Biases start at zero and BatchNorm at weight 1, bias 0.

    Example:
        >>> from torch import nn
        >>> from metalearn.models import initialize
        >>> net = initialize(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), "xavier")
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INITS}")
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
