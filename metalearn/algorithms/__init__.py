"""Meta-learning algorithms: inner loop on the support set, outer meta-update.

The pieces: :func:`inner_loop` with its update rules (:func:`sgd`, :func:`adam`), the
:class:`FunctionalModel` view of any ``nn.Module``, the task losses (:class:`TaskLoss`), and
the ways of getting the meta-gradient (unrolled or first order in :class:`MetaLearner`,
checkpointed in :mod:`~metalearn.algorithms.checkpointed`, implicit in
:mod:`~metalearn.algorithms.implicit`). Each algorithm composes them in a file of its own.
"""

from metalearn.algorithms.anil import ANIL
from metalearn.algorithms.base import MetaLearner
from metalearn.algorithms.functional_model import FunctionalModel
from metalearn.algorithms.gradient_combination import GradientCombination
from metalearn.algorithms.imaml import IMAML
from metalearn.algorithms.inner_loop import adam, inner_loop, sgd
from metalearn.algorithms.losses import TaskLoss
from metalearn.algorithms.maml import FOMAML, MAML
from metalearn.algorithms.maml_plus_plus import MAMLPlusPlus
from metalearn.algorithms.meta_sgd import MetaSGD
from metalearn.algorithms.reptile import Reptile

__all__ = ["MAML", "FOMAML", "Reptile"]
__all__ += ["MetaSGD", "ANIL", "MAMLPlusPlus", "IMAML"]
__all__ += ["GradientCombination"]
__all__ += ["MetaLearner", "FunctionalModel", "TaskLoss", "inner_loop", "sgd", "adam"]
