"""Task samplers: few-shot episodes as :class:`TaskBatch` objects."""

from metalearn.data.few_shot import ClassAugment, FewShotTasks, rotations90
from metalearn.data.omniglot import OmniglotTasks
from metalearn.data.sine import SineTasks
from metalearn.data.task_batch import TaskBatch

__all__ = ["ClassAugment", "FewShotTasks", "OmniglotTasks", "SineTasks", "TaskBatch",
           "rotations90"]
