"""The journal's file: its schema, the checks and migrations on open, and the marks.

The file is stamped with ``PRAGMA application_id`` (``APPLICATION_ID``) so that a
stray database is never mistaken for a journal (or silently extended with our
tables); ``prepare`` refuses one, sets WAL and ``synchronous=FULL``, creates the
tables and adds the columns older journals lack. ``Mark`` and ``apply_mark`` are one
``Journal.mark_done`` waiting for its group commit, and its statements.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import JournalCorruptError
from agent.log import get_logger
from agent.platform import create_private_file, make_private_dirs

__all__ = ["APPLICATION_ID", "Mark", "apply_mark", "create_private", "prepare"]

log = get_logger("agent.folder.journal")  # the journal's warnings, as before the split

APPLICATION_ID = 0x70644A31  # "pdJ1": marks the file as one of our journals
SCHEMA_VERSION = 1
TABLES = frozenset({"pending", "staged", "meta", "counter"})

SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS pending (
    path TEXT PRIMARY KEY,
    op TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    seq INTEGER NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    recorded_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    ctime_ns INTEGER,
    inode INTEGER
);
CREATE TABLE IF NOT EXISTS staged (
    path TEXT PRIMARY KEY,
    op TEXT NOT NULL CHECK (op IN ('put', 'delete')),
    etag TEXT,
    size INTEGER,
    sha256 TEXT,
    mtime_ns INTEGER,
    executable INTEGER
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
INSERT OR IGNORE INTO counter (id, seq) VALUES (1, 0);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""  # noqa: S608 - two int constants, no input


def prepare(path: Path, conn: sqlite3.Connection) -> None:
    """Check that ``conn`` is a sound journal (or a new file) and set it up."""
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    # app_id 0 with exactly our tables: a journal written before the stamp existed.
    if app_id != APPLICATION_ID and not (app_id == 0 and tables <= TABLES):
        raise JournalCorruptError(
            f"{path} is not a journal of this agent (an unrelated SQLite database, "
            f"application_id {app_id:#x}); it was left untouched. Move it away, then "
            "`agent recover --resume` rebuilds the pending list from the working folder"
        )
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if mode is None or str(mode[0]).lower() != "wal":
        # A filesystem without shared memory (some network shares): still durable.
        log.warning("journal_not_wal", path=str(path), mode=mode and mode[0])
    conn.execute("PRAGMA synchronous=FULL")
    if app_id != APPLICATION_ID or tables != TABLES:
        conn.executescript(SCHEMA)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(pending)")}
    if "inode" not in columns:  # a journal from before issue 8
        conn.execute("ALTER TABLE pending ADD COLUMN ctime_ns INTEGER")
        conn.execute("ALTER TABLE pending ADD COLUMN inode INTEGER")
    staged_columns = {r[1] for r in conn.execute("PRAGMA table_info(staged)")}
    if "executable" not in staged_columns:  # a journal from before the executable bit
        conn.execute("ALTER TABLE staged ADD COLUMN executable INTEGER")
    row = conn.execute("PRAGMA quick_check").fetchone()
    if row is None or row[0] != "ok":
        raise sqlite3.DatabaseError(f"quick_check: {row and row[0]}")


def create_private(path: Path) -> None:
    """Create the database file 0600 in a 0700 folder before SQLite opens it.

    SQLite would create it with the umask's mode; its ``-wal``/``-shm`` files take
    the database file's mode, so the whole journal stays owner-only (issue 9).
    """
    make_private_dirs(path.parent)
    try:
        fd = create_private_file(path)
    except FileExistsError:
        return
    os.close(fd)


@dataclass
class Mark:
    """One ``mark_done`` waiting for its group commit."""

    path: str
    seq: int
    etag: str | None
    size: int | None
    sha256: str | None
    mtime_ns: int | None
    executable: bool | None
    deleted: bool
    unchanged: bool
    result: bool = False
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def apply_mark(conn: sqlite3.Connection, mark: Mark) -> bool:
    """``mark_done``'s statements for one row, inside the caller's transaction."""
    cur = conn.execute("DELETE FROM pending WHERE path = ? AND seq = ?", (mark.path, mark.seq))
    if cur.rowcount == 0:
        return False
    if mark.unchanged:
        pass
    elif mark.etag is not None:
        conn.execute(
            "INSERT OR REPLACE INTO staged"
            " (path, op, etag, size, sha256, mtime_ns, executable)"
            " VALUES (?, 'put', ?, ?, ?, ?, ?)",
            (
                mark.path,
                mark.etag,
                mark.size or 0,
                mark.sha256 or "",
                mark.mtime_ns,
                mark.executable,
            ),
        )
    elif mark.deleted:
        conn.execute(
            "INSERT OR REPLACE INTO staged (path, op, etag, size, sha256, mtime_ns)"
            " VALUES (?, 'delete', NULL, 0, '', NULL)",
            (mark.path,),
        )
    else:
        conn.execute("DELETE FROM staged WHERE path = ?", (mark.path,))
    return True
