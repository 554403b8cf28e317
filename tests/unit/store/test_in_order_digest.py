"""``InOrderDigest``: the sha256 of a file written as ranges in any order, while they arrive."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.store.s3_parts import InOrderDigest, part_ranges, write_at


@contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def _write_ranges(path: Path, data: bytes, order: list[int], part: int) -> str:
    ranges = part_ranges(len(data), part)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, len(data))
        digest = InOrderDigest(fd, ranges)
        gate = threading.Barrier(len(order))

        def one(index: int) -> None:
            gate.wait()  # all at once: ranges complete in whatever order the threads run
            start, end = ranges[index]
            write_at(fd, memoryview(data)[start:end], start)
            digest.written(index)

        threads = [threading.Thread(target=one, args=(i,)) for i in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return digest.hexdigest()
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", range(5))
def test_ranges_written_in_any_order_from_threads_give_the_files_sha256(
    tmp_path: Path, seed: int
) -> None:
    """23 ranges, started in a shuffled order on their own threads: the digest of the file."""
    data = os.urandom(23 * 4096 - 100)
    order = list(range(23))
    random.Random(seed).shuffle(order)
    got = _write_ranges(tmp_path / "f", data, order, 4096)
    assert hashlib.sha256(data).hexdigest() == got
    assert data == (tmp_path / "f").read_bytes()


def test_the_digest_is_of_the_bytes_in_the_file_read_back_not_of_what_was_meant(
    tmp_path: Path,
) -> None:
    """Each range is read back from the file: bytes changed there before it was hashed count."""
    data = os.urandom(3 * 1000)
    ranges = part_ranges(len(data), 1000)
    path = tmp_path / "f"
    path.write_bytes(data)
    with _opened(path, os.O_RDWR) as fd:
        digest = InOrderDigest(fd, ranges)
        digest.written(2)  # not hashed yet: ranges 0 and 1 are not in
        write_at(fd, memoryview(b"X"), 2500)
        digest.written(1)
        digest.written(0)
        changed = data[:2500] + b"X" + data[2501:]
        assert hashlib.sha256(changed).hexdigest() == digest.hexdigest()


def test_a_digest_with_a_range_not_written_is_refused(tmp_path: Path) -> None:
    """Asking before every range is in raises instead of giving the digest of a prefix."""
    path = tmp_path / "f"
    path.write_bytes(b"a" * 300)
    with _opened(path, os.O_RDONLY) as fd:
        digest = InOrderDigest(fd, part_ranges(300, 100))
        digest.written(0)
        digest.written(2)
        with pytest.raises(RuntimeError, match="2 of 3 ranges not hashed"):
            digest.hexdigest()


def test_a_file_shorter_than_a_written_range_is_an_os_error(tmp_path: Path) -> None:
    """A range said written whose bytes are not in the file (cut under us) is not hashed."""
    path = tmp_path / "f"
    path.write_bytes(b"a" * 150)
    with _opened(path, os.O_RDONLY) as fd:
        digest = InOrderDigest(fd, part_ranges(300, 100))
        digest.written(0)
        with pytest.raises(OSError, match="ends at 150 bytes"):
            digest.written(1)
