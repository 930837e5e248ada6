"""N-way K-shot episodes from any labeled data: tensors in memory, or a map-style Dataset.

One sampling code path for the library: :class:`OmniglotTasks` and the benchmark loaders
(miniImageNet, tieredImageNet, CIFAR-FS, FC100) are :class:`FewShotTasks` over their
decoded arrays.

Draw order of :meth:`FewShotTasks.sample` (the stream a seed fixes; it is the order
:class:`OmniglotTasks` has always used, so its episodes are unchanged):

1. the classes of each task, ``_pick_classes`` (distinct, uniformly random);
2. the examples of each class slot: ``rand(B, N, M).argsort`` over the class's ``M``
   positions, the first ``shots`` to the support set and the next ``queries`` to the
   query set (positions past a smaller class's size are masked to sort last);
3. the class augmentation's variant of each slot, ``randint(0, variants, (B, N))``, if
   there is a class augmentation;
4. the label of each slot, ``rand(B, N).argsort``, if labels are permuted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from metalearn.data.task_batch import TaskBatch
from metalearn.data.validation import check_positive_int

_ROWS_PER_CHUNK = 8192  # gather in chunks so the uint8 temporary stays small and reused
# Above this many bytes, variants of a class augmentation are made per batch instead of
# stored for every example (a memory-mapped 9 GB array must not be copied 4 times).
_PRECOMPUTE_LIMIT = 1 << 30
_MASKED = 2.0  # larger than any torch.rand value: masked positions sort last


@dataclass(frozen=True)
class ClassAugment:
    """An augmentation that makes new classes: variant ``k`` of class ``c`` is a class.

    A task draws, for each of its class slots, a variant ``k`` in ``0..variants-1`` and
    applies ``fn(images, k)`` to every image of that slot (support and query alike), as
    the MAML reference turns Omniglot characters by k·90°. Distinct classes are drawn
    first, so a task never holds two variants of one class.

    Args:
        variants: how many classes each class becomes (``k`` is uniform over them).
        fn: ``fn(images, k) -> images`` on a stack ``(m, *input_shape)``; ``k == 0``
            should be the identity. It may get ``uint8`` images (variants of data that fit
            in memory are made once, before the conversion to float) or float ones, so it
            should treat both alike: a rearrangement of pixels (rotation, flip) does.
        name: shown in ``repr``.
        active: ``False`` still draws ``k`` but uses variant 0 throughout, so the same
            seed gives the same classes, examples and labels with and without the
            augmentation (the control of an ablation).

    Example:
        >>> import torch
        >>> flip = ClassAugment(2, lambda x, k: x.flip(-1) if k else x, name="flip")
        >>> flip.fn(torch.tensor([[1, 2]]), 1).tolist()
        [[2, 1]]
    """

    variants: int
    fn: Callable[[torch.Tensor, int], torch.Tensor]
    name: str = "custom"
    active: bool = True

    def __post_init__(self) -> None:
        check_positive_int("variants", self.variants)


# Seed of the fixed permutation that picks a subset of a split's classes (class_subset). It
# is not the run's seed: every run and every seed given the same count gets the same classes.
SUBSET_SEED = 0


def class_subset(classes: torch.Tensor, n: int, ways: int, seed: int = SUBSET_SEED,
                 what: str = "subset") -> torch.Tensor:
    """``n`` of ``classes``: the first ``n`` of ``torch.randperm(len(classes))`` drawn from a
    generator seeded with ``seed`` (:data:`SUBSET_SEED`), kept in the order of ``classes``.

    The subset depends on the classes and ``n`` only, never on a run's seed; and a smaller
    ``n`` picks a subset of a larger one's (the same permutation's first entries), so runs
    at 50, 100 and 200 classes are nested. ``what`` names the argument in errors.

    Example:
        >>> import torch
        >>> from metalearn.data.few_shot import class_subset
        >>> small = class_subset(torch.arange(10), 3, ways=2)
        >>> set(small.tolist()) <= set(class_subset(torch.arange(10), 6, ways=2).tolist())
        True
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{what} must be an integer number of classes, got {n!r}")
    if n < ways or n > len(classes):
        raise ValueError(f"{what}={n} must be >= ways={ways} (a task needs {ways} distinct "
                         f"classes) and <= {len(classes)}, the classes of the split")
    perm = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
    return classes[perm[:n].sort().values]


