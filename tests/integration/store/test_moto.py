"""Issue 18 on moto's S3 server, which ignores ``x-amz-copy-source-if-match``.

A copy pinned to an ETag that no longer holds is made anyway there: the commit must
catch it by the answer's ETag and end with exactly the user's bytes; ``agent doctor``
says what it found. Conditional writes (``If-None-Match``, ``If-Match``) moto keeps,
so locks work as on any conforming store.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.cli.doctor import COPY_CHECK
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore
from tests.conftest import s3_config
from tests.integration.bucket import (
    FAST_WATCH,
    STAGE,
    MakeSession,
    P,
    Truth,
    cleanup,
    other_user_sees,
)

KEYS = StageKeys(P, STAGE)


@pytest.fixture
def on_moto(moto_env: dict[str, str], tmp_path: Path) -> Iterator[MakeSession]:
    """Sessions on the test's moto bucket; each ``machine`` has its own base folder."""
    made: list[PlantDesignSession] = []

    def make(machine: str = "other", **sections: Any) -> PlantDesignSession:
        sections.setdefault("lock", {"heartbeat_interval": 3600, "stale_after": 7200})
        sections.setdefault("watch", FAST_WATCH)
        sections.setdefault("history", {"prune_on_close": False})
        made.append(PlantDesignSession(s3_config(moto_env, tmp_path / machine, **sections)))
        return made[-1]

    yield make
    cleanup(made)


def _doctor(env: dict[str, str], base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``agent doctor ARGS`` in a subprocess pointed at ``env``'s bucket."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "AWS_"))}
    full.update(env)
    full["AGENT_PATHS__BASE_DIR"] = str(base)
    return subprocess.run(
        [sys.executable, "-m", "agent", "doctor", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_check(env: dict[str, str], base: Path) -> dict[str, Any]:
    """The copy-condition check of ``agent doctor --json`` (which must exit 0)."""
    result = _doctor(env, base, "--json")
    assert 0 == result.returncode, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    found: dict[str, Any] = checks[COPY_CHECK]
    return found


def _copy_line(env: dict[str, str], base: Path) -> str:
    """The copy-condition line of ``agent doctor``'s text (which must exit 0)."""
    result = _doctor(env, base)
    assert 0 == result.returncode, result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if COPY_CHECK in line]
    return line


def test_doctor_finds_that_moto_ignores_the_copy_condition_and_warns(
    moto_env: dict[str, str], moto_truth: Truth, tmp_path: Path
) -> None:
    """On moto: the copy condition is reported ignored, as a warning that says the agent
    stays correct (exit 0, text and --json), and no probe key is left in the bucket."""
    copy = _copy_check(moto_env, tmp_path / "base")
    assert ("ignored", True, True) == (copy["found"], copy["warning"], copy["ok"])
    assert "stays correct" in copy["detail"]
    assert _copy_line(moto_env, tmp_path / "base").startswith(f"[warn] {COPY_CHECK}: IGNORED")
    assert [] == moto_truth.listing()


def test_doctor_finds_that_seaweedfs_honours_the_copy_condition(
    s3_env: dict[str, str], truth: Truth, tmp_path: Path
) -> None:
    """On SeaweedFS: the copy condition is honoured, no warning (text and --json), and no
    probe key is left under the prefix."""
    copy = _copy_check(s3_env, tmp_path / "base")
    assert ("honoured", True) == (copy["found"], copy["ok"])
    assert "warning" not in copy
    assert _copy_line(s3_env, tmp_path / "base").startswith(f"[ok] {COPY_CHECK}: honoured")
    assert [] == truth.listing()


def test_a_session_on_moto_commits_exactly_the_users_files(
    on_moto: MakeSession, moto_truth: Truth
) -> None:
    """Open, edit, delete, close, and another user's open: exactly the committed bytes, and
    the plain tree byte for byte the manifest's."""
    seed = on_moto("seed")
    work = seed.open(P, "seeder", STAGE, watch=False)
    (work / "a.txt").write_bytes(b"alpha")
    (work / "b.txt").write_bytes(b"bravo")
    seed.close()
    alice = on_moto("alice")
    work = alice.open(P, "alice", STAGE)
    (work / "a.txt").write_bytes(b"alpha, changed")
    (work / "b.txt").unlink()
    (work / "c" / "c.txt").parent.mkdir()
    (work / "c" / "c.txt").write_bytes(b"charlie")
    assert alice.flush(timeout=30)
    alice.close()
    other_user_sees(on_moto, moto_truth, {"a.txt": b"alpha, changed", "c/c.txt": b"charlie"})


def test_a_copy_whose_pin_moto_ignores_still_commits_the_users_bytes(
    on_moto: MakeSession, moto_store: ObjectStore
) -> None:
    """After the file was streamed, a co-worker puts other bytes under its content's name.
    On SeaweedFS the pinned copy is refused; moto copies them anyway. The copy's answer
    gives it away: the user's bytes are sent again and copied again, and the stage holds
    exactly them (a correct stage, not exit 19 forever)."""
    mine = b"the user's drawing"
    alice = on_moto("alice")
    work = alice.open(P, "alice", STAGE)
    (work / "plan.dwg").write_bytes(mine)
    assert alice.flush(timeout=30)
    sha = hashlib.sha256(mine).hexdigest()
    moto_store.put_bytes(KEYS.version(sha), b"planted by a co-worker")
    with capture_logs() as logs:
        alice.close()
    assert ["plan.dwg"] == [e["path"] for e in logs if e["event"] == "copy_answer_differs"]
    assert mine == moto_store.get(KEYS.committed("plan.dwg")).body
    assert mine == moto_store.get(KEYS.version(sha)).body
    manifest = json.loads(moto_store.get(KEYS.manifest).body)
    assert sha == manifest["files"]["plan.dwg"]["sha256"]
    assert moto_store.head(KEYS.committed("plan.dwg")).etag == manifest["files"]["plan.dwg"]["etag"]
