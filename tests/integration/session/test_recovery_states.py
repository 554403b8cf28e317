"""The seed's state sequences, exactly, and the library's crash/resume/discard path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import CommitBlockedError, SessionError
from agent.session import PlantDesignSession
from agent.stage.commit import Commit
from agent.stage.intent import StagedCopy, read_intent, read_manifest
from agent.stage.keys import StageKeys
from agent.stage.manifest import Manifest
from agent.state import SessionState
from agent.store.base import ObjectStore

S = SessionState
P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)


def _config(tmp_path: Path) -> AgentConfig:
    return load_config(
        paths={"base_dir": str(tmp_path / "m1")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
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
        paths={"base_dir": str(tmp_path / "seed")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
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
        load_config(
            paths={"base_dir": str(tmp_path / "bob")},
            lock={"heartbeat_interval": 3600, "stale_after": 7200},
        ),
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
    assert ["draft.txt"] == info.unsaved, "staged but never committed: discard loses it"
    PlantDesignSession(config, store=store).discard(info.session_id, confirm_loss=info.unsaved)
    assert [] == list(store.list(f"{P}/.sessions/"))
    assert not work.exists()
    assert not info.backup_path.exists()
    assert PlantDesignSession(config, store=store).check_previous_crash() is None
    other = PlantDesignSession(
        load_config(
            paths={"base_dir": str(tmp_path / "o")},
            lock={"heartbeat_interval": 3600, "stale_after": 7200},
        ),
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


def _other(store: ObjectStore, tmp_path: Path, name: str) -> PlantDesignSession:
    return PlantDesignSession(
        load_config(
            paths={"base_dir": str(tmp_path / name)},
            lock={"heartbeat_interval": 3600, "stale_after": 7200},
        ),
        store=store,
    )


def test_resume_after_someone_elses_commit_to_another_file_keeps_our_edit(
    store: ObjectStore, tmp_path: Path
) -> None:
    """We edit a.txt, bob edits only b.txt: resume takes b.txt, keeps a.txt, no conflict copy."""
    seed = _other(store, tmp_path, "seed")
    work0 = seed.open(P, "seeder", STAGE, watch=False)
    (work0 / "a.txt").write_text("a1")
    (work0 / "b.txt").write_text("b1")
    seed.close()
    config = _config(tmp_path)
    mine = PlantDesignSession(config, store=store)
    work = mine.open(P, "admin", STAGE)
    (work / "a.txt").write_text("admin's a")
    assert mine.flush(timeout=15)
    mine.emergency_save("test")
    bob = _other(store, tmp_path, "bob")
    (bob.open(P, "bob", STAGE, watch=False) / "b.txt").write_text("bob's b")
    bob.close()
    again = PlantDesignSession(config, store=store)
    again.resume()
    assert "admin's a" == (work / "a.txt").read_text()
    assert "bob's b" == (work / "b.txt").read_text()
    assert [] == list(work.glob("*.conflict-*"))
    report = again.close()
    assert [] == report.conflicts
    assert b"admin's a" == store.get(KEYS.committed("a.txt")).body
    assert b"bob's b" == store.get(KEYS.committed("b.txt")).body


def test_close_commits_the_users_bytes_when_a_sent_object_was_swapped(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A co-worker overwrites our sent object before close: our bytes are committed."""
    session = PlantDesignSession(_config(tmp_path), store=store)
    work = session.open(P, "admin", STAGE)
    (work / "plan.dwg").write_bytes(b"the user's drawing")
    assert session.flush(timeout=15)
    assert session.record is not None
    # The hash of a file is no secret (a co-worker may have the same drawing): plant bytes.
    sent_key = KEYS.version(hashlib.sha256(b"the user's drawing").hexdigest())
    store.put_bytes(sent_key, b"a co-worker's bytes")
    session.close()
    assert b"the user's drawing" == store.get(KEYS.committed("plan.dwg")).body
    manifest = Manifest.parse(store.get(KEYS.manifest).body, key=KEYS.manifest)
    assert hashlib.sha256(b"the user's drawing").hexdigest() == manifest.files["plan.dwg"].sha256
    other = _other(store, tmp_path, "bob")
    assert b"the user's drawing" == (other.open(P, "bob", STAGE) / "plan.dwg").read_bytes()
    other.abort()


