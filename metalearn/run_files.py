"""One run per checkpoint path, and the path checked before any training.

:func:`claim_checkpoint` is what :func:`metalearn.train` does with its ``checkpoint``
before the first iteration: check that the path can be written (not a directory, parent a
writable folder, names short enough for the temp files), take an advisory lock on
``<checkpoint>.lock`` for the run's life (a second run on the path is refused at once,
naming the holder's PID), refuse a fresh run on a path that already holds a run's files
unless told to overwrite them, and remove temp files left by a save that was killed.

Errors are worded for the library (``checkpoint=``, ``overwrite=True``); the command line
prints them with its flags through :meth:`RunFileError.worded`.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from metalearn.checkpoint import CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, runs are not serialised
    fcntl = None

# mkstemp's random part: 8 characters of this set (CPython's tempfile._RandomNameSequence).
_TEMP_RANDOM = r"[a-z0-9_]{8}"
_TEMP_EXTRA = len(".") + len(".") + 8 + len(".tmp")  # ".NAME." + random + ".tmp"


@dataclass(frozen=True)
class Wording:
    """How the caller names the checkpoint path and the two ways past an existing run."""

    checkpoint: str  # formats the path: "checkpoint={}" or "--checkpoint {}"
    another: str  # "another checkpoint path" or "another --checkpoint"
    resume: str
    overwrite: str


LIBRARY = Wording("checkpoint={}", "another checkpoint path", "resume=True", "overwrite=True")
CLI = Wording("--checkpoint {}", "another --checkpoint", "--resume", "--overwrite")


class RunFileError(Exception):
    """An error whose message names the caller's arguments; ``str()`` uses the library's."""

    def __init__(self, template: str, **values) -> None:
        self.template, self.values = template, values
        super().__init__(self.worded(LIBRARY))

    def worded(self, words: Wording) -> str:
        """The message in ``words`` (:data:`LIBRARY` or :data:`CLI`)."""
        names = asdict(words)
        names["checkpoint"] = words.checkpoint.format(self.values.get("path", ""))
        return self.template.format(**names, **self.values)


class CheckpointPathError(RunFileError, ValueError):
    """The checkpoint path cannot be written, or holds another run's files."""


class CheckpointBusyError(RunFileError, CheckpointError):
    """Another live run holds the checkpoint path's lock."""


def lock_path(checkpoint: Path) -> Path:
    """The lock file of a checkpoint: ``<checkpoint>.lock`` beside it."""
    return checkpoint.with_name(checkpoint.name + ".lock")


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_name(checkpoint: Path) -> None:
    if checkpoint.name in ("", ".", ".."):
        raise CheckpointPathError("{checkpoint} names a directory; give a file path such as "
                                  "{example}", path=str(checkpoint),
                                  example=str(checkpoint / "run.pt"))


def check_checkpoint_path(checkpoint: Path, files: Sequence[Path]) -> None:
    """Raise :class:`CheckpointPathError` if the run's files cannot be written at
    ``checkpoint``: a directory in the way, a parent that is a file or not writable, a name
    too long once the temp-file prefix and suffix are added. Creates nothing.

    Args:
        checkpoint: the latest-state checkpoint path.
        files: every file the run writes beside it (checkpoint, best model, log).
    """
    path = str(checkpoint)
    _check_name(checkpoint)
    if len(set(files)) < len(files):
        raise CheckpointPathError("{checkpoint} would be the same file as the log or the best "
                                  "model written beside it; use a name ending in .pt",
                                  path=path)
    for f in [*files, lock_path(checkpoint)]:
        if f.is_dir():
            what = "" if f == checkpoint else f" ({f}, written beside it, is one)"
            raise CheckpointPathError("{checkpoint} names a directory{what}; give a file path "
                                      "such as {example}", path=path, what=what,
                                      example=str(checkpoint / "run.pt"))
    existing = _nearest_existing(checkpoint.absolute().parent)
    if not existing.is_dir():
        raise CheckpointPathError("{checkpoint}: {existing} is a file, not a folder, so nothing "
                                  "can be written under it; choose {another}", path=path,
                                  existing=str(existing))
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    size = len(os.fsencode(checkpoint.name))
    longest = max([len(os.fsencode(f.name)) + _TEMP_EXTRA for f in files]
                  + [len(os.fsencode(lock_path(checkpoint).name))])
    if longest > name_max:
        extra = longest - size
        raise CheckpointPathError(
            "{checkpoint}: the file name is {size} bytes, but the file system allows "
            "{name_max} per name and the run's temp files add up to {extra} bytes to it; use a "
            "name of at most {allowed} bytes", path=path, size=size, name_max=name_max,
            extra=extra, allowed=name_max - extra)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointPathError("{checkpoint}: the folder {existing} is not writable; choose "
                                  "{another} or make the folder writable", path=path,
                                  existing=str(existing))


def check_run_files(
    checkpoint: Path, files: Sequence[Path], *, resume: bool, overwrite: bool
) -> None:
    """Raise :class:`CheckpointPathError` if ``resume`` finds no checkpoint, or a fresh run
    would write over another run's files without ``overwrite``.

    Args:
        checkpoint: the latest-state checkpoint path.
        files: every file the run writes beside it (checkpoint, best model, log).
        resume: the run continues from ``checkpoint``.
        overwrite: a fresh run may replace the run found at ``checkpoint``.
    """
    path = str(checkpoint)
    if resume and overwrite:
        raise CheckpointPathError("{resume} and {overwrite} contradict each other: pass "
                                  "{resume} to continue the run at {checkpoint}, or "
                                  "{overwrite} to replace it", path=path)
    if resume:
        if not checkpoint.is_file():
            raise CheckpointPathError("{resume}, but {checkpoint} does not exist; drop "
                                      "{resume} to start a new run", path=path)
    elif not overwrite:
        found = [f for f in files if os.path.lexists(f)]
        if found:
            raise CheckpointPathError(
                "{checkpoint} already holds a run ({found}); pass {resume} to continue it, "
                "{overwrite} to replace it, or choose {another}", path=path,
                found=", ".join(f.name for f in found))


