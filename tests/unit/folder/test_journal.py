"""The SQLite journal: coalescing, seq semantics, durability, corruption."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import JournalCorruptError, SessionError
from agent.folder.journal import Journal


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
        "from agent.folder.journal import Journal\n"
        f"j = Journal.open(Path({str(path)!r}))\n"
        "for i in range(50): j.record(f'f{i}', 'put')\n"
        # kill -9 alone keeps what reached the OS; a power cut keeps only what was fsync'd
        "print(j._conn.execute('PRAGMA synchronous').fetchone()[0], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, timeout=60, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "2" == proc.stdout.strip(), "the journal must commit with synchronous=FULL (fsync)"
    again = Journal.open(path)
    try:
        assert 50 == again.pending_count()
    finally:
        again.close()


def _synchronous(journal: Journal) -> int:
    """The journal connection's ``PRAGMA synchronous`` (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA)."""
    (level,) = journal._conn.execute("PRAGMA synchronous").fetchone()
    return int(level)


def test_records_are_fsynced_on_commit(journal: Journal) -> None:
    """The journal runs in WAL mode with synchronous=FULL, also after a non-durable mark_done."""
    (mode,) = journal._conn.execute("PRAGMA journal_mode").fetchone()
    assert "wal" == mode
    assert 2 == _synchronous(journal), "synchronous must be FULL: WAL+NORMAL skips the fsync"
    seq = journal.record("a", "put")
    assert 2 == _synchronous(journal)
    journal.mark_failed("a", seq, "timeout")
    journal.mark_done("a", seq, etag="e", size=1, sha256="h")
    assert 2 == _synchronous(journal), "a non-durable commit must not leave the fsync off"


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


def test_record_many_coalesces_within_and_across_batches(journal: Journal) -> None:
    """A batch that names a path twice, or a path already pending, leaves one row each."""
    journal.record("a", "put")
    journal.record_many([("a", "put", 1, 1), ("b", "put", 2, 2), ("b", "delete", None, None)])
    journal.record_many([])
    rows = {r.path: r for r in journal.pending()}
    assert {"a", "b"} == set(rows)
    assert ("put", 1) == (rows["a"].op, rows["a"].size)
    assert "delete" == rows["b"].op
    assert [r.seq for r in journal.pending()] == sorted(r.seq for r in rows.values())


def test_a_stale_failure_does_not_touch_a_newer_change(journal: Journal) -> None:
    """mark_failed with an old seq leaves the newer row's counters alone."""
    old = journal.record("a", "put")
    journal.record("a", "put")
    journal.mark_failed("a", old, "boom")
    [row] = journal.pending()
    assert (0, None) == (row.attempts, row.last_error)


def test_an_unknown_op_is_refused(journal: Journal) -> None:
    """Only put and delete can be recorded."""
    with pytest.raises(ValueError, match=r"put.*delete"):
        journal.record("a", "move")  # type: ignore[arg-type]
    assert 0 == journal.pending_count()


def test_meta_values_are_replaced_and_missing_keys_are_none(journal: Journal) -> None:
    """meta_set overwrites; meta_get of an unknown key is None."""
    assert journal.meta_get("phase") is None
    journal.meta_set("phase", "OPENING")
    journal.meta_set("phase", "ACTIVE")
    journal.meta_set("base_etag", '"abc"')
    assert ("ACTIVE", '"abc"') == (journal.meta_get("phase"), journal.meta_get("base_etag"))


def test_staged_state_survives_reopening(tmp_path: Path) -> None:
    """What staging holds is still known after the journal was closed and reopened."""
    path = tmp_path / "s.sqlite"
    with Journal.open(path) as j:
        j.mark_done("a", j.record("a", "put"), etag='"e"', size=3, sha256="h", mtime_ns=9)
        j.mark_done("b", j.record("b", "delete"), deleted=True)
    with Journal.open(path) as again:
        staged = again.staged()
        assert ('"e"', 3, "h") == (staged["a"].etag, staged["a"].size, staged["a"].sha256)
        assert "delete" == staged["b"].op
        assert 0 == again.pending_count()


