"""Atomic, code-free, verified checkpoints.

Written through a temp file (fsync, rename), loaded with ``weights_only=True``, and checked
on load: a content digest written with each checkpoint must match (an edited or damaged
byte is an error), and the model's tensors must be finite.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

# The key under which save_checkpoint stores the digest, beside "model", "config", ...
DIGEST_KEY = "digest"
# From this "format" on a checkpoint must carry a digest; format 1 (before digests) is read
# unverified, since runs started before them still write it.
DIGEST_SINCE_FORMAT = 2
# The newest format load_checkpoint understands (3: a run of the user's own objects,
# metalearn.training.CHECKPOINT_FORMAT).
MAX_FORMAT = 3
# The state entries that hold the model; a non-finite value in them is refused on load.
MODEL_KEYS = ("model", "learner")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it.

    A crash or kill at any point leaves either the old file or the new one, never a
    truncated file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# Types whose repr is exact and tells them apart (1, 1.0, True, '1', None).
_PLAIN = {int, float, bool, str, type(None)}


def _feed(h, obj) -> None:
    """Add ``obj`` to hash ``h``: tensors by dtype, shape and bytes, containers item by item,
    anything else by type and repr (all of which a weights_only load gives back unchanged)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        if all(type(v) in _PLAIN for v in obj):  # one repr for Python's 625-int RNG state
            text = repr(obj)
            h.update(f"{len(text)}:{text};".encode())
        else:
            for value in obj:
                _feed(h, value)
    else:
        text = repr(obj)
        h.update(f"S{type(obj).__name__}:{len(text)}:{text};".encode())


class _Crc32:
    """zlib.crc32 behind hashlib's ``update``."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)


def state_digest(state: dict) -> str:
    """The content digest of a checkpoint's state (its ``"digest"`` entry left out).

    crc32 over every tensor's dtype, shape and bytes and every other value, in order: any
    changed byte (any burst of up to 32 bits) changes it, at a few GB/s, so well under a
    millisecond of hashing for a Conv4 with its Adam state. It detects damage and stray
    edits; it is not a signature (whoever edits a file can recompute it).

    Example:
        >>> state_digest({"format": 2, "model": {"w": torch.zeros(2)}})[:6]
        'crc32:'
    """
    h = _Crc32()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return f"crc32:{h.value:08x}"


def non_finite_entries(state: dict, keys: tuple[str, ...] = MODEL_KEYS) -> list[str]:
    """Names of the floating-point tensors under ``state[key]`` that hold a NaN or inf."""
    bad = []

    def walk(obj, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                if not bool(torch.isfinite(obj).all()):
                    bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")
        elif isinstance(obj, float) and not math.isfinite(obj):
            bad.append(name)

    for key in keys:
        if key in state:
            walk(state[key], key)
    return bad


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically, with its digest.

    The digest goes in as one more entry, ``state["digest"]``, so the other entries load as
    before: ``torch.load(path, weights_only=True)["model"]`` is the model's state dict.

    Args:
        path: the file to write; its folder is created if missing.
        state: what to save; ``load_checkpoint`` expects a ``"format"`` entry.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "c.pt"
        >>> save_checkpoint(p, {"format": 2, "model": {"w": torch.ones(2)}})
        >>> load_checkpoint(p)["model"]["w"]
        tensor([1., 1.])
    """
    state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    digest = state_digest(state)
    atomic_write(path, lambda f: torch.save({**state, DIGEST_KEY: digest}, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint without executing any pickled code, and check it.

    The digest must match the content (checkpoints of format 1, written before digests,
    have none and are read unverified), and the model's tensors must be finite.

    Args:
        path: the checkpoint file.

    Returns:
        The saved state, without its ``"digest"`` entry.

    Raises:
        CheckpointError: the file is missing, unreadable, altered, not a metalearn
            checkpoint, from a newer format, or holds a non-finite model; the message says
            which.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad bytes; all mean "corrupt"
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a metalearn checkpoint ({type(err).__name__}: "
            f"{reason}); delete or replace the file"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a metalearn checkpoint (no 'format' key)")
    fmt = state["format"]
    if not isinstance(fmt, int) or fmt > MAX_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {fmt!r}, which this metalearn "
                              f"cannot read (it reads 1 to {MAX_FORMAT}); upgrade metalearn")
    saved = state.pop(DIGEST_KEY, None)
    if saved is None and fmt >= DIGEST_SINCE_FORMAT:
        raise CheckpointError(f"checkpoint {path} has no content digest, which format {fmt} "
                              "requires: it was not written by metalearn or was altered; "
                              "use another checkpoint or start a new run")
    if saved is not None and saved != state_digest(state):
        raise CheckpointError(f"checkpoint {path} fails its content check: its contents "
                              "differ from what was saved (edited or damaged after writing), "
                              "so it cannot be trusted; use another checkpoint or start a new "
                              "run")
    bad = non_finite_entries(state)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"checkpoint {path} holds non-finite values (NaN or inf) in "
                              f"{', '.join(bad[:3])}{more}; a model with them cannot be "
                              "resumed or evaluated. Use an earlier checkpoint (the .best.pt "
                              "beside it holds the best validated model) or start a new run")
    return state


def rng_state() -> dict:
    """Python, numpy and torch RNG states in a weights_only-loadable form."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    """Restore the Python, numpy and torch RNG states that :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
