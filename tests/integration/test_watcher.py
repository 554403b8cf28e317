"""Real watchdog observers on real folders: the save patterns of real editors."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import WatchConfig
from agent.watcher import Watcher

WATCH = WatchConfig(debounce=0.1, max_delay=1.0, min_interval_per_path=0.2, rescan_interval=3600)
DEADLINE = 10.0


class Collector:
    """Records deliveries: each path with whether it existed when delivered."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.batches: list[set[str]] = []
        self.present: dict[str, list[bool]] = {}
        self.rescans: list[str] = []
        self._cond = threading.Condition()

    def on_dirty(self, paths: set[str]) -> None:
        with self._cond:
            self.batches.append(set(paths))
            for p in paths:
                self.present.setdefault(p, []).append((self.root / p).exists())
            self._cond.notify_all()

    def on_rescan(self, subtree: str) -> None:
        with self._cond:
            self.rescans.append(subtree)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    @property
    def delivered(self) -> set[str]:
        return set(self.present)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Collector]]:
    """A watched folder and the collector of what the watcher delivers."""
    root = tmp_path / "work"
    root.mkdir()
    collector = Collector(root)
    watcher = Watcher(root, WATCH, collector.on_dirty, on_rescan=collector.on_rescan)
    watcher.start()
    yield root, collector
    watcher.stop()


def _settle(collector: Collector, path: str) -> None:
    """Wait until ``path`` was delivered and then nothing more arrives for a while."""
    assert collector.wait_for(lambda: path in collector.present), f"{path} never delivered"
    seen = len(collector.batches)
    collector.wait_for(lambda: len(collector.batches) > seen, timeout=0.6)


def test_word_save_delivers_the_document_and_no_temp_or_owner_file(
    watched: tuple[Path, Collector],
) -> None:
    """Word: owner file, temp file, rename over the original: only the .docx arrives, present."""
    root, c = watched
    (root / "report.docx").write_bytes(b"v1")
    _settle(c, "report.docx")
    (root / "~$report.docx").write_bytes(b"owner")
    (root / "~WRL0001.tmp").write_bytes(b"v2 content")
    os.replace(root / "report.docx", root / "~WRL0002.tmp")
    os.replace(root / "~WRL0001.tmp", root / "report.docx")
    (root / "~WRL0002.tmp").unlink()
    (root / "~$report.docx").unlink()
    assert c.wait_for(lambda: len(c.present.get("report.docx", [])) >= 2)
    assert {"report.docx"} == c.delivered
    assert c.present["report.docx"][-1] is True


def test_libreoffice_lock_file_never_delivered(watched: tuple[Path, Collector]) -> None:
    """LibreOffice's .~lock.NAME# is ignored; the document is delivered."""
    root, c = watched
    (root / ".~lock.plan.odt#").write_text("user,host")
    (root / "plan.odt").write_bytes(b"odt")
    (root / ".~lock.plan.odt#").unlink()
    _settle(c, "plan.odt")
    assert {"plan.odt"} == c.delivered


def test_vim_swap_backup_and_rename(watched: tuple[Path, Collector]) -> None:
    """vim: .swp, backup~ and write-then-rename deliver only the file, present."""
    root, c = watched
    (root / "notes.txt").write_text("one")
    _settle(c, "notes.txt")
    (root / ".notes.txt.swp").write_bytes(b"swap")
    os.replace(root / "notes.txt", root / "notes.txt~")
    (root / "notes.txt").write_text("two")
    (root / "notes.txt~").unlink()
    (root / ".notes.txt.swp").unlink()
    assert c.wait_for(lambda: len(c.present.get("notes.txt", [])) >= 2)
    assert {"notes.txt"} == c.delivered
    assert c.present["notes.txt"][-1] is True


def test_atomic_replace_is_one_delivery_of_the_target(watched: tuple[Path, Collector]) -> None:
    """os.replace of a temp file over the target delivers the target (and the temp as gone)."""
    root, c = watched
    (root / "model.step").write_bytes(b"v1")
    _settle(c, "model.step")
    tmp = root / "model.step.new"
    tmp.write_bytes(b"v2")
    os.replace(tmp, root / "model.step")
    assert c.wait_for(lambda: len(c.present.get("model.step", [])) >= 2)
    assert c.present["model.step"][-1] is True
    assert all(not present for present in c.present.get("model.step.new", []))


def test_slowly_written_large_file_is_delivered_after_it_stops_changing(
    watched: tuple[Path, Collector],
) -> None:
    """A file written in chunks for longer than max_delay is delivered once, after the last."""
    root, c = watched
    path = root / "big.bin"
    with path.open("wb") as fh:
        for _ in range(40):
            fh.write(os.urandom(64 * 1024))
            fh.flush()
            time.sleep(0.03)  # the editor writing slowly is the scenario, not a wait
    finished = time.monotonic()
    assert c.wait_for(lambda: "big.bin" in c.present)
    assert time.monotonic() >= finished
    assert [True] == c.present["big.bin"]


def test_burst_of_1000_files_all_delivered_in_few_batches(watched: tuple[Path, Collector]) -> None:
    """1000 files saved at once all arrive, batched."""
    root, c = watched
    (root / "burst").mkdir()
    c.wait_for(lambda: "burst" in c.rescans, timeout=2)
    for i in range(1000):
        (root / "burst" / f"f{i:04d}.dat").write_bytes(b"x" * 64)
    expected = {f"burst/f{i:04d}.dat" for i in range(1000)}
    assert c.wait_for(lambda: expected <= c.delivered, timeout=30)
    assert len(c.batches) < 200


def test_directory_rename_asks_for_a_rescan_of_both_sides(watched: tuple[Path, Collector]) -> None:
    """A renamed folder is reported as rescans of its old and new path."""
    root, c = watched
    (root / "old").mkdir()
    (root / "old" / "a.txt").write_text("a")
    _settle(c, "old/a.txt")
    os.replace(root / "old", root / "new")
    assert c.wait_for(lambda: {"old", "new"} <= set(c.rescans))
