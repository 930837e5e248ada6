"""The Omniglot image set on disk: find, download, verify and decode the two zips.

The two archives ``images_background.zip`` (964 characters) and ``images_evaluation.zip``
(659 characters) are read straight from the zip, never extracted, and decoded once into a
``uint8`` array of shape ``(1623, 20, 28, 28)`` that is cached on disk and in memory.

Character order: background then evaluation, each sorted by entry path in byte order
(alphabet, then ``characterNN``), which is also torchvision's order. Drawing order: by
file name, ``<id>_01.png`` … ``<id>_20.png``. Pixel values are ink intensities: 255 is
ink, 0 is background (the PNGs are inverted, as the MAML reference does).

Integrity is checked on the content, not on the zip bytes: the number of alphabets,
characters and drawings, and a digest over the PNG files (sha256 of the lines
``f"{md5(png)}  {path}\\n"`` sorted by path, the ``find | sort | xargs md5sum | sha256sum``
of an unzipped copy). :func:`verify_archive` accepts a zip whose md5 is the canonical one
without that scan; decoding reads every PNG anyway, so it always checks the digest.

The decoded array's cache carries a digest of its own (see :mod:`metalearn.data.array_cache`):
a cache that is unreadable, truncated or altered is reported in one warning line and
decoded again from the zips, never used.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metalearn.data.array_cache import CacheWarning, load_array, save_array

ARCHIVE_NAMES = ("images_background", "images_evaluation")
DEFAULT_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
NUM_CHARACTERS = 1623
NUM_BACKGROUND = 964  # characters 0..963 come from images_background.zip
DRAWINGS = 20
IMAGE_SIZE = 28
# Bump when the decoding changes, so old caches are not reused.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ArchiveSpec:
    """What a genuine archive holds."""

    name: str
    md5: str  # md5 of the canonical zip file (fast path only)
    content_sha256: str  # digest of the PNG contents, independent of zip metadata
    alphabets: int
    characters: int


SPECS = {
    "images_background": ArchiveSpec(
        "images_background",
        "68d2efa1b9178cc56df9314c21c6e718",
        "d138e0645731c43778fca707f1652677a54e641331bcec4aa20b21b4a0de7de5",
        30,
        964,
    ),
    "images_evaluation": ArchiveSpec(
        "images_evaluation",
        "6b91aef0f799c5bb55b94e3f2daec811",
        "5eb49863a1612a3f07ef7610462bbafe5badbf9a24236991809627d606d1de95",
        20,
        659,
    ),
}


class OmniglotError(Exception):
    """Base class of the errors raised for missing, bad or undownloadable Omniglot data."""


class OmniglotNotFoundError(OmniglotError, FileNotFoundError):
    """The zips are in none of the places searched and ``download`` was not requested."""


class OmniglotIntegrityError(OmniglotError, ValueError):
    """A zip is truncated, corrupt, unsafe or does not hold the Omniglot images."""


class OmniglotDownloadError(OmniglotError, OSError):
    """A download failed; nothing was saved."""


class _Bad(Exception):
    """Internal: what is wrong with an archive, worded by the caller for its context."""


def data_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``omniglot/`` folders searched: ``root`` alone if given (a wrong root is an error,
    not a silent fall-back), else ``$METALEARN_DATA``, then ``~/.cache/metalearn``."""
    if root is not None:
        return [Path(root).expanduser().absolute() / "omniglot"]
    bases = [os.environ.get("METALEARN_DATA") or None, Path.home() / ".cache" / "metalearn"]
    dirs: list[Path] = []
    for base in bases:
        # Absolute, so messages name real places even for a relative $METALEARN_DATA.
        if base is not None and (d := Path(base).expanduser().absolute() / "omniglot") not in dirs:
            dirs.append(d)
    return dirs


