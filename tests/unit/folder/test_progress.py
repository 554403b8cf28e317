"""Progress (issue 10): monotonic per operation, throttled, cancellable."""

from __future__ import annotations

import random
import threading

import pytest

from agent.errors import SessionCancelledError
from agent.store.parallel import Progress


class Clock:
    """A settable ``time.monotonic``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("agent.store.parallel.time.monotonic", c)
    return c


def test_percentages_never_go_back_with_many_threads_and_rewinds() -> None:
    """8 threads add bytes (and retries rewind some): the emitted sequence only goes up."""
    seen: list[int] = []
    progress = Progress("dl", 8 * 500 * 10, lambda _m, p: seen.append(p), interval=0)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(500):
            progress.add(10)
            if rng.random() < 0.1:
                progress.add(-10)  # a retry rewinds ...
                progress.add(10)  # ... and sends again

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.finish()
    assert seen == sorted(set(seen)), "a percentage went back or repeated"
    assert 0 == seen[0] and 100 == seen[-1]


def test_emits_at_most_every_interval_but_always_the_first_and_last(clock: Clock) -> None:
    """Within 100 ms only the first value goes out; a later one after the interval; 100 % always."""
    seen: list[int] = []
    progress = Progress("up", 1000, lambda _m, p: seen.append(p))
    for _ in range(50):
        progress.add(10)  # 50 % within the same instant
    assert [0] == seen
    clock.now += 0.1
    progress.add(10)
    assert [0, 51] == seen
    progress.add(10)
    progress.finish()
    assert [0, 51, 100] == seen


def test_a_slow_operation_reports_every_percent(clock: Clock) -> None:
    """When each percent takes longer than the interval, every percent is reported."""
    seen: list[int] = []
    progress = Progress("copy", 100, lambda _m, p: seen.append(p))
    for _ in range(100):
        clock.now += 0.2
        progress.add(1)
    assert list(range(101)) == seen


def test_cancelled_progress_stops_the_next_bytes() -> None:
    """With the cancel event set, counting more bytes raises SessionCancelledError."""
    cancel = threading.Event()
    progress = Progress("dl", 100, None, cancel=cancel)
    progress.add(10)
    cancel.set()
    with pytest.raises(SessionCancelledError):
        progress.add(10)
    progress.add(-10)  # a rewind after the cancel is still counted (clean-up)
    assert 0 == progress.bytes_done
