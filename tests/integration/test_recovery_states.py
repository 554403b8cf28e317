"""The seed's state sequences, exactly, and the library's crash/resume/discard path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.keys import StageKeys
from agent.session import PlantDesignSession
from agent.state import SessionState
from agent.store.base import ObjectStore

S = SessionState
P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)


def _config(tmp_path: Path) -> AgentConfig:
    return load_config(
        paths={"base_dir": str(tmp_path / "m1")},
        lock={"heartbeat_interval": 3600},
        watch={"debounce": 0.05, "max_delay": 0.5, "min_interval_per_path": 0.1},
    )


def _recorded(session: PlantDesignSession) -> list[int]:
    states: list[int] = []
    session.state_changed.connect(states.append)
    return states


def test_abort_sequence(store: ObjectStore, tmp_path: Path) -> None:
    """Abort: IDLE -> ACQUIRING -> DOWNLOADING -> ACTIVE -> CLOSED."""
    s = PlantDesignSession(_config(tmp_path), store=store)
    states = _recorded(s)
    s.open(P, "admin", STAGE)
    s.abort()
    assert [S.ACQUIRING, S.DOWNLOADING, S.ACTIVE, S.CLOSED] == states


def test_crash_then_resume_sequences_and_nothing_lost(store: ObjectStore, tmp_path: Path) -> None:
    """Crash: ACTIVE, RECOVERING, CLOSED; then Resume: ACQUIRING, RESTORING, ACTIVE ... CLOSED."""
    config = _config(tmp_path)
    first = PlantDesignSession(config, store=store)
    crash_states = _recorded(first)
    work = first.open(P, "admin", STAGE)
    (work / "saved.dwg").write_bytes(b"saved before the crash")
    first.emergency_save("test")
    assert [S.ACQUIRING, S.DOWNLOADING, S.ACTIVE, S.RECOVERING, S.CLOSED] == crash_states
    info = PlantDesignSession(config, store=store).check_previous_crash()
    assert info is not None
    assert (P, "admin", STAGE) == (info.projekt_id, info.user, info.stage)
    assert info.backup_path is not None
    assert info.lock_released
    second = PlantDesignSession(config, store=store)
    resume_states = _recorded(second)
    assert work == second.resume(info.session_id)
    report = second.close()
    assert [S.ACQUIRING, S.RESTORING, S.ACTIVE, S.UPLOADING, S.CLOSED] == resume_states
    assert ["saved.dwg"] == report.uploaded
    assert b"saved before the crash" == store.get(KEYS.committed("saved.dwg")).body
    assert PlantDesignSession(config, store=store).check_previous_crash() is None


def test_resume_keeps_both_versions_when_someone_else_committed(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A file changed here and in another user's commit is kept twice; theirs keeps its name."""
    seed_cfg = load_config(
        paths={"base_dir": str(tmp_path / "seed")}, lock={"heartbeat_interval": 3600}
    )
    seed = PlantDesignSession(seed_cfg, store=store)
    (seed.open(P, "seeder", STAGE, watch=False) / "plan.txt").write_text("v1")
    seed.close()
    config = _config(tmp_path)
    mine = PlantDesignSession(config, store=store)
    work = mine.open(P, "admin", STAGE)
    (work / "plan.txt").write_text("admin's edit")
    assert mine.flush(timeout=15)
    mine.emergency_save("test")  # releases the lock
    bob = PlantDesignSession(
        load_config(paths={"base_dir": str(tmp_path / "bob")}, lock={"heartbeat_interval": 3600}),
        store=store,
    )
    (bob.open(P, "bob", STAGE, watch=False) / "plan.txt").write_text("bob's edit")
    bob.close()
    again = PlantDesignSession(config, store=store)
    again.resume()
    assert "bob's edit" == (work / "plan.txt").read_text()
    [mine_copy] = list(work.glob("plan.conflict-admin-*.txt"))
    assert "admin's edit" == mine_copy.read_text()
    report = again.close()
    assert ["plan.txt"] == report.conflicts
    assert b"bob's edit" == store.get(KEYS.committed("plan.txt")).body
    assert b"admin's edit" == store.get(KEYS.committed(mine_copy.name)).body


def test_discard_removes_staging_folder_backup_and_releases(
    store: ObjectStore, tmp_path: Path
) -> None:
    """Discard throws the session away: staging, working folder, backup; the stage is free."""
    config = _config(tmp_path)
    s = PlantDesignSession(config, store=store)
    work = s.open(P, "admin", STAGE)
    (work / "draft.txt").write_text("draft")
    assert s.flush(timeout=15)
    s.emergency_save("test")
    info = PlantDesignSession(config, store=store).check_previous_crash()
    assert info is not None and info.backup_path is not None
    PlantDesignSession(config, store=store).discard(info.session_id)
    assert [] == list(store.list(f"{P}/.sessions/"))
    assert not work.exists()
    assert not info.backup_path.exists()
    assert PlantDesignSession(config, store=store).check_previous_crash() is None
    other = PlantDesignSession(
        load_config(paths={"base_dir": str(tmp_path / "o")}, lock={"heartbeat_interval": 3600}),
        store=store,
    )
    other.open(P, "bob", STAGE, watch=False)
    other.abort()


def test_resume_needs_a_fresh_session(store: ObjectStore, tmp_path: Path) -> None:
    """resume() on a session that is already open is refused, naming its state."""
    s = PlantDesignSession(_config(tmp_path), store=store)
    s.open(P, "admin", STAGE, watch=False)
    from agent.errors import SessionError

    with pytest.raises(SessionError, match="active"):
        s.resume()
    s.abort()
