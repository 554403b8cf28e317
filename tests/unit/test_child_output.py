"""``tests.children.ChildOutput``: no line a child printed is lost between reads."""

from __future__ import annotations

import subprocess
import sys

from tests.children import ChildOutput

# Two JSON lines in one write: they arrive in one chunk of the pipe.
_CHILD = r"""
import os, sys
os.write(1, b'{"first": 1}\nnot json\n{"second": 2}\n')
sys.stdin.readline()
os.write(1, b'{"third": 3}\n')
os.write(2, b"on stderr\n")
"""


def test_lines_that_came_in_one_chunk_with_the_one_read_are_all_kept() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output = ChildOutput(proc)
    try:
        assert {"first": 1} == output.next(timeout=60)
        assert proc.stdin is not None
        proc.stdin.close()
        assert 0 == proc.wait(timeout=60)
        assert [{"second": 2}, {"third": 3}] == output.rest()
        assert "not json\n" in output.stdout()
        assert "on stderr\n" == output.stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
