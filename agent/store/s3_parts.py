"""Parts and request slots, shared by both engines of ``agent.store.s3``.

A large file moves (and a large object is copied) as equal parts in parallel; each
part request takes a slot of the process-wide ``REQUEST_SLOTS``, so many files at
once never open more requests than ``transfer.max_requests``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

# R2 and S3 allow 10,000 parts; 9,000 leaves room, and parts stay equal-sized.
_MAX_PARTS = 9000
_PARTS_PER_FILE = 8


def part_size(size: int, configured: int) -> int:
    """The part size for one file: ``max(configured, ceil(size / 9000))``, all parts equal."""
    return max(configured, -(-size // _MAX_PARTS))


def part_ranges(size: int, part: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of ``part`` bytes (the last one shorter) covering ``size``."""
    return [(start, min(start + part, size)) for start in range(0, size, part)]


class RequestSlots:
    """A weighted semaphore: how many transfer requests are in flight, process-wide.

    One instance per process (``REQUEST_SLOTS``); each file's parallel parts take
    one slot each, so 10 workers x 8 parts never become 80 requests at once.
    Lock and manifest requests do not queue here: a lock renewal must never wait
    behind a slow bulk transfer.
    """

    def __init__(self, capacity: int) -> None:
        self._cond = threading.Condition()
        self._capacity = capacity
        self._used = 0
        self.peak = 0
        """The most slots in use at once so far (tests reset it)."""

    @property
    def capacity(self) -> int:
        """How many slots there are."""
        return self._capacity

    def resize(self, capacity: int) -> None:
        """Set the number of slots (the config's ``transfer.max_requests``)."""
        with self._cond:
            self._capacity = capacity
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold_up_to(self, most: int) -> Iterator[int]:
        """Take between 1 and ``most`` slots, as many as are free; yields how many."""
        with self._cond:
            while self._used >= self._capacity:
                self._cond.wait()
            weight = max(1, min(most, self._capacity - self._used))
            self._used += weight
            self.peak = max(self.peak, self._used)
        try:
            yield weight
        finally:
            with self._cond:
                self._used -= weight
                self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, weight: int = 1) -> Iterator[None]:
        """Take ``weight`` slots (at most all of them) for the duration of a request."""
        with self._cond:
            weight = max(1, min(weight, self._capacity))
            while self._used + weight > self._capacity:
                self._cond.wait()
            self._used += weight
            self.peak = max(self.peak, self._used)
        try:
            yield
        finally:
            with self._cond:
                self._used -= weight
                self._cond.notify_all()


REQUEST_SLOTS = RequestSlots(32)

_READ = 1024 * 1024
_POSITIONAL = hasattr(os, "pread") and hasattr(os, "pwrite")
_PREADV = hasattr(os, "preadv")
_SEEK_LOCK = threading.Lock()  # where there is no pread/pwrite (Windows): seek + read/write


def write_at(fd: int, data: memoryview, pos: int) -> None:
    """Write all of ``data`` at offset ``pos`` of ``fd`` (threads write other ranges at once)."""
    while data:
        if _POSITIONAL:
            done = os.pwrite(fd, data, pos)
        else:  # pragma: no cover - Windows
            with _SEEK_LOCK:
                os.lseek(fd, pos, os.SEEK_SET)
                done = os.write(fd, data)
        data, pos = data[done:], pos + done


def read_at(fd: int, size: int, pos: int) -> bytes:
    """Up to ``size`` bytes at offset ``pos`` of ``fd``."""
    if _POSITIONAL:
        return os.pread(fd, size, pos)
    with _SEEK_LOCK:  # pragma: no cover - Windows
        os.lseek(fd, pos, os.SEEK_SET)
        return os.read(fd, size)


class InOrderDigest:
    """The sha256 of a file written as ranges in any order, computed while they arrive.

    A range is hashed (read back from the file: the bytes on disk are what is verified)
    as soon as it and every range before it are written, by the thread whose range
    completed that prefix; one thread hashes at a time, in order. When the last range
    is written only the ranges after the last gap remain to be hashed, not the file.
    """

    def __init__(self, fd: int, ranges: Sequence[tuple[int, int]]) -> None:
        self._fd = fd
        self._ranges = ranges
        self._written = [False] * len(ranges)
        self._next = 0  # the first range not hashed yet
        self._busy = False  # a thread is hashing
        self._lock = threading.Lock()
        self._sha = hashlib.sha256()
        self._buf: memoryview | None = None  # read into by the one hashing thread

    def written(self, index: int) -> None:
        """Range ``index`` is wholly in the file; hash what is now a complete prefix."""
        with self._lock:
            self._written[index] = True
            if self._busy:
                return  # the hashing thread sees it before it stops
            self._busy = True
        try:
            while True:
                with self._lock:
                    if self._next == len(self._ranges) or not self._written[self._next]:
                        self._busy = False
                        return
                    start, end = self._ranges[self._next]
                self._hash(start, end)
                with self._lock:
                    self._next += 1
        except BaseException:
            with self._lock:
                self._busy = False
            raise

    def _hash(self, start: int, end: int) -> None:
        # One buffer, read into again and again: a fresh 1 MiB ``bytes`` per read is a
        # fresh mapping of memory, faulted in and zeroed by the kernel every time.
        if self._buf is None:
            self._buf = memoryview(bytearray(_READ))
        while start < end:
            size = min(_READ, end - start)
            if _PREADV:
                got = os.preadv(self._fd, [self._buf[:size]], start)
                chunk = self._buf[:got]
            else:  # pragma: no cover - macOS before 11, Windows
                chunk = memoryview(read_at(self._fd, size, start))
            if not chunk:
                raise OSError(f"the file ends at {start} bytes, before the {end} written")
            self._sha.update(chunk)
            start += len(chunk)

    def hexdigest(self) -> str:
        """The digest of the whole file (every range written and hashed)."""
        with self._lock:
            if self._next != len(self._ranges):
                raise RuntimeError(
                    f"{len(self._ranges) - self._next} of {len(self._ranges)} ranges not hashed"
                )
        return self._sha.hexdigest()


def _run_parallel(workers: int, calls: Sequence[Callable[[], None]]) -> None:
    """Run ``calls`` on ``workers`` threads; on a failure cancel the rest and raise it."""
    if len(calls) == 1 or workers == 1:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(
        max_workers=min(workers, len(calls)), thread_name_prefix="pdagent-part"
    ) as pool:
        futures: list[Future[None]] = [pool.submit(call) for call in calls]
        _done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in not_done:
            fut.cancel()
        wait(not_done)
        for fut in futures:
            error = None if fut.cancelled() else fut.exception()
            if error is not None:
                raise error
