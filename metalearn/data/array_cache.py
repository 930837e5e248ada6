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
from collections.abc import Iterable
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


def save_array_chunks(path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype | type,
                      chunks: Iterable[np.ndarray]) -> None:
    """Like :func:`save_array` for an array built piece by piece: ``chunks`` are its rows in
    order (each ``(n, *shape[1:])``), written as they come, so the whole array never has to
    be in memory (a 9 GB decoded dataset). Nothing is left under ``path`` unless every row
    arrived; the digest is written last.

    Raises:
        ValueError: the chunks do not add up to ``shape`` or have another dtype or row shape.
        OSError: the folder cannot be written.
    """
    path, dtype, shape = Path(path), np.dtype(dtype), tuple(shape)
    crc, rows = 0, 0

    def write(f) -> None:
        nonlocal crc, rows
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_2_0(f, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk)
            if chunk.dtype != dtype or chunk.shape[1:] != shape[1:]:
                raise ValueError(f"chunk of {chunk.dtype} {chunk.shape} does not fit an array "
                                 f"of {dtype} {shape}")
            rows += chunk.shape[0]
            if rows > shape[0]:
                raise ValueError(f"more than the {shape[0]} rows of {shape}")
            data = memoryview(chunk).cast("B")
            crc = zlib.crc32(data, crc)
            f.write(data)
        if rows != shape[0]:
            raise ValueError(f"{rows} rows arrived, {shape[0]} expected")

    atomic_write(path, write)
    atomic_write(digest_path(path), lambda f: f.write(f"crc32:{crc:08x}\n".encode()))


def _crc32(array: np.ndarray) -> str:
    """``array_digest`` read in 64 MB pieces, so a memory-mapped array is not read at once."""
    flat, crc, step = array.reshape(-1).view(np.uint8), 0, 1 << 26
    for s in range(0, flat.size, step):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(flat[s:s + step])), crc)
    return f"crc32:{crc:08x}"


def _problem(path: Path, shape: tuple[int, ...] | None, dtype: np.dtype,
             mmap: bool = False) -> tuple[np.ndarray | None, str]:
    try:
        expected = digest_path(path).read_text().strip()
    except FileNotFoundError:
        return None, "has no digest (written by an older metalearn, or cut short)"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"has an unreadable digest file ({type(err).__name__}: {err})"
    try:
        # "c" (copy-on-write): pages are read on demand and shared, and torch.from_numpy
        # gets a writable array (no warning); a write would stay in this process.
        array = np.load(path, allow_pickle=False, mmap_mode="c" if mmap else None)
    except Exception as err:  # noqa: BLE001 - np.load raises many types for bad bytes
        reason = str(err).splitlines()[0] if str(err) else ""
        return None, f"cannot be read ({type(err).__name__}: {reason})"
    if (not isinstance(array, np.ndarray) or (shape is not None and array.shape != shape)
            or array.dtype != dtype):
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else "no array"
        return None, f"holds {got}, not {np.dtype(dtype)} {shape or '(any shape)'}"
    actual = _crc32(array) if mmap else array_digest(array)
    if actual != expected:
        return None, f"does not match its digest ({actual}, expected {expected})"
    return array, ""


def load_array(
    path: str | os.PathLike,
    shape: tuple[int, ...] | None,
    dtype: np.dtype | type,
    *,
    what: str = "cache",
    source: str = "the source files",
    stacklevel: int = 2,
    mmap: bool = False,
) -> np.ndarray | None:
    """The cached array at ``path`` if it is present and checks out, else ``None``.

    A present cache that fails a check is reported in one :class:`CacheWarning` line and
    deleted (with its digest), so the caller rebuilds it; an absent one is not reported.

    Args:
        path: the ``.npy`` file written by :func:`save_array`.
        shape: the shape it must have (``None``: any shape).
        dtype: the dtype it must have.
        what: how the warning names the cache, e.g. ``"the Omniglot cache"``.
        source: how the warning names what it is rebuilt from, e.g. ``"the zips"``.
        stacklevel: passed to :func:`warnings.warn` (2 = the caller).
        mmap: map the file instead of reading it (copy-on-write): for arrays larger than
            memory. The digest is still checked, reading the file once.

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
    array, problem = _problem(path, None if shape is None else tuple(shape), np.dtype(dtype),
                              mmap)
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
