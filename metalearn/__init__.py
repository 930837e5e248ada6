"""metalearn: MAML and its variants, batched over tasks."""

from metalearn.algorithms import ANIL, FOMAML, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from metalearn.algorithms.gradient_combination import GradientCombination
from metalearn.data import TaskBatch
from metalearn.evaluation import EvaluationResult, Metric, evaluate
from metalearn.memory import memory_profile
from metalearn.training import TrainResult, train

__version__ = "0.1.0"
__all__ = ["MAML", "FOMAML", "Reptile", "TaskBatch", "train", "TrainResult", "evaluate",
           "EvaluationResult", "memory_profile"]
__all__ += ["MetaSGD", "ANIL", "MAMLPlusPlus", "IMAML"]
__all__ += ["GradientCombination"]
__all__ += ["Metric"]
