"""Keep freed CPU memory in the process for reuse instead of returning it to the OS.

torch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold (at
most 32 MB) with fresh ``mmap`` pages and unmaps them on free, so each large activation of
a batched meta-iteration (up to 128 MB for Omniglot 5-way at 15 queries per class and 32
tasks) is page-faulted in again every step. With glibc told never to ``mmap`` and to keep
freed memory, the same step ran 1.1-1.8x faster at 15 queries per class and no faster at 1
(``benchmarks/malloc_tunables.json``). The price: the process keeps its peak memory until
it exits. The command line applies this (``--no-malloc-reuse`` turns it off); the library
never does it on import, since it changes the whole process.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The largest value mallopt's int takes: free memory at the top of the heap beyond 2 GiB
# still goes back to the OS.
_TRIM_THRESHOLD = 2**31 - 1

_applied = False


def reuse_freed_memory() -> bool:
    """Tell glibc's ``malloc`` to serve every block from its heap and keep freed memory.

    Affects allocations made after the call, by every library in the process. The same as
    starting the process with ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:``
    ``glibc.malloc.trim_threshold=2147483647``.

    Returns:
        True if the setting is in effect; False on a C library other than glibc (macOS,
        Windows, musl), where nothing is changed.

    Example:
        >>> from metalearn.allocator import reuse_freed_memory
        >>> reuse_freed_memory() in (True, False)
        True
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    if mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) != 1 or mallopt(_M_MMAP_MAX, 0) != 1:
        return False
    _applied = True
    return True


def reusing_freed_memory() -> bool:
    """Whether :func:`reuse_freed_memory` has taken effect in this process."""
    return _applied
