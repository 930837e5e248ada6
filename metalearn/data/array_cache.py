"""Decoded-data caches that check their content before use.

A cache is an ``.npy`` file plus a one-line digest file beside it (``<name>.npy.digest``,
``crc32:<8 hex digits>`` of the array's bytes). :func:`load_array` returns the array only
if it reads completely, has the expected shape and dtype, and matches its digest; any
other cache (unreadable, truncated, empty, edited, or without a digest) is reported in
one :class:`CacheWarning` line, deleted, and the caller rebuilds it from the source.

crc32 because it is the cheapest check that catches changed bytes: about 7 ms for the
25 MB Omniglot array, where a cryptographic hash would take 20 to 40 ms; the digest guards
against damage and stray writes, not against someone forging a cache.
"""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

import numpy as np

from metalearn.checkpoint import atomic_write


class CacheWarning(UserWarning):
    """A cache could not be used (unreadable, truncated, altered) and is being rebuilt."""


def digest_path(path: str | os.PathLike) -> Path:
    """The digest file of cache ``path``: ``<path>.digest`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".digest")


def array_digest(array: np.ndarray) -> str:
    """``crc32:<hex>`` of the array's bytes in C order."""
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    return f"crc32:{zlib.crc32(data):08x}"


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as ``.npy``, then its digest; each file atomically.

    A kill between the two leaves an array without a digest, which :func:`load_array`
    rebuilds rather than trusts.

    Args:
        path: the ``.npy`` file; its folder is created if missing.
        array: what to cache.

    Raises:
        OSError: the folder cannot be written.
    """
    path = Path(path)
    digest = array_digest(array)
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    atomic_write(digest_path(path), lambda f: f.write(f"{digest}\n".encode()))


def _problem(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray | None, str]:
    try:
        expected = digest_path(path).read_text().strip()
    except FileNotFoundError:
        return None, "has no digest (written by an older metalearn, or cut short)"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"has an unreadable digest file ({type(err).__name__}: {err})"
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - np.load raises many types for bad bytes
        reason = str(err).splitlines()[0] if str(err) else ""
        return None, f"cannot be read ({type(err).__name__}: {reason})"
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else "no array"
        return None, f"holds {got}, not {np.dtype(dtype)} {shape}"
    actual = array_digest(array)
    if actual != expected:
        return None, f"does not match its digest ({actual}, expected {expected})"
    return array, ""


def load_array(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    dtype: np.dtype | type,
    *,
    what: str = "cache",
    source: str = "the source files",
    stacklevel: int = 2,
) -> np.ndarray | None:
    """The cached array at ``path`` if it is present and checks out, else ``None``.

    A present cache that fails a check is reported in one :class:`CacheWarning` line and
    deleted (with its digest), so the caller rebuilds it; an absent one is not reported.

    Args:
        path: the ``.npy`` file written by :func:`save_array`.
        shape: the shape it must have.
        dtype: the dtype it must have.
        what: how the warning names the cache, e.g. ``"the Omniglot cache"``.
        source: how the warning names what it is rebuilt from, e.g. ``"the zips"``.
        stacklevel: passed to :func:`warnings.warn` (2 = the caller).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.npy"
        >>> save_array(p, np.arange(3, dtype=np.uint8))
        >>> load_array(p, (3,), np.uint8)
        array([0, 1, 2], dtype=uint8)
    """
    path = Path(path)
    if not path.is_file():
        return None
    array, problem = _problem(path, tuple(shape), np.dtype(dtype))
    if array is not None:
        return array
    warnings.warn(f"{what} {path} {problem}; rebuilding it from {source}",
                  CacheWarning, stacklevel=stacklevel + 1)
    for f in (path, digest_path(path)):
        try:
            f.unlink(missing_ok=True)
        except OSError:  # a read-only cache folder: it is rebuilt in memory each time
            pass
    return None
