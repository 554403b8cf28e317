"""Smoke tests against a real bucket (R2 first of all), deselected by default (issue 12).

What the bed (SeaweedFS on loopback) cannot show: R2's own answers to conditional
writes, copies, ranges and batch deletes. Run against a bucket you may write to::

    export PDAGENT_R2_URL=s3://BUCKET/pdagent-smoke
    export PDAGENT_R2_ENDPOINT=https://ACCOUNT_ID.r2.cloudflarestorage.com
    export PDAGENT_R2_ACCESS_KEY_ID=...  PDAGENT_R2_SECRET_ACCESS_KEY=...
    pytest -m r2 tests/r2

Without these variables every test is skipped, with the reason printed. Each test
works under a fresh prefix below ``PDAGENT_R2_URL`` and deletes what it wrote.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import PreconditionFailedError
from agent.stage.locktools import probe_conditional_writes
from agent.store import open_store
from agent.store.base import ObjectStore

pytestmark = pytest.mark.r2

MiB = 1024 * 1024
_NAMES = ("PDAGENT_R2_URL", "PDAGENT_R2_ENDPOINT", "PDAGENT_R2_ACCESS_KEY_ID")
# Read at import: the suite's autouse fixture clears AWS_* and AGENT_* for each test.
_SETTINGS = {name: os.environ.get(name, "") for name in (*_NAMES, "PDAGENT_R2_SECRET_ACCESS_KEY")}
_MISSING = [name for name in (*_NAMES, "PDAGENT_R2_SECRET_ACCESS_KEY") if not _SETTINGS[name]]
_RACERS = 6


def _config(prefix: str, base_dir: Path) -> AgentConfig:
    return load_config(
        store={
            "url": f"{_SETTINGS['PDAGENT_R2_URL'].rstrip('/')}/{prefix}",
            "endpoint_url": _SETTINGS["PDAGENT_R2_ENDPOINT"],
            "region": "auto",
        },
        transfer={"multipart_threshold": 8 * MiB, "multipart_chunksize": 8 * MiB},
        paths={"base_dir": str(base_dir)},
    )


def _credentials() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": _SETTINGS["PDAGENT_R2_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": _SETTINGS["PDAGENT_R2_SECRET_ACCESS_KEY"],
    }


@pytest.fixture
def r2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ObjectStore, str]]:
    """The real store under a fresh prefix, emptied afterwards; skipped without credentials."""
    if _MISSING:
        pytest.skip(f"no real bucket configured: set {', '.join(_MISSING)} (see this module)")
    for name, value in _credentials().items():
        monkeypatch.setenv(name, value)
    prefix = f"smoke-{uuid.uuid4().hex[:12]}"
    store = open_store(_config(prefix, tmp_path / "cfg"))
    yield store, prefix
    try:
        store.delete_many([o.key for o in store.list("")])
    finally:
        store.close()


def _race_once(prefix: str, base_dir: str, key: str, racer: int) -> str:
    """One process's conditional put (run in a spawned process)."""
    os.environ.update(_credentials())
    store = open_store(_config(prefix, Path(base_dir)))
    try:
        store.put_bytes(key, f"racer {racer}".encode(), if_none_match=True)
    except PreconditionFailedError:
        return "refused"
    finally:
        store.close()
    return "won"


def test_put_get_and_head_round_trip(r2: tuple[ObjectStore, str]) -> None:
    """A put is read back whole, with its ETag and size."""
    store, _ = r2
    written = store.put_bytes("a/plan.json", b'{"x": 1}', content_type="application/json")
    got = store.get("a/plan.json")
    assert (b'{"x": 1}', written.etag) == (got.body, got.etag)
    assert 8 == store.head("a/plan.json").size


def test_a_conditional_put_race_of_several_processes_has_exactly_one_winner(
    r2: tuple[ObjectStore, str], tmp_path: Path
) -> None:
    """N processes put-if-absent one key at once: exactly one 2xx, the rest refused."""
    _store, prefix = r2
    with ProcessPoolExecutor(_RACERS, mp_context=get_context("spawn")) as pool:
        results = list(
            pool.map(
                _race_once,
                [prefix] * _RACERS,
                [str(tmp_path / f"r{i}") for i in range(_RACERS)],
                ["race.lock.json"] * _RACERS,
                range(_RACERS),
            )
        )
    assert 1 == results.count("won"), results


def test_a_copy_pinned_to_the_source_etag_copies_and_a_stale_pin_is_refused(
    r2: tuple[ObjectStore, str],
) -> None:
    """``x-amz-copy-source-if-match``: the right ETag copies, a stale one copies nothing."""
    store, _ = r2
    first = store.put_bytes("stage/a.dwg", b"one")
    store.put_bytes("stage/a.dwg", b"two")
    with pytest.raises(PreconditionFailedError):
        store.copy("stage/a.dwg", "main/a.dwg", if_source_etag=first.etag, size=3)
    current = store.head("stage/a.dwg").etag
    store.copy("stage/a.dwg", "main/a.dwg", if_source_etag=current, size=3)
    assert b"two" == store.get("main/a.dwg").body


def test_a_large_file_goes_up_in_parts_and_comes_down_in_ranges(
    r2: tuple[ObjectStore, str], tmp_path: Path
) -> None:
    """20 MiB: a multipart upload (equal parts) and a ranged parallel download, byte-exact."""
    store, _ = r2
    data = os.urandom(20 * MiB)
    (tmp_path / "src").write_bytes(data)
    store.upload_file("big/model.step", tmp_path / "src", metadata={"sha256": "x"})
    moved: list[int] = []
    info = store.download_file("big/model.step", tmp_path / "out", progress=moved.append)
    assert len(data) == info.size == sum(moved)
    out = (tmp_path / "out").read_bytes()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(out).hexdigest()


def test_delete_many_removes_every_key_and_ignores_missing_ones(
    r2: tuple[ObjectStore, str],
) -> None:
    """A batch delete of present and absent keys leaves none behind."""
    store, _ = r2
    keys = [f"del/{i}.txt" for i in range(5)]
    for key in keys:
        store.put_bytes(key, b"x")
    store.delete_many([*keys, "del/never.txt"])
    assert [] == list(store.list("del/"))


def test_the_capability_probe_accepts_the_store(r2: tuple[ObjectStore, str]) -> None:
    """R2 honours If-None-Match and If-Match: the probe passes and leaves nothing."""
    store, _ = r2
    probe_conditional_writes(store)
    assert [] == list(store.list(".pdagent-probe/"))
