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
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import load_config
from agent.keys import StageKeys
from agent.session import PlantDesignSession
from agent.store import open_store
from agent.store.base import ObjectStore
from tests.servers import MotoServer, SeaweedServer

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)


def _env(server: MotoServer | SeaweedServer, bucket: str, base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "AWS_"))}
    env.update(server.env())
    env["AGENT_STORE__URL"] = f"s3://{bucket}/t"
    env["AGENT_PATHS__BASE_DIR"] = str(base)
    return env


@pytest.fixture
def moto_env(moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh bucket on the session's moto server; the agent's environment for it."""
    bucket = f"pdt-{uuid.uuid4().hex[:20]}"
    moto.create_bucket(bucket)
    env = _env(moto, bucket, tmp_path / "base")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return env


def _config(env: dict[str, str], base: Path) -> object:
    return load_config(
        store={
            "url": env["AGENT_STORE__URL"],
            "endpoint_url": env["AGENT_STORE__ENDPOINT_URL"],
            "region": "us-east-1",
        },
        paths={"base_dir": str(base)},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        watch={"debounce": 0.05, "max_delay": 0.5, "min_interval_per_path": 0.1},
        retry={"attempts": 3, "initial_backoff": 0.05, "max_backoff": 0.2},
        history={"prune_on_close": False},
    )


@pytest.fixture
def moto_store(moto_env: dict[str, str], tmp_path: Path) -> Iterator[ObjectStore]:
    """The agent's S3 store on that bucket (a co-worker's view, for planting and reading)."""
    store = open_store(_config(moto_env, tmp_path / "direct"))  # type: ignore[arg-type]
    yield store
    store.close()


def _session(env: dict[str, str], base: Path) -> PlantDesignSession:
    return PlantDesignSession(_config(env, base))  # type: ignore[arg-type]


def _doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "doctor", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_doctor_finds_that_moto_ignores_the_copy_condition_and_warns(
    moto_env: dict[str, str],
) -> None:
    """On moto: the copy condition is reported ignored, as a warning (exit 0)."""
    result = _doctor(moto_env)
    assert 0 == result.returncode, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    copy = next(c for name, c in checks.items() if name.startswith("copy condition"))
    assert ("ignored", True, True) == (copy["found"], copy["warning"], copy["ok"])


def test_doctor_finds_that_seaweedfs_honours_the_copy_condition(
    seaweed: SeaweedServer, shared_bucket: str, tmp_path: Path
) -> None:
    """On SeaweedFS: the copy condition is honoured, no warning."""
    result = _doctor(_env(seaweed, shared_bucket, tmp_path / "base"))
    assert 0 == result.returncode, result.stdout + result.stderr
    checks = json.loads(result.stdout)["checks"]
    copy = next(c for c in checks if c["name"].startswith("copy condition"))
    assert "honoured" == copy["found"] and "warning" not in copy


def test_a_session_on_moto_commits_exactly_the_users_files(
    moto_env: dict[str, str], moto_store: ObjectStore, tmp_path: Path
) -> None:
    """Open, edit, delete, close, and another user's open: the committed bytes, and the plain
    tree equal to the manifest."""
    seed = _session(moto_env, tmp_path / "seed")
    work = seed.open(P, "seeder", STAGE, watch=False)
    (work / "a.txt").write_bytes(b"alpha")
    (work / "b.txt").write_bytes(b"bravo")
    seed.close()
    alice = _session(moto_env, tmp_path / "alice")
    work = alice.open(P, "alice", STAGE)
    (work / "a.txt").write_bytes(b"alpha, changed")
    (work / "b.txt").unlink()
    (work / "c" / "c.txt").parent.mkdir()
    (work / "c" / "c.txt").write_bytes(b"charlie")
    assert alice.flush(timeout=30)
    alice.close()
    bob = _session(moto_env, tmp_path / "bob")
    got = bob.open(P, "bob", STAGE, watch=False)
    files = {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()}
    bob.abort()
    assert {"a.txt": b"alpha, changed", "c/c.txt": b"charlie"} == files
    plain = {o.key for o in moto_store.list(KEYS.committed_prefix)}
    assert {KEYS.committed("a.txt"), KEYS.committed("c/c.txt")} == plain


def test_a_copy_whose_pin_moto_ignores_still_commits_the_users_bytes(
    moto_env: dict[str, str], moto_store: ObjectStore, tmp_path: Path
) -> None:
    """After the file was streamed, a co-worker puts other bytes under its content's name.
    On SeaweedFS the pinned copy is refused; moto copies them anyway. The copy's answer
    gives it away: the user's bytes are sent again and copied again, and the stage holds
    exactly them (a correct stage, not exit 19 forever)."""
    mine = b"the user's drawing"
    alice = _session(moto_env, tmp_path / "alice")
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
