"""The working folder as the user's processes see it: replaced, deleted under a crash,
filled by other tools (issue 20), with real ``agent`` processes and SeaweedFS."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.store.base import ObjectStore
from tests.cli.test_crash import KEYS, STAGE, Agent, P, _committed, _env


def _lock_state(store: ObjectStore) -> str:
    import json

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
