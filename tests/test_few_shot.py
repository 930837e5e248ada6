"""FewShotTasks: the frozen Omniglot stream, brute-force checks of every episode, lazy
datasets (with and without workers), resume, and the messages for impossible requests."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from metalearn.data import ClassAugment, FewShotTasks, OmniglotTasks, rotations90
from metalearn.data import few_shot as fs
from tests.reference_samplers import FrozenOmniglotTasks

FIELDS = ("support_x", "support_y", "query_x", "query_y")


def synthetic_omniglot(characters: int = 60, seed: int = 0) -> torch.Tensor:
    """uint8 (characters, 20, 28, 28) random images: an Omniglot-shaped array."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (characters, 20, 28, 28), generator=g, dtype=torch.uint8)


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


# -- the Omniglot stream, frozen ---------------------------------------------------------
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("ways, shots, queries, seed", [
    (5, 1, 15, 0), (5, 5, 15, 1), (20, 1, 5, 2), (10, 19, 1, 3)])  # rejection and top-k paths
def test_equal_class_sizes_reproduce_the_frozen_omniglot_stream(rotate, ways, shots, queries,
                                                                 seed):
    images = synthetic_omniglot()
    classes = torch.tensor([3, 5, 8, 13, 21, 22, 30, 31, 34, 40, 41, 44, 50, 55, 59, 1, 2, 4,
                            6, 7, 9, 10, 11, 12])[: 24].sort().values
    frozen = FrozenOmniglotTasks(images, classes, ways, shots, queries, seed, rotate)
    tasks = FewShotTasks(images.view(-1, 1, 28, 28), torch.arange(60).repeat_interleave(20),
                         ways, shots, queries, seed, classes=classes,
                         class_augment=rotations90(active=rotate))
    for batch in (1, 7, 32):
        assert same(tasks.sample(batch), frozen.sample(batch))
        assert torch.equal(tasks.last_classes, frozen.last_classes)
        assert torch.equal(tasks.last_variants, frozen.last_rotations)
        assert torch.equal(tasks.last_positions, frozen.last_drawings)
        assert torch.equal(tasks.last_labels, frozen.last_labels)


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("split, ways, shots, queries, seed", [
    ("train", 5, 1, 15, 0), ("train", 5, 5, 15, 11), ("val", 20, 1, 19, 2),
    ("test", 60, 2, 3, 7)])
def test_omniglot_tasks_keep_their_stream_on_the_real_data(omniglot_images, rotate, split, ways,
                                                           shots, queries, seed):
    from metalearn.data.omniglot import split_classes

    frozen = FrozenOmniglotTasks(omniglot_images, split_classes(split), ways, shots, queries,
                                 seed, rotate)
    tasks = OmniglotTasks(split=split, ways=ways, shots=shots, queries=queries, seed=seed,
                          rotate=rotate, progress=False)
    for _ in range(3):
        assert same(tasks.sample(16), frozen.sample(16))
        for name in ("last_classes", "last_rotations", "last_drawings", "last_labels"):
            assert torch.equal(getattr(tasks, name), getattr(frozen, name)), name
    state = tasks.state_dict()
    assert set(state) == {"generator"}  # checkpoints of earlier runs hold this, and resume
    frozen.load_state_dict(state)
    assert same(tasks.sample(4), frozen.sample(4))


