"""`agent restore` and the mass-delete guard as a user meets them (issue 20), on SeaweedFS.

A restore of an early commit removes most of a stage that grew since: the restore
itself is the user's confirmation, so the guard must not stop it. A rename moves
files; the guard counts it as no delete at all.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore
from tests.cli.conftest import Run
from tests.conftest import s3_config

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)

Commit = Callable[..., None]
"""``commit({"a.txt": b"..."}, delete=("b.txt",))``: one session, committed."""

FIRST = {"plan.dwg": b"plan one", "notes.txt": b"notes one"}
# The stage then gains and loses files: #2 adds two and changes the plan, #3 drops
# notes.txt and adds one more. Restoring #1 removes three of the four files it has.
SECOND = {"plan.dwg": b"plan two", "pump.dwg": b"pump", "valve.dwg": b"valve"}
THIRD = {"pipe.dwg": b"pipe"}


@pytest.fixture
def s3_agent_env(s3_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """The CLI's environment on this test's SeaweedFS prefix, with its own runtime folder."""
    runtime = Path(tempfile.mkdtemp(prefix="pdr-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "AWS_"))}
    env.update(s3_env)
    env["AGENT_PATHS__BASE_DIR"] = str(tmp_path / "base")
    env["AGENT_PATHS__RUNTIME_DIR"] = str(runtime)
    yield env
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def s3run(s3_agent_env: dict[str, str]) -> Run:
    """``agent ARGS`` in a subprocess against SeaweedFS (never raises on exit codes)."""

    def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env=s3_agent_env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return _run


def _open(run: Run, user: str = "alice") -> Path:
    opened = run("open", P, "--user", user, "--stage", STAGE, "--json")
    assert 0 == opened.returncode, opened.stderr
    return Path(json.loads(opened.stdout)["path"])


def _close(run: Run) -> None:
    closed = run("close", "--json")
    assert 0 == closed.returncode, closed.stdout + closed.stderr


@pytest.fixture
def commit(s3_env: dict[str, str], tmp_path: Path) -> Commit:
    """Commit to the test's prefix in-process (the set-up, not what is tested: fast)."""
    config = s3_config(
        s3_env, tmp_path / "seed", lock={"heartbeat_interval": 3600, "stale_after": 7200}
    )

    def _commit(write: dict[str, bytes], delete: tuple[str, ...] = ()) -> None:
        s = PlantDesignSession(config)
        work = s.open(P, "alice", STAGE, watch=False)
        for rel, data in write.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        for rel in delete:
            (work / rel).unlink()
        s.close()

    return _commit


def _grown_stage(commit: Commit) -> None:
    commit(FIRST)
    commit(SECOND)
    commit(THIRD, delete=("notes.txt",))


def _committed(store: ObjectStore) -> dict[str, bytes]:
    return {
        KEYS.rel_from_committed(o.key): store.get(o.key).body
        for o in store.list(KEYS.committed_prefix)
    }


def _seqs(run: Run) -> list[int]:
    listed = run("history", P, "--stage", STAGE, "--json")
    assert 0 == listed.returncode, listed.stderr
    return [c["seq"] for c in json.loads(listed.stdout)["commits"]]


@pytest.mark.parametrize("flags", [("--yes",), ("--json", "--yes")], ids=["text", "json"])
def test_restore_of_the_first_commit_of_a_grown_stage_brings_back_exactly_its_files(
    s3run: Run, s3_store: ObjectStore, commit: Commit, flags: tuple[str, ...]
) -> None:
    """Restoring #1 removes three of the four files the stage has now (a "mass delete")
    and is committed as #4 holding exactly #1's files, with no --allow-mass-delete."""
    _grown_stage(commit)
    restored = s3run("restore", P, "--stage", STAGE, "--commit", "#1", *flags)
    assert 0 == restored.returncode, restored.stdout + restored.stderr
    assert FIRST == _committed(s3_store)
    assert [1, 2, 3, 4] == _seqs(s3run)
    if "--json" in flags:
        report = json.loads(restored.stdout)
        assert (["notes.txt"], ["plan.dwg"], ["pipe.dwg", "pump.dwg", "valve.dwg"]) == (
            report["added"],
            report["changed"],
            report["removed"],
        )
    else:
        assert "remove pump.dwg" in restored.stdout and "add notes.txt" in restored.stdout


def _on_terminal(env: dict[str, str], args: tuple[str, ...], answer: bytes) -> tuple[int, str]:
    """Run ``agent ARGS`` on a pseudo-terminal; type ``answer`` once it asks "Restore?"."""
    import pty  # POSIX only: the test that uses it is skipped on Windows

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args], env=env, stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    out, answered = b"", False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if not answered and b"Restore?" in out:
                os.write(master, answer)
                answered = True
        return proc.wait(timeout=60), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is POSIX")
