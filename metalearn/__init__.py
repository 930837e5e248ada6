"""metalearn: MAML and its variants, batched over tasks."""

from metalearn.algorithms import FOMAML, MAML, Reptile
from metalearn.data import TaskBatch

__version__ = "0.1.0"
__all__ = ["MAML", "FOMAML", "Reptile", "TaskBatch"]