def _rot90(images: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(images, k, dims=(-2, -1)) if k else images


def rotations90(active: bool = True) -> ClassAugment:
    """Rotations by k·90° counter-clockwise (k in 0..3) as new classes (Omniglot's, as in
    Santoro et al. 2016 and the MAML reference code), on the last two dimensions.

    Example:
        >>> import torch
        >>> rotations90().fn(torch.tensor([[1, 2], [3, 4]]), 1).tolist()
        [[2, 4], [1, 3]]
    """
    return ClassAugment(4, _rot90, name="rotations90", active=active)


def _labels_of(dataset: Dataset) -> torch.Tensor | None:
    """The labels a dataset states without loading its items, or ``None``."""
    if isinstance(dataset, Subset):
        inner = _labels_of(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices)]
    for name in ("targets", "labels"):
        value = getattr(dataset, name, None)
        if value is not None and not callable(value):
            return _as_labels(value, f"the dataset's {name} attribute")
    tensors = getattr(dataset, "tensors", None)  # TensorDataset
    if isinstance(tensors, tuple) and len(tensors) == 2:
        return _as_labels(tensors[1], "the TensorDataset's second tensor")
    return None


def _as_labels(values: object, what: str) -> torch.Tensor:
    """``values`` as a 1-d int64 tensor; an error naming ``what`` if they are not integers."""
    if isinstance(values, torch.Tensor):
        t = values
    else:
        try:
            t = torch.as_tensor(np.asarray(values))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{what} must be integer class labels; could not read them as an "
                            f"array ({err})") from None
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{what} must hold integer class labels, got {t.dtype}; convert them "
                        "(e.g. y.long() for whole numbers, or map names to integers first)")
    if t.ndim != 1:
        raise ValueError(f"{what} must be one label per example, shape (n,), got "
                         f"{tuple(t.shape)}")
    return t.to(torch.int64)


def _collate_items(items: list) -> tuple[list, list]:
    """DataLoader collate: items kept apart, checked and stacked by the sampler."""
    return [item[0] for item in items], [item[1] for item in items]


