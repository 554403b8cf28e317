"""The pure debounce table, driven by a fake clock and fake stat results."""

from __future__ import annotations

from agent.watcher import Debouncer


class FakeFiles:
    """``rel -> (size, mtime)``; missing paths stat as None."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, int]] = {}

    def stat(self, rel: str) -> tuple[int, int] | None:
        return self.files.get(rel)


def test_a_saved_file_is_delivered_once_after_the_quiet_period() -> None:
    """Events within the quiet period coalesce; delivery comes once the file is stable."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=2.0, min_interval=1.0)
    fs.files["a.txt"] = (10, 1)
    d.touch("a.txt", 0.0)
    d.touch("a.txt", 0.1)
    assert set() == d.due(0.2, fs.stat)
    assert set() == d.due(0.3, fs.stat), "first stat seen at 0.2: not yet stable for 0.3 s"
    assert {"a.txt"} == d.due(0.55, fs.stat)
    assert set() == d.due(0.6, fs.stat)


def test_a_file_still_being_written_waits_until_stable() -> None:
    """A growing file is not delivered, even past max_delay, until its size stops changing."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=0.0)
    d.touch("big.bin", 0.0)
    now = 0.0
    for size in range(1, 20):
        fs.files["big.bin"] = (size, size)
        now += 0.2
        assert set() == d.due(now, fs.stat)
    assert set() == d.due(now + 0.1, fs.stat)
    assert {"big.bin"} == d.due(now + 0.35, fs.stat)


def test_continuous_events_on_a_stable_file_are_delivered_by_max_delay() -> None:
    """Events that never go quiet still deliver after max_delay if the content is stable."""
    fs = FakeFiles()
    fs.files["x"] = (1, 1)
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=0.0)
    now = 0.0
    d.touch("x", now)
    d.due(now, fs.stat)
    delivered: set[str] = set()
    while now < 1.2 and not delivered:
        now += 0.1
        d.touch("x", now)
        delivered = d.due(now, fs.stat)
    assert {"x"} == delivered
    assert 1.0 <= now <= 1.2


def test_same_path_is_spaced_by_min_interval() -> None:
    """A second save within min_interval waits until the interval has passed."""
    fs = FakeFiles()
    fs.files["k"] = (1, 1)
    d = Debouncer(debounce=0.1, max_delay=1.0, min_interval=1.0)
    d.touch("k", 0.0)
    d.due(0.0, fs.stat)
    assert {"k"} == d.due(0.2, fs.stat)
    fs.files["k"] = (2, 2)
    d.touch("k", 0.3)
    d.due(0.3, fs.stat)
    assert set() == d.due(0.6, fs.stat)
    assert set() == d.due(1.1, fs.stat)
    assert {"k"} == d.due(1.25, fs.stat)


def test_vanished_file_is_delivered_at_once_and_batches_are_sets() -> None:
    """A deleted path is delivered without waiting; many paths come in one batch."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=2.0, min_interval=1.0)
    for i in range(100):
        fs.files[f"f{i}"] = (1, 1)
        d.touch(f"f{i}", 0.0)
    d.touch("gone", 0.0)
    assert {"gone"} == d.due(0.01, fs.stat)
    assert {f"f{i}" for i in range(100)} == d.due(0.4, fs.stat)


def test_force_delivers_everything_now() -> None:
    """flush's force mode ignores quiet period, stability and spacing."""
    fs = FakeFiles()
    fs.files["a"] = (1, 1)
    d = Debouncer(debounce=5, max_delay=10, min_interval=10)
    d.touch("a", 0.0)
    assert {"a"} == d.due(0.0, fs.stat, force=True)
    assert 0 == d.dirty_count
