"""miniImageNet episodes (Vinyals et al. 2016) on Ravi & Larochelle's (2017) class split.

100 ImageNet classes of 600 images, 84×84 RGB: 64 train, 16 val, 20 test classes
(:data:`~metalearn.data.published_splits.MINI_IMAGENET`). It has no public download (the
images are ImageNet's); two common distributions are read, from a ``mini-imagenet/``
folder:

* learn2learn's pickles ``mini-imagenet-cache-{train,validation,test}.pkl`` (``val`` is
  also accepted for ``validation``): a dict with ``image_data``, uint8 ``(n, 84, 84, 3)``,
  and ``class_dict``, synset id → indices of its images (the format learn2learn's
  ``MiniImagenet`` reads);
* Ravi & Larochelle's ``{train,val,test}.csv`` (``filename,label`` rows) beside an
  ``images/`` folder of the JPEGs (flat, or one folder per synset), decoded with Pillow
  and Lanczos-resized to 84×84 where they are another size.

Each split is decoded once into a cached uint8 array (see :mod:`image_sets`); images of a
class keep their order in the source (the CSV's rows, or ``class_dict``'s indices).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from metalearn.data.few_shot import ClassAugment
from metalearn.data.image_sets import (
    BenchmarkTasks,
    DatasetIntegrityError,
    DatasetNotFoundError,
    Decoded,
    as_text,
    check_counts,
    data_dirs,
    decode_image,
    file_sha256,
    listing_sha256,
    load_or_build,
    load_pickle,
    places,
    str_keys,
)
from metalearn.data.published_splits import MINI_IMAGENET

FOLDER = "mini-imagenet"
IMAGE_SIZE = 84
PER_CLASS = 600
_PICKLE_NAMES = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
_CHUNK = 1000


def _fix() -> str:
    return ("Get a good copy (see the Datasets page of the docs) into a mini-imagenet/ folder, "
            "and point root= / METALEARN_DATA at its parent.")


def find_source(root: str | os.PathLike | None, split: str) -> tuple[str, Path]:
    """``("pickle", path)`` or ``("csv", path)`` of the split, from the first folder of
    :func:`~metalearn.data.image_sets.data_dirs` that holds either (a pickle first)."""
    for d in data_dirs(FOLDER, root):
        for name in _PICKLE_NAMES[split]:
            if (p := d / f"mini-imagenet-cache-{name}.pkl").is_file():
                return "pickle", p
        if (p := d / f"{split}.csv").is_file() and (d / "images").is_dir():
            return "csv", p
    pkl = f"mini-imagenet-cache-{_PICKLE_NAMES[split][0]}.pkl"
    raise DatasetNotFoundError(
        f"miniImageNet data not found: none of these folders holds {pkl}, or {split}.csv "
        f"beside an images/ folder:\n{places(FOLDER, root)}\nminiImageNet has no public "
        "download (its images are ImageNet's). Get learn2learn's pickles "
        "mini-imagenet-cache-{train,validation,test}.pkl, or Ravi & Larochelle's split CSVs "
        "(twitter/meta-learning-lstm, data/miniImagenet/) with the images/ folder of their "
        "60,000 JPEGs; put them in a mini-imagenet/ folder and pass its parent as root= or "
        "set METALEARN_DATA to it.")


def _class_index(names: list[str], split: str, source: Path) -> dict[str, int]:
    wanted = {c: i for i, c in enumerate(MINI_IMAGENET[split])}
    alien = [c for c in names if c not in wanted]
    if alien:
        raise DatasetIntegrityError(
            f"{source} holds class {alien[0]}"
            f"{f' (and {len(alien) - 1} more)' if len(alien) > 1 else ''}, which is not in "
            f"Ravi & Larochelle's {split} split: it is another split or another dataset. "
            f"{_fix()}")
    return wanted


def _from_pickle(path: Path, split: str) -> Decoded:
    what = "miniImageNet pickle"
    d = str_keys(load_pickle(path, what, _fix()), path, what, ("image_data", "class_dict"),
                 _fix())
    images, class_dict = d["image_data"], d["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images)
        raise DatasetIntegrityError(f"{path} is not a good {what}: its image_data is {got}, "
                                    f"not uint8 (n, 84, 84, 3). {_fix()}")
    if not isinstance(class_dict, dict):
        raise DatasetIntegrityError(f"{path} is not a good {what}: class_dict is a "
                                    f"{type(class_dict).__name__}. {_fix()}")
    names = [as_text(c) for c in class_dict]
    index = _class_index(names, split, path)
    labels = np.full(len(images), -1, np.int64)
    for name, rows in zip(names, class_dict.values()):
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(images) or (labels[rows] >= 0).any()):
            raise DatasetIntegrityError(
                f"{path} is not a good {what}: class_dict's indices of {name} are outside "
                f"image_data or shared with another class. {_fix()}")
        labels[rows] = index[name]
    if (labels < 0).any():
        raise DatasetIntegrityError(f"{path} is not a good {what}: {int((labels < 0).sum())} "
                                    f"images belong to no class of class_dict. {_fix()}")
    chunks = (images[s: s + _CHUNK].transpose(0, 3, 1, 2) for s in range(0, len(images), _CHUNK))
    return Decoded(labels, (3, IMAGE_SIZE, IMAGE_SIZE), chunks)


def _csv_rows(path: Path, split: str) -> tuple[list[str], np.ndarray]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetIntegrityError(f"{path} cannot be read as a split CSV ({err}). "
                                    f"{_fix()}") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"] or \
            any(len(r) != 2 for r in rows[1:]):
        raise DatasetIntegrityError(f"{path} is not a Ravi & Larochelle split CSV (a "
                                    f"'filename,label' header, then one image a row). {_fix()}")
    files, names = [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]
    index = _class_index(sorted(set(names)), split, path)
    return files, np.array([index[n] for n in names], dtype=np.int64)


def _image_paths(path: Path, files: list[str], labels: np.ndarray, split: str) -> list[Path]:
    folder, names = path.parent / "images", MINI_IMAGENET[split]
    out, missing = [], []
    for f, label in zip(files, labels):
        flat, nested = folder / f, folder / names[label] / f
        p = flat if flat.is_file() else nested
        (out if p.is_file() else missing).append(p)
    if missing:
        raise DatasetIntegrityError(
            f"{len(missing)} images of {path.name} are missing from {folder} (first: "
            f"{missing[0].name}): the images/ folder is incomplete. {_fix()}")
    return out


def _from_csv(paths: list[Path], labels: np.ndarray) -> Decoded:
    def chunks():
        for s in range(0, len(paths), _CHUNK):
            yield np.stack([decode_image(p.read_bytes(), IMAGE_SIZE, str(p), _fix())
                            for p in paths[s: s + _CHUNK]])

    return Decoded(labels, (3, IMAGE_SIZE, IMAGE_SIZE), chunks())


def load_split(root: str | os.PathLike | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 ``(n, 3, 84, 84)``, labels ``(n,)``: the index of each image's class
    in ``MINI_IMAGENET[split]``) of one split, decoded once and cached."""
    kind, path = find_source(root, split)
    expected = len(MINI_IMAGENET[split]) * PER_CLASS
    if kind == "pickle":
        key = file_sha256(path, FOLDER)
        build: Callable[[], Decoded] = lambda: _checked(_from_pickle(path, split), split, path)  # noqa: E731
    else:
        files, labels = _csv_rows(path, split)
        check_counts("miniImageNet", split, labels, list(MINI_IMAGENET[split]), PER_CLASS,
                     expected, _fix(), path)
        images = _image_paths(path, files, labels, split)
        key = file_sha256(path, FOLDER)[:16] + listing_sha256(images)[:16]
        build = lambda: _from_csv(images, labels)  # noqa: E731
    images, labels = load_or_build(FOLDER, f"mini-imagenet-{split}-{kind}", key, build,
                                   "miniImageNet")
    # Checked again on the cache: a cache of a smaller source must not pass for the split.
    check_counts("miniImageNet", split, labels.numpy(), list(MINI_IMAGENET[split]), PER_CLASS,
                 expected, _fix(), path)
    return images, labels


