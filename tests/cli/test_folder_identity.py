"""A working folder replaced by a link or by another folder (issue 20): every verb that
would read, move or delete it refuses, with real ``agent`` processes and SeaweedFS."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from agent.store.base import ObjectStore
from tests.cli.test_crash import KEYS, STAGE, Agent, P, _committed, _dead, _env
from tests.waiting import wait_for


def _lock_state(store: ObjectStore) -> str:
    return str(json.loads(store.get(KEYS.lock).body)["state"])


def _outside_folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    outside = tmp_path / "elsewhere"
    (outside / "deep").mkdir(parents=True)
    files = {"mine.txt": b"the user's own file", "deep/other.dwg": b"not the agent's"}
    for rel, body in files.items():
        (outside / rel).write_bytes(body)
    return outside, files


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("replacement", ["link", "other-folder"])
def test_close_and_abort_refuse_a_working_folder_replaced(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, replacement: str
) -> None:
    """A working folder swapped for a link to another folder, or for another folder: close
    and abort refuse, name it and say what to do; the other folder's files stay where they
    are, nothing is committed from them, nothing is set aside, and the lock stays held
    (the session's unsaved work is not given up)."""
    agent = Agent(_env(tmp_path / "base", s3_env))
    opened = agent.json("open", P, "--user", "admin", "--stage", STAGE)
    work = Path(opened["path"])
    (work / "saved.txt").write_text("saved in the session")
    agent.run("flush")
    outside, files = _outside_folder(tmp_path)
    moved = work.with_name(work.name + ".moved")
    work.rename(moved)
    if replacement == "link":
        work.symlink_to(outside, target_is_directory=True)
        said = "is a link"
    else:
        outside.rename(work)
        outside = work
        said = "is another folder"

    for verb in ("close", "abort"):
        refused = agent.run(verb, check=False)
        assert 22 == refused.returncode, (verb, refused.stdout, refused.stderr)
        assert str(work) in refused.stderr
        assert said in refused.stderr
        assert "folder back" in refused.stderr
        assert files == _tree(outside), f"{verb} touched the other folder"
        assert not list(tmp_path.rglob("*.kept-*")), f"{verb} moved files aside"
        assert {} == _committed(s3_store)
        assert "held" == _lock_state(s3_store)

    # Putting the session's folder back lets the session close as usual.
    if replacement == "link":
        work.unlink()
    else:
        work.rename(tmp_path / "elsewhere")
        outside = tmp_path / "elsewhere"
    moved.rename(work)
    agent.json("close")
    assert {"saved.txt": b"saved in the session"} == _committed(s3_store)
    assert "released" == _lock_state(s3_store)
    assert files == _tree(outside)


def test_recover_refuses_to_resume_or_discard_into_a_working_folder_replaced_by_a_link(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path
) -> None:
    """After kill -9 the working folder became a link: resume and discard refuse (exit 22)
    before taking or giving up the lock; the linked folder's files are untouched."""
    agent = Agent(_env(tmp_path / "base", s3_env))
    opened = agent.json("open", P, "--user", "admin", "--stage", STAGE)
    work, pid = Path(opened["path"]), int(opened["agent_pid"])
    (work / "unsaved.txt").write_text("not committed")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: _dead(pid), 20)
    outside, files = _outside_folder(tmp_path)
    work.rename(work.with_name(work.name + ".moved"))
    work.symlink_to(outside, target_is_directory=True)
    for args in (("recover", "--resume"), ("recover", "--discard", "--yes")):
        refused = agent.run(*args, check=False)
        assert 22 == refused.returncode, (args, refused.stdout, refused.stderr)
        assert str(work) in refused.stderr
        assert files == _tree(outside)
        assert "held" == _lock_state(s3_store)
    work.unlink()
    work.with_name(work.name + ".moved").rename(work)
    agent.json("recover", "--resume")
    agent.json("close")
    assert {"unsaved.txt": b"not committed"} == _committed(s3_store)
