"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018) episodes, both built
from the official CIFAR-100 archive (Krizhevsky 2009).

CIFAR-100 has 100 classes of 600 32×32 RGB images (500 in its ``train`` file, 100 in
``test``). Both benchmarks use all 600 of a class and split the classes:

* CIFAR-FS: 64/16/20 classes (:data:`~metalearn.data.published_splits.CIFAR_FS`);
* FC100: by superclass, 12/4/4 superclasses, 60/20/20 classes
  (:data:`~metalearn.data.published_splits.FC100_SUPERCLASSES`).

The archive is read from a ``cifar100/`` folder, as ``cifar-100-python.tar.gz`` or its
extracted ``cifar-100-python/`` folder (``train``, ``test`` and ``meta`` pickles, with
``data``, ``fine_labels``, ``coarse_labels``, ``fine_label_names``,
``coarse_label_names``), and can be downloaded (``download=True``; the address is
:data:`DEFAULT_URL`, or ``url=`` / ``$METALEARN_CIFAR100_URL``). It is checked on its
content: the md5 of the archive or of its three members (the published ones, as
torchvision checks them), the class names, each class's superclass, and 500 + 100 images a
class. It is decoded once into one cached array that both benchmarks use; images of a
class are its ``train`` images then its ``test`` ones, in file order.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from metalearn.data import image_sets
from metalearn.data.few_shot import ClassAugment
from metalearn.data.image_sets import (
    BenchmarkTasks,
    DatasetIntegrityError,
    DatasetNotFoundError,
    Decoded,
    as_text,
    check_counts,
    data_dirs,
    download_file,
    file_sha256,
    load_or_build,
    load_pickle,
    places,
    str_keys,
)
from metalearn.data.published_splits import (
    CIFAR100_CLASSES,
    CIFAR100_SUPERCLASSES,
    CIFAR_FS,
    FC100,
)

FOLDER = "cifar100"
ARCHIVE = "cifar-100-python.tar.gz"
MEMBERS = ("train", "test", "meta")
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
URL_ENV = "METALEARN_CIFAR100_URL"
# The published md5s of the archive and of its members (as torchvision's CIFAR100 checks).
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBER_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d",
              "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
              "meta": "7973b15100ade9c7d40fb424638fde48"}
IMAGES = {"train": 500, "test": 100}  # per class
PER_CLASS = 600
IMAGE_SIZE = 32
SUPERCLASSES = tuple(sorted(CIFAR100_SUPERCLASSES))
_SUPER_OF = {c: s for s, cs in CIFAR100_SUPERCLASSES.items() for c in cs}


def _fix() -> str:
    return ("Delete it and re-run with download=True, or point root= / METALEARN_DATA at a "
            "directory whose cifar100/ folder holds a good copy.")


def find_source(root: str | os.PathLike | None) -> Path | None:
    """The archive or extracted folder, from the first of the data folders holding one."""
    for d in data_dirs(FOLDER, root):
        if all((d / "cifar-100-python" / m).is_file() for m in MEMBERS):
            return d / "cifar-100-python"
        if (d / ARCHIVE).is_file():
            return d / ARCHIVE
    return None


def _not_found(root) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"CIFAR-100 data not found: none of these folders holds {ARCHIVE} or an extracted "
        f"cifar-100-python/ folder:\n{places(FOLDER, root)}\nTo get it, pass download=True "
        f"(it downloads into the first folder), or put {ARCHIVE} (from {DEFAULT_URL}) in a "
        "cifar100/ folder and pass its parent as root= or set METALEARN_DATA to it.")


