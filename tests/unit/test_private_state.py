"""Private state by construction (issue 9): modes, planted links, refused folders."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import InsecureStateError, SessionError
from agent.platform import (
    check_private_dir,
    create_private_file,
    ensure_private_dir,
    write_private_file,
)
from agent.session.records import SessionStore


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """Umask 000: anything left to the umask would be world-writable."""
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_private_files_and_their_folders_ignore_the_umask(
    loose_umask: None, tmp_path: Path
) -> None:
    """write_private_file makes missing folders 0700 and the file 0600 under umask 000."""
    target = tmp_path / "a" / "b" / "secret.json"
    write_private_file(target, b"{}")
    assert b"{}" == target.read_bytes()
    assert (0o600, 0o700, 0o700) == (
        _mode(target),
        _mode(target.parent),
        _mode(target.parent.parent),
    )
    assert [] == [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_link_planted_at_the_old_temp_name_is_never_followed(tmp_path: Path) -> None:
    """The temp name is fresh and random: a link at ``.name.tmp`` is left alone."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    (folder / ".token.tmp").symlink_to(victim)
    write_private_file(folder / "token", b"new")
    assert "untouched" == victim.read_text()
    assert b"new" == (folder / "token").read_bytes()


def test_a_link_at_the_target_itself_is_replaced_not_followed(tmp_path: Path) -> None:
    """The rename replaces a planted link with our file; its target keeps its bytes."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "session.json").symlink_to(victim)
    write_private_file(tmp_path / "session.json", b"ours")
    assert "untouched" == victim.read_text()
    assert not (tmp_path / "session.json").is_symlink()
    assert 0o600 == _mode(tmp_path / "session.json")


def test_create_private_file_refuses_an_existing_name_or_link(tmp_path: Path) -> None:
    """O_EXCL | O_NOFOLLOW: neither a planted file nor a link at the name is opened."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for name in ("file", "link"):
        with pytest.raises(FileExistsError):
            create_private_file(tmp_path / name)
    assert not (tmp_path / "nowhere").exists()


def test_a_group_writable_state_folder_is_refused_naming_the_fix(tmp_path: Path) -> None:
    """Writable by others: InsecureStateError (exit 20) naming the folder and chmod 700."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(InsecureStateError) as caught:
        SessionStore(state)
    assert 20 == caught.value.exit_code
    assert str(state) in str(caught.value)
    assert "chmod 700" in str(caught.value)


def test_a_state_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """A symbolic link in place of the state folder is not followed."""
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    assert "is a symbolic link" == check_private_dir(tmp_path / "state")
    with pytest.raises(InsecureStateError):
        SessionStore(tmp_path / "state")


def test_a_readable_state_folder_of_ours_is_tightened(tmp_path: Path) -> None:
    """0755 (an older version, a loose umask) is ours and safe to fix: made 0700."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    assert ensure_private_dir(state) is None
    assert 0o700 == _mode(state)


def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    """Owned by someone else (root can chown to show it): refused with the uid named."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    problem = check_private_dir(state)
    assert problem is not None
    assert "owned by uid 65534" in problem


def _record(work_path: str, session_id: str = "20260101T000000-deadbeef") -> dict[str, object]:
    return {
        "session_id": session_id,
        "projekt_id": "P",
        "stage": "s",
        "user": "u",
        "machine": "m",
        "pid": 1,
        "work_path": work_path,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }


@pytest.mark.parametrize(
    "work_path",
    ["/etc", "{base}/../outside", "{base}", "{base}/state/sessions"],
)
def test_a_record_whose_working_folder_is_outside_the_base_is_refused(
    tmp_path: Path, work_path: str
) -> None:
    """Records are data: a working folder outside the base folder makes the record untrusted."""
    base = tmp_path / "base"
    store = SessionStore(base / "state")
    sid = "20260101T000000-deadbeef"
    write_private_file(
        store.folder(sid) / "session.json",
        json.dumps(_record(work_path.format(base=base))).encode(),
    )
    with pytest.raises(SessionError, match="damaged or forged"):
        store.load(sid)
    assert [] == list(store.all())


def test_a_record_naming_another_session_is_refused(tmp_path: Path) -> None:
    """A record copied into another session's folder is not that session."""
    base = tmp_path / "base"
    store = SessionStore(base / "state")
    good = str(base / ".app_temp" / "plant_design" / "P" / "s")
    write_private_file(
        store.folder("20260101T000000-00000000") / "session.json",
        json.dumps(_record(good)).encode(),
    )
    with pytest.raises(SessionError, match="names session"):
        store.load("20260101T000000-00000000")


def test_crash_backup_folders_are_private(loose_umask: None, tmp_path: Path) -> None:
    """The recovery copy of pending files lives in 0700 folders whatever the umask."""
    from agent.session.recovery import copy_pending

    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "a.txt").write_text("pending")
    backup = tmp_path / "recovery" / "sid"
    assert ["sub/a.txt"] == copy_pending(work, backup, ["sub/a.txt"])
    assert (0o700, 0o700, 0o700) == (
        _mode(backup),
        _mode(backup / "files"),
        _mode(backup / "files" / "sub"),
    )
