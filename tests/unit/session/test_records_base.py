"""The session's start snapshot keeps the whole stat tuple, so the first rescan hashes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import SessionError
from agent.folder.entries import LocalEntry
from agent.session.records import SessionStore


def test_start_snapshot_round_trips_ctime_and_inode(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_bytes(b"abc")
    entry = LocalEntry.from_stat(file.stat(), "f" * 64, now_ns=file.stat().st_ctime_ns + 10**9)
    records = SessionStore(tmp_path / "state")
    records.save_base("s1", {"a.txt": entry})
    loaded = records.load_base("s1")["a.txt"]
    assert loaded == entry
    assert loaded.matches(file.stat())  # unchanged file: no hashing needed


def test_a_damaged_start_snapshot_is_a_session_error(tmp_path: Path) -> None:
    records = SessionStore(tmp_path / "state")
    records.save_base("s1", {})
    (records.folder("s1") / "base.json").write_text('{"a.txt": ["x"]}', encoding="utf-8")
    with pytest.raises(SessionError, match="damaged"):
        records.load_base("s1")
