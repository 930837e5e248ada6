"""Built-in networks of the meta-learning papers, and their initialisation."""

from metalearn.models.conv4 import Conv4
from metalearn.models.init import initialize
from metalearn.models.mlp import MLP
from metalearn.models.resnet12 import ResNet12

__all__ = ["MLP", "Conv4", "ResNet12", "initialize"]
