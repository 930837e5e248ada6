"""tieredImageNet episodes (Ren et al. 2018) on its published split.

608 ImageNet classes from 34 categories, 84×84 RGB: 351 train classes (20 categories,
448,695 images), 97 val (6, 124,261), 160 test (8, 206,209)
(:data:`~metalearn.data.published_splits.TIERED_IMAGENET`). Classes have 732 to 1,300
images. It has no public download (ImageNet's images); the common distribution, the one
Ren et al.'s code writes and learn2learn's ``TieredImagenet`` reads, is read from a
``tiered-imagenet/`` folder:

* ``{split}_labels.pkl``: a dict with ``label_specific`` (each image's class index),
  ``label_specific_str`` (class names), ``label_general`` and ``label_general_str``;
* and either ``{split}_images_png.pkl``, a list of PNG-encoded images, or
  ``{split}_images.npz`` with ``images``, uint8 ``(n, 84, 84, 3)``. The npz holds the
  arrays OpenCV wrote, in BGR order (``fewshot/data/tiered_imagenet.py`` and
  ``compress_tiered_imagenet.py`` in renmengye/few-shot-ssl-public); they are turned to RGB
  here, so both files give the same images.

Classes are numbered as in ``label_specific`` (the files do not carry synset ids). A split
is decoded once into a cached uint8 array, memory-mapped when used (the train split is
9.5 GB), and the decode streams, so it needs little memory beyond the source file.
"""

from __future__ import annotations

import os
import zipfile
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
    load_or_build,
    load_pickle,
    places,
    str_keys,
)
from metalearn.data.published_splits import TIERED_IMAGENET, TIERED_IMAGENET_IMAGES

FOLDER = "tiered-imagenet"
IMAGE_SIZE = 84
_CHUNK = 1000


def _fix() -> str:
    return ("Get a good copy (see the Datasets page of the docs) into a tiered-imagenet/ "
            "folder, and point root= / METALEARN_DATA at its parent.")


def find_source(root: str | os.PathLike | None, split: str) -> tuple[Path, Path]:
    """(labels pickle, images file) of the split from the first folder that holds both."""
    for d in data_dirs(FOLDER, root):
        labels = d / f"{split}_labels.pkl"
        for images in (d / f"{split}_images_png.pkl", d / f"{split}_images.npz"):
            if labels.is_file() and images.is_file():
                return labels, images
    raise DatasetNotFoundError(
        f"tieredImageNet data not found: none of these folders holds {split}_labels.pkl with "
        f"{split}_images_png.pkl or {split}_images.npz:\n{places(FOLDER, root)}\n"
        "tieredImageNet has no public download (its images are ImageNet's). Get the files "
        "of Ren et al.'s release (renmengye/few-shot-ssl-public; learn2learn's TieredImagenet "
        "reads the same), put them in a tiered-imagenet/ folder and pass its parent as root= "
        "or set METALEARN_DATA to it.")


def _labels(path: Path) -> tuple[np.ndarray, list[str] | None]:
    what = "tieredImageNet labels pickle"
    d = str_keys(load_pickle(path, what, _fix()), path, what, ("label_specific",), _fix())
    try:
        labels = np.asarray(d["label_specific"]).astype(np.int64, casting="safe")
    except TypeError:
        raise DatasetIntegrityError(f"{path} is not a good {what}: label_specific is not "
                                    f"integers. {_fix()}") from None
    if labels.ndim != 1 or (labels.size and labels.min() < 0):
        raise DatasetIntegrityError(f"{path} is not a good {what}: label_specific must be "
                                    f"one class index >= 0 per image. {_fix()}")
    names = d.get("label_specific_str")
    return labels, None if names is None else [as_text(n) for n in names]


def _png_chunks(path: Path, n: int):
    what = "tieredImageNet PNG pickle"
    pngs = load_pickle(path, what, _fix())
    if not isinstance(pngs, (list, tuple)) or len(pngs) != n:
        got = len(pngs) if isinstance(pngs, (list, tuple)) else type(pngs).__name__
        raise DatasetIntegrityError(f"{path} is not a good {what}: it holds {got} images, its "
                                    f"labels {n}. {_fix()}")
    for s in range(0, n, _CHUNK):
        yield np.stack([decode_image(bytes(memoryview(np.ascontiguousarray(p)).cast("B"))
                                     if isinstance(p, np.ndarray) else bytes(p),
                                     IMAGE_SIZE, f"image {s + i} of {path}", _fix())
                        for i, p in enumerate(pngs[s: s + _CHUNK])])


