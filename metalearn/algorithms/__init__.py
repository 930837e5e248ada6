"""Meta-learning algorithms: inner loop on the support set, outer meta-update."""

from metalearn.algorithms.maml import FOMAML, MAML
from metalearn.algorithms.reptile import Reptile

__all__ = ["MAML", "FOMAML", "Reptile"]
