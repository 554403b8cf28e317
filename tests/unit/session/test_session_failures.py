"""Failures half-way through open: the lock is released and nothing partial stays (fake store)."""

from __future__ import annotations

import errno
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import LocalFileError, TransientStoreError
from agent.session import PlantDesignSession
from agent.stage.keys import CommitInfo, StageKeys
from agent.state import SessionState
from agent.store.base import ObjectInfo, ProgressFn
from tests.fakes import FaultyStore, MemoryStore

KEYS = StageKeys("P1", "planning")


def _seeded() -> MemoryStore:
    store = MemoryStore()
    for i in range(5):
        store.put_bytes(KEYS.committed(f"f{i}.txt"), b"content")
    return store


def test_disk_full_during_download_releases_the_lock_and_removes_the_folder(tmp_path: Path) -> None:
    """ENOSPC mid-download: LocalFileError saying the disk is full; lock released; no folder."""
    inner = _seeded()
    store = FaultyStore(inner)

    def full(key: str, dest: Path, *, progress: ProgressFn | None = None) -> ObjectInfo:
        if key.endswith("f3.txt"):
            dest.write_bytes(b"par")
            raise OSError(errno.ENOSPC, "No space left on device")
        return inner.download_file(key, dest, progress=progress)

    store.faults["download_file"] = full
    config = load_config(
        paths={"base_dir": str(tmp_path)}, lock={"heartbeat_interval": 3600, "stale_after": 7200}
    )
    session = PlantDesignSession(config, store=store)
    with pytest.raises(LocalFileError, match="disk is full"):
        session.open("P1", "admin", "planning")
    assert SessionState.CLOSED == session.state
    assert "released" == json.loads(inner.objects[KEYS.lock])["state"]
    assert not (config.paths.work_root / "P1" / "planning").exists()
    assert [] == list(session.records.all())


def test_unreachable_store_leaves_no_lock_and_no_session(tmp_path: Path) -> None:
    """A store that fails every request: a clear error, no lock held, nothing recorded."""
    inner = MemoryStore()
    store = FaultyStore(inner)

    def down(*_a: object, **_k: object) -> object:
        raise TransientStoreError("cannot reach http://127.0.0.1:9 after 6 tries")

    store.faults["get"] = down
    store.faults["put_bytes"] = down
    config = load_config(paths={"base_dir": str(tmp_path)})
    session = PlantDesignSession(config, store=store)
    with pytest.raises(TransientStoreError, match="cannot reach"):
        session.open("P1", "admin", "planning")
    assert SessionState.CLOSED == session.state
    assert KEYS.lock not in inner.objects
    assert [] == list(session.records.all())


class _SkewedStore(MemoryStore):
    """A store whose clock runs two hours ahead of this machine's."""

    def _now(self) -> datetime:
        return datetime.now(UTC) + timedelta(hours=2)


def test_a_commit_is_stamped_with_the_stores_clock_like_the_lock(tmp_path: Path) -> None:
    """History times, lock times and retention are read on one clock, the store's: a
    machine whose clock is two hours behind still stamps the commit with the store's time."""
    store = _SkewedStore()
    config = load_config(
        paths={"base_dir": str(tmp_path / "m1")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        history={"prune_on_close": False},
    )
    session = PlantDesignSession(config, store=store, crash_hooks=False)
    work = session.open("P1", "alice", "planning", watch=False, crash_hooks=False)
    (work / "a.txt").write_text("a")
    session.close()
    reader = PlantDesignSession(config, store=store, crash_hooks=False)
    [commit] = reader.history("P1", "planning")
    assert isinstance(commit, CommitInfo)
    lock = json.loads(store.get(KEYS.lock).body)
    since = datetime.fromisoformat(lock["heartbeat_at"])
    assert abs(commit.committed_at - since) < timedelta(minutes=5)
    assert commit.committed_at - datetime.now(UTC) > timedelta(minutes=90)
