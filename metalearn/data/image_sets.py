"""What the benchmark loaders share: where their files are, the errors, safe pickles, image
decoding and the decoded-array cache.

Each benchmark (miniImageNet, tieredImageNet, CIFAR-FS and FC100) is decoded once into a
``uint8`` array ``(n, 3, H, W)`` plus an ``int64`` label per image, cached as two ``.npy``
files with digests (:mod:`metalearn.data.array_cache`), named after the source files'
sha256, and memory-mapped when used, so a split larger than memory works.

Folders, as for Omniglot: ``root/<folder>`` when ``root`` is given, else
``$METALEARN_DATA/<folder>``, then ``~/.cache/metalearn/<folder>``. Caches go to
``$METALEARN_CACHE``, else ``~/.cache/metalearn/<folder>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metalearn.checkpoint import atomic_write
from metalearn.data.array_cache import CacheWarning, load_array, save_array_chunks
from metalearn.data.few_shot import FewShotTasks, class_subset
from metalearn.data.validation import check_positive_int

SPLITS = ("train", "val", "test")
# Test hook: accept data holding a subset of a benchmark's published classes and images
# (the tests' small fixtures). Never set outside tests: it turns the count checks off.
_ALLOW_SUBSET = False


class DatasetError(Exception):
    """Base class of the errors raised for missing, bad or undownloadable benchmark data."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The files are in none of the places searched (and cannot be downloaded)."""


class DatasetIntegrityError(DatasetError, ValueError):
    """A file is truncated, corrupt, unsafe, or does not hold the published data."""


class DatasetDownloadError(DatasetError, OSError):
    """A download failed; nothing was saved."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return split


def data_dirs(folder: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The ``<folder>/`` folders searched: under ``root`` alone if given (a wrong root is an
    error, not a silent fall-back), else under ``$METALEARN_DATA``, then ``~/.cache/metalearn``."""
    if root is not None:
        return [Path(root).expanduser().absolute() / folder]
    bases = [os.environ.get("METALEARN_DATA") or None, Path.home() / ".cache" / "metalearn"]
    dirs: list[Path] = []
    for base in bases:
        if base is not None and (d := Path(base).expanduser().absolute() / folder) not in dirs:
            dirs.append(d)
    return dirs


def places(folder: str, root: str | os.PathLike | None) -> str:
    """The searched folders, one per line, for a not-found message."""
    text = "\n".join(f"  {d}" for d in data_dirs(folder, root))
    if root is None and not os.environ.get("METALEARN_DATA"):
        text += "\n  ($METALEARN_DATA is not set)"
    return text


