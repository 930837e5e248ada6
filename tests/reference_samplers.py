"""Frozen copies of sampling logic the library must keep reproducing, bit for bit.

``FrozenOmniglotTasks`` is ``metalearn.data.OmniglotTasks`` as it was at commit 0e10c00
(before it became a layer over ``FewShotTasks``), with the image loading replaced by an
``images`` argument ``(characters, 20, 28, 28)`` uint8 so that tests can run it on the real
data or on synthetic arrays. The sampling code is unchanged. Do not edit it: a long
reproduction run and committed results depend on this stream.
"""

from __future__ import annotations

import torch

from metalearn.data.task_batch import TaskBatch

DRAWINGS = 20
IMAGE_SIZE = 28
_ROWS_PER_CHUNK = 8192


class FrozenOmniglotTasks:
    def __init__(self, images: torch.Tensor, classes: torch.Tensor, ways: int = 5,
                 shots: int = 1, queries: int = 15, seed: int = 0, rotate: bool = True) -> None:
        self.ways, self.shots, self.queries = ways, shots, queries
        self.classes = classes
        self.rotate = bool(rotate)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        base = images[self.classes]
        rots = [torch.rot90(base, k, dims=(-2, -1)) for k in range(4 if self.rotate else 1)]
        table = torch.stack(rots, dim=1).reshape(-1, IMAGE_SIZE * IMAGE_SIZE).contiguous()
        self._rows64 = table.view(torch.int64)
        self.last_classes = self.last_rotations = self.last_drawings = self.last_labels = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        out = torch.empty(flat.numel(), IMAGE_SIZE * IMAGE_SIZE)
        for s in range(0, flat.numel(), _ROWS_PER_CHUNK):
            o = out[s : s + _ROWS_PER_CHUNK]
            picked = self._rows64.index_select(0, flat[s : s + _ROWS_PER_CHUNK])
            o.copy_(picked.view(torch.uint8))
            o.div_(255)
        return out.view(*rows.shape, 1, IMAGE_SIZE, IMAGE_SIZE)

    def _pick_classes(self, b: int) -> torch.Tensor:
        n, c, g = self.ways, self.num_classes, self.generator
        if n * (n - 1) > c:
            return torch.rand(b, c, generator=g).topk(n, dim=1).indices
        slots = torch.randint(0, c, (b, n), generator=g)
        while True:
            s = slots.sort(dim=1).values
            bad = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().squeeze(1)
            if bad.numel() == 0:
                return slots
            slots[bad] = torch.randint(0, c, (bad.numel(), n), generator=g)

    def sample(self, batch_size: int) -> TaskBatch:
        b = batch_size
        g, n, k, q = self.generator, self.ways, self.shots, self.queries
        slots = self._pick_classes(b)
        drawings = torch.rand(b, n, DRAWINGS, generator=g).argsort(dim=2)[:, :, : k + q]
        rotations = torch.randint(0, 4, (b, n), generator=g)
        labels = torch.rand(b, n, generator=g).argsort(dim=1)
        if not self.rotate:
            rotations.zero_()
        n_rot = 4 if self.rotate else 1
        rows = ((slots * n_rot + rotations) * DRAWINGS).unsqueeze(2) + drawings
        self.last_classes, self.last_rotations = self.classes[slots], rotations
        self.last_drawings, self.last_labels = drawings, labels
        return TaskBatch(
            self._gather(rows[:, :, :k]).view(b, n * k, 1, IMAGE_SIZE, IMAGE_SIZE),
            labels.repeat_interleave(k, dim=1),
            self._gather(rows[:, :, k:]).view(b, n * q, 1, IMAGE_SIZE, IMAGE_SIZE),
            labels.repeat_interleave(q, dim=1),
        )

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