def cache_dir() -> Path:
    """Where decoded arrays go: ``$METALEARN_CACHE``, else ``~/.cache/metalearn/omniglot``."""
    env = os.environ.get("METALEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metalearn" / "omniglot"


def _fix_hint() -> str:
    return (
        "Delete it and re-run with download=True, or point root= / METALEARN_DATA at a "
        "directory whose omniglot/ folder holds a good copy."
    )


def find_archives(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Return the path of each zip, taking the first of :func:`data_dirs` that holds it.

    Raises:
        OmniglotNotFoundError: a zip is in none of them; the message lists every place.
    """
    found, missing = {}, []
    for name in ARCHIVE_NAMES:
        hits = [d / f"{name}.zip" for d in data_dirs(root) if (d / f"{name}.zip").is_file()]
        if hits:
            found[name] = hits[0]
        else:
            missing.append(f"{name}.zip")
    if missing:
        places = "\n".join(f"  {d}" for d in data_dirs(root))
        if root is None and not os.environ.get("METALEARN_DATA"):
            places += "\n  ($METALEARN_DATA is not set)"
        verb = "is" if len(missing) == 1 else "are"
        raise OmniglotNotFoundError(
            f"Omniglot data not found: {' and '.join(missing)} {verb} in none of these folders:"
            f"\n{places}\nTo get it, pass download=True (it downloads into the first folder), "
            "or put images_background.zip and images_evaluation.zip in an omniglot/ folder and "
            "pass its parent as root= or set METALEARN_DATA to it."
        )
    return found


def _file_hashes(path: Path, md5: bool = True) -> tuple[str | None, str]:
    """(md5, sha256) of a file; md5 None unless asked for (it costs as much as sha256)."""
    md5_ = hashlib.md5() if md5 else None
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if md5_ is not None:
                md5_.update(chunk)
            sha.update(chunk)
    return (md5_.hexdigest() if md5_ is not None else None), sha.hexdigest()


def _read_checked(path: Path, spec: ArchiveSpec) -> list[list[bytes]]:
    """The PNG bytes of each character (20 each), after every content check; raises _Bad."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:  # reject zip-slip names before reading anything
                name = info.filename
                if (
                    name.startswith(("/", "\\"))
                    or re.match(r"[A-Za-z]:", name)
                    or (".." in PurePosixPath(name.replace("\\", "/")).parts)
                ):
                    raise _Bad(f"unsafe entry name {name!r} (absolute path or '..')")
            pngs = []
            for info in infos:
                parts = info.filename.rstrip("/").split("/")
                if info.is_dir() and len(parts) <= 3 and parts[0] == spec.name:
                    continue
                if len(parts) != 4 or parts[0] != spec.name or not parts[3].endswith(".png"):
                    raise _Bad(f"unexpected entry {info.filename!r}")
                pngs.append(info.filename)
            # Byte order of the full path (= str order for UTF-8 names): the order the digest
            # is defined on. A folder's files are contiguous in it, so grouping keeps order.
            pngs.sort()
            chars: dict[str, list[str]] = {}
            for name in pngs:
                chars.setdefault(name.rsplit("/", 1)[0], []).append(name)
            alphabets = {c.split("/")[1] for c in chars}
            if len(alphabets) != spec.alphabets or len(chars) != spec.characters:
                raise _Bad(
                    f"{len(alphabets)} alphabets and {len(chars)} characters, expected "
                    f"{spec.alphabets} and {spec.characters}"
                )
            bad = [c for c, files in chars.items() if len(files) != DRAWINGS]
            if bad:
                raise _Bad(f"{bad[0]} (and {len(bad) - 1} more) do not hold {DRAWINGS} PNGs")
            digest, out = hashlib.sha256(), []
            for files in chars.values():
                out.append([])
                for name in files:
                    out[-1].append(data := zf.read(name))  # zipfile checks each CRC
                    digest.update(f"{hashlib.md5(data).hexdigest()}  {name}\n".encode())
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        OSError,
        NotImplementedError,
    ) as e:
        raise _Bad(f"cannot be read as a zip ({type(e).__name__}: {e})") from e
    if digest.hexdigest() != spec.content_sha256:
        raise _Bad(
            f"content digest {digest.hexdigest()} differs from the expected "
            f"{spec.content_sha256} (the PNG files are not the Omniglot ones)"
        )
    return out


def verify_archive(path: str | os.PathLike, name: str) -> None:
    """Check that ``path`` is a good copy of archive ``name`` (e.g. ``"images_background"``).

    A file with the canonical md5 passes at once; any other is checked on its content.

    Raises:
        OmniglotIntegrityError: the file is truncated, corrupt, unsafe or not Omniglot.
    """
    path, spec = Path(path), SPECS[name]
    if _file_hashes(path)[0] == spec.md5:
        return
    try:
        _read_checked(path, spec)
    except _Bad as e:
        raise OmniglotIntegrityError(f"{path} is not a good {name}.zip: {e}. {_fix_hint()}") from e


def _download_one(name: str, dest: Path, base_url: str, progress: bool) -> Path:
    url = f"{base_url.rstrip('/')}/{name}.zip"
    final = dest / f"{name}.zip"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.zip.", suffix=".part")
    except OSError as e:
        raise OmniglotDownloadError(
            f"cannot write the Omniglot download into {dest} ({e}); pass root= (or set "
            "METALEARN_DATA to) a writable directory"
        ) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    total = resp.headers.get("Content-Length")
                    total = int(total) if total and total.isdigit() else None
                    done = 0
                    with tqdm(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        desc=f"{name}.zip",
                        disable=not progress,
                    ) as bar:
                        while chunk := resp.read(1 << 16):
                            f.write(chunk)
                            done += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                raise OmniglotDownloadError(
                    f"downloading {url} failed ({type(e).__name__}: {e}); nothing was saved as "
                    f"{final}. Check the address, or pass url= / set METALEARN_OMNIGLOT_URL "
                    "to a mirror, or copy the zips there by hand."
                ) from e
            if total is not None and done != total:
                raise OmniglotDownloadError(
                    f"downloading {url} stopped after {done} of {total} bytes; nothing was "
                    f"saved as {final}. Re-run with download=True."
                )
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes it private; the data may be shared
        try:
            verify_archive(tmp, name)
        except OmniglotIntegrityError as e:
            problem = str(e.__cause__) if e.__cause__ else str(e)
            raise OmniglotIntegrityError(
                f"the file downloaded from {url} is not a good {name}.zip: {problem}. It was "
                f"deleted and nothing was saved as {final}. Re-run with download=True, or pass "
                "url= / set METALEARN_OMNIGLOT_URL to a good mirror."
            ) from None
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def download_archives(
    root: str | os.PathLike | None = None, url: str | None = None, progress: bool = True
) -> dict[str, Path]:
    """Find the zips, downloading each missing one into the first of :func:`data_dirs`.

    Each download goes to a temporary file in the same folder, is verified, and only then
    renamed to its final name; on any failure the temporary file is removed.

    Args:
        root: folder holding ``omniglot/`` (else ``$METALEARN_DATA``, else ``~/.cache/metalearn``).
        url: base URL of the zips; else ``$METALEARN_OMNIGLOT_URL``, else :data:`DEFAULT_URL`.
        progress: show tqdm progress bars.
    """
    base = url or os.environ.get("METALEARN_OMNIGLOT_URL") or DEFAULT_URL
    try:
        return find_archives(root)
    except OmniglotNotFoundError:
        pass
    dest = data_dirs(root)[0]
    for name in ARCHIVE_NAMES:
        if not any((d / f"{name}.zip").is_file() for d in data_dirs(root)):
            _download_one(name, dest, base, progress)
    return find_archives(root)


def _decode(pngs: list[list[bytes]], out: np.ndarray, bar: tqdm) -> None:
    for c, drawings in enumerate(pngs):
        for d, data in enumerate(drawings):
            with Image.open(io.BytesIO(data)) as im:
                # The PNGs are mode "1", and Pillow silently resizes mode "1" with NEAREST
                # whatever filter is asked; converting to "L" first makes Lanczos apply.
                small = im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
            out[c, d] = 255 - np.asarray(small, dtype=np.uint8)  # ink = 255
            bar.update(1)


def cache_path(sha256s: dict[str, str]) -> Path:
    """The cache file for zips with these sha256s (a new source gives a new file); its
    digest is ``<name>.digest`` beside it."""
    keys = "-".join(sha256s[n][:16] for n in ARCHIVE_NAMES)
    return cache_dir() / f"omniglot-{IMAGE_SIZE}px-f{CACHE_FORMAT}-{keys}.npy"


def _load_or_decode(paths: dict[str, Path], progress: bool) -> np.ndarray:
    # The cache key needs only the sha256; skipping the md5 pays for the cache's crc32.
    sha = {n: _file_hashes(p, md5=False)[1] for n, p in paths.items()}
    target = cache_path(sha)
    shape = (NUM_CHARACTERS, DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
    cached = load_array(target, shape, np.uint8, what="the Omniglot cache",
                        source="the zips", stacklevel=3)
    if cached is not None:
        return cached
    pngs = []
    for name in ARCHIVE_NAMES:
        try:
            pngs += _read_checked(paths[name], SPECS[name])
        except _Bad as e:
            raise OmniglotIntegrityError(
                f"{paths[name]} is not a good {name}.zip: {e}. {_fix_hint()}"
            ) from e
    array = np.empty(shape, dtype=np.uint8)
    with tqdm(
        total=NUM_CHARACTERS * DRAWINGS, unit="img", desc="Decoding Omniglot", disable=not progress
    ) as bar:
        _decode(pngs, array, bar)
    try:
        save_array(target, array)
    except OSError as e:
        warnings.warn(
            f"could not write the Omniglot cache {target} ({e}); it will be decoded again next "
            "time. Set METALEARN_CACHE to a writable directory.",
            CacheWarning,
            stacklevel=3,
        )
    return array


_MEMO: dict[tuple, torch.Tensor] = {}
_MEMO_LOCK = threading.Lock()


def load_images(
    root: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """All Omniglot images as a ``uint8`` tensor ``(1623, 20, 28, 28)``, ink = 255.

    The first call decodes the zips (a few seconds) and writes the cache; later calls read
    the cache, and later calls in the same process return the same tensor (do not modify
    it in place).

    Args:
        root: folder holding ``omniglot/``; see :func:`data_dirs` for the search order.
        download: download missing zips (see :func:`download_archives`).
        url: base URL for the download.
        progress: show tqdm progress bars.

    Example:
        >>> from metalearn.data.omniglot_archive import load_images
        >>> images = load_images(progress=False)
        >>> tuple(images.shape), images.dtype
        ((1623, 20, 28, 28), torch.uint8)
    """
    paths = download_archives(root, url, progress) if download else find_archives(root)
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths.values())
    with _MEMO_LOCK:
        if key not in _MEMO:
            _MEMO[key] = torch.from_numpy(_load_or_decode(paths, progress))
        return _MEMO[key]


def clear_memo() -> None:
    """Forget the in-process copies (the on-disk cache stays)."""
    with _MEMO_LOCK:
        _MEMO.clear()
