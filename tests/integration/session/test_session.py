"""The session lifecycle against both real stores (folder store and SeaweedFS)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import (
    ConflictError,
    InvalidNameError,
    LockCorruptError,
    LockHeldError,
    MassDeleteError,
    PreviousCrashError,
    SessionError,
)
from agent.folder.entries import file_sha256
from agent.session import PlantDesignSession, checkout
from agent.stage.keys import StageKeys
from agent.stage.manifest import Manifest
from agent.state import SessionState
from agent.store.base import ObjectStore
from tests.integration.conftest import MakeSession
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _committed(store: ObjectStore) -> dict[str, bytes]:
    out = {}
    for info in store.list(KEYS.committed_prefix):
        rel = KEYS.rel_from_committed(info.key)
        out[rel] = store.get(info.key).body
    return out


def _seed(make_session: MakeSession, files: dict[str, bytes]) -> None:
    s = make_session("seed")
    work = s.open(P, "seeder", STAGE)
    _write(work, files)
    s.close()


def test_online_lifecycle_commits_changes_and_emits_the_seed_sequence(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """Open, edit, close: the store holds the edits, the manifest matches, states are Online."""
    _seed(make_session, {"a.txt": b"alpha", "dir/b.dwg": b"bravo", "gone.txt": b"x"})
    session = make_session()
    states: list[int] = []
    progress: list[tuple[str, int]] = []
    session.state_changed.connect(states.append)
    session.progress.connect(lambda m, p: progress.append((m, p)))
    work = session.open(P, "admin", STAGE)
    assert b"bravo" == (work / "dir" / "b.dwg").read_bytes()
    (work / "a.txt").write_bytes(b"alpha v2")
    (work / "new" / "c.txt").parent.mkdir()
    (work / "new" / "c.txt").write_bytes(b"charlie")
    (work / "gone.txt").unlink()
    report = session.close()
    assert ["a.txt", "new/c.txt"] == report.uploaded
    assert ["gone.txt"] == report.deleted
    assert {"a.txt": b"alpha v2", "dir/b.dwg": b"bravo", "new/c.txt": b"charlie"} == _committed(
        store
    )
    manifest = Manifest.parse(store.get(KEYS.manifest).body, key=KEYS.manifest)
    assert {"a.txt", "dir/b.dwg", "new/c.txt"} == set(manifest.files)
    assert [] == list(store.list(f"{P}/.sessions/"))
    lock = json.loads(store.get(KEYS.lock).body)
    assert "released" == lock["state"]
    s = SessionState
    assert [s.ACQUIRING, s.DOWNLOADING, s.ACTIVE, s.UPLOADING, s.CLOSED] == states
    assert progress and 100 == progress[-1][1]
    assert not work.exists()


def test_open_refuses_when_lock_held_by_another_user(make_session: MakeSession) -> None:
    """A second user gets LockHeldError naming the holder and machine, and nothing local."""
    first = make_session("m1")
    first.open(P, "alice", STAGE)
    second = make_session("m2")
    with pytest.raises(LockHeldError) as info:
        second.open(P, "bob", STAGE)
    assert "alice" in str(info.value)
    assert SessionState.CLOSED == second.state
    first.abort()


def test_abort_discards_edits_and_releases_the_lock(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """Abort leaves the committed copy untouched and lets the next user in."""
    _seed(make_session, {"a.txt": b"v1"})
    session = make_session()
    work = session.open(P, "admin", STAGE)
    (work / "a.txt").write_bytes(b"unsaved")
    session.abort()
    assert {"a.txt": b"v1"} == _committed(store)
    other = make_session("m2")
    other.open(P, "bob", STAGE)
    other.abort()


def test_reopening_an_unchanged_copy_downloads_nothing(
    make_session: MakeSession, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache of the closed copy makes a re-open transfer no file; a change fetches only it."""
    _seed(make_session, {f"f{i}.txt": str(i).encode() for i in range(20)})
    first = make_session()
    first.open(P, "admin", STAGE)
    first.close()
    downloads: list[str] = []
    real = store.download_file

    def counting(key: str, dest: Path, **kw: object) -> object:
        downloads.append(key)
        return real(key, dest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "download_file", counting)
    second = make_session()
    work = second.open(P, "admin", STAGE)
    assert [] == downloads
    assert b"7" == (work / "f7.txt").read_bytes()
    (work / "f3.txt").write_bytes(b"three")
    second.close()
    # someone else changes one file; our cached copy fetches only that one
    other = make_session("m2")
    w2 = other.open(P, "bob", STAGE)
    (w2 / "f5.txt").write_bytes(b"five")
    other.close()
    downloads.clear()
    third = make_session()
    work = third.open(P, "admin", STAGE)
    assert [KEYS.committed("f5.txt")] == downloads
    assert b"three" == (work / "f3.txt").read_bytes()
    third.abort()


