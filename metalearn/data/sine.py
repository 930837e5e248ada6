"""Sine-wave regression tasks in the setup of Finn et al. (2017), section 5.1."""

from __future__ import annotations

import math

import torch

from metalearn.data.task_batch import TaskBatch
from metalearn.data.validation import check_positive_int


class SineTasks:
    """Sampler of sine regression tasks ``y = A·sin(x − φ)``.

    Each task draws ``A ~ U[0.1, 5.0]`` and ``φ ~ U[0, π]``; its support and query inputs
    are drawn independently from ``U[−5, 5]``. The sampler owns a seeded generator, so the
    same seed gives the same sequence of tasks.

    Args:
        shots: support points per task (K).
        queries: query points per task.
        seed: seed of the sampler's generator.
        amplitude: range of A.
        phase: range of φ.
        x_range: range of the inputs.

    Example:
        >>> from metalearn.data import SineTasks
        >>> batch = SineTasks(shots=10, queries=10, seed=0).sample(25)
        >>> tuple(batch.support_x.shape), tuple(batch.query_y.shape)
        ((25, 10, 1), (25, 10, 1))
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        seed: int = 0,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        self.shots = check_positive_int("shots", shots)
        self.queries = check_positive_int("queries", queries)
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo < hi:
                raise ValueError(f"{name} must be an interval (low, high) with low < high, "
                                 f"got {(lo, hi)}")
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.last_amplitude: torch.Tensor | None = None
        self.last_phase: torch.Tensor | None = None

    def _uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator) * (high - low) + low

    def sample(self, batch_size: int) -> TaskBatch:
        """Draw ``batch_size`` tasks; their A and φ are kept in ``last_amplitude/last_phase``."""
        b = check_positive_int("batch_size", batch_size)
        amp = self._uniform((b, 1, 1), *self.amplitude)
        phase = self._uniform((b, 1, 1), *self.phase)
        x = self._uniform((b, self.shots + self.queries, 1), *self.x_range)
        y = amp * torch.sin(x - phase)
        self.last_amplitude, self.last_phase = amp.view(b), phase.view(b)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def state_dict(self) -> dict:
        """The generator state, so a resumed run continues the same task stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