def _checked(decoded: Decoded, split: str, path: Path) -> Decoded:
    check_counts("miniImageNet", split, decoded.labels, list(MINI_IMAGENET[split]), PER_CLASS,
                 len(MINI_IMAGENET[split]) * PER_CLASS, _fix(), path)
    return decoded


class MiniImageNetTasks(BenchmarkTasks):
    """N-way K-shot miniImageNet episodes on Ravi & Larochelle's split, 84×84 RGB.

    Images are ``float32`` ``(3, 84, 84)`` in [0, 1]. The split is decoded once into a
    cached uint8 array (memory-mapped), checked against the published split (its 64/16/20
    synsets, 600 images each). See the Datasets page of the docs for where to get the data.

    Args:
        root: folder holding ``mini-imagenet/``; else ``$METALEARN_DATA``, else
            ``~/.cache/metalearn``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class; ``shots + queries <= 600``.
        seed: seed of the sampler's generator.
        download: miniImageNet has no public download; ``True`` changes nothing.
        transform: see :class:`~metalearn.data.FewShotTasks`.
        class_augment: see :class:`~metalearn.data.FewShotTasks`.
        progress: unused (decoding shows no bar); for a signature like the others'.
        subset: draw tasks from only this many of the split's classes, a fixed subset
            (:func:`~metalearn.data.few_shot.class_subset`, whatever ``seed`` is);
            ``None``: all of them.

    Example:
        >>> from metalearn.data import MiniImageNetTasks
        >>> tasks = MiniImageNetTasks(root="/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metalearn.data.image_sets.DatasetNotFoundError: miniImageNet data not found: ...
    """

    _title = "miniImageNet"
    _per_class = PER_CLASS
    _splits = MINI_IMAGENET

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
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        class_augment: ClassAugment | None = None,
        progress: bool = True,
        subset: int | None = None,
    ) -> None:
        super().__init__(root, split, ways, shots, queries, seed, download, transform=transform,
                         class_augment=class_augment, progress=progress, subset=subset)

    def _load(self, root, split, download, progress):
        return load_split(root, split)
