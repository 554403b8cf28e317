"""The pure debounce table, driven by a fake clock and fake stat results (no sleeping)."""

from __future__ import annotations

from collections.abc import Callable

from agent.folder.debounce import Debouncer

TICK = 0.02


class FakeFiles:
    """``rel -> (size, mtime)``; missing paths stat as None. Counts stat calls."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, int]] = {}
        self.calls = 0

    def stat(self, rel: str) -> tuple[int, int] | None:
        self.calls += 1
        return self.files.get(rel)


def drive(
    d: Debouncer,
    fs: FakeFiles,
    start: float,
    end: float,
    *,
    each_tick: Callable[[float], None] | None = None,
) -> list[tuple[float, set[str]]]:
    """Call ``due`` every TICK from ``start`` to ``end``; return the non-empty batches."""
    batches = []
    steps = round((end - start) / TICK)
    for i in range(steps + 1):
        now = round(start + i * TICK, 6)
        if each_tick is not None:
            each_tick(now)
        got = d.due(now, fs.stat)
        if got:
            batches.append((now, got))
    return batches


def test_a_saved_file_is_delivered_once_after_the_quiet_period() -> None:
    """Events within the quiet period coalesce into one delivery, debounce after the last one."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=2.0, min_interval=1.0)
    fs.files["a.txt"] = (10, 1)
    d.touch("a.txt", 0.0)
    d.touch("a.txt", 0.1)
    batches = drive(d, fs, 0.1, 2.0)
    assert 1 == len(batches)
    when, paths = batches[0]
    assert {"a.txt"} == paths
    assert 0.4 <= when <= 0.4 + 2 * TICK


def test_nothing_is_due_before_the_quiet_period_ends() -> None:
    """A path touched again keeps waiting: the quiet period restarts at each event."""
    fs = FakeFiles()
    fs.files["a"] = (1, 1)
    d = Debouncer(debounce=0.3, max_delay=5.0, min_interval=0.0)
    batches = drive(d, fs, 0.0, 1.0, each_tick=lambda now: d.touch("a", now) if now < 0.6 else None)
    assert [{"a"}] == [p for _, p in batches]
    assert batches[0][0] >= 0.58 + 0.3


def test_continuous_events_on_a_stable_file_are_delivered_by_max_delay() -> None:
    """Events that never go quiet still deliver after max_delay when the content is stable."""
    fs = FakeFiles()
    fs.files["x"] = (1, 1)
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=0.0)
    batches = drive(d, fs, 0.0, 1.5, each_tick=lambda now: d.touch("x", now))
    assert batches
    assert {"x"} == batches[0][1]
    assert 1.0 <= batches[0][0] <= 1.0 + 2 * TICK


def test_a_file_still_being_written_is_delivered_every_max_delay_and_after_it_stops() -> None:
    """A growing file (a log, a long export) is delivered at least every max_delay while
    it is written, not held until it stops; and once more after its last write."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=0.0)

    def write(now: float) -> None:
        if now <= 3.0:  # the writer appends every tick for 3 s, well past max_delay
            fs.files["big.bin"] = (int(now * 1000), int(now * 1000))
            d.touch("big.bin", now)

    batches = drive(d, fs, 0.0, 5.0, each_tick=write)
    times = [when for when, _ in batches]
    assert all({"big.bin"} == p for _, p in batches)
    while_written = [t for t in times if t <= 3.0]
    assert len(while_written) >= 2, times
    gaps = [b - a for a, b in zip([0.0, *while_written], while_written, strict=False)]
    assert max(gaps) <= 1.0 + 2 * TICK, times
    assert 3.0 <= times[-1] <= 3.3 + 2 * TICK, "the last delivery comes after the last write"


def test_a_missing_file_is_not_delivered_before_its_absence_is_stable_even_when_overdue() -> None:
    """Overdue deliveries of a changing file never deliver it missing mid-save."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=0.0)

    def flap(now: float) -> None:
        if now <= 2.0:  # an editor that keeps replacing the file: present, gone, present
            if round(now / TICK) % 2:
                fs.files.pop("doc", None)
            else:
                fs.files["doc"] = (1, int(now * 1000))
            d.touch("doc", now)

    delivered_missing = []

    def tick(now: float) -> None:
        flap(now)

    for now, _paths in drive(d, fs, 0.0, 3.0, each_tick=tick):
        if "doc" not in fs.files:
            delivered_missing.append(now)
    assert [] == [t for t in delivered_missing if t <= 2.0]


def test_a_missing_file_is_delivered_as_missing_after_the_quiet_period() -> None:
    """A deleted path is delivered (the consumer makes it a delete) once its absence is stable."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=2.0, min_interval=1.0)
    d.touch("gone", 0.0)
    batches = drive(d, fs, 0.0, 1.0)
    assert [{"gone"}] == [p for _, p in batches]
    assert 0.3 <= batches[0][0] <= 0.3 + 2 * TICK


def test_a_file_renamed_away_and_back_is_delivered_only_present() -> None:
    """An editor's save (old file moved away, new one moved in) never delivers the gap."""
    fs = FakeFiles()
    fs.files["doc.docx"] = (1, 1)
    d = Debouncer(debounce=0.3, max_delay=2.0, min_interval=0.0)
    seen: list[bool] = []

    def save(now: float) -> None:
        if now == 0.1:
            del fs.files["doc.docx"]
            d.touch("doc.docx", now)
        if now == 0.2:
            fs.files["doc.docx"] = (2, 2)
            d.touch("doc.docx", now)

    d.touch("doc.docx", 0.0)
    for _when, paths in drive(d, fs, 0.0, 1.0, each_tick=save):
        seen.extend("doc.docx" in fs.files for _ in paths)
    assert [True] == seen


