"""N-way K-shot Omniglot classification episodes (Lake et al. 2015; Finn et al. 2017)."""

from __future__ import annotations

import os

import torch

from metalearn.data.omniglot_archive import (
    DRAWINGS,
    IMAGE_SIZE,
    NUM_BACKGROUND,
    NUM_CHARACTERS,
    load_images,
)
from metalearn.data.task_batch import TaskBatch
from metalearn.data.validation import check_positive_int

SPLITS = ("train", "val", "test")
SPLIT_SCHEMES = ("random", "lake")
# Seed of the fixed permutations that define the splits; changing it changes every split.
SPLIT_SEED = 1
_ROWS_PER_CHUNK = 8192  # gather in chunks so the uint8 temporary stays small and reused


def split_classes(split: str, scheme: str = "random") -> torch.Tensor:
    """Sorted character indices (0..1622, see :mod:`omniglot_archive`) of one split.

    ``"random"``: ``torch.randperm(1623, generator=torch.Generator().manual_seed(1))``
    split 1100/100/423 into train/val/test, the sizes of the MAML reference and
    learn2learn (not their exact characters: those depend on file-system order).
    ``"lake"``: test is the 659 evaluation characters; train is the 964 background ones
    minus 100 held out for val, the first 100 of ``randperm(964)`` with the same seed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if scheme not in SPLIT_SCHEMES:
        raise ValueError(f"unknown split_scheme {scheme!r}; use one of {SPLIT_SCHEMES}")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    if scheme == "random":
        perm = torch.randperm(NUM_CHARACTERS, generator=g)
        parts = {"train": perm[:1100], "val": perm[1100:1200], "test": perm[1200:]}
    else:
        perm = torch.randperm(NUM_BACKGROUND, generator=g)
        test = torch.arange(NUM_BACKGROUND, NUM_CHARACTERS)
        parts = {"train": perm[100:], "val": perm[:100], "test": test}
    return parts[split].sort().values


class OmniglotTasks:
    """Sampler of N-way K-shot Omniglot episodes, vectorised over the batch of tasks.

    Each task picks ``ways`` distinct characters of the split, gives each a random
    rotation by k·90° counter-clockwise (k in 0..3, so 4x the classes, as in the MAML
    reference) and draws ``shots + queries`` distinct drawings of it: the first ``shots``
    go to the support set, the rest to the query set, so the two never share a drawing.
    Examples are grouped by class; the label ids 0..N−1 are a random permutation over the
    task's classes. Images are ``float32`` ``(1, 28, 28)`` with ink = 1.0, background = 0.0
    (Lanczos-resized, so edges take values in between).

    The sampler owns a seeded generator: the same seed gives the same tasks, so an
    evaluation set is fixed by its seed (:meth:`reset` rewinds it). The images are
    decoded once and cached on disk and in memory (see :mod:`omniglot_archive`).

    Args:
        root: folder holding ``omniglot/images_*.zip``; else ``$METALEARN_DATA``, else
            ``~/.cache/metalearn``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        ways: classes per task (N).
        shots: support drawings per class (K).
        queries: query drawings per class; ``shots + queries <= 20``.
        seed: seed of the sampler's generator.
        download: download the zips if they are missing.
        rotate: rotate each class by a random multiple of 90°.
        split_scheme: ``"random"`` (1100/100/423) or ``"lake"`` (background/evaluation).
        url: base URL for the download; else ``$METALEARN_OMNIGLOT_URL``.
        progress: show progress bars while downloading or decoding.

    Example:
        >>> from metalearn.data import OmniglotTasks
        >>> tasks = OmniglotTasks(split="train", ways=5, shots=1, queries=15, progress=False)
        >>> batch = tasks.sample(32)
        >>> tuple(batch.support_x.shape), tuple(batch.query_y.shape)
        ((32, 5, 1, 28, 28), (32, 75))
        >>> sorted(batch.support_y[0].tolist())
        [0, 1, 2, 3, 4]
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        seed: int = 0,
        download: bool = False,
        *,
        rotate: bool = True,
        split_scheme: str = "random",
        url: str | None = None,
        progress: bool = True,
    ) -> None:
        # Every argument is checked before any file is touched.
        self.ways = check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.queries = check_positive_int("queries", queries)
        if shots + queries > DRAWINGS:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries}, but each Omniglot "
                f"character has only {DRAWINGS} drawings; lower shots or queries"
            )
        self.classes = split_classes(split, split_scheme)
        if ways > len(self.classes):
            raise ValueError(
                f"ways={ways} but the {split!r} split of split_scheme={split_scheme!r} has only "
                f"{len(self.classes)} classes; use ways <= {len(self.classes)}"
            )
        self.split, self.split_scheme, self.rotate = split, split_scheme, bool(rotate)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        images = load_images(root, download=download, url=url, progress=progress)
        # All rotations precomputed once: row ((c * R + r) * 20 + d) is class c, rotation r,
        # drawing d, so a whole batch is one gather.
        base = images[self.classes]
        rots = [torch.rot90(base, k, dims=(-2, -1)) for k in range(4 if self.rotate else 1)]
        table = torch.stack(rots, dim=1).reshape(-1, IMAGE_SIZE * IMAGE_SIZE).contiguous()
        self._rows64 = table.view(torch.int64)  # 784 bytes = 98 words per image
        self.last_classes: torch.Tensor | None = None
        self.last_rotations: torch.Tensor | None = None
        self.last_drawings: torch.Tensor | None = None
        self.last_labels: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        """Characters in the split (rotations not counted)."""
        return len(self.classes)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Images of ``rows`` (B, n) as float32 (B, n, 1, 28, 28) in [0, 1]."""
        flat = rows.reshape(-1)
        out = torch.empty(flat.numel(), IMAGE_SIZE * IMAGE_SIZE)
        for s in range(0, flat.numel(), _ROWS_PER_CHUNK):
            o = out[s : s + _ROWS_PER_CHUNK]
            # Gathering 784-byte rows as 98 int64 words is faster than as 784 uint8s.
            picked = self._rows64.index_select(0, flat[s : s + _ROWS_PER_CHUNK])
            # uint8 -> float copy, then an in-place divide: both vectorised, unlike u8 / 255.
            # Divide, not multiply by 1/255, so values are exactly k/255 as in ToTensor.
            o.copy_(picked.view(torch.uint8))
            o.div_(255)
        return out.view(*rows.shape, 1, IMAGE_SIZE, IMAGE_SIZE)

    def _pick_classes(self, b: int) -> torch.Tensor:
        """(b, ways) distinct class slots per task, a uniformly random ordered subset."""
        n, c, g = self.ways, self.num_classes, self.generator
        if n * (n - 1) > c:  # many ways: a duplicate is likely, take the top-n of uniforms
            return torch.rand(b, c, generator=g).topk(n, dim=1).indices
        # Few ways: draw with replacement and redraw the tasks that repeat a class (rejection
        # keeps the result uniform); ~10x cheaper than b x c uniforms at 5 of 1100.
        slots = torch.randint(0, c, (b, n), generator=g)
        while True:
            s = slots.sort(dim=1).values
            bad = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().squeeze(1)
            if bad.numel() == 0:
                return slots
            slots[bad] = torch.randint(0, c, (bad.numel(), n), generator=g)

    def sample(self, batch_size: int) -> TaskBatch:
        """Draw ``batch_size`` tasks.

        What was drawn is kept in ``last_classes`` (character indices, ``(B, N)``),
        ``last_rotations`` (k of k·90°, ``(B, N)``), ``last_drawings`` (``(B, N, K+Q)``,
        support first) and ``last_labels`` (label of each class slot, ``(B, N)``).
        """
        b = check_positive_int("batch_size", batch_size)
        g, n, k, q = self.generator, self.ways, self.shots, self.queries
        slots = self._pick_classes(b)
        drawings = torch.rand(b, n, DRAWINGS, generator=g).argsort(dim=2)[:, :, : k + q]
        # Drawn even when rotate=False, so both settings see the same classes and drawings.
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
        """Rewind the generator to ``seed``: the same tasks are drawn again."""
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict:
        """The generator state, so a resumed run continues the same task stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (
            f"OmniglotTasks(split={self.split!r}, split_scheme={self.split_scheme!r}, "
            f"classes={self.num_classes}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, rotate={self.rotate}, seed={self.seed})"
        )