def _npz_chunks(path: Path, n: int):
    """The ``images`` array of an npz, read piece by piece (never all in memory)."""
    what = "tieredImageNet npz"
    try:
        with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            if dtype != np.uint8 or fortran or tuple(shape) != (n, IMAGE_SIZE, IMAGE_SIZE, 3):
                raise DatasetIntegrityError(
                    f"{path} is not a good {what}: images is {dtype} {tuple(shape)}, not uint8 "
                    f"({n}, 84, 84, 3) as its labels say. {_fix()}")
            row = IMAGE_SIZE * IMAGE_SIZE * 3
            for s in range(0, n, _CHUNK):
                m = min(_CHUNK, n - s)
                data = f.read(m * row)
                if len(data) != m * row:
                    raise EOFError(f"images end after {s + len(data) // row} of {n}")
                bgr = np.frombuffer(data, np.uint8).reshape(m, IMAGE_SIZE, IMAGE_SIZE, 3)
                yield np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2))
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, ValueError) as err:
        if isinstance(err, DatasetIntegrityError):
            raise
        raise DatasetIntegrityError(f"{path} is not a good {what}: {type(err).__name__}: "
                                    f"{err}. {_fix()}") from None


def load_split(root: str | os.PathLike | None,
               split: str) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(images uint8 ``(n, 3, 84, 84)``, labels ``(n,)``, class names or ``None``) of one
    split, decoded once and cached."""
    labels_path, images_path = find_source(root, split)
    labels, names = _labels(labels_path)
    expected = len(TIERED_IMAGENET[split])
    n_classes = int(labels.max(initial=-1)) + 1
    if n_classes > expected and not _subset():
        raise DatasetIntegrityError(
            f"{labels_path} numbers {n_classes} classes, but tieredImageNet's {split} split has "
            f"{expected}: the data are not the published ones. {_fix()}")
    shown = [names[i] if names is not None and i < len(names) else f"#{i}"
             for i in range(max(expected, n_classes))]
    check_counts("tieredImageNet", split, labels, shown, None, TIERED_IMAGENET_IMAGES[split],
                 _fix(), labels_path)
    key = file_sha256(labels_path, FOLDER)[:16] + file_sha256(images_path, FOLDER)[:16]
    kind = "png" if images_path.suffix == ".pkl" else "npz"
    chunks = _png_chunks if kind == "png" else _npz_chunks
    build: Callable[[], Decoded] = lambda: Decoded(  # noqa: E731
        labels, (3, IMAGE_SIZE, IMAGE_SIZE), chunks(images_path, len(labels)))
    images, cached = load_or_build(FOLDER, f"tiered-imagenet-{split}-{kind}", key, build,
                                   "tieredImageNet")
    if not torch.equal(cached, torch.from_numpy(labels)):
        raise DatasetIntegrityError(f"the tieredImageNet cache of {images_path} holds other "
                                    "labels than its labels pickle; delete the cache (under "
                                    "METALEARN_CACHE) and run again")
    return images, cached, names


def _subset() -> bool:
    from metalearn.data import image_sets

    return image_sets._ALLOW_SUBSET


class TieredImageNetTasks(BenchmarkTasks):
    """N-way K-shot tieredImageNet episodes on Ren et al.'s split, 84×84 RGB.

    Images are ``float32`` ``(3, 84, 84)`` in [0, 1]. Classes have 732 to 1,300 images, so
    ``shots + queries`` is checked against the smallest class of the split. The split is
    decoded once into a cached, memory-mapped uint8 array, checked against the published
    counts (351/97/160 classes; 448,695/124,261/206,209 images).

    Args:
        root: folder holding ``tiered-imagenet/``; else ``$METALEARN_DATA``, else
            ``~/.cache/metalearn``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class.
        seed: seed of the sampler's generator.
        download: tieredImageNet has no public download; ``True`` changes nothing.
        transform: see :class:`~metalearn.data.FewShotTasks`.
        class_augment: see :class:`~metalearn.data.FewShotTasks`.
        progress: unused; for a signature like the others'.
        subset: draw tasks from only this many of the split's classes, a fixed subset
            (:func:`~metalearn.data.few_shot.class_subset`, whatever ``seed`` is);
            ``None``: all of them.

    Example:
        >>> from metalearn.data import TieredImageNetTasks
        >>> TieredImageNetTasks(root="/nonexistent", split="val")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metalearn.data.image_sets.DatasetNotFoundError: tieredImageNet data not found: ...
    """

    _title = "tieredImageNet"
    _splits = TIERED_IMAGENET

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
        images, labels, self._names = load_split(root, split)
        return images, labels

    @property
    def class_names(self) -> list[str]:
        """The classes' names from ``label_specific_str`` (else ``#<index>``), in order."""
        return [self._names[int(c)] if self._names is not None and int(c) < len(self._names)
                else f"#{int(c)}" for c in self.classes]
