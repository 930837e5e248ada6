"""Meta-learning algorithms: inner loop on the support set, outer meta-update."""

from metalearn.algorithms.anil import ANIL
from metalearn.algorithms.gradient_combination import GradientCombination
from metalearn.algorithms.imaml import IMAML
from metalearn.algorithms.maml import FOMAML, MAML
from metalearn.algorithms.maml_plus_plus import MAMLPlusPlus
from metalearn.algorithms.meta_sgd import MetaSGD
from metalearn.algorithms.reptile import Reptile

__all__ = ["MAML", "FOMAML", "Reptile"]
__all__ += ["MetaSGD", "ANIL", "MAMLPlusPlus", "IMAML"]
__all__ += ["GradientCombination"]
