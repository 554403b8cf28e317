"""The SQLite journal: coalescing, seq semantics, durability, corruption."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import JournalCorruptError
from agent.journal import Journal


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    """A fresh journal, closed after the test."""
    j = Journal.open(tmp_path / "j.sqlite")
    yield j
    j.close()


def test_saving_a_path_ten_times_is_one_pending_row(journal: Journal) -> None:
    """Records of one path coalesce: the last op and a new seq."""
    seqs = [journal.record("a.dwg", "put", size=i, mtime_ns=i) for i in range(10)]
    journal.record("b.dwg", "put")
    journal.record("a.dwg", "delete")
    rows = journal.pending()
    assert ["b.dwg", "a.dwg"] == [r.path for r in rows]
    assert "delete" == rows[1].op
    assert seqs == sorted(seqs)
    assert 2 == journal.pending_count()


def test_mark_done_only_with_the_current_seq(journal: Journal) -> None:
    """A newer change during an upload keeps the row pending; staged records the confirmed put."""
    old = journal.record("a", "put")
    new = journal.record("a", "put")
    assert not journal.mark_done("a", old, etag="e1", size=1, sha256="h1")
    assert 1 == journal.pending_count()
    assert journal.mark_done("a", new, etag="e2", size=2, sha256="h2", mtime_ns=7)
    assert 0 == journal.pending_count()
    staged = journal.staged()["a"]
    assert ("put", "e2", 2, "h2", 7) == (
        staged.op,
        staged.etag,
        staged.size,
        staged.sha256,
        staged.mtime_ns,
    )


def test_delete_and_noop_outcomes_update_staged(journal: Journal) -> None:
    """A confirmed delete is staged as a delete; a no-op clears the staged entry."""
    journal.mark_done("x", journal.record("x", "put"), etag="e", size=1, sha256="h")
    journal.mark_done("x", journal.record("x", "delete"), deleted=True)
    assert "delete" == journal.staged()["x"].op
    journal.mark_done("x", journal.record("x", "put"))
    assert journal.staged_entry("x") is None


def test_failures_are_counted_and_kept_pending(journal: Journal) -> None:
    """mark_failed increments attempts and keeps the last error."""
    seq = journal.record("a", "put")
    journal.mark_failed("a", seq, "503 SlowDown")
    journal.mark_failed("a", seq, "timeout")
    [row] = journal.pending()
    assert (2, "timeout") == (row.attempts, row.last_error)


def test_rows_survive_reopening_and_backup(journal: Journal, tmp_path: Path) -> None:
    """Pending rows, staged state and meta are there after close/reopen and in a backup."""
    journal.record("a", "put")
    journal.meta_set("phase", "active")
    journal.backup(tmp_path / "copy.sqlite")
    journal.close()
    for path in (tmp_path / "j.sqlite", tmp_path / "copy.sqlite"):
        again = Journal.open(path)
        try:
            assert ["a"] == [r.path for r in again.pending()]
            assert "active" == again.meta_get("phase")
        finally:
            again.close()


def test_a_record_survives_kill_9_right_after_it_returns(tmp_path: Path) -> None:
    """A process killed with SIGKILL right after record() returned loses nothing."""
    path = tmp_path / "k.sqlite"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from agent.journal import Journal\n"
        f"j = Journal.open(Path({str(path)!r}))\n"
        "for i in range(50): j.record(f'f{i}', 'put')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert proc.returncode != 0
    again = Journal.open(path)
    try:
        assert 50 == again.pending_count()
    finally:
        again.close()


def test_a_file_that_is_not_a_journal_is_reported(tmp_path: Path) -> None:
    """Garbage in place of the journal is JournalCorruptError naming the file and a way out."""
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalCorruptError, match=r"bad\.sqlite.*agent recover"):
        Journal.open(bad)


def test_a_truncated_journal_is_reported(tmp_path: Path) -> None:
    """A journal cut mid-page is refused, not silently used."""
    path = tmp_path / "t.sqlite"
    j = Journal.open(path)
    for i in range(2000):
        j.record(f"some/long/path/number/{i:05d}.dwg", "put", size=i, mtime_ns=i)
    j.close()
    for extra in (path.with_name("t.sqlite-wal"), path.with_name("t.sqlite-shm")):
        extra.unlink(missing_ok=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(JournalCorruptError):
        j2 = Journal.open(path)
        try:
            j2.pending()
        finally:
            j2.close()
