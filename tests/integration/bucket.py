"""The bucket as it really is, and sessions on it (shared by the integration tests).

``Truth`` reads the bucket straight (``truth`` SeaweedFS, ``moto_truth`` moto), never
through the fault proxy; ``via_proxy``
makes sessions that talk through the test's ``FaultProxy``, ``direct`` sessions
that talk to SeaweedFS (other users, seeding). The fixtures are made available
to every integration test by ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from agent.config import AgentConfig
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.state import SessionState
from agent.store import open_store
from agent.store.base import ObjectStore
from tests.conftest import proxy_config, s3_config
from tests.faultproxy import FaultProxy
from tests.servers import MotoServer, S3Server, SeaweedServer

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
FAST_WATCH = {"debounce": 0.05, "max_delay": 0.5, "min_interval_per_path": 0.1}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Truth:
    """The bucket as it really is, read straight from the server."""

    client: Any
    bucket: str
    prefix: str

    def key(self, rel: str) -> str:
        """The full key of a store-relative key."""
        return f"{self.prefix}/{rel}"

    def get(self, rel: str) -> bytes | None:
        """An object's bytes, or None."""
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))[
                "Body"
            ].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        return body

    def put(self, rel: str, data: bytes) -> None:
        """Write an object as a second client (a co-worker with write access)."""
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def server_time(self) -> datetime:
        """The store's clock (the ``Date`` of an answer)."""
        headers = self.client.head_bucket(Bucket=self.bucket)["ResponseMetadata"]["HTTPHeaders"]
        return parsedate_to_datetime(headers["date"])

    def delete(self, rel: str) -> None:
        """Delete an object as a plain tool would (a co-worker, a sync tool)."""
        self.client.delete_object(Bucket=self.bucket, Key=self.key(rel))

    def listing(self, under: str = "") -> list[str]:
        """Store-relative keys under ``under``."""
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(under)):
            out += [o["Key"][len(self.prefix) + 1 :] for o in page.get("Contents", [])]
        return sorted(out)

    def lock(self) -> dict[str, Any]:
        """The lock object's body."""
        data = self.get(f"{P}/{STAGE}.lock.json")
        assert data is not None, "no lock object"
        body: dict[str, Any] = json.loads(data)
        return body

    def manifest(self) -> dict[str, Any]:
        """The committed manifest."""
        data = self.get(f"{P}/{STAGE}.manifest.json")
        assert data is not None, "no manifest"
        body: dict[str, Any] = json.loads(data)
        return body

    def committed(self) -> dict[str, bytes]:
        """Every committed object of the stage, by working-copy path."""
        base = f"{P}/{STAGE}/"
        out = {}
        for key in self.listing(base):
            data = self.get(key)
            assert data is not None
            out[key[len(base) :]] = data
        return out

    def assert_content_consistent(self) -> dict[str, bytes]:
        """The truth of a content-addressed stage: every manifest entry's object in
        ``.objects/`` holds the entry's bytes. Returns the files by path, read from there
        (the plain tree is a view of this, repaired by the next lock holder)."""
        out = {}
        for rel, entry in self.manifest()["files"].items():
            data = self.get(f"{P}/.objects/{entry['sha256']}")
            assert data is not None, f"{rel}: no object for its content in .objects/"
            assert (entry["size"], entry["sha256"]) == (len(data), sha(data)), (
                f"{rel}: the object under its hash holds other bytes"
            )
            out[rel] = data
        return out

    def assert_consistent(self) -> dict[str, bytes]:
        """The committed stage equals exactly its manifest; returns the committed files."""
        files = self.manifest()["files"]
        committed = self.committed()
        assert sorted(files) == sorted(committed), "committed objects differ from the manifest"
        for rel, entry in files.items():
            data = committed[rel]
            assert (entry["size"], entry["sha256"]) == (len(data), sha(data)), (
                f"{rel}: the committed bytes are not the manifest's"
            )
        return committed


@contextlib.contextmanager
def _truth(server: S3Server, env: dict[str, str]) -> Iterator[Truth]:
    bucket, _, prefix = env["AGENT_STORE__URL"].removeprefix("s3://").partition("/")
    client = server.client()
    try:
        yield Truth(client, bucket, prefix)
    finally:
        client.close()  # type: ignore[attr-defined]


@pytest.fixture
def truth(seaweed: SeaweedServer, s3_env: dict[str, str]) -> Iterator[Truth]:
    """Direct access to the test's bucket and prefix."""
    with _truth(seaweed, s3_env) as found:
        yield found