# -- brute force, unequal classes ----------------------------------------------------------
def uneven(seed: int = 0):
    """12 classes of 6..17 examples (labels 100..111, shuffled), inputs (3, 4) floats whose
    first entry is the example's index, so every drawn input names its example."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.arange(6, 18)
    y = torch.arange(100, 112).repeat_interleave(sizes)
    y = y[torch.randperm(len(y), generator=g)]
    x = torch.randn(len(y), 3, 4, generator=g)
    x[:, 0, 0] = torch.arange(len(y), dtype=torch.float32)
    return x, y


def check_episodes(tasks: FewShotTasks, batch, x, y, allowed):
    b, n, k, q = len(batch), tasks.ways, tasks.shots, tasks.queries
    idx = tasks.last_indices
    for t in range(b):
        assert len(set(tasks.last_classes[t].tolist())) == n
        assert set(tasks.last_classes[t].tolist()) <= set(allowed)
        assert sorted(tasks.last_labels[t].tolist()) == list(range(n))
        for j in range(n):
            rows = idx[t, j]
            assert len(set(rows.tolist())) == k + q  # support and query disjoint
            assert (y[rows] == tasks.last_classes[t, j]).all()
            label = tasks.last_labels[t, j]
            assert (batch.support_y[t, j * k:(j + 1) * k] == label).all()
            assert (batch.query_y[t, j * q:(j + 1) * q] == label).all()
            assert torch.equal(batch.support_x[t, j * k:(j + 1) * k], x[rows[:k]])
            assert torch.equal(batch.query_x[t, j * q:(j + 1) * q], x[rows[k:]])


@pytest.mark.parametrize("ways, shots, queries", [(3, 1, 5), (5, 2, 4), (12, 1, 5)])
def test_every_episode_checks_out_with_unequal_classes(ways, shots, queries):
    x, y = uneven()
    tasks = FewShotTasks(x, y, ways, shots, queries, seed=4)
    batch = tasks.sample(50)
    check_episodes(tasks, batch, x, y, range(100, 112))


def test_a_split_keeps_to_its_classes_and_small_classes_use_all_their_examples():
    x, y = uneven()
    split = [111, 100, 105, 103]  # the given order is the class order
    tasks = FewShotTasks(x, y, ways=4, shots=1, queries=5, seed=1, classes=split)
    assert tasks.classes.tolist() == split and tasks.class_sizes.tolist() == [17, 6, 11, 9]
    batch = tasks.sample(300)
    check_episodes(tasks, batch, x, y, split)
    # Class 100 has 6 examples and each task takes 6: all of them, every time.
    for t in range(300):
        j = tasks.last_classes[t].tolist().index(100)
        assert sorted(tasks.last_indices[t, j].tolist()) == (y == 100).nonzero().squeeze(1).tolist()
    # Class 111 (17 examples): every example is drawn (300 draws of 6).
    drawn = tasks.last_indices[tasks.last_classes == 111].flatten().tolist()
    assert set(drawn) == set((y == 111).nonzero().flatten().tolist())


def test_positions_are_uniform_within_a_class():
    x, y = uneven()
    tasks = FewShotTasks(x, y, ways=2, shots=1, queries=1, seed=3, classes=[104, 110])
    tasks.sample(4000)
    counts = torch.bincount(tasks.last_indices[tasks.last_classes == 104].flatten(),
                            minlength=len(y))[y == 104]
    expected = 4000 * 2 / 10  # 10 examples, two drawn per task
    assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected


def test_same_seed_same_tasks_resume_and_reset():
    x, y = uneven()
    a, b, c = (FewShotTasks(x, y, 3, 2, 3, seed=s) for s in (5, 5, 6))
    first = a.sample(8)
    assert same(first, b.sample(8)) and not same(first, c.sample(8))
    state = a.state_dict()
    expected = a.sample(8)
    a.sample(8)
    resumed = FewShotTasks(x, y, 3, 2, 3, seed=99)
    resumed.load_state_dict(state)
    assert same(resumed.sample(8), expected)
    a.reset()
    assert same(a.sample(8), first)


def test_labels_in_slot_order_make_no_draw():
    x, y = uneven()
    plain = FewShotTasks(x, y, 4, 1, 2, seed=2, permute_labels=False)
    batch = plain.sample(6)
    assert (batch.support_y == torch.arange(4)).all()
    permuted = FewShotTasks(x, y, 4, 1, 2, seed=2)
    permuted.sample(6)  # the same classes and examples: labels are drawn last
    assert torch.equal(permuted.last_indices, plain.last_indices)


# -- class augmentation and transforms ----------------------------------------------------
def test_class_augmentation_made_per_batch_equals_the_stored_variants(monkeypatch):
    images = synthetic_omniglot(30)
    x, y = images.view(-1, 1, 28, 28), torch.arange(30).repeat_interleave(20)
    stored = FewShotTasks(x, y, 5, 2, 3, seed=8, class_augment=rotations90())
    monkeypatch.setattr(fs, "_PRECOMPUTE_LIMIT", 0)
    per_batch = FewShotTasks(x, y, 5, 2, 3, seed=8, class_augment=rotations90())
    assert stored._precomputed and not per_batch._precomputed
    a, b = stored.sample(20), per_batch.sample(20)
    assert same(a, b)
    # And each slot's images are its rotation of the source images.
    for t in range(20):
        for j in range(5):
            k = int(stored.last_variants[t, j])
            rows = stored.last_indices[t, j, :2]
            want = torch.rot90(x[rows].float() / 255, k, dims=(-2, -1))
            assert torch.equal(a.support_x[t, 2 * j:2 * j + 2], want)


def test_custom_class_augment_and_transform():
    x, y = uneven()
    negate = ClassAugment(2, lambda t, k: -t if k else t, name="negate")
    tasks = FewShotTasks(x, y, 3, 1, 2, seed=0, class_augment=negate,
                         transform=lambda t: t * 10)
    batch = tasks.sample(30)
    assert set(tasks.last_variants.flatten().tolist()) == {0, 1}
    sign = 1 - 2 * tasks.last_variants  # +1 or -1 per slot
    for t in range(30):
        for j in range(3):
            row = tasks.last_indices[t, j, 0]
            assert torch.equal(batch.support_x[t, j], x[row] * sign[t, j] * 10)
    assert "negate" in repr(tasks)


# -- a Dataset source ---------------------------------------------------------------------
class CountingDataset(Dataset):
    """Items (uint8 image, label) made on demand; counts the loads; no labels attribute."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, with_targets: bool = False):
        self.x, self.y, self.loads = x, y, 0
        if with_targets:
            self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.loads += 1
        return self.x[i], int(self.y[i])