def test_a_cached_file_that_cannot_be_read_fails_the_open_and_leaves_nothing(
    make_session: MakeSession, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-open judges each cached file as its walk meets it; a file that must be hashed
    (its ctime moved) and cannot be read fails the open, as before the walk judged: it is
    not taken for an unreadable folder that ends the walk early (files after it would be
    neither checked nor removed)."""
    _seed(make_session, {f"f{i}.txt": str(i).encode() for i in range(20)})
    first = make_session()
    first.open(P, "admin", STAGE)
    first.close()
    (cached,) = first.cache.root.glob("*/*/files/f3.txt")
    st = cached.stat()
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same times, a new ctime
    real = file_sha256

    def unreadable(path: Path) -> str:
        if path.name == "f3.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(checkout, "file_sha256", unreadable)
    second = make_session()
    with pytest.raises(PermissionError):
        second.open(P, "admin", STAGE)
    assert SessionState.CLOSED == second.state
    monkeypatch.undo()
    third = make_session("m2")  # the lock was given back
    work = third.open(P, "bob", STAGE)
    assert b"3" == (work / "f3.txt").read_bytes()
    third.abort()


def test_open_twice_and_close_without_open_are_session_errors(make_session: MakeSession) -> None:
    """API misuse names the state it found."""
    session = make_session()
    with pytest.raises(SessionError, match="no session is open"):
        session.close()
    session.open(P, "admin", STAGE)
    with pytest.raises(SessionError, match="already called"):
        session.open(P, "admin", STAGE)
    session.abort()
    with pytest.raises(SessionError, match="closed"):
        session.close()


def test_second_open_of_a_recorded_stage_on_this_machine_is_refused(
    make_session: MakeSession,
) -> None:
    """A session already recorded for the stage blocks a new one, pointing at close/abort."""
    first = make_session()
    first.open(P, "admin", STAGE)
    with pytest.raises(PreviousCrashError, match="agent close"):
        make_session().open(P, "admin", STAGE)
    first.abort()


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 200])
def test_invalid_projekt_id_is_refused_before_touching_the_store(
    make_session: MakeSession, store: ObjectStore, bad: str
) -> None:
    """An unsafe projekt_id fails fast and writes nothing."""
    with pytest.raises(InvalidNameError, match="projekt_id"):
        make_session().open(bad, "admin", STAGE)
    assert [] == list(store.list(""))


def test_corrupt_lock_body_is_reported_with_the_way_out(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """A lock object that is not JSON stops open and names the operator's unlock."""
    store.put_bytes(KEYS.lock, b"\x00garbage")
    with pytest.raises(LockCorruptError, match="unlock"):
        make_session().open(P, "admin", STAGE)


def test_manifest_path_escaping_the_work_folder_is_refused(
    make_session: MakeSession, store: ObjectStore, tmp_path: Path
) -> None:
    """A manifest naming '../evil.txt' is refused by name; nothing is written; lock released."""
    bad = b'{"files": {"../evil.txt": {"size": 3, "sha256": "x", "etag": "e"}}}'
    store.put_bytes(KEYS.manifest, bad)
    with pytest.raises(InvalidNameError, match="evil"):
        make_session().open(P, "admin", STAGE)
    assert [] == list(tmp_path.rglob("*evil*"))
    assert "released" == json.loads(store.get(KEYS.lock).body)["state"]


def test_key_with_drive_letter_is_refused_naming_the_key(
    s3_store: ObjectStore, tmp_path: Path
) -> None:
    """A committed key that maps to a drive letter (legal in S3) is refused; nothing written."""
    s3_store.put_bytes(KEYS.committed_prefix + "ok.txt", b"fine")
    s3_store.put_bytes(KEYS.committed_prefix + "C:/evil.txt", b"bad")
    config = load_config(
        paths={"base_dir": str(tmp_path / "m")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
    )
    session = PlantDesignSession(config, store=s3_store)
    with pytest.raises(InvalidNameError, match="drive letter"):
        session.open(P, "admin", STAGE)
    assert [] == list(tmp_path.rglob("*evil*"))
    assert "released" == json.loads(s3_store.get(KEYS.lock).body)["state"]


def test_mass_delete_needs_explicit_consent(make_session: MakeSession, store: ObjectStore) -> None:
    """Deleting most files stops the close; the flag lets it through."""
    _seed(make_session, {f"f{i}": b"x" for i in range(4)})
    session = make_session()
    work = session.open(P, "admin", STAGE)
    for i in range(3):
        (work / f"f{i}").unlink()
    with pytest.raises(MassDeleteError, match="--allow-mass-delete"):
        session.close()
    assert SessionState.ACTIVE == session.state
    assert 4 == len(_committed(store))
    session.close(allow_mass_delete=True)
    assert {"f3": b"x"} == _committed(store)


def test_a_move_counts_once_per_copy_of_its_content(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """Six files with the same bytes, five deleted and one new file with those bytes: one
    move and four deletes of six, refused as "4 deleted, 1 moved" (one put cannot
    excuse every delete of its content)."""
    _seed(make_session, {f"f{i}": b"same" for i in range(6)})
    session = make_session()
    work = session.open(P, "admin", STAGE, watch=False)
    for i in range(5):
        (work / f"f{i}").unlink()
    (work / "new").write_bytes(b"same")
    with pytest.raises(MassDeleteError, match="4 deleted, 1 moved"):
        session.close()
    assert 6 == len(_committed(store))
    session.abort()


@pytest.mark.skipif(sys.platform == "win32", reason="the executable bit is POSIX")
def test_a_changed_executable_bit_is_no_move(make_session: MakeSession) -> None:
    """Four files with the same bytes, three deleted, the fourth made executable: its bytes
    were there before, so nothing moved: "3 deleted, 0 moved"."""
    _seed(make_session, {f"f{i}": b"same" for i in range(4)})
    session = make_session()
    work = session.open(P, "admin", STAGE, watch=False)
    for i in range(3):
        (work / f"f{i}").unlink()
    (work / "f3").chmod(0o755)
    with pytest.raises(MassDeleteError, match="3 deleted, 0 moved"):
        session.close()
    session.abort()


def test_someone_elses_commit_makes_close_a_conflict_not_an_overwrite(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """If the manifest changed since open, close refuses and keeps lock and files."""
    _seed(make_session, {"a.txt": b"v1"})
    session = make_session()
    work = session.open(P, "admin", STAGE)
    (work / "a.txt").write_bytes(b"mine")
    base = store.get(KEYS.manifest).body
    store.put_bytes(
        KEYS.manifest, base.replace(b'"version"', b'"committed_by": "intruder", "version"')
    )
    with pytest.raises(ConflictError, match="nothing was overwritten"):
        session.close()
    assert SessionState.ACTIVE == session.state
    assert b"mine" == (work / "a.txt").read_bytes()
    assert "held" == json.loads(store.get(KEYS.lock).body)["state"]
    assert {"a.txt": b"v1"} == _committed(store)
    session.abort()


def test_the_stage_check_of_a_new_stage_ends_and_says_nothing_was_wrong(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A stage with no manifest yet has nothing to compare: the background check ends at
    once and `status` says so, instead of showing it running for the whole session."""
    config = load_config(
        paths={"base_dir": str(tmp_path / "m1")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
    )
    session = PlantDesignSession(config, store=store)
    session.open(P, "admin", "brand_new_stage")
    assert wait_for(lambda: isinstance(session.status().get("stage_check"), dict), timeout=20)
    assert [] == session.status()["stage_check"]["recopied"]  # type: ignore[index]
    session.abort()
