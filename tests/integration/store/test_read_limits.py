"""Small whole-object reads have a limit per kind; over it, a clear error and no memory spent.

``get`` and ``get_many`` take ``max_bytes``: an object over it is refused with an
``ObjectTooLargeError`` naming the key, its size and the limit, and its body is
not read (the store states the size) or read to ``max_bytes + 1`` bytes at most.
Lock bodies are read with 64 KiB: 40 locks of 16 MiB do not take ``agent locks``
above 300 MiB (issue 19: it reached 951 MiB). Both backends, SeaweedFS and the
folder store, and the hostile endpoint of ``tests/hostile.py``.
"""

from __future__ import annotations

import hashlib
import sys
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import LockConfig, load_config
from agent.errors import LockCorruptError, ObjectTooLargeError
from agent.stage.keys import CommitInfo, StageKeys
from agent.stage.lockbody import read_lock
from agent.stage.manifest import Manifest, ManifestEntry
from agent.store import open_store
from agent.store.base import LOCK_MAX_BYTES, ObjectStore
from tests.hostile import HostileS3, run_measured

MiB = 1024 * 1024


def test_a_get_over_its_limit_is_refused_naming_the_key_its_size_and_the_limit(
    store: ObjectStore,
) -> None:
    """1,001 bytes read with max_bytes=1,000: ObjectTooLargeError; 1,000 bytes are read."""
    store.put_bytes("P/big.json", b"x" * 1001)
    store.put_bytes("P/fits.json", b"x" * 1000)
    with pytest.raises(ObjectTooLargeError) as info:
        store.get("P/big.json", max_bytes=1000)
    assert ("P/big.json", 1001, 1000) == (info.value.key, info.value.size, info.value.limit)
    assert "P/big.json" in str(info.value)
    assert "1001 bytes" in str(info.value)
    assert "1000 bytes" in str(info.value)
    assert 1000 == len(store.get("P/fits.json", max_bytes=1000).body)


def test_a_bulk_read_names_every_object_over_the_limit_and_keeps_the_others(
    store: ObjectStore,
) -> None:
    """get_many: two of four over the limit, one absent; the error names both, carries the rest."""
    store.put_bytes("P/a.json", b"a")
    store.put_bytes("P/b.json", b"b" * 5000)
    store.put_bytes("P/c.json", b"c" * 4097)
    keys = ["P/a.json", "P/b.json", "P/none.json", "P/c.json"]
    with pytest.raises(ObjectTooLargeError) as info:
        store.get_many(keys, max_bytes=4096)
    assert {"P/b.json": 5000, "P/c.json": 4097} == info.value.oversized
    got = info.value.results
    assert 4 == len(got)
    assert [None, None, None] == got[1:]
    first = got[0]
    assert first is not None
    assert b"a" == getattr(first, "body", None)


def test_a_lock_body_over_64_kib_is_a_corrupt_lock_naming_its_size(store: ObjectStore) -> None:
    """A lock of 64 KiB + 1: LockCorruptError (exit 4, unlockable by force), body unread."""
    store.put_bytes("P/planning.lock.json", b" " * (LOCK_MAX_BYTES + 1))
    with pytest.raises(LockCorruptError, match=f"{LOCK_MAX_BYTES + 1} bytes"):
        read_lock(store, "P/planning.lock.json", LockConfig())


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileS3]:
    """The hostile endpoint, with credentials for it in the environment."""
    with HostileS3() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.mark.timeout(60)
def test_a_300_mib_object_read_as_small_is_refused_without_holding_it(
    hostile: HostileS3, tmp_path: Path
) -> None:
    """get and get_many of a 300 MiB object with a 4 MiB limit: refused, peak memory far below."""
    hostile.huge_objects["p/P/planning.manifest.json"] = 300 * MiB
    hostile.objects["p/P/other.json"] = b"{}"
    store = open_store(
        load_config(
            store={"url": "s3://bucket/p", "endpoint_url": hostile.endpoint, "region": "us-east-1"},
            paths={"base_dir": str(tmp_path / "base")},
            retry={"attempts": 2, "initial_backoff": 0.01, "max_backoff": 0.02},
        )
    )
    tracemalloc.start()
    try:
        with pytest.raises(ObjectTooLargeError, match=f"{300 * MiB} bytes"):
            store.get("P/planning.manifest.json", max_bytes=4 * MiB)
        with pytest.raises(ObjectTooLargeError) as info:
            store.get_many(["P/other.json", "P/planning.manifest.json"], max_bytes=4 * MiB)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        store.close()
    assert {"P/planning.manifest.json": 300 * MiB} == info.value.oversized
    assert peak < 32 * MiB, f"peak {peak / MiB:.0f} MiB"


@pytest.mark.timeout(120)
def test_agent_locks_over_40_lock_bodies_of_16_mib_stays_under_300_mib(
    hostile: HostileS3, tmp_path: Path
) -> None:
    """40 stages whose locks are 16 MiB each: ``agent locks`` lists them corrupt, under 300 MiB."""
    for i in range(40):
        hostile.huge_objects[f"p/Proj_{i:02d}/planning.lock.json"] = 16 * MiB
    env = hostile.cli_env(tmp_path)
    ran = run_measured([sys.executable, "-m", "agent", "locks"], env=env, cwd=tmp_path, timeout=100)
    assert 0 == ran.returncode, ran.stderr[-2000:]
    rows = [line for line in ran.stdout.splitlines() if "Proj_" in line]
    assert 40 == len(rows), ran.stdout
    assert all("CORRUPT" in row for row in rows), ran.stdout
    assert ran.max_rss < 300 * MiB, f"peak {ran.max_rss / MiB:.0f} MiB"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("declared", [True, False], ids=["stated-size", "no-content-length"])
def test_agent_show_of_a_4_byte_version_under_a_300_mib_object_stays_under_300_mib(
    hostile: HostileS3, tmp_path: Path, *, declared: bool
) -> None:
    """The history says ``plan.dwg`` is 4 bytes; ``.objects/{sha256}`` and the plain key
    answer 300 MiB (with or without a ``Content-Length``). ``agent show`` reads no more
    than the manifest's size of each, says the version is not there (exit 21) and stays
    under 300 MiB (issue 19: 679 MiB)."""
    keys = StageKeys("P", "planning")
    sha = hashlib.sha256(b"good").hexdigest()
    manifest = Manifest(
        version=2,
        files={"plan.dwg": ManifestEntry(size=4, sha256=sha, etag="e" * 32)},
        commit_id="c" * 32,
        seq=1,
    )
    info = CommitInfo(1, "c" * 32, datetime(2026, 1, 1, tzinfo=UTC), "alice", 1, 0, 0, 4)
    hostile.objects["p/" + info.key_in(keys)] = manifest.to_bytes()
    big = hostile.huge_objects if declared else hostile.undeclared_objects
    big["p/" + keys.version(sha)] = 300 * MiB
    big["p/" + keys.committed("plan.dwg")] = 300 * MiB
    env = hostile.cli_env(tmp_path)
    out = tmp_path / "old.dwg"
    ran = run_measured(
        [sys.executable, "-m", "agent", "show", "P", "--stage", "planning", "--commit", "#1",
         "--path", "plan.dwg", "--output", str(out)],
        env=env,
        cwd=tmp_path,
        timeout=100,
    )  # fmt: skip
    assert 21 == ran.returncode, ran.stderr[-2000:]
    assert "no longer kept" in ran.stderr
    assert not out.exists()
    assert ran.max_rss < 300 * MiB, f"peak {ran.max_rss / MiB:.0f} MiB"