def cache_dir(folder: str) -> Path:
    """Where decoded arrays go: ``$METALEARN_CACHE``, else ``~/.cache/metalearn/<folder>``."""
    env = os.environ.get("METALEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metalearn" / folder


_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path, folder: str) -> str:
    """sha256 of a file, remembered by (path, size, mtime) in this process and in the cache
    folder, so gigabytes of pickles are hashed once, not at every start; a changed file
    (new size or mtime) is hashed again."""
    st = path.stat()
    real = str(path.resolve())
    key = (real, st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    memo = cache_dir(folder) / "hashes" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if [saved["path"], saved["size"], saved["mtime_ns"]] == list(key):
            _HASHES[key] = saved["sha256"]
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    _HASHES[key] = digest = h.hexdigest()
    record = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        atomic_write(memo, lambda f: f.write(json.dumps(record).encode()))
    except OSError:  # a read-only cache: hashed again next time
        pass
    return digest


def listing_sha256(paths: Iterable[Path]) -> str:
    """sha256 of the names, sizes and mtimes of many small files (an image folder): a key
    that changes when any of them does, without reading tens of thousands of files."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# -- pickles -----------------------------------------------------------------------------
def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2 (numpy.core warns there)
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


class _DataUnpickler(pickle.Unpickler):
    """Unpickles arrays, lists, dicts, strings and numbers only: a data pickle has no
    business naming any other Python object, and unpickling one could run code."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and \
                name in ("_reconstruct", "scalar"):
            return getattr(_multiarray(), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            import numpy.dtypes

            return getattr(numpy.dtypes, name)
        if (module, name) in {("_codecs", "encode"), ("collections", "OrderedDict"),
                              ("builtins", "bytearray")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a data pickle should "
                                     "not; refusing to load it")


def load_pickle(source: Path | bytes, what: str, fix: str, name: str | None = None) -> object:
    """A data pickle (Python 2 or 3) from a file or bytes, read safely; any failure is a
    :class:`DatasetIntegrityError` naming ``name`` (default: the file)."""
    name = name or str(source)
    try:
        if isinstance(source, bytes):
            return _DataUnpickler(io.BytesIO(source), encoding="latin1").load()
        with open(source, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OSError, ModuleNotFoundError) as err:
        reason = str(err).splitlines()[0] if str(err) else "cut short"
        raise DatasetIntegrityError(
            f"{name} is not a good {what}: it cannot be read as a data pickle "
            f"({type(err).__name__}: {reason}). {fix}") from None


def str_keys(d: object, path: Path | str, what: str, keys: tuple[str, ...], fix: str) -> dict:
    """``d`` as a dict with str keys (Python 2 pickles have bytes keys), holding ``keys``."""
    if not isinstance(d, dict):
        raise DatasetIntegrityError(f"{path} is not a good {what}: it holds a "
                                    f"{type(d).__name__}, not a dict. {fix}")
    out = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    missing = [k for k in keys if k not in out]
    if missing:
        raise DatasetIntegrityError(f"{path} is not a good {what}: it has no "
                                    f"{', '.join(map(repr, missing))} entry. {fix}")
    return out


def as_text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# -- images ------------------------------------------------------------------------------
def decode_image(data: bytes, size: int, name: str, fix: str) -> np.ndarray:
    """An encoded image (JPEG, PNG) as RGB uint8 ``(3, size, size)``, Lanczos-resized if it
    is another size (as the miniImageNet tools' ``resize((84, 84), LANCZOS)``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetIntegrityError(f"{name} cannot be decoded as an image "
                                    f"({type(err).__name__}: {err}). {fix}") from None


# -- the decoded cache -------------------------------------------------------------------
@dataclass
class Decoded:
    """What a loader's ``build`` returns: labels, the image shape and the images in order."""

    labels: np.ndarray  # (n,) int64, an index into the split's class list
    image_shape: tuple[int, ...]  # (3, H, W)
    chunks: Iterable[np.ndarray]  # uint8 (m, 3, H, W) pieces, in label order


_FORMAT = 1  # bump when decoding changes, so old caches are not reused


def load_or_build(folder: str, stem: str, key: str, build: Callable[[], Decoded],
                  what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 ``(n, 3, H, W)``, labels int64 ``(n,)``) from the cache named by
    ``stem`` and ``key``, built with ``build()`` and cached if absent or damaged.

    The images are memory-mapped: pages are read when a batch needs them.
    """
    base = cache_dir(folder) / f"{stem}-f{_FORMAT}-{key[:16]}"
    images_path, labels_path = base.with_suffix(".images.npy"), base.with_suffix(".labels.npy")
    labels = load_array(labels_path, None, np.int64, what=f"the {what} cache",
                        source="the source files", stacklevel=3)
    images = None
    if labels is not None and labels.ndim == 1:
        shape = load_shape(images_path)
        if shape is not None and shape[0] == len(labels):
            images = load_array(images_path, shape, np.uint8, what=f"the {what} cache",
                                source="the source files", stacklevel=3, mmap=True)
    if images is None:
        decoded = build()
        labels = np.ascontiguousarray(decoded.labels, dtype=np.int64)
        shape = (len(labels), *decoded.image_shape)
        try:
            save_array_chunks(images_path, shape, np.uint8, decoded.chunks)
            save_array_chunks(labels_path, labels.shape, np.int64, [labels])
            images = load_array(images_path, shape, np.uint8, mmap=True)
        except OSError as err:
            images = None
            warnings.warn(f"could not write the {what} cache {images_path} ({err}); it will be "
                          "decoded again next time. Set METALEARN_CACHE to a writable "
                          "directory.", CacheWarning, stacklevel=3)
        if images is None:  # unwritable cache: decode into memory instead
            images = np.empty(shape, np.uint8)
            row = 0
            for chunk in build().chunks:
                images[row: row + len(chunk)] = chunk
                row += len(chunk)
    return torch.from_numpy(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def load_shape(path: Path) -> tuple[int, ...] | None:
    """The shape in an ``.npy`` header, or ``None`` if it cannot be read (rebuilt then)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, _ = read(f)
        return tuple(shape)
    except (OSError, ValueError):
        return None


def check_counts(what: str, split: str, labels: np.ndarray, names: list[str],
                 per_class: int | None, total: int | None, fix: str, source: Path) -> None:
    """The published class and image counts of a split (unless the test hook is set)."""
    counts = np.bincount(labels, minlength=len(names)) if len(labels) else np.zeros(len(names))
    if _ALLOW_SUBSET:
        if not counts.any():
            raise DatasetIntegrityError(f"{source} holds no {what} {split} images. {fix}")
        return
    missing = [names[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise DatasetIntegrityError(
            f"{source} holds {len(names) - len(missing)} of the {len(names)} {what} {split} "
            f"classes (no images of {', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}): it is "
            f"incomplete. {fix}")
    if per_class is not None and (counts != per_class).any():
        i = int(np.flatnonzero(counts != per_class)[0])
        raise DatasetIntegrityError(
            f"{source}: {what} class {names[i]} has {int(counts[i])} {split} images, not "
            f"{per_class}: the data are incomplete or not the published ones. {fix}")
    if total is not None and len(labels) != total:
        raise DatasetIntegrityError(
            f"{source} holds {len(labels)} {what} {split} images, not the published "
            f"{total}: the data are incomplete or not the published ones. {fix}")


# -- downloads ---------------------------------------------------------------------------
def download_file(url: str, final: Path, verify: Callable[[Path], None], what: str,
                  url_hint: str, progress: bool) -> Path:
    """Download ``url`` to a temporary file beside ``final``, ``verify`` it, then rename it;
    on any failure nothing is left behind and ``final`` is untouched.

    ``verify(path)`` raises :class:`DatasetIntegrityError` for a bad file.
    """
    import http.client
    import tempfile
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.",
                                        suffix=".part")
    except OSError as e:
        raise DatasetDownloadError(
            f"cannot write the {what} download into {final.parent} ({e}); pass root= (or set "
            "METALEARN_DATA to) a writable directory") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    total = resp.headers.get("Content-Length")
                    total = int(total) if total and total.isdigit() else None
                    done = 0
                    with tqdm(total=total, unit="B", unit_scale=True, desc=final.name,
                              disable=not progress) as bar:
                        while chunk := resp.read(1 << 16):
                            f.write(chunk)
                            done += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                raise DatasetDownloadError(
                    f"downloading {url} failed ({type(e).__name__}: {e}); nothing was saved as "
                    f"{final}. Check the address, or {url_hint} to a mirror, or copy the file "
                    "there by hand.") from e
            if total is not None and done != total:
                raise DatasetDownloadError(
                    f"downloading {url} stopped after {done} of {total} bytes; nothing was "
                    f"saved as {final}. Re-run with download=True.")
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes it private; the data may be shared
        try:
            verify(tmp)
        except DatasetIntegrityError as e:
            raise DatasetIntegrityError(
                f"the file downloaded from {url} is not a good {final.name}: "
                f"{str(e).strip().removeprefix(str(tmp)).lstrip(': ')} It was "
                f"deleted and nothing was saved as {final}. Re-run with download=True, or "
                f"{url_hint} to a good mirror.") from None
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


# -- the samplers' common part -----------------------------------------------------------
class BenchmarkTasks(FewShotTasks):
    """A :class:`FewShotTasks` over one split of a benchmark's decoded images: the
    counts are checked before any file is touched, then :meth:`_load` gives the images and
    labels and :meth:`_classes` the label values of the split's classes (present ones)."""

    _title = "benchmark"
    _per_class: int | None = None  # images per class, where the benchmark has a fixed number
    _splits: dict[str, tuple[str, ...]] = {}

    def __init__(self, root, split, ways, shots, queries, seed, download, *, transform,
                 class_augment, progress, subset=None, **source) -> None:
        check_positive_int("ways", ways)
        check_positive_int("shots", shots)
        check_positive_int("queries", queries)
        check_split(split)
        names = self._splits[split]
        if subset is not None:  # checked before any file is touched, as the rest
            class_subset(torch.arange(len(names)), subset, ways)
        if ways > len(names):
            raise ValueError(f"ways={ways} but the {self._title} {split!r} split has only "
                             f"{len(names)} classes; use ways <= {len(names)}")
        if self._per_class is not None and shots + queries > self._per_class:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries}, but each "
                f"{self._title} class has only {self._per_class} images; lower shots or queries")
        self.split, self.root = split, root
        images, labels = self._load(root, split, download, progress, **source)
        classes = self._classes(split, labels)
        if subset is not None:
            classes = class_subset(classes, subset, ways)
        super().__init__(images, labels, ways, shots, queries, seed, classes=classes,
                         transform=transform, class_augment=class_augment)

    def _load(self, root, split, download, progress, **source):
        raise NotImplementedError

    def _classes(self, split: str, labels: torch.Tensor) -> torch.Tensor:
        """Label values of the split's classes, in the split's order (labels index the
        split's class list unless a loader says otherwise)."""
        present = torch.unique(labels)
        return present

    @property
    def class_names(self) -> list[str]:
        """Names of :attr:`classes` (synset ids, CIFAR-100 names), in order."""
        names = self._splits[self.split]
        return [names[int(c)] for c in self.classes]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, classes={self.num_classes}, "
                f"ways={self.ways}, shots={self.shots}, queries={self.queries}, "
                f"seed={self.seed})")
