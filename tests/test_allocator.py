"""metalearn.allocator: glibc keeps freed memory after reuse_freed_memory()."""

import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Counts the mmapped blocks that glibc adds (mallinfo2's hblks, glibc >= 2.33) while a 96 MB tensor,
# above glibc's largest mmap threshold (32 MB), is alive: before and after the call.
PROBE = """
import ctypes, torch
from metalearn.allocator import reuse_freed_memory, reusing_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mmapped_with_a_large_tensor():
    blocks = libc.mallinfo2().hblks
    t = torch.ones(24 * 2**20)
    return libc.mallinfo2().hblks - blocks, float(t.sum())

before = mmapped_with_a_large_tensor()[0]
assert not reusing_freed_memory()
applied = reuse_freed_memory()
after = mmapped_with_a_large_tensor()[0]
print(before, applied, after, reusing_freed_memory(), reuse_freed_memory())
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_large_blocks_come_from_the_heap_after_the_call():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, applied, after, state, again = r.stdout.split()
    assert int(before) >= 1  # by default the tensor is mmapped: the probe can tell
    assert applied == "True" and int(after) == 0 and state == "True" and again == "True"


def test_other_c_libraries_are_left_alone(monkeypatch):
    import metalearn.allocator as allocator

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator.reuse_freed_memory() is False
    assert allocator.reusing_freed_memory() is False
