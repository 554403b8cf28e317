"""`agent restore` and the mass-delete guard as a user meets them (issue 20), on SeaweedFS.

A rename moves files; the guard counts it as no delete at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.keys import StageKeys
from agent.session import PlantDesignSession
from agent.store.base import ObjectStore
from tests.cli.conftest import Run
from tests.conftest import s3_config

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)

Commit = Callable[..., None]
"""``commit({"a.txt": b"..."}, delete=("b.txt",))``: one session, committed."""


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


def _committed(store: ObjectStore) -> dict[str, bytes]:
    return {
        KEYS.rel_from_committed(o.key): store.get(o.key).body
        for o in store.list(KEYS.committed_prefix)
    }


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
