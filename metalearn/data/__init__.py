"""Task samplers: few-shot episodes as :class:`TaskBatch` objects."""

from metalearn.data.cifar100 import CIFARFSTasks, FC100Tasks
from metalearn.data.few_shot import ClassAugment, FewShotTasks, class_subset, rotations90
from metalearn.data.mini_imagenet import MiniImageNetTasks
from metalearn.data.omniglot import OmniglotTasks
from metalearn.data.sine import SineTasks
from metalearn.data.task_batch import TaskBatch
from metalearn.data.tiered_imagenet import TieredImageNetTasks

__all__ = ["CIFARFSTasks", "ClassAugment", "FC100Tasks", "FewShotTasks", "MiniImageNetTasks",
           "OmniglotTasks", "SineTasks", "TaskBatch", "TieredImageNetTasks", "class_subset",
           "rotations90"]