def test_same_path_is_spaced_by_min_interval() -> None:
    """A second save within min_interval stays dirty until the interval has passed."""
    fs = FakeFiles()
    fs.files["k"] = (1, 1)
    d = Debouncer(debounce=0.1, max_delay=1.0, min_interval=1.0)
    d.touch("k", 0.0)
    first = drive(d, fs, 0.0, 0.3)
    assert 1 == len(first)
    delivered_at = first[0][0]
    fs.files["k"] = (2, 2)
    d.touch("k", 0.3)
    second = drive(d, fs, 0.3, 2.0)
    assert [{"k"}] == [p for _, p in second]
    assert second[0][0] >= delivered_at + 1.0
    assert second[0][0] <= delivered_at + 1.0 + 2 * TICK


def test_paths_due_at_the_same_tick_come_as_one_batch() -> None:
    """1000 paths saved at once are delivered in one set."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=2.0, min_interval=1.0)
    for i in range(1000):
        fs.files[f"f{i}"] = (1, 1)
        d.touch(f"f{i}", 0.0)
    batches = drive(d, fs, 0.0, 1.0)
    assert [{f"f{i}" for i in range(1000)}] == [p for _, p in batches]
    assert 0 == d.dirty_count


def test_quiet_waiting_paths_are_not_statted_every_tick() -> None:
    """Stat is called once after an event and once when ready, not on every tick."""
    fs = FakeFiles()
    fs.files["a"] = (1, 1)
    d = Debouncer(debounce=1.0, max_delay=5.0, min_interval=0.0)
    d.touch("a", 0.0)
    batches = drive(d, fs, 0.0, 1.5)
    assert [{"a"}] == [p for _, p in batches]
    assert fs.calls <= 3


def test_force_delivers_on_two_equal_checks_ignoring_quiet_and_spacing() -> None:
    """flush's force mode skips the quiet period, max_delay and spacing, not stability."""
    fs = FakeFiles()
    fs.files["a"] = (1, 1)
    d = Debouncer(debounce=5, max_delay=10, min_interval=10)
    d.touch("a", 0.0)
    assert set() == d.due(0.0, fs.stat, force=True), "first check only observes"
    assert {"a"} == d.due(0.02, fs.stat, force=True)
    d.touch("a", 0.03)
    assert set() == d.due(0.04, fs.stat, force=True), "a new change is observed afresh"
    assert {"a"} == d.due(0.06, fs.stat, force=True), "spacing (10 s) does not hold a flush"
    assert 0 == d.dirty_count


def test_force_holds_a_file_that_changes_between_checks() -> None:
    """A file whose size changes between two forced checks waits until it stops."""
    fs = FakeFiles()
    d = Debouncer(debounce=5, max_delay=10, min_interval=10)
    d.touch("w", 0.0)
    for i in range(5):
        fs.files["w"] = (i, i)
        assert set() == d.due(i * 0.02, fs.stat, force=True)
    assert {"w"} == d.due(0.2, fs.stat, force=True)


def test_a_folder_rescan_waits_until_nothing_inside_it_changes() -> None:
    """A folder event's rescan is delivered once, a quiet period after the last event inside."""
    d = Debouncer(debounce=0.3, max_delay=2.0, min_interval=1.0)
    d.request_rescan("pkg", 0.0)
    for i in range(10):  # a cp -r still writing files into the new folder
        d.touch(f"pkg/sub/f{i}.txt", 0.1 * (i + 1))
        assert set() == d.due_rescans(0.1 * (i + 1))
    d.touch("elsewhere.txt", 1.2)
    assert set() == d.due_rescans(1.2)
    assert {"pkg"} == d.due_rescans(1.31)
    assert 0 == d.rescan_count
    assert set() == d.due_rescans(5.0)


def test_a_subtree_that_never_quietens_is_rescanned_after_ten_max_delays() -> None:
    """Events that never stop delay a rescan to 10 x max_delay, not forever."""
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=1.0)
    d.request_rescan("log", 0.0)
    now = 0.0
    while now < 9.9:
        now = round(now + 0.1, 6)
        d.touch("log/app.log", now)
        assert set() == d.due_rescans(now)
    d.touch("log/app.log", 10.0)
    assert {"log"} == d.due_rescans(10.0)


def test_rescans_inside_a_due_rescan_are_covered_by_it() -> None:
    """A rescan of the root or of a parent folder makes its subfolders' rescans redundant."""
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=1.0)
    for sub in ("a", "a/b", "c"):
        d.request_rescan(sub, 0.0)
    assert {"a", "c"} == d.due_rescans(1.0)
    d.request_rescan("x", 2.0)
    d.request_rescan("", 2.0)
    assert {""} == d.due_rescans(2.0, force=True)


def test_a_file_first_looked_at_when_overdue_still_waits_until_stable() -> None:
    """A busy delivery thread that stats a burst's file late (already past max_delay) and
    sees it change once delivers it once, stable, not half-written and then again."""
    fs = FakeFiles()
    d = Debouncer(debounce=0.3, max_delay=1.0, min_interval=0.0)
    d.touch("f", 0.0)
    fs.files["f"] = (0, 1)
    assert set() == d.due(1.5, fs.stat)  # first look, late: just created, empty
    fs.files["f"] = (64, 2)  # written a moment later, done
    assert set() == d.due(1.52, fs.stat), "delivered while it had been seen changing once"
    batches = drive(d, fs, 1.54, 3.0)
    assert [{"f"}] == [p for _, p in batches]
    assert batches[0][0] >= 1.52 + 0.3
