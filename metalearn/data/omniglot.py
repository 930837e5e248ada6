"""N-way K-shot Omniglot classification episodes (Lake et al. 2015; Finn et al. 2017)."""

from __future__ import annotations

import os

import torch

from metalearn.data.few_shot import FewShotTasks, class_subset, rotations90
from metalearn.data.omniglot_archive import (
    DRAWINGS,
    IMAGE_SIZE,
    NUM_BACKGROUND,
    NUM_CHARACTERS,
    load_images,
)
from metalearn.data.validation import check_positive_int

SPLITS = ("train", "val", "test")
SPLIT_SCHEMES = ("random", "lake")
# Seed of the fixed permutations that define the splits; changing it changes every split.
SPLIT_SEED = 1


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


class OmniglotTasks(FewShotTasks):
    """Sampler of N-way K-shot Omniglot episodes, vectorised over the batch of tasks.

    Each task picks ``ways`` distinct characters of the split, gives each a random
    rotation by k·90° counter-clockwise (k in 0..3, so 4x the classes, as in the MAML
    reference) and draws ``shots + queries`` distinct drawings of it: the first ``shots``
    go to the support set, the rest to the query set, so the two never share a drawing.
    Examples are grouped by class; the label ids 0..N−1 are a random permutation over the
    task's classes. Images are ``float32`` ``(1, 28, 28)`` with ink = 1.0, background = 0.0
    (Lanczos-resized, so edges take values in between).

    It is a :class:`FewShotTasks` over the decoded images (labels: character indices,
    classes: the split, class augmentation: :func:`rotations90`), whose draw order is the
    one this sampler has always had: a seed gives the same episodes as before.

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
        subset: draw tasks from only this many of the split's characters, a fixed subset
            (:func:`~metalearn.data.few_shot.class_subset`: the same characters whatever
            ``seed`` is, and nested across sizes); ``None``: all of them. The rotations
            still make 4 classes of each.

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
        subset: int | None = None,
    ) -> None:
        # Every argument is checked before any file is touched.
        check_positive_int("ways", ways)
        check_positive_int("shots", shots)
        check_positive_int("queries", queries)
        if shots + queries > DRAWINGS:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries}, but each Omniglot "
                f"character has only {DRAWINGS} drawings; lower shots or queries"
            )
        classes = split_classes(split, split_scheme)
        if ways > len(classes):
            raise ValueError(
                f"ways={ways} but the {split!r} split of split_scheme={split_scheme!r} has only "
                f"{len(classes)} classes; use ways <= {len(classes)}"
            )
        if subset is not None:
            classes = class_subset(classes, subset, ways)
        self.split, self.split_scheme, self.rotate = split, split_scheme, bool(rotate)
        images = load_images(root, download=download, url=url, progress=progress)
        # Drawing d of character c is example c * 20 + d, its label c.
        super().__init__(
            images.view(NUM_CHARACTERS * DRAWINGS, 1, IMAGE_SIZE, IMAGE_SIZE),
            torch.arange(NUM_CHARACTERS).repeat_interleave(DRAWINGS),
            ways, shots, queries, seed,
            classes=classes,
            # Drawn even when rotate=False, so both settings see the same classes and drawings.
            class_augment=rotations90(active=self.rotate),
        )

    @property
    def num_classes(self) -> int:
        """Characters in the split (rotations not counted)."""
        return len(self.classes)

    @property
    def last_rotations(self) -> torch.Tensor | None:
        """k of the k·90° rotation of each class slot in the last batch, ``(B, N)``."""
        return self.last_variants

    @property
    def last_drawings(self) -> torch.Tensor | None:
        """Drawing indices (0..19) of each slot in the last batch, ``(B, N, K+Q)``,
        support first."""
        return self.last_positions

    def sample(self, batch_size: int):
        """Draw ``batch_size`` tasks.

        What was drawn is kept in ``last_classes`` (character indices, ``(B, N)``),
        ``last_rotations`` (k of k·90°, ``(B, N)``), ``last_drawings`` (``(B, N, K+Q)``,
        support first) and ``last_labels`` (label of each class slot, ``(B, N)``).
        """
        return super().sample(batch_size)

    def __repr__(self) -> str:
        return (
            f"OmniglotTasks(split={self.split!r}, split_scheme={self.split_scheme!r}, "
            f"classes={self.num_classes}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, rotate={self.rotate}, seed={self.seed})"
        )
