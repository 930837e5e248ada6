"""The episode container every sampler returns and every algorithm consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TaskBatch:
    """A batch of few-shot tasks, each with a support set and a query set.

    Every tensor carries a leading task dimension ``B``. Classification labels are
    integer tensors of shape ``(B, n)``; regression targets are float tensors of shape
    ``(B, n, d)``.

    Args:
        support_x: support inputs, ``(B, n_support, *input_shape)``.
        support_y: support labels or targets, ``(B, n_support[, d])``.
        query_x: query inputs, ``(B, n_query, *input_shape)``.
        query_y: query labels or targets, ``(B, n_query[, d])``.

    Example:
        >>> import torch
        >>> from metalearn.data import TaskBatch
        >>> b = TaskBatch(torch.zeros(4, 5, 1), torch.zeros(4, 5, 1),
        ...               torch.zeros(4, 7, 1), torch.zeros(4, 7, 1))
        >>> len(b), b.num_support, b.num_query
        (4, 5, 7)
        >>> len(b[1:3])
        2
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if the shapes do not describe one batch of tasks."""
        for f in fields(self):
            t = getattr(self, f.name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"TaskBatch.{f.name} must be a torch.Tensor, got {type(t).__name__}"
                )
            if t.ndim < 2:
                raise ValueError(
                    f"TaskBatch.{f.name} has shape {tuple(t.shape)}; expected a leading task "
                    "dimension and a per-task example dimension, e.g. (B, n, ...)"
                )
        sx, sy, qx, qy = self.support_x, self.support_y, self.query_x, self.query_y
        b = sx.shape[0]
        if not (sy.shape[0] == qx.shape[0] == qy.shape[0] == b):
            raise ValueError(
                "TaskBatch tensors disagree on the number of tasks: "
                f"support_x {tuple(sx.shape)}, support_y {tuple(sy.shape)}, "
                f"query_x {tuple(qx.shape)}, query_y {tuple(qy.shape)}"
            )
        if sy.shape[1] != sx.shape[1]:
            raise ValueError(
                f"support_x has {sx.shape[1]} examples per task but support_y has {sy.shape[1]}"
            )
        if qy.shape[1] != qx.shape[1]:
            raise ValueError(
                f"query_x has {qx.shape[1]} examples per task but query_y has {qy.shape[1]}"
            )
        if sx.shape[2:] != qx.shape[2:]:
            raise ValueError(
                f"support and query inputs differ in shape: {tuple(sx.shape[2:])} vs "
                f"{tuple(qx.shape[2:])}"
            )
        if sy.shape[2:] != qy.shape[2:] or sy.dtype.is_floating_point != qy.dtype.is_floating_point:
            raise ValueError(
                f"support and query targets differ: {tuple(sy.shape)} {sy.dtype} vs "
                f"{tuple(qy.shape)} {qy.dtype}"
            )
        if not sy.dtype.is_floating_point and sy.ndim != 2:
            raise ValueError(
                f"integer class labels must have shape (B, n), got support_y {tuple(sy.shape)}"
            )

    @property
    def is_classification(self) -> bool:
        """True when the targets are integer class labels."""
        return not self.support_y.dtype.is_floating_point

    @property
    def num_support(self) -> int:
        return self.support_x.shape[1]

    @property
    def num_query(self) -> int:
        return self.query_x.shape[1]

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index: slice | int | torch.Tensor) -> TaskBatch:
        """Select tasks; an integer index keeps the task dimension (length 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaskBatch(*(getattr(self, f.name)[index] for f in fields(self)))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to ``device``; ``dtype`` casts only the floating-point tensors."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.dtype.is_floating_point:
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return TaskBatch(*(move(getattr(self, f.name)) for f in fields(self)))

    @staticmethod
    def cat(batches: list[TaskBatch]) -> TaskBatch:
        """Concatenate batches along the task dimension."""
        return TaskBatch(
            *(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(TaskBatch))
        )
