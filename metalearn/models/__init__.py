"""Built-in networks of the MAML papers, and their initialisation."""

from metalearn.models.conv4 import Conv4
from metalearn.models.init import initialize
from metalearn.models.mlp import MLP

__all__ = ["MLP", "Conv4", "initialize"]
