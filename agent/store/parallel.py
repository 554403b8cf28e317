"""The thread pool the layers above share: ``Parallel.map`` and ``Progress``.

Stage code (commit copies, history reads, repair, the lock board) and the folder's
transfers run many store requests at once through ``Parallel``; ``Progress`` counts
their bytes from many threads and reports one percentage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from agent.errors import AgentError, SessionCancelledError, TransferError
from agent.log import get_logger

__all__ = ["Parallel", "Progress"]

log = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Progress:
    """Counts byte deltas from many threads; emits ``(message, percent)`` for one operation.

    The percentage never goes down (a retry that rewinds bytes holds it until they are
    back) and is emitted in order: 0 % first, 100 % last, in between a new value at
    most every ``interval`` seconds (0.1 s), whenever it moved by at least 1 %.
    With ``cancel`` set, counting more bytes raises ``SessionCancelledError``: the
    transfers stop (``Parallel.map`` cancels what has not started).
    """

    def __init__(
        self,
        message: str,
        total_bytes: int,
        emit: Callable[[str, int], None] | None,
        *,
        cancel: threading.Event | None = None,
        interval: float = 0.1,
    ) -> None:
        self.message = message
        self.total = max(total_bytes, 0)
        self._emit = emit
        self._cancel = cancel
        self._interval = interval
        self._done = 0
        self._last = -1
        self._last_at = float("-inf")
        self._lock = threading.Lock()
        self._emit_lock = threading.Lock()
        self._report(force=True)

    @property
    def bytes_done(self) -> int:
        """Bytes counted so far (may shrink when a retry rewinds)."""
        return self._done

    def check(self) -> None:
        """Raise ``SessionCancelledError`` if the operation was cancelled."""
        if self._cancel is not None and self._cancel.is_set():
            raise SessionCancelledError("cancelled")

    def add(self, delta: int) -> None:
        """Count ``delta`` bytes (negative when a retry rewinds)."""
        if delta > 0:
            self.check()
        with self._lock:
            self._done += delta
        self._report()

    def advance_to(self, done: int) -> None:
        """Set the bytes done so far (for work counted from outside, e.g. a flush)."""
        with self._lock:
            self._done = done
        self._report()

    def finish(self) -> None:
        """Report 100 %."""
        with self._lock:
            self._done = self.total
        self._report(force=True)

    def _report(self, *, force: bool = False) -> None:
        if self._emit is None:
            return
        with self._emit_lock:  # one emitter at a time: values arrive in order
            with self._lock:
                done = self._done
            pct = 100 if self.total == 0 else min(100, max(0, done * 100 // self.total))
            now = time.monotonic()
            if pct <= self._last:
                return
            if not force and pct < 100 and now - self._last_at < self._interval:
                return
            self._last, self._last_at = pct, now
            self._emit(self.message, pct)


class Parallel:
    """A pool of ``workers`` threads running one function over many items, in order.

    A failure cancels what has not started, waits for what is running and raises the
    first error (an ``AgentError`` as it is, anything else as ``TransferError``).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def map(
        self, items: Sequence[T], fn: Callable[[T], R], progress: Progress | None = None
    ) -> list[R]:
        """Run ``fn`` over ``items`` on the pool; on a failure cancel the rest and raise it."""
        if not items:
            if progress is not None:
                progress.finish()
            return []
        results: list[R | None] = [None] * len(items)
        window = max(1, self.workers) * 4
        with ThreadPoolExecutor(
            max_workers=min(self.workers, len(items)), thread_name_prefix="pdagent-xfer"
        ) as pool:
            # At most ``window`` items in flight: not a Future per item held at once
            # (100,000 of them during a cold open of a large stage).
            running: dict[Future[R], int] = {}
            failures: list[tuple[int, Future[R]]] = []
            pending = iter(enumerate(items))
            while True:
                if not failures:
                    for index, item in pending:
                        running[pool.submit(fn, item)] = index
                        if len(running) >= window:
                            break
                if not running:
                    break
                # On a failure nothing more is submitted (what has not started is
                # cancelled): wait for every running one, then raise the first error.
                done, _ = wait(running, return_when=ALL_COMPLETED if failures else FIRST_COMPLETED)
                _collect(done, running, results, failures)
                if failures:
                    for fut in running:
                        fut.cancel()
            if failures:
                self._raise_first([f for _, f in sorted(failures, key=lambda x: x[0])], len(items))
        if progress is not None:
            progress.finish()
        return results  # type: ignore[return-value]  # every slot was filled

    @staticmethod
    def _raise_first(failures: Iterable[Future[R]], total: int) -> None:
        errors = [f.exception() for f in failures]
        first = errors[0]
        log.error(
            "transfer_failed",
            failed=len(errors),
            total=total,
            error=str(first),
            kind=type(first).__name__,
        )
        if isinstance(first, AgentError):
            raise first
        raise TransferError(
            f"{len(errors)} of {total} transfers failed; first: {first}",
            failed=len(errors),
            last_exception=first,
        ) from first


def _collect(
    done: Iterable[Future[R]],
    running: dict[Future[R], int],
    results: list[R | None],
    failures: list[tuple[int, Future[R]]],
) -> None:
    """Move the ``done`` futures out of ``running``: a result to its slot, a failure listed."""
    for fut in done:
        index = running.pop(fut)
        if fut.cancelled():
            continue
        if fut.exception() is not None:
            failures.append((index, fut))
        else:
            results[index] = fut.result()