class _IndexBatches:
    """A DataLoader batch sampler whose batches the sampler sets before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FewShotTasks:
    """Sampler of N-way K-shot episodes from any labeled data, vectorised over tasks.

    Each task picks ``ways`` distinct classes and ``shots + queries`` distinct examples of
    each: the first ``shots`` form the support set, the rest the query set, so the two
    never share an example. Examples are grouped by class slot; the labels 0..N−1 are a
    random permutation over the task's classes (``permute_labels=False``: slot order).

    The data are either tensors in memory, ``x`` ``(n, *input_shape)`` with integer labels
    ``y`` ``(n,)``, where a whole batch of tasks is one gather; or a map-style
    :class:`~torch.utils.data.Dataset` of ``(input, label)`` items, loaded lazily (only the
    items a batch uses, optionally by ``num_workers`` DataLoader processes), so data on
    disk larger than memory work. A dataset's per-class index is built once, from its
    ``targets``/``labels`` attribute (or ``y``) where it has one, else by reading every
    item's label once.

    ``uint8`` inputs are images: they come out as ``float32`` in [0, 1] (divided by 255,
    as torchvision's ``ToTensor``); other dtypes come out as they are.

    The sampler owns a seeded generator: the same seed gives the same tasks, so an
    evaluation set is fixed by its seed (:meth:`reset` rewinds it), and
    :meth:`state_dict` / :meth:`load_state_dict` resume a stream exactly.

    Args:
        x: inputs ``(n, *input_shape)``, or a map-style Dataset yielding ``(input, label)``.
        y: integer labels ``(n,)``; required with a tensor ``x``; with a Dataset, its
            labels if known (so no item is loaded to learn them).
        ways: classes per task (N).
        shots: support examples per class (K).
        queries: query examples per class.
        seed: seed of the sampler's generator.
        classes: the label values tasks draw from (a split), in a fixed order; default
            every label present, sorted.
        class_augment: a :class:`ClassAugment` that makes new classes, e.g.
            :func:`rotations90`.
        transform: ``transform(images) -> images`` on each batch's stacked float inputs
            ``(m, *input_shape)``, after the class augmentation (vectorised per-image
            transforms: normalisation, random flips drawn per image). Randomness it draws
            is its own, not part of :meth:`state_dict`.
        permute_labels: give each task a random label order (else slot order 0..N−1, and
            no draw is made for it).
        num_workers: DataLoader worker processes that load a Dataset's items (0: in this
            process). Tensors are always gathered in this process.

    Example:
        >>> import torch
        >>> from metalearn.data import FewShotTasks
        >>> x = torch.randn(100, 3, 8, 8)          # 10 classes of 10 examples
        >>> y = torch.arange(10).repeat_interleave(10)
        >>> tasks = FewShotTasks(x, y, ways=5, shots=1, queries=3, seed=0)
        >>> batch = tasks.sample(4)
        >>> tuple(batch.support_x.shape), tuple(batch.query_y.shape)
        ((4, 5, 3, 8, 8), (4, 15))
        >>> sorted(batch.support_y[0].tolist())
        [0, 1, 2, 3, 4]
        >>> state = tasks.state_dict(); again = tasks.sample(2)
        >>> tasks.load_state_dict(state); torch.equal(tasks.sample(2).query_x, again.query_x)
        True
    """

    def __init__(
        self,
        x: torch.Tensor | np.ndarray | Dataset,
        y: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        seed: int = 0,
        *,
        classes: torch.Tensor | Sequence[int] | None = None,
        class_augment: ClassAugment | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        permute_labels: bool = True,
        num_workers: int = 0,
    ) -> None:
        self.ways = check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.queries = check_positive_int("queries", queries)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if class_augment is not None and not isinstance(class_augment, ClassAugment):
            raise TypeError("class_augment must be a ClassAugment (e.g. rotations90()), got "
                            f"{type(class_augment).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.seed, self.class_augment, self.transform = seed, class_augment, transform
        self.permute_labels, self.num_workers = bool(permute_labels), num_workers
        self.generator = torch.Generator().manual_seed(seed)
        self._loader: DataLoader | None = None
        self._original: torch.Tensor | None = None  # compact row -> row of x, for a split
        self._label_of: dict[int, int] | None = None
        self.last_classes: torch.Tensor | None = None
        self.last_positions: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_variants: torch.Tensor | None = None
        self.last_labels: torch.Tensor | None = None

        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            if y is None:
                raise ValueError("y is required with tensor inputs x: pass the integer label "
                                 "of each example, shape (n,)")
            if x.ndim < 1:
                raise ValueError(f"x must have a leading example dimension, got shape "
                                 f"{tuple(x.shape)}")
            labels = _as_labels(y, "y")
            if len(labels) != len(x):
                raise ValueError(f"x has {len(x)} examples but y has {len(labels)} labels; "
                                 "pass one label per example")
            self.dataset = None
        elif isinstance(x, Dataset) or hasattr(x, "__getitem__"):
            self.dataset = x
            if y is not None:
                labels = _as_labels(y, "y")
            else:
                labels = _labels_of(x)
                if labels is None:
                    labels = self._read_labels()
            if hasattr(x, "__len__") and len(labels) != len(x):
                raise ValueError(f"the dataset has {len(x)} items but {len(labels)} labels; "
                                 "pass one label per item as y")
        else:
            raise TypeError("x must be a tensor (with labels y) or a map-style Dataset of "
                            f"(input, label) items, got {type(x).__name__}")
        self._build_index(labels, classes)
        self._check_sizes()
        if self.dataset is None:
            self._build_table(x)

    # -- construction ------------------------------------------------------------------
    def _read_labels(self) -> torch.Tensor:
        """Every item's label, read once (the dataset states none)."""
        n = len(self.dataset)
        batches = [list(range(s, min(s + 256, n))) for s in range(0, n, 256)]
        labels = [label for _, ls in self._load_batches(batches) for label in ls]
        return _as_labels(labels, "the dataset's labels (item[1])")

    def _build_index(self, labels: torch.Tensor, classes) -> None:
        """``_index`` (C, M): example positions of each class, padded; ``class_sizes`` (C,)."""
        if labels.numel() == 0:
            raise ValueError("the data have no examples; pass at least ways classes of "
                             "shots + queries examples each")
        present, counts = torch.unique(labels, sorted=True, return_counts=True)
        if classes is None:
            chosen = present
        else:
            chosen = _as_labels(classes, "classes")
            if chosen.numel() == 0:
                raise ValueError("classes is empty; pass the label values tasks draw from")
            if torch.unique(chosen).numel() != chosen.numel():
                dup = [c for c in chosen.tolist() if chosen.tolist().count(c) > 1][0]
                raise ValueError(f"classes lists label {dup} more than once; list each once")
        where = torch.searchsorted(present, chosen).clamp(max=len(present) - 1)
        found = present[where] == chosen
        if not bool(found.all()):
            missing = chosen[~found].tolist()
            raise ValueError(
                f"class {missing[0]} in classes has no examples"
                + (f" (nor do {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; remove it from classes, or check the labels")
        self.classes = chosen
        self.class_sizes = counts[where]
        order = torch.argsort(labels, stable=True)  # examples grouped by label, in order
        starts = torch.cumsum(counts, 0) - counts
        m = int(self.class_sizes.max())
        offsets = torch.arange(m)
        valid = offsets < self.class_sizes.unsqueeze(1)
        pos = (starts[where].unsqueeze(1) + offsets).clamp(max=len(order) - 1)
        # Padding points at the class's first example; it is never drawn (masked).
        index = torch.where(valid, order[pos], order[starts[where]].unsqueeze(1))
        self._index = index  # (C, M) rows of x / items of the dataset
        self._equal_sizes = bool((self.class_sizes == m).all())
        self._valid = None if self._equal_sizes else valid

    def _check_sizes(self) -> None:
        c = len(self.classes)
        if self.ways > c:
            raise ValueError(f"ways={self.ways} but the data have only {c} classes to draw "
                             f"from; use ways <= {c}, or pass more classes")
        need = self.shots + self.queries
        small = self.class_sizes < need
        if bool(small.any()):
            i = int(small.nonzero()[0])
            raise ValueError(
                f"shots + queries = {self.shots} + {self.queries} = {need}, but class "
                f"{int(self.classes[i])} has only {int(self.class_sizes[i])} examples"
                + (f" ({int(small.sum()) - 1} more classes are smaller than {need})"
                   if int(small.sum()) > 1 else "")
                + "; lower shots or queries, or leave such classes out with classes=")

    def _build_table(self, x: torch.Tensor) -> None:
        """The gather table of a tensor source: the chosen classes' rows, with the class
        augmentation's variants stored when they fit (row ``v * n + i``)."""
        used = int(self.class_sizes.sum())
        if used < len(x):  # a split of the data: keep its rows only
            rows = torch.cat([self._index[i, : int(s)] for i, s in enumerate(self.class_sizes)])
            data = x.index_select(0, rows)
            self._original = rows  # compact row -> row of x
            compact = torch.zeros(len(x), dtype=torch.int64)
            compact[rows] = torch.arange(used)
            self._index = compact[self._index]
        else:
            data, self._original = x, None
        aug = self.class_augment
        self._precomputed = False
        if aug is not None and aug.active and aug.variants > 1:
            size = data.element_size() * data.numel() * aug.variants
            if size <= _PRECOMPUTE_LIMIT:
                data = torch.cat([aug.fn(data, k) for k in range(aug.variants)])
                self._precomputed = True
        self._rows = data
        self._per_row = self._rows[0].numel() if len(self._rows) else 0
        self._input_shape = tuple(self._rows.shape[1:])
        self._words = None
        rows = self._rows
        if rows.dtype == torch.uint8 and self._per_row % 8 == 0 and rows.is_contiguous():
            # Gathering rows as int64 words is faster than as uint8s (784 B = 98 words).
            self._words = self._rows.view(len(self._rows), -1).view(torch.int64)
        self._n_rows = len(data) if not self._precomputed else len(data) // aug.variants

    # -- sampling ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Classes tasks draw from (variants of a class augmentation not counted)."""
        return len(self.classes)

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

    def _pick_positions(self, slots: torch.Tensor) -> torch.Tensor:
        """(b, ways, shots + queries) distinct example positions within each slot's class."""
        b, n = slots.shape
        r = torch.rand(b, n, self._index.shape[1], generator=self.generator)
        if not self._equal_sizes:
            r.masked_fill_(~self._valid[slots], _MASKED)
        return r.argsort(dim=2)[:, :, : self.shots + self.queries]

    def sample(self, batch_size: int) -> TaskBatch:
        """Draw ``batch_size`` tasks.

        What was drawn is kept in ``last_classes`` (label values, ``(B, N)``),
        ``last_positions`` (positions within each class, ``(B, N, K+Q)``, support first),
        ``last_indices`` (the examples' indices in ``x`` or the dataset, ``(B, N, K+Q)``),
        ``last_variants`` (the class augmentation's ``k``, ``(B, N)``, or ``None``) and
        ``last_labels`` (label of each class slot, ``(B, N)``).
        """
        b = check_positive_int("batch_size", batch_size)
        g, n, k, q = self.generator, self.ways, self.shots, self.queries
        slots = self._pick_classes(b)
        positions = self._pick_positions(slots)
        aug = self.class_augment
        variants = None
        if aug is not None:
            # Drawn even when inactive, so both settings see the same classes and examples.
            variants = torch.randint(0, aug.variants, (b, n), generator=g)
            if not aug.active:
                variants.zero_()
        if self.permute_labels:
            labels = torch.rand(b, n, generator=g).argsort(dim=1)
        else:
            labels = torch.arange(n).expand(b, n).contiguous()
        rows = self._index[slots.unsqueeze(2), positions]  # (b, n, k + q)
        self.last_classes, self.last_positions = self.classes[slots], positions
        self.last_variants, self.last_labels = variants, labels
        self.last_indices = rows if self._original is None else self._original[rows]
        support = self._inputs(rows[:, :, :k], variants)
        query = self._inputs(rows[:, :, k:], variants)
        return TaskBatch(
            support.view(b, n * k, *support.shape[3:]),
            labels.repeat_interleave(k, dim=1),
            query.view(b, n * q, *query.shape[3:]),
            labels.repeat_interleave(q, dim=1),
        )

    def _inputs(self, rows: torch.Tensor, variants: torch.Tensor | None) -> torch.Tensor:
        """The inputs of ``rows`` (b, n, j), after augmentation and transform:
        (b, n, j, *input_shape)."""
        per_row = variants.unsqueeze(2).expand_as(rows) if variants is not None else None
        if self.dataset is not None:
            out = self._load(rows.reshape(-1), rows)
            apply = per_row is not None and self.class_augment.active
        elif self._precomputed:
            out = self._gather(per_row.reshape(-1) * self._n_rows + rows.reshape(-1))
            apply = False
        else:
            out = self._gather(rows.reshape(-1))
            apply = per_row is not None and self.class_augment.active
        if apply:
            flat = per_row.reshape(-1)
            for v in flat.unique().tolist():
                if v:
                    picked = (flat == v).nonzero().squeeze(1)
                    out[picked] = self.class_augment.fn(out[picked], v)
        if self.transform is not None:
            out = self.transform(out)
            if not isinstance(out, torch.Tensor) or out.shape[0] != rows.numel():
                raise ValueError("transform must return a tensor with one row per input "
                                 f"({rows.numel()}), got "
                                 f"{getattr(out, 'shape', type(out).__name__)}")
        return out.reshape(*rows.shape, *out.shape[1:])

    def _gather(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows ``flat`` of the table; uint8 as float32 in [0, 1]."""
        if self._rows.dtype != torch.uint8:
            return self._rows.index_select(0, flat)
        out = torch.empty(flat.numel(), self._per_row)
        for s in range(0, flat.numel(), _ROWS_PER_CHUNK):
            o = out[s : s + _ROWS_PER_CHUNK]
            idx = flat[s : s + _ROWS_PER_CHUNK]
            if self._words is not None:
                picked = self._words.index_select(0, idx).view(torch.uint8)
            else:
                picked = self._rows.index_select(0, idx).reshape(len(idx), -1)
            # uint8 -> float copy, then an in-place divide: both vectorised, unlike u8 / 255.
            # Divide, not multiply by 1/255, so values are exactly k/255 as in ToTensor.
            o.copy_(picked)
            o.div_(255)
        return out.view(flat.numel(), *self._input_shape)

    # -- a Dataset source --------------------------------------------------------------
    def _load_batches(self, batches: list[list[int]]):
        """Yield ``(inputs, labels)`` lists for each batch of dataset indices."""
        if self.num_workers == 0:
            for batch in batches:
                items = [self.dataset[i] for i in batch]
                yield _collate_items(items)
            return
        if self._loader is None:
            self._batches = _IndexBatches()
            # Persistent workers: started once, reused by every sample() call.
            self._loader = DataLoader(self.dataset, batch_sampler=self._batches,
                                      num_workers=self.num_workers, collate_fn=_collate_items,
                                      persistent_workers=True)
        self._batches.batches = batches
        yield from self._loader

    def _load(self, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The items ``flat`` (dataset indices), each loaded once, as one float tensor."""
        unique, inverse = torch.unique(flat, return_inverse=True)
        wanted = unique.tolist()
        # Enough batches to keep every worker busy, few enough to keep the overhead low.
        per = max(1, math.ceil(len(wanted) / max(1, 2 * self.num_workers)))
        batches = [wanted[s : s + per] for s in range(0, len(wanted), per)]
        label_of = self._label_lookup()
        inputs, shape = [], None
        for batch, (xs, ys) in zip(batches, self._load_batches(batches)):
            for i, item_x, item_y in zip(batch, xs, ys):
                t = item_x if isinstance(item_x, torch.Tensor) else torch.as_tensor(
                    np.asarray(item_x))
                if shape is None:
                    shape = t.shape
                elif t.shape != shape:
                    raise ValueError(f"dataset[{i}] has input shape {tuple(t.shape)}, others "
                                     f"{tuple(shape)}; give the dataset a transform that makes "
                                     "every input the same shape")
                got = int(item_y) if not isinstance(item_y, torch.Tensor) else int(item_y.item())
                if got != label_of[i]:
                    raise ValueError(f"dataset[{i}] has label {got}, but its labels (y or the "
                                     f"dataset's targets) say {label_of[i]}; pass the right y")
                inputs.append(t)
        stacked = torch.stack(inputs)
        if stacked.dtype == torch.uint8:
            stacked = stacked.to(torch.float32).div_(255)
        return stacked[inverse]

    def _label_lookup(self) -> dict[int, int]:
        if self._label_of is None:
            label = self.classes.unsqueeze(1).expand_as(self._index)
            valid = (torch.arange(self._index.shape[1]) < self.class_sizes.unsqueeze(1))
            self._label_of = dict(zip(self._index[valid].tolist(), label[valid].tolist()))
        return self._label_of

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        """Rewind the generator to ``seed``: the same tasks are drawn again."""
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict:
        """The generator state, so a resumed run continues the same task stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        source = (f"dataset={type(self.dataset).__name__}" if self.dataset is not None
                  else f"input_shape={self._input_shape}")
        aug = self.class_augment
        return (f"{type(self).__name__}({source}, classes={self.num_classes}, ways={self.ways}, "
                f"shots={self.shots}, queries={self.queries}, class_augment="
                f"{None if aug is None else aug.name + ('' if aug.active else ' (inactive)')}, "
                f"seed={self.seed})")