def _read_members(source: Path, fix: str) -> dict[str, bytes]:
    """The three member files' bytes, from the archive or the folder."""
    if source.is_dir():
        return {m: (source / m).read_bytes() for m in MEMBERS}
    try:
        out = {}
        with tarfile.open(source, "r:gz") as tar:
            for m in MEMBERS:
                f = tar.extractfile(f"cifar-100-python/{m}")
                if f is None:
                    raise KeyError(f"cifar-100-python/{m} is not a file")
                out[m] = f.read()
        return out
    except (tarfile.TarError, KeyError, EOFError, zlib.error, OSError) as err:
        raise DatasetIntegrityError(f"{source} is not a good {ARCHIVE}: it cannot be read "
                                    f"({type(err).__name__}: {err}). {fix}") from None


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _decode(source: Path, fix: str | None = None) -> Decoded:
    """Check the archive's content and return its images and fine labels, train then test;
    ``fix`` ends each error message (default: how to replace the files)."""
    fix = _fix() if fix is None else fix
    members = _read_members(source, fix)
    official = not source.is_dir() and _file_md5(source) == ARCHIVE_MD5
    if not official and not image_sets._ALLOW_SUBSET:
        bad = [m for m in MEMBERS if _md5(members[m]) != MEMBER_MD5[m]]
        if bad:
            raise DatasetIntegrityError(
                f"{source}: its {bad[0]} file has md5 {_md5(members[bad[0]])}, not the "
                f"published {MEMBER_MD5[bad[0]]}: it is altered or not CIFAR-100. {fix}")
    meta = str_keys(load_pickle(members["meta"], "CIFAR-100 meta file", fix,
                                f"{source}/meta"), f"{source}/meta", "CIFAR-100 meta file",
                    ("fine_label_names", "coarse_label_names"), fix)
    fine = [as_text(n) for n in meta["fine_label_names"]]
    coarse = [as_text(n) for n in meta["coarse_label_names"]]
    if tuple(fine) != CIFAR100_CLASSES or tuple(coarse) != SUPERCLASSES:
        raise DatasetIntegrityError(f"{source}/meta does not name CIFAR-100's 100 classes and "
                                    f"20 superclasses. {fix}")
    images, labels = [], []
    for part in ("train", "test"):
        name = f"{source}/{part}"
        d = str_keys(load_pickle(members[part], "CIFAR-100 file", fix, name), name,
                     "CIFAR-100 file", ("data", "fine_labels", "coarse_labels"), fix)
        data = d["data"]
        y = np.asarray(d["fine_labels"], dtype=np.int64)
        y_coarse = np.asarray(d["coarse_labels"], dtype=np.int64)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or \
                data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or len(data) != len(y) or \
                len(y) != len(y_coarse) or (y.size and (y.min() < 0 or y.max() > 99)):
            raise DatasetIntegrityError(f"{name} is not a good CIFAR-100 file: its data and "
                                        f"labels do not fit together. {fix}")
        wrong = [i for i in np.flatnonzero(np.bincount(y, minlength=100))
                 if (y_coarse[y == i] != SUPERCLASSES.index(_SUPER_OF[fine[i]])).any()]
        if wrong:
            raise DatasetIntegrityError(f"{name}: images of {fine[wrong[0]]} carry another "
                                        f"superclass than CIFAR-100's. {fix}")
        counts = np.bincount(y, minlength=100)
        if not image_sets._ALLOW_SUBSET and (counts != IMAGES[part]).any():
            i = int(np.flatnonzero(counts != IMAGES[part])[0])
            raise DatasetIntegrityError(
                f"{name} has {int(counts[i])} images of {fine[i]}, not {IMAGES[part]}: it is "
                f"incomplete. {fix}")
        images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE))  # stored as R, G, B planes
        labels.append(y)
    return Decoded(np.concatenate(labels), (3, IMAGE_SIZE, IMAGE_SIZE), images)


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(root: str | os.PathLike | None = None, url: str | None = None,
             progress: bool = True) -> Path:
    """Find the CIFAR-100 archive, downloading it into the first data folder if missing.

    The download goes to a temporary file, is checked (:data:`ARCHIVE_MD5`, else its
    content) and only then renamed to ``cifar100/cifar-100-python.tar.gz``.

    Args:
        root: folder holding ``cifar100/`` (else ``$METALEARN_DATA``, else ``~/.cache/metalearn``).
        url: the archive's address; else ``$METALEARN_CIFAR100_URL``, else :data:`DEFAULT_URL`.
        progress: show a progress bar.
    """
    found = find_source(root)
    if found is not None:
        return found
    address = url or os.environ.get(URL_ENV) or DEFAULT_URL
    return download_file(address, data_dirs(FOLDER, root)[0] / ARCHIVE,
                         lambda p: _decode(p, fix=""), "CIFAR-100", f"pass url= / set {URL_ENV}",
                         progress)