def image_data():
    x, y = uneven()
    images = (torch.arange(len(y) * 12) % 251).to(torch.uint8).view(len(y), 3, 2, 2)
    return images[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))], y


def test_a_dataset_gives_the_tensor_stream_and_loads_lazily():
    x, y = image_data()
    ref = FewShotTasks(x, y, 4, 1, 3, seed=3, classes=[101, 104, 107, 109, 111])
    with_targets = CountingDataset(x, y, with_targets=True)
    lazy = FewShotTasks(with_targets, ways=4, shots=1, queries=3, seed=3,
                        classes=[101, 104, 107, 109, 111])
    assert with_targets.loads == 0  # the targets attribute: no item loaded to index it
    for _ in range(3):
        a, b = ref.sample(5), lazy.sample(5)
        assert same(a, b) and b.support_x.dtype == torch.float32
        assert with_targets.loads <= 5 * 4 * 4 * 3  # only the drawn items
    without = CountingDataset(x, y)
    FewShotTasks(without, ways=4, shots=1, queries=3)
    assert without.loads == len(y)  # no labels stated: each item read once


def test_torchvision_style_wrappers_state_their_labels():
    x, y = image_data()
    keep = (y != 100).nonzero().squeeze(1).tolist()
    tasks = FewShotTasks(Subset(TensorDataset(x, y), keep), ways=3, shots=1, queries=2, seed=0)
    assert 100 not in tasks.classes.tolist() and len(tasks.classes) == 11
    batch = tasks.sample(4)
    assert batch.support_x.shape == (4, 3, 3, 2, 2)


def test_workers_load_the_same_episodes():
    x, y = image_data()
    ds = CountingDataset(x, y, with_targets=True)
    in_process = FewShotTasks(ds, ways=5, shots=2, queries=2, seed=6)
    workers = FewShotTasks(ds, ways=5, shots=2, queries=2, seed=6, num_workers=2)
    for _ in range(2):  # the second call reuses the persistent workers
        assert same(in_process.sample(6), workers.sample(6))


# -- impossible requests -------------------------------------------------------------------
class WrongLabel(CountingDataset):
    def __getitem__(self, i):
        return self.x[i], int(self.y[i]) + 1


class Ragged(CountingDataset):
    def __getitem__(self, i):
        return self.x[i][..., : 1 + i % 2], int(self.y[i])


BAD = [
    (lambda x, y: FewShotTasks(x, y, ways=13), ValueError,
     "ways=13 but the data have only 12 classes to draw from; use ways <= 12"),
    (lambda x, y: FewShotTasks(x, y, ways=3, classes=[100, 101], shots=1), ValueError,
     "only 2 classes"),
    (lambda x, y: FewShotTasks(x, y, shots=2, queries=5), ValueError,
     r"shots \+ queries = 2 \+ 5 = 7, but class 100 has only 6 examples.*lower shots or "
     "queries, or leave such classes out with classes="),
    (lambda x, y: FewShotTasks(x, y.float()), TypeError,
     "y must hold integer class labels, got torch.float32"),
    (lambda x, y: FewShotTasks(x, y, classes=[100, 555], queries=2), ValueError,
     "class 555 in classes has no examples; remove it from classes"),
    (lambda x, y: FewShotTasks(x, y, classes=[100, 100]), ValueError, "more than once"),
    (lambda x, y: FewShotTasks(x, y[:-1]), ValueError, "x has 138 examples but y has 137"),
    (lambda x, y: FewShotTasks(x), ValueError, "y is required with tensor inputs"),
    (lambda x, y: FewShotTasks(x, y, ways=0), ValueError, "ways must be >= 1"),
    (lambda x, y: FewShotTasks(x, y, shots=1.5), TypeError, "shots must be an integer"),
    (lambda x, y: FewShotTasks(x, y, num_workers=-1), ValueError, "num_workers must be"),
    (lambda x, y: FewShotTasks(x, y, class_augment=rotations90), TypeError,
     "class_augment must be a ClassAugment"),
    (lambda x, y: FewShotTasks(x, y.view(2, -1)), ValueError, "one label per example"),
    (lambda x, y: FewShotTasks(x, y, queries=2).sample(0), ValueError, "batch_size must be"),
    (lambda x, y: FewShotTasks(x, y, queries=2, transform=lambda t: t[:1]).sample(1),
     ValueError, "transform must return a tensor with one row per input"),
    (lambda x, y: FewShotTasks(WrongLabel(x, y, True), queries=2).sample(1), ValueError,
     r"dataset\[\d+\] has label \d+, but its labels .* say \d+"),
    (lambda x, y: FewShotTasks(Ragged(x, y, True), queries=2).sample(2), ValueError,
     "give the dataset a transform that makes every input the same shape"),
    (lambda x, y: FewShotTasks(x[:0], y[:0]), ValueError, "the data have no examples"),
]


@pytest.mark.parametrize("make, exc, text", BAD)
def test_impossible_requests_name_the_numbers_and_the_fix(make, exc, text):
    x, y = image_data()
    with pytest.raises(exc, match=text):
        make(x, y)
