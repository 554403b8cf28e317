"""``release_free_memory`` gives freed heap back to the system (glibc), a no-op elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Fills the heap with 1000-byte blocks (malloc'd, not pymalloc), keeps one block made
# after them (so the heap's top cannot shrink by itself), frees the rest, and prints
# VmRSS in KiB before and after ``release_free_memory``.
_PROBE = """
from agent.platform import release_free_memory
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
blocks = [bytes(1000) for _ in range(200_000)]
top = bytes(1000)
del blocks
before = rss()
release_free_memory()
print(before, rss())
"""


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="only glibc keeps freed heap pages mapped")
def test_freed_heap_is_given_back_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    before, after = (int(v) for v in out.stdout.split())
    assert before - after > 100 * 1024, (before, after)  # of ~200 MB freed, most returned