@pytest.fixture
def moto_truth(moto: MotoServer, moto_env: dict[str, str]) -> Iterator[Truth]:
    """Direct access to the test's moto bucket and prefix."""
    with _truth(moto, moto_env) as found:
        yield found


MakeSession = Callable[..., PlantDesignSession]


def cleanup(sessions: list[PlantDesignSession]) -> None:
    """Abort what a failing test left open, so its threads stop."""
    for session in sessions:
        if session.state not in (SessionState.IDLE, SessionState.CLOSED):
            with contextlib.suppress(Exception):
                session.abort()


@pytest.fixture
def via_proxy(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> Iterator[MakeSession]:
    """Sessions through the proxy; each ``machine`` has its own base folder."""
    made: list[PlantDesignSession] = []

    def make(machine: str = "m1", **sections: Any) -> PlantDesignSession:
        sections.setdefault("lock", {"heartbeat_interval": 3600, "stale_after": 7200})
        sections.setdefault("watch", FAST_WATCH)
        made.append(
            PlantDesignSession(proxy_config(s3_env, fault_proxy, tmp_path / machine, **sections))
        )
        return made[-1]

    yield make
    fault_proxy.clear()
    cleanup(made)


@pytest.fixture
def direct(s3_env: dict[str, str], tmp_path: Path) -> Iterator[MakeSession]:
    """Sessions straight to SeaweedFS (other users, seeding)."""
    made: list[PlantDesignSession] = []

    def make(machine: str = "other", **sections: Any) -> PlantDesignSession:
        sections.setdefault("lock", {"heartbeat_interval": 3600, "stale_after": 7200})
        sections.setdefault("watch", FAST_WATCH)
        config: AgentConfig = s3_config(s3_env, tmp_path / machine, **sections)
        made.append(PlantDesignSession(config))
        return made[-1]

    yield make
    cleanup(made)


def lock_state(store: ObjectStore) -> str:
    """The stage lock's ``state`` (``held``, ``released``), read through ``store``."""
    state = json.loads(store.get(StageKeys(P, STAGE).lock).body)["state"]
    assert isinstance(state, str)
    return state


def resume_and_close_commits(
    env: dict[str, str], base: Path, store: ObjectStore, work: Path, edits: dict[str, bytes]
) -> None:
    """After a signal a host handled: a handled crash with the lock released and every
    edit in the backup; resume, close: every edit committed."""
    config = s3_config(env, base, lock={"heartbeat_interval": 3600, "stale_after": 7200})
    info = PlantDesignSession(config).check_previous_crash()
    assert info is not None, "the crash left nothing to recover"
    assert "handled" == info.kind, "the signal was not seen: nothing was saved"
    assert info.lock_released
    assert "released" == lock_state(store)
    assert set(edits) <= set(info.unsaved)
    assert info.backup_path is not None
    for rel, data in edits.items():
        assert data == (info.backup_path / rel).read_bytes(), f"{rel} is not in the backup"
    session = PlantDesignSession(config)
    assert work == session.resume(info.session_id, watch=False)
    session.close()
    keys = StageKeys(P, STAGE)
    for rel, data in edits.items():
        assert data == store.get(keys.committed(rel)).body


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def seed_stage(direct: MakeSession, files: dict[str, bytes]) -> None:
    s = direct("seed")
    write_files(s.open(P, "seeder", STAGE, watch=False), files)
    s.close()


def committed_files(store: ObjectStore) -> dict[str, bytes]:
    """The stage's plain tree as ``store`` lists it: path -> bytes."""
    return {
        KEYS.rel_from_committed(o.key): store.get(o.key).body
        for o in store.list(KEYS.committed_prefix)
    }


def folder_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".pdagent")
    }


def other_user_sees(
    direct: MakeSession, truth: Truth, expected: dict[str, bytes] | None = None
) -> None:
    """Bob opens the stage and gets exactly the committed files (``expected`` if given)."""
    committed = truth.assert_consistent()
    bob = direct("bob")
    work = bob.open(P, "bob", STAGE, watch=False)
    try:
        got = folder_files(work)
    finally:
        bob.abort()
    assert committed == got
    if expected is not None:
        assert expected == got


@pytest.fixture
def ranged_store(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> Iterator[ObjectStore]:
    """Through the proxy; multipart from 1 MiB with 5 MiB parts, so 11 MiB is three ranges."""
    mib = 1024 * 1024
    store = open_store(
        proxy_config(
            s3_env,
            fault_proxy,
            tmp_path / "cfg",
            transfer={"multipart_threshold": mib, "multipart_chunksize": 5 * mib},
        )
    )
    yield store
    store.close()