def _probe(checkpoint: Path) -> list[Path]:
    """Create the checkpoint's folder and a temp file in it, as a save will; return the
    folders created. Catches what the checks above cannot see (a read-only file system, a
    folder root can write only in principle, ...)."""
    folder = checkpoint.absolute().parent
    created = []
    p = folder
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{checkpoint.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        _remove_folders(created)  # leave nothing behind
        reason = err.strerror or type(err).__name__
        if err.errno == errno.ENAMETOOLONG:
            raise CheckpointPathError("{checkpoint}: a name on the path is too long for the file "
                                      "system ({reason}); choose {another}",
                                      path=str(checkpoint), reason=reason) from None
        raise CheckpointPathError("{checkpoint}: cannot write in {folder} ({reason}); choose "
                                  "{another}", path=str(checkpoint), folder=str(folder),
                                  reason=reason) from None
    return created


def remove_stale_temp_files(files: Sequence[Path]) -> list[Path]:
    """Delete the ``.NAME.XXXXXXXX.tmp`` files that an atomic save of one of ``files``
    leaves when the process is killed mid-write; only safe while holding the run's lock.

    Args:
        files: the run's files (checkpoint, best model, log).

    Returns:
        The temp files deleted.
    """
    removed = []
    for f in files:
        pattern = re.compile(rf"\.{re.escape(f.name)}\.{_TEMP_RANDOM}\.tmp")
        if not f.parent.is_dir():
            continue
        for entry in f.parent.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _holder(fd: int) -> str:
    # The holder writes its PID right after locking: give it a moment.
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


class RunLock:
    """An advisory ``flock`` on a lock file, holding the owner's PID; removed on release.

    Without ``fcntl`` (not POSIX) it does nothing.

    Args:
        path: the lock file (created if missing).
        checkpoint: the checkpoint it guards, for the messages.

    Raises:
        CheckpointBusyError: another process (or another RunLock here) holds it.
        CheckpointPathError: the lock file cannot be opened.

    Example:
        >>> import tempfile
        >>> ckpt = Path(tempfile.mkdtemp()) / "run.pt"
        >>> lock = RunLock(lock_path(ckpt), ckpt)
        >>> int(lock_path(ckpt).read_text()) == os.getpid()
        True
        >>> lock.release()
    """

    def __init__(self, path: Path, checkpoint: Path) -> None:
        self.path, self.fd = path, None
        if fcntl is None:
            return
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise CheckpointPathError(
                    "{checkpoint}: cannot open its lock file {lock} ({reason}); choose "
                    "{another}", path=str(checkpoint), lock=str(path),
                    reason=err.strerror or type(err).__name__) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise CheckpointBusyError(
                    "{checkpoint} is in use by another run (PID {pid}, lock file {lock}); "
                    "wait for it to end, or choose {another}", path=str(checkpoint),
                    pid=pid, lock=str(path)) from None
            # A holder removes the file before unlocking; if it did so after our open, we
            # locked a file that is no longer there: open the new one and try again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then unlock (in that order, see above)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _remove_folders(created: list[Path]) -> None:
    for d in created:  # innermost first
        try:
            d.rmdir()
        except OSError:
            break


@contextmanager
def claim_checkpoint(
    checkpoint: Path | None,
    companions: Callable[[Path], Iterable[Path]] = lambda p: (),
    *,
    resume: bool = False,
    overwrite: bool = False,
    writer: bool = True,
) -> Iterator[None]:
    """Check, lock and tidy a run's checkpoint path for the life of the ``with`` block.

    In order: :func:`check_checkpoint_path`; the folder is created and a temp file written
    and removed there; the lock is taken; then, under the lock, :func:`check_run_files`
    (with ``overwrite``, the old run's files are deleted) and stale temp files are removed.
    Nothing is left behind when a check fails.

    Args:
        checkpoint: the run's checkpoint path; ``None`` (nothing written) does nothing.
        companions: the other files the run writes, given the checkpoint path.
        resume: the run continues from the checkpoint.
        overwrite: a fresh run replaces the run found there.
        writer: this process writes the files (False on torchrun ranks other than 0,
            which neither check nor lock).

    Raises:
        CheckpointPathError: a bad path, or another run's files without ``overwrite``.
        CheckpointBusyError: a live run holds the path.

    Example:
        >>> import tempfile
        >>> ckpt = Path(tempfile.mkdtemp()) / "run.pt"
        >>> with claim_checkpoint(ckpt):
        ...     lock_path(ckpt).exists()
        True
        >>> lock_path(ckpt).exists()
        False
    """
    if checkpoint is None or not writer:
        yield
        return
    checkpoint = Path(checkpoint)
    _check_name(checkpoint)  # before companions(), which needs a file name
    files = [checkpoint, *companions(checkpoint)]
    check_checkpoint_path(checkpoint, files)
    created = _probe(checkpoint)
    try:
        lock = RunLock(lock_path(checkpoint), checkpoint)
    except BaseException:
        _remove_folders(created)
        raise
    try:
        check_run_files(checkpoint, files, resume=resume, overwrite=overwrite)
    except BaseException:
        lock.release()
        _remove_folders(created)
        raise
    try:
        if overwrite:
            for f in files:
                f.unlink(missing_ok=True)
        remove_stale_temp_files(files)
        yield
    finally:
        lock.release()