def test_an_old_upload_arriving_late_does_not_replace_the_newer_save(
    store: ObjectStore, tmp_path: Path
) -> None:
    """The older bytes land after the newer save was sent: close commits the newer."""
    session = PlantDesignSession(_config(tmp_path), store=store)
    work = session.open(P, "admin", STAGE)
    (work / "plan.dwg").write_bytes(b"version 1")
    assert session.flush(timeout=15)
    (work / "plan.dwg").write_bytes(b"version 2, the last save")
    assert session.flush(timeout=15)
    assert session.record is not None
    # What a delayed retry of the first PUT does when it reaches the store last (to the
    # first version's own content key, where it can do no harm):
    store.put_bytes(KEYS.version(hashlib.sha256(b"version 1").hexdigest()), b"version 1")
    session.close()
    assert b"version 2, the last save" == store.get(KEYS.committed("plan.dwg")).body


def test_a_swapped_object_of_a_crashed_session_blocks_others_until_its_owner_resumes(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A cut commit whose sent object was swapped: bob's open refuses; our resume finishes it."""
    config = _config(tmp_path)
    mine = PlantDesignSession(config, store=store)
    work = mine.open(P, "admin", STAGE)
    (work / "plan.dwg").write_bytes(b"mine")
    assert mine.flush(timeout=15)
    assert mine.record is not None and mine._journal is not None
    sid = mine.record.session_id
    staged = mine._journal.staged()["plan.dwg"]
    # The close process dies right after writing its intent (nothing copied yet) ...
    Commit(store, KEYS, workers=1).begin(
        session_id=sid,
        user="admin",
        machine="m1",
        base=Manifest(),
        base_etag=None,
        copies={
            "plan.dwg": StagedCopy(size=staged.size, sha256=staged.sha256, etag=staged.etag or "")
        },
        deletes=[],
        previous=None,
    )
    mine.emergency_save("test")  # releases the lock, keeps the record
    # ... and a co-worker swaps the sent object.
    store.put_bytes(KEYS.version(staged.sha256), b"foreign")
    bob = _other(store, tmp_path, "bob")
    with pytest.raises(CommitBlockedError):
        bob.open(P, "bob", STAGE)
    assert "released" == json.loads(store.get(KEYS.lock).body)["state"]
    again = PlantDesignSession(config, store=store)
    again.resume()
    assert b"mine" == store.get(KEYS.committed("plan.dwg")).body
    again.close()
    bob2 = _other(store, tmp_path, "bob2")
    assert b"mine" == (bob2.open(P, "bob", STAGE) / "plan.dwg").read_bytes()
    bob2.abort()


@pytest.mark.parametrize("then", ["abort", "discard", "resume_close", "other_open"])
def test_a_commit_cut_after_its_intent_is_finished_by_whoever_comes_next(
    store: ObjectStore, tmp_path: Path, then: str
) -> None:
    """Intent written, nothing copied, process gone: every next verb rolls the commit forward."""
    seed = _other(store, tmp_path, "seed")
    (seed.open(P, "seeder", STAGE, watch=False) / "keep.txt").write_text("keep")
    seed.close()
    config = _config(tmp_path)
    mine = PlantDesignSession(config, store=store)
    work = mine.open(P, "admin", STAGE)
    (work / "plan.dwg").write_bytes(b"saved work")
    assert mine.flush(timeout=15)
    assert mine.record is not None and mine._journal is not None
    staged = mine._journal.staged()["plan.dwg"]
    manifest, etag = read_manifest(store, KEYS)
    assert manifest is not None
    Commit(store, KEYS, workers=1).begin(
        session_id=mine.record.session_id,
        user="admin",
        machine="m1",
        base=manifest,
        base_etag=etag,
        copies={
            "plan.dwg": StagedCopy(size=staged.size, sha256=staged.sha256, etag=staged.etag or "")
        },
        deletes=[],
        previous=read_intent(store, KEYS),
    )
    if then == "abort":
        mine.abort()
    else:
        mine.emergency_save("test")
        if then == "discard":
            PlantDesignSession(config, store=store).discard(confirm_loss=True)
        elif then == "resume_close":
            again = PlantDesignSession(config, store=store)
            again.resume()
            again.close()
        else:
            carol = _other(store, tmp_path, "carol")
            carol.open(P, "carol", STAGE)
            carol.abort()
    committed, _etag = read_manifest(store, KEYS)
    assert committed is not None
    assert {"keep.txt", "plan.dwg"} == set(committed.files)
    for rel, entry in committed.files.items():
        body = store.get(KEYS.committed(rel)).body
        assert entry.sha256 == hashlib.sha256(body).hexdigest()
    assert "done" == read_intent(store, KEYS)[0].state  # type: ignore[index]
    assert "released" == json.loads(store.get(KEYS.lock).body)["state"]
    bob = _other(store, tmp_path, "bob")
    assert b"saved work" == (bob.open(P, "bob", STAGE) / "plan.dwg").read_bytes()
    bob.abort()


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_a_close_cut_after_its_release_is_not_offered_for_resume(
    store: ObjectStore, tmp_path: Path
) -> None:
    """Phase 'closing' (committed, released) of a dead process: recovery only cleans up."""
    config = _config(tmp_path)
    session = PlantDesignSession(config, store=store)
    session.open(P, "admin", STAGE, watch=False)
    session._stop_heartbeat()
    session._update_record(phase="closing", pid=_dead_pid())
    assert session.record is not None
    sid = session.record.session_id
    assert PlantDesignSession(config, store=store).check_previous_crash() is None
    assert [] == [r.session_id for r in session.records.all() if r.session_id == sid]


def test_an_abort_cut_by_a_crash_is_finished_by_discard_not_resumed(
    store: ObjectStore, tmp_path: Path
) -> None:
    """Phase 'aborting' of a dead process: resume refuses and says so; discard finishes it."""
    config = _config(tmp_path)
    session = PlantDesignSession(config, store=store)
    session.open(P, "admin", STAGE, watch=False)
    session._stop_heartbeat()
    session._update_record(phase="aborting", pid=_dead_pid())
    with pytest.raises(SessionError, match="being aborted"):
        PlantDesignSession(config, store=store).resume()
    PlantDesignSession(config, store=store).discard(confirm_loss=True)
    assert "released" == json.loads(store.get(KEYS.lock).body)["state"]
    assert PlantDesignSession(config, store=store).check_previous_crash() is None


def _damage_journal(session: PlantDesignSession) -> None:
    """Overwrite the journal's first pages (and its WAL) as a failing disk would."""
    assert session.record is not None
    path = session._journal_path(session.record.session_id)
    for part in (path, path.with_name(path.name + "-wal")):
        if part.exists():
            with part.open("r+b") as fh:
                fh.write(os.urandom(min(part.stat().st_size, 8192)))


def test_a_journal_damaged_under_a_running_session_is_rebuilt_by_close(
    store: ObjectStore, tmp_path: Path
) -> None:
    """The journal goes bad while the session runs: status still answers, close rebuilds the
    journal from the folder and commits every saved file; nothing is lost."""
    session = PlantDesignSession(_config(tmp_path), store=store)
    work = session.open(P, "admin", STAGE)
    (work / "a.txt").write_bytes(b"saved before")
    assert session.flush(timeout=15)
    _damage_journal(session)
    (work / "b.txt").write_bytes(b"saved after the damage")
    status = session.status()  # answers (it used to raise), whether SQLite noticed yet or not
    assert "active" == status["state"]
    report = session.close()
    assert ["a.txt", "b.txt"] == report.uploaded
    assert b"saved before" == store.get(KEYS.committed("a.txt")).body
    assert b"saved after the damage" == store.get(KEYS.committed("b.txt")).body
    assert [] == list(store.list(f"{P}/.sessions/"))