def load_cifar100(root: str | os.PathLike | None = None, download_missing: bool = False,
                  url: str | None = None,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All CIFAR-100 images, uint8 ``(60000, 3, 32, 32)``, and their fine labels (class
    index in :data:`CIFAR100_CLASSES`), decoded once and cached."""
    source = download(root, url, progress) if download_missing else find_source(root)
    if source is None:
        raise _not_found(root)
    if source.is_dir():
        key = "".join(file_sha256(source / m, FOLDER)[:12] for m in MEMBERS)
    else:
        key = file_sha256(source, FOLDER)
    images, labels = load_or_build(FOLDER, "cifar100", key, lambda: _decode(source), "CIFAR-100")
    check_counts("CIFAR-100", "all", labels.numpy(), list(CIFAR100_CLASSES), PER_CLASS,
                 100 * PER_CLASS, _fix(), source)
    return images, labels


class _CIFARTasks(BenchmarkTasks):
    _per_class = PER_CLASS

    def __init__(self, root, split, ways, shots, queries, seed, download, *, transform,
                 class_augment, progress, url, subset=None) -> None:
        super().__init__(root, split, ways, shots, queries, seed, download, transform=transform,
                         class_augment=class_augment, progress=progress, url=url,
                         subset=subset)

    def _load(self, root, split, download, progress, url):
        return load_cifar100(root, download, url, progress)

    def _classes(self, split: str, labels: torch.Tensor) -> torch.Tensor:
        present = set(torch.unique(labels).tolist())
        ids = [CIFAR100_CLASSES.index(c) for c in self._splits[split]]
        return torch.tensor([i for i in ids if i in present])

    @property
    def class_names(self) -> list[str]:
        return [CIFAR100_CLASSES[int(c)] for c in self.classes]


class CIFARFSTasks(_CIFARTasks):
    """N-way K-shot CIFAR-FS episodes (Bertinetto et al. 2019), 32×32 RGB.

    64/16/20 CIFAR-100 classes of 600 images (the r2d2 release's split). Images are
    ``float32`` ``(3, 32, 32)`` in [0, 1]. CIFAR-100 is decoded once into a cached uint8
    array that :class:`FC100Tasks` shares.

    Args:
        root: folder holding ``cifar100/``; else ``$METALEARN_DATA``, else
            ``~/.cache/metalearn``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class; ``shots + queries <= 600``.
        seed: seed of the sampler's generator.
        download: download the CIFAR-100 archive if it is missing.
        transform: see :class:`~metalearn.data.FewShotTasks`.
        class_augment: see :class:`~metalearn.data.FewShotTasks`.
        progress: show a progress bar while downloading.
        url: the archive's address for the download; else ``$METALEARN_CIFAR100_URL``.
        subset: draw tasks from only this many of the split's classes, a fixed subset
            (:func:`~metalearn.data.few_shot.class_subset`, whatever ``seed`` is);
            ``None``: all of them.

    Example:
        >>> from metalearn.data import CIFARFSTasks
        >>> CIFARFSTasks(root="/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metalearn.data.image_sets.DatasetNotFoundError: CIFAR-100 data not found: ...
    """

    _title = "CIFAR-FS"
    _splits = CIFAR_FS

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
        url: str | None = None,
        subset: int | None = None,
    ) -> None:
        super().__init__(root, split, ways, shots, queries, seed, download, transform=transform,
                         class_augment=class_augment, progress=progress, url=url,
                         subset=subset)


class FC100Tasks(_CIFARTasks):
    """N-way K-shot FC100 episodes (Oreshkin et al. 2018), 32×32 RGB.

    CIFAR-100 split by superclass: 12/4/4 superclasses, 60/20/20 classes of 600 images, so
    no superclass is shared between splits. Images are ``float32`` ``(3, 32, 32)`` in
    [0, 1].

    Args:
        root: folder holding ``cifar100/``; else ``$METALEARN_DATA``, else
            ``~/.cache/metalearn``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class; ``shots + queries <= 600``.
        seed: seed of the sampler's generator.
        download: download the CIFAR-100 archive if it is missing.
        transform: see :class:`~metalearn.data.FewShotTasks`.
        class_augment: see :class:`~metalearn.data.FewShotTasks`.
        progress: show a progress bar while downloading.
        url: the archive's address for the download; else ``$METALEARN_CIFAR100_URL``.
        subset: draw tasks from only this many of the split's classes, a fixed subset
            (:func:`~metalearn.data.few_shot.class_subset`, whatever ``seed`` is);
            ``None``: all of them.

    Example:
        >>> from metalearn.data import FC100Tasks
        >>> FC100Tasks(root="/nonexistent", split="test")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metalearn.data.image_sets.DatasetNotFoundError: CIFAR-100 data not found: ...
    """

    _title = "FC100"
    _splits = FC100

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
        url: str | None = None,
        subset: int | None = None,
    ) -> None:
        super().__init__(root, split, ways, shots, queries, seed, download, transform=transform,
                         class_augment=class_augment, progress=progress, url=url,
                         subset=subset)
