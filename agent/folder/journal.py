"""The durable change journal of one session: SQLite in WAL mode (stdlib ``sqlite3``).

Two tables:

* ``pending``: one row per path with work to do (``put`` or ``delete``),
  coalesced: recording a path again replaces its op and bumps its ``seq``, so a
  path saved ten times before upload is one row. Recording a row identical to
  the pending one (same op; for a put the same size, mtime, ctime and inode) is
  a no-op that keeps its ``seq``, so an upload already under way still counts
  (a folder copy reports each file several times; issue 8). ``synchronous=FULL``: when
  ``record`` returns, the row is on disk.
* ``staged``: what the session's staging prefix holds per path: a confirmed
  ``put`` (with ETag, size, sha256, mtime) or a ``delete`` to apply at commit.
  ``mark_done`` moves a pending row here only if its ``seq`` is unchanged, so a
  change that arrived during the upload stays pending.

Plus ``meta``, a small key-value table for session facts (phase, base manifest
ETag, last upload, last error). A file that is not a journal (another SQLite
database, or not SQLite at all), or is damaged or truncated, raises
``JournalCorruptError`` naming the file and the way forward; so does a journal
that another process keeps locked longer than the busy timeout (never a silent
hang). Using a journal after ``close`` raises ``SessionError``.

The file is stamped with ``PRAGMA application_id`` so that a stray database is
never mistaken for a journal (or silently extended with our tables): the schema,
its checks on open and the marks of the group commit live in ``journal_schema``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

from agent.errors import JournalCorruptError, SessionError
from agent.folder.journal_schema import Mark, apply_mark, create_private, prepare
from agent.log import get_logger

__all__ = ["Change", "Entry", "Journal", "Op", "ShortChange", "Staged"]

log = get_logger(__name__)

Op = Literal["put", "delete"]
Change = tuple[str, Op, int | None, int | None, int | None, int | None]
"""``(path, op, size, mtime_ns, ctime_ns, inode)``: one change to record."""
ShortChange = tuple[str, Op, int | None, int | None]
"""``(path, op, size, mtime_ns)``: a change without ctime and inode (never a no-op put)."""

_OPS = frozenset({"put", "delete"})


@dataclass(frozen=True)
class Entry:
    """A pending row."""

    path: str
    op: Op
    seq: int
    size: int | None
    mtime_ns: int | None
    recorded_at: float
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class Staged:
    """What staging holds for a path (or a delete to apply at commit)."""

    op: Op
    etag: str | None
    size: int
    sha256: str
    mtime_ns: int | None
    executable: bool | None = None


class Journal:
    """One session's journal. Thread-safe: one connection guarded by a lock.

    The watcher thread records, uploader threads mark done, the status reader
    reads; each call is one short transaction. Another process may open the
    same file (``agent status`` reads while the agent writes): WAL lets readers
    run beside the writer, and a writer waits at most ``busy_timeout``.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self._closed = False
        self._busy_timeout = busy_timeout
        # Reads go through a connection per thread, so ten uploaders asking "what does
        # staging hold" never queue behind a writer's fsync (WAL lets readers run beside
        # the writer). Without WAL (some network shares) all share the one connection.
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        self._wal = mode is not None and str(mode[0]).lower() == "wal"
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._marks: list[Mark] = []
        self._marks_lock = threading.Lock()
        self._marking = False

    @classmethod
    def open(cls, path: Path, *, busy_timeout: float = 10.0) -> Journal:
        """Open the journal at ``path``, creating it (and its folder) if it does not exist."""
        try:
            create_private(path)
            conn = sqlite3.connect(
                path, timeout=busy_timeout, check_same_thread=False, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise cls._error(path, exc) from exc
        try:
            prepare(path, conn)
        except sqlite3.Error as exc:
            conn.close()
            raise cls._error(path, exc) from exc
        except JournalCorruptError:
            conn.close()
            raise
        return cls(path, conn, busy_timeout=busy_timeout)

    @staticmethod
    def set_aside(path: Path) -> Path:
        """Move a damaged journal (and its WAL files) to ``<name>.damaged-<time>``; where."""
        aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S}")
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if part.exists():
                os.replace(part, aside.with_name(aside.name + suffix))
        return aside

    @staticmethod
    def _error(path: Path, exc: BaseException) -> JournalCorruptError:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return JournalCorruptError(
                f"the journal {path} stayed locked by another process beyond the busy timeout "
                f"({exc}). Is a second agent running for this session? `agent status` shows it; "
                "stop it, or wait and retry"
            )
        return JournalCorruptError(
            f"the journal {path} cannot be read ({exc}). The working folder still holds your "
            "files: `agent close` (or `agent flush`) rebuilds the pending list by comparing "
            "the folder with the store, and so does `agent recover --resume` when no agent "
            "runs for the session"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError(f"the journal {self.path} was already closed")

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; sqlite errors become ``JournalCorruptError``.

        ``durable=False`` commits without its own fsync (``synchronous=NORMAL`` for this
        one transaction; WAL keeps the order, so the next durable commit syncs it too):
        for bookkeeping whose loss only means repeating work (``mark_done``,
        ``mark_failed``), never for ``record``.
        """
        with self._lock:
            self._check_open()
            try:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield self._conn
                    except BaseException:
                        self._conn.execute("ROLLBACK")
                        raise
                    self._conn.execute("COMMIT")
                finally:
                    if not durable:
                        self._conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise self._error(self.path, exc) from exc

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        if not self._wal:
            with self._lock:
                self._check_open()
                try:
                    return list(self._conn.execute(sql, args).fetchall())
                except sqlite3.Error as exc:
                    raise self._error(self.path, exc) from exc
        self._check_open()
        try:
            return list(self._reader().execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise self._error(self.path, exc) from exc

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (opened on first use, closed with the journal)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                check_same_thread=False,  # used by this thread only; closed by close()
                isolation_level=None,
            )
            conn.execute("PRAGMA query_only=ON")
            with self._readers_lock:
                self._check_open()
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    # ----------------------------------------------------------------- writes

    def record(
        self,
        path: str,
        op: Op,
        *,
        size: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        inode: int | None = None,
    ) -> int:
        """Record pending work for ``path`` (coalesced); durable when it returns. Returns seq.

        Recording a path that is already pending replaces its op, size and mtime and
        gives it a new, higher seq (so an upload of the older state cannot mark it
        done); ``attempts`` and ``last_error`` are kept, so the retry backoff goes on.
        A record identical to the pending row changes nothing and returns its seq.
        """
        _check_op(op)
        with self._tx() as conn:
            return self._upsert(conn, (path, op, size, mtime_ns, ctime_ns, inode))

    def record_many(self, items: Iterable[Change | ShortChange]) -> None:
        """Record several changes in one durable transaction (one fsync).

        Each item is ``(path, op, size, mtime_ns, ctime_ns, inode)``, or the first four.
        """
        rows: list[Change] = [(*item, None, None) if len(item) == 4 else item for item in items]
        for _path, op, *_rest in rows:
            _check_op(op)
        if not rows:
            return
        with self._tx() as conn:
            for row in rows:
                self._upsert(conn, row)

    @staticmethod
    def _upsert(conn: sqlite3.Connection, row: Change) -> int:
        path, op, size, mtime_ns, ctime_ns, inode = row
        current = conn.execute(
            "SELECT seq, op, size, mtime_ns, ctime_ns, inode FROM pending WHERE path = ?", (path,)
        ).fetchone()
        if current is not None and _identical(tuple(current[1:]), row[1:]):
            return int(current[0])
        conn.execute("UPDATE counter SET seq = seq + 1 WHERE id = 1")
        (seq,) = conn.execute("SELECT seq FROM counter WHERE id = 1").fetchone()
        conn.execute(
            "INSERT INTO pending (path, op, seq, size, mtime_ns, ctime_ns, inode, recorded_at,"
            " attempts, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, NULL)"
            " ON CONFLICT(path) DO UPDATE SET op=excluded.op, seq=excluded.seq, size=excluded.size,"
            " mtime_ns=excluded.mtime_ns, ctime_ns=excluded.ctime_ns, inode=excluded.inode,"
            " recorded_at=excluded.recorded_at",
            (path, op, seq, size, mtime_ns, ctime_ns, inode, time.time()),
        )
        return int(seq)

    def mark_done(
        self,
        path: str,
        seq: int,
        *,
        etag: str | None = None,
        size: int | None = None,
        sha256: str | None = None,
        mtime_ns: int | None = None,
        executable: bool | None = None,
        deleted: bool = False,
        unchanged: bool = False,
    ) -> bool:
        """Finish a pending row if its seq is unchanged; record what staging now holds.

        ``etag`` given: staging holds a put. ``deleted``: a delete to apply at commit.
        ``unchanged``: the file equals what the store holds already; staging is left as
        it is. None of these: nothing to stage (the file equals the base). Returns False
        if a newer change arrived meanwhile (the row stays pending).

        Committed without an fsync (``synchronous=NORMAL``): losing a mark_done to a
        power cut only means the row is sent again; ``record`` keeps its fsync.
        Concurrent calls are committed together (group commit): the first caller
        writes the marks that queued up meanwhile in one transaction, the others wait
        for it. Ten uploaders each committing alone spent more time queued for the
        write lock than uploading.
        """
        mark = Mark(path, seq, etag, size, sha256, mtime_ns, executable, deleted, unchanged)
        with self._marks_lock:
            self._marks.append(mark)
            leader = not self._marking
            self._marking = True
        if not leader:
            mark.done.wait()
        else:
            self._commit_marks()
        if mark.error is not None:
            raise mark.error
        return mark.result

    def _commit_marks(self) -> None:
        """Write every queued mark, batch by batch, until the queue is empty."""
        while True:
            with self._marks_lock:
                batch, self._marks = self._marks, []
                if not batch:
                    self._marking = False
                    return
            try:
                with self._tx(durable=False) as conn:
                    for mark in batch:
                        mark.result = apply_mark(conn, mark)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter, re-raised there
                for mark in batch:
                    mark.error = exc
            for mark in batch:
                mark.done.set()

    def mark_failed(self, path: str, seq: int, error: str) -> None:
        """Count a failed attempt; the row stays pending."""
        with self._tx(durable=False) as conn:
            conn.execute(
                "UPDATE pending SET attempts = attempts + 1, last_error = ?"
                " WHERE path = ? AND seq = ?",
                (error[:500], path, seq),
            )

    def forget(self, path: str) -> None:
        """Drop pending and staged state of ``path`` (a conflict took it over)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM pending WHERE path = ?", (path,))
            conn.execute("DELETE FROM staged WHERE path = ?", (path,))

    def drop_staged(self, paths: Iterable[str]) -> None:
        """Forget the staged entries of ``paths`` (a commit made them the base); pending stays."""
        with self._tx() as conn:
            conn.executemany("DELETE FROM staged WHERE path = ?", [(p,) for p in paths])

    def clear_staged(self) -> None:
        """Forget every staged entry (after a commit made them the base)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM staged")

    def meta_set(self, key: str, value: str) -> None:
        """Store a session fact."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ reads

    def meta_get(self, key: str) -> str | None:
        """Read a session fact."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def pending(self) -> list[Entry]:
        """Pending rows in the order they were (last) recorded."""
        rows = self._query(
            "SELECT path, op, seq, size, mtime_ns, recorded_at, attempts, last_error"
            " FROM pending ORDER BY seq"
        )
        return [Entry(*row) for row in rows]  # type: ignore[arg-type]

    def pending_bytes(self) -> int:
        """The bytes still to send (one SQL sum: close polls it for its progress bar)."""
        rows = self._query("SELECT COALESCE(SUM(MAX(size, 0)), 0) FROM pending")
        total = rows[0][0] if rows else 0
        return total if isinstance(total, int) else 0

    def pending_since(self, seq: int) -> list[Entry]:
        """Pending rows recorded after ``seq``, in order."""
        rows = self._query(
            "SELECT path, op, seq, size, mtime_ns, recorded_at, attempts, last_error"
            " FROM pending WHERE seq > ? ORDER BY seq",
            (seq,),
        )
        return [Entry(*row) for row in rows]  # type: ignore[arg-type]

    def pending_for(self, paths: Iterable[str]) -> list[Entry]:
        """The pending rows of ``paths`` (those that have one), one lookup by key each."""
        out: list[Entry] = []
        for path in paths:
            rows = self._query(
                "SELECT path, op, seq, size, mtime_ns, recorded_at, attempts, last_error"
                " FROM pending WHERE path = ?",
                (path,),
            )
            out += [Entry(*row) for row in rows]  # type: ignore[arg-type]
        return out

    def pending_count(self) -> int:
        """How many paths have work to do."""
        count = self._query("SELECT COUNT(*) FROM pending")[0][0]
        assert isinstance(count, int)
        return count

    def staged(self) -> dict[str, Staged]:
        """Everything staging holds (puts) or commit must delete."""
        rows = self._query(
            "SELECT path, op, etag, size, sha256, mtime_ns, executable FROM staged ORDER BY path"
        )
        return {str(r[0]): _staged(r[1:]) for r in rows}

    def staged_entry(self, path: str) -> Staged | None:
        """What staging holds for one path."""
        rows = self._query(
            "SELECT op, etag, size, sha256, mtime_ns, executable FROM staged WHERE path = ?",
            (path,),
        )
        return _staged(rows[0]) if rows else None

    def backup(self, dest: Path) -> None:
        """A consistent copy of the journal at ``dest`` (SQLite's online backup)."""
        create_private(dest)
        target = sqlite3.connect(dest)
        try:
            with self._lock:
                self._conn.backup(target)
        finally:
            target.close()

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise ``SessionError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()
            with self._readers_lock:
                for reader in self._readers:
                    reader.close()
                self._readers.clear()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _identical(pending: tuple[object, ...], new: tuple[object, ...]) -> bool:
    """``(op, size, mtime_ns, ctime_ns, inode)`` of a pending row and of a new record."""
    if pending[0] != new[0]:
        return False
    if new[0] == "delete":
        return True
    return None not in new and pending == new


def _check_op(op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"journal op must be 'put' or 'delete', not {op!r}")


def _staged(row: tuple[object, ...]) -> Staged:
    """A ``staged`` row (without its path) as ``Staged``; SQLite keeps the bit as 0/1/NULL."""
    op, etag, size, sha256, mtime_ns, executable = row
    return Staged(
        op=cast(Op, op),
        etag=cast("str | None", etag),
        size=cast(int, size),
        sha256=cast(str, sha256),
        mtime_ns=cast("int | None", mtime_ns),
        executable=None if executable is None else bool(executable),
    )