def test_restore_on_a_terminal_shows_what_it_changes_and_asks(
    s3_agent_env: dict[str, str], s3run: Run, s3_store: ObjectStore, commit: Commit
) -> None:
    """Without --yes on a terminal: the adds, changes and removes are shown, then the
    question; "n" leaves the stage as it is, "y" restores #1 as commit #4."""
    _grown_stage(commit)
    before = _committed(s3_store)
    args = ("restore", P, "--stage", STAGE, "--commit", "#1")
    code, shown = _on_terminal(s3_agent_env, args, b"n\n")
    assert 130 == code, shown  # declined: aborted, as Ctrl-C
    for line in ("add notes.txt", "change plan.dwg", "remove pipe.dwg", "Restore?"):
        assert line in shown
    assert before == _committed(s3_store)
    assert [1, 2, 3] == _seqs(s3run)
    code, shown = _on_terminal(s3_agent_env, args, b"y\n")
    assert 0 == code, shown
    assert FIRST == _committed(s3_store)
    assert [1, 2, 3, 4] == _seqs(s3run)


def test_a_json_restore_without_yes_refuses_at_once_and_changes_nothing(
    s3run: Run, s3_store: ObjectStore, commit: Commit
) -> None:
    """A script that forgot --yes gets exit 2 naming --yes (no prompt it cannot answer),
    and neither the stage nor its lock is touched."""
    _grown_stage(commit)
    before = _committed(s3_store)
    refused = s3run("restore", P, "--stage", STAGE, "--commit", "#1", "--json")
    assert 2 == refused.returncode, refused.stdout + refused.stderr
    assert "--yes" in refused.stderr
    assert before == _committed(s3_store)
    assert [1, 2, 3] == _seqs(s3run)
    lock = json.loads(s3run("lock", "show", P, "--stage", STAGE, "--json").stdout)
    assert "released" == lock["lock"]["body"]["state"]


def test_moving_most_files_into_a_folder_closes_without_the_override(
    s3run: Run, s3_store: ObjectStore, commit: Commit
) -> None:
    """`mv other*.txt all/` moves 8 of 10 files: every one is staged under its new name,
    so close commits (no exit 14) and the stage holds the same bytes under the new names."""
    files = {f"other{i}.txt": f"content {i}".encode() for i in range(8)}
    files |= {"keep.txt": b"keep", "plan.dwg": b"plan"}
    commit(files)
    work = _open(s3run)
    (work / "all").mkdir()
    for i in range(8):
        (work / f"other{i}.txt").rename(work / "all" / f"other{i}.txt")
    _close(s3run)
    expected = {f"all/other{i}.txt": f"content {i}".encode() for i in range(8)}
    assert expected | {"keep.txt": b"keep", "plan.dwg": b"plan"} == _committed(s3_store)


def test_renaming_the_top_folder_closes_without_the_override(
    s3run: Run, s3_store: ObjectStore, commit: Commit
) -> None:
    """Every file lives under one folder; renaming it moves all of them, deletes none."""
    files = {f"project/sub/f{i}.dwg": f"drawing {i}".encode() for i in range(5)}
    commit(files)
    work = _open(s3run)
    (work / "project").rename(work / "project-2026")
    _close(s3run)
    assert {k.replace("project/", "project-2026/"): v for k, v in files.items()} == _committed(
        s3_store
    )


def test_a_real_mass_delete_is_refused_and_says_how_many_were_deleted_and_moved(
    s3run: Run, s3_store: ObjectStore, commit: Commit
) -> None:
    """Of 10 files, 6 deleted and 2 moved: exit 14, "6 deleted, 2 moved", nothing
    committed; --allow-mass-delete then commits it."""
    files = {f"f{i}.txt": f"c{i}".encode() for i in range(10)}
    commit(files)
    work = _open(s3run)
    for i in range(6):
        (work / f"f{i}.txt").unlink()
    (work / "moved").mkdir()
    for i in (6, 7):
        (work / f"f{i}.txt").rename(work / "moved" / f"f{i}.txt")
    refused = s3run("close", "--json")
    assert 14 == refused.returncode, refused.stdout + refused.stderr
    message = json.loads(refused.stdout)["error"]["message"]
    assert "6 deleted, 2 moved" in message and "--allow-mass-delete" in message
    assert files == _committed(s3_store)
    closed = s3run("close", "--json", "--allow-mass-delete")
    assert 0 == closed.returncode, closed.stdout + closed.stderr
    assert {"f8.txt": b"c8", "f9.txt": b"c9", "moved/f6.txt": b"c6", "moved/f7.txt": b"c7"} == (
        _committed(s3_store)
    )