def test_concurrent_recorders_and_uploaders_keep_the_table_consistent(journal: Journal) -> None:
    """Threads recording and marking done at once lose no change and never crash."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [f"p{i}" for i in range(50)]

    def recorder() -> None:
        for _ in range(5):
            for p in paths:
                journal.record(p, "put")

    def uploader() -> None:
        for _ in range(20):
            for row in journal.pending():
                journal.mark_done(row.path, row.seq, etag="e", size=1, sha256="h")

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(recorder), pool.submit(uploader), pool.submit(uploader)]
        for future in futures:
            future.result(timeout=60)  # re-raises what the thread raised
    for row in journal.pending():
        assert journal.mark_done(row.path, row.seq, etag="e", size=1, sha256="h")
    assert 0 == journal.pending_count()
    assert set(paths) == set(journal.staged())


def test_another_sqlite_database_is_not_taken_for_a_journal(tmp_path: Path) -> None:
    """A foreign SQLite file is refused and left untouched."""
    import sqlite3

    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(JournalCorruptError, match=r"other\.sqlite.*not a journal"):
        Journal.open(path)
    conn = sqlite3.connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert {"users"} == tables


def test_a_journal_locked_by_another_writer_fails_within_the_busy_timeout(
    tmp_path: Path,
) -> None:
    """A writer that holds the journal longer than busy_timeout gives a clear error, no hang."""
    import sqlite3
    import time

    path = tmp_path / "l.sqlite"
    Journal.open(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with Journal.open(path, busy_timeout=0.2) as j:
            started = time.monotonic()
            with pytest.raises(JournalCorruptError, match=r"l\.sqlite.*locked"):
                j.record("a", "put")
            assert time.monotonic() - started < 5
            holder.execute("ROLLBACK")
            assert 1 == j.record("a", "put")
    finally:
        holder.close()


def test_using_a_closed_journal_is_a_session_error(tmp_path: Path) -> None:
    """After close, calls raise SessionError rather than a misleading corruption error."""
    from agent.errors import SessionError

    j = Journal.open(tmp_path / "c.sqlite")
    j.close()
    j.close()
    with pytest.raises(SessionError, match="closed"):
        j.record("a", "put")
    with pytest.raises(SessionError, match="closed"):
        j.pending()


def test_recording_an_identical_pending_row_keeps_its_seq(journal: Journal) -> None:
    """The same put (same stat tuple) or delete again is a no-op; an upload under way counts."""
    seq = journal.record("a", "put", size=1, mtime_ns=2, ctime_ns=3, inode=4)
    assert seq == journal.record("a", "put", size=1, mtime_ns=2, ctime_ns=3, inode=4)
    journal.record_many([("a", "put", 1, 2, 3, 4)])
    assert journal.mark_done("a", seq, etag="e", size=1, sha256="h")
    gone = journal.record("b", "delete")
    assert gone == journal.record("b", "delete")


def test_a_record_with_another_ctime_or_unknown_stat_bumps_the_seq(journal: Journal) -> None:
    """Only a fully known, equal stat tuple is identical: a cp -p (new ctime) is new work."""
    seq = journal.record("a", "put", size=1, mtime_ns=2, ctime_ns=3, inode=4)
    newer = journal.record("a", "put", size=1, mtime_ns=2, ctime_ns=5, inode=4)
    assert newer > seq
    assert journal.record("a", "put") > newer
    assert not journal.mark_done("a", seq, etag="e", size=1, sha256="h")


def test_a_journal_from_before_the_stat_columns_is_upgraded(tmp_path: Path) -> None:
    """An older journal's pending table gains ctime_ns and inode and keeps its rows."""
    path = tmp_path / "old.sqlite"
    with Journal.open(path) as j:
        j.record("kept", "put", size=1, mtime_ns=1)
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE pending DROP COLUMN inode")
    conn.execute("ALTER TABLE pending DROP COLUMN ctime_ns")
    conn.close()
    with Journal.open(path) as j:
        assert ["kept"] == [e.path for e in j.pending()]
        seq = j.record("new", "put", size=1, mtime_ns=1, ctime_ns=1, inode=1)
        assert seq == j.record("new", "put", size=1, mtime_ns=1, ctime_ns=1, inode=1)


def test_readers_on_other_threads_see_committed_rows_while_a_writer_holds_the_lock(
    tmp_path: Path,
) -> None:
    """Reads use a connection per thread (WAL): they see commits and never wait on the lock."""
    import threading

    journal = Journal.open(tmp_path / "j.sqlite")
    journal.record("a.txt", "put", size=1, mtime_ns=1)
    seen: list[int] = []
    with journal._lock:  # a writer in the middle of its transaction (e.g. an fsync)
        reader = threading.Thread(target=lambda: seen.append(journal.pending_count()))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), "a read waited for the writer's lock"
    assert seen == [1]
    journal.close()
    with pytest.raises(SessionError):
        journal.pending_count()


def test_concurrent_mark_done_calls_each_get_their_own_answer(tmp_path: Path) -> None:
    """Group commit: 200 marks from 10 threads, each row finished exactly once, results kept."""
    import threading

    journal = Journal.open(tmp_path / "j.sqlite")
    seqs = {f"f{i}": journal.record(f"f{i}", "put", size=1, mtime_ns=1) for i in range(200)}
    results: dict[str, bool] = {}
    stale: dict[str, bool] = {}

    def worker(names: list[str]) -> None:
        for name in names:
            results[name] = journal.mark_done(name, seqs[name], etag="e", size=1, sha256="s")
            stale[name] = journal.mark_done(name, seqs[name], etag="e")  # already finished

    names = sorted(seqs)
    threads = [threading.Thread(target=worker, args=(names[i::10],)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(results.values()) and len(results) == 200
    assert not any(stale.values())
    assert journal.pending_count() == 0
    assert len(journal.staged()) == 200
    journal.close()
