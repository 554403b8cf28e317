"""One contract, two backends: the folder store and S3 (SeaweedFS) keep the same promises."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import (
    AccessDeniedError,
    BucketMissingError,
    NotFoundError,
    PreconditionFailedError,
    TransientStoreError,
)
from agent.store.base import ObjectStore
from agent.store.s3 import S3Store
from tests.servers import SeaweedServer


def test_put_get_head_roundtrip_with_etags(store: ObjectStore) -> None:
    """What is put comes back with the same ETag from put, get, head and list."""
    written = store.put_bytes("a/b.txt", b"hello", content_type="text/plain")
    got = store.get("a/b.txt")
    assert b"hello" == got.body
    assert written.etag == got.etag == store.head("a/b.txt").etag
    assert 5 == store.head("a/b.txt").size
    assert [written.etag] == [o.etag for o in store.list("a/")]


def test_put_if_absent_refuses_an_existing_key(store: ObjectStore) -> None:
    """If-None-Match: the first put wins, the second is a precondition failure."""
    store.put_bytes("lock.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        store.put_bytes("lock.json", b"2", if_none_match=True)
    assert b"1" == store.get("lock.json").body


def test_put_if_match_needs_the_current_etag(store: ObjectStore) -> None:
    """If-Match with the current ETag writes; with a stale one it is refused."""
    first = store.put_bytes("k", b"v1")
    second = store.put_bytes("k", b"v2", if_match=first.etag)
    with pytest.raises(PreconditionFailedError):
        store.put_bytes("k", b"v3", if_match=first.etag)
    assert b"v2" == store.get("k").body
    assert second.etag == store.head("k").etag


def test_put_if_match_on_a_missing_key_is_a_precondition_failure(store: ObjectStore) -> None:
    """A 404 on a conditional write means the condition did not hold."""
    with pytest.raises(PreconditionFailedError):
        store.put_bytes("missing", b"x", if_match="0123456789abcdef0123456789abcdef")


def test_missing_object_is_not_found_and_delete_is_idempotent(store: ObjectStore) -> None:
    """get/head of a missing key raise NotFoundError; deleting it is fine."""
    with pytest.raises(NotFoundError):
        store.get("nope")
    with pytest.raises(NotFoundError):
        store.head("nope")
    store.delete("nope")
    store.delete_many(["nope", "nope2"])


def test_list_is_recursive_ordered_and_keeps_to_the_prefix(store: ObjectStore) -> None:
    """Listing returns keys under the prefix only, in order, including nested and sibling keys."""
    for key in ["p/b", "p/a/x", "p/a", "q/z", "pp"]:
        store.put_bytes(key, key.encode())
    assert ["p/a", "p/a/x", "p/b"] == [o.key for o in store.list("p/")]
    assert ["p/a", "p/a/x", "p/b", "pp"] == [o.key for o in store.list("p")]


def test_file_roundtrip_above_the_multipart_threshold(store: ObjectStore, tmp_path: Path) -> None:
    """A file larger than the multipart threshold uploads and downloads intact, with progress."""
    data = os.urandom(6 * 1024 * 1024 + 123)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    if isinstance(store, S3Store):  # make the S3 path really go multipart
        store.transfer = store.transfer.model_copy(
            update={"multipart_threshold": 5 * 1024 * 1024, "multipart_chunksize": 5 * 1024 * 1024}
        )
    up: list[int] = []
    store.upload_file("big/f.bin", src, progress=up.append)
    assert len(data) == sum(up)
    down: list[int] = []
    dest = tmp_path / "out.bin"
    info = store.download_file("big/f.bin", dest, progress=down.append)
    assert hashlib.sha256(data).digest() == hashlib.sha256(dest.read_bytes()).digest()
    assert len(data) == info.size == sum(down)


def test_copy_and_delete_many(store: ObjectStore) -> None:
    """Server-side copy duplicates content; delete_many removes every key."""
    store.put_bytes("s/1", b"one")
    copied = store.copy("s/1", "c/1")
    assert b"one" == store.get("c/1").body
    assert copied.etag == store.head("c/1").etag
    source = store.head("s/1").etag
    assert store.copy("s/1", "c/2", if_source_etag=source).etag == store.head("c/2").etag
    store.delete_many(["s/1", "c/1", "c/2"])
    assert [] == list(store.list(""))


def test_listing_tells_when_each_object_was_written_and_a_copy_is_new(
    store: ObjectStore,
) -> None:
    """History's retention judges age from the listing; a copy counts as written now."""
    store.put_bytes("age/src", b"x")
    store.copy("age/src", "age/dst")
    listed = {o.key: o.last_modified for o in store.list("age/")}
    now = store.server_time()
    for key, when in listed.items():
        assert when is not None, key
        assert abs((now - when).total_seconds()) < 120, (key, when, now)


def test_pinned_copy_refuses_a_changed_or_missing_source(store: ObjectStore) -> None:
    """``if_source_etag`` copies only the pinned version: another is 412, none is 404."""
    first = store.put_bytes("s/pin", b"mine")
    store.put_bytes("s/pin", b"someone else's")
    with pytest.raises(PreconditionFailedError):
        store.copy("s/pin", "c/pin", if_source_etag=first.etag)
    with pytest.raises(NotFoundError):
        store.head("c/pin")
    with pytest.raises((NotFoundError, PreconditionFailedError)):
        store.copy("s/none", "c/none", if_source_etag=first.etag)


def test_uploaded_metadata_is_kept_by_head_and_copy(store: ObjectStore, tmp_path: Path) -> None:
    """User metadata (the staged sha256) comes back from HEAD, on the copy too."""
    src = tmp_path / "m.bin"
    src.write_bytes(b"content")
    up = store.upload_file("s/m.bin", src, metadata={"sha256": "abc123"})
    assert {"sha256": "abc123"} == dict(store.head("s/m.bin").metadata)
    store.copy("s/m.bin", "c/m.bin", if_source_etag=up.etag)
    assert "abc123" == store.head("c/m.bin").metadata.get("sha256")


def test_server_time_is_close_to_now(store: ObjectStore) -> None:
    """The store's clock is within a minute of ours on one machine."""
    assert abs((store.server_time() - datetime.now(UTC)).total_seconds()) < 60


def _s3_store(config: AgentConfig, waits: list[float]) -> S3Store:
    """An S3Store whose retry waits are recorded instead of slept."""
    return S3Store(
        config.store_location(),
        config.store,
        retry=config.retry,
        transfer=config.transfer,
        sleep=waits.append,
    )


def test_missing_bucket_is_reported_by_name(
    seaweed: SeaweedServer, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    """A bucket that does not exist is a BucketMissingError naming it."""
    config = load_config(
        store={
            "url": "s3://no-such-bucket-pdagent/x",
            "endpoint_url": seaweed.endpoint,
            "region": "us-east-1",
        },
        paths={"base_dir": str(tmp_path)},
    )
    store = S3Store(
        config.store_location(), config.store, retry=config.retry, transfer=config.transfer
    )
    try:
        with pytest.raises(BucketMissingError, match="no-such-bucket-pdagent"):
            store.get("k")
    finally:
        store.close()


def test_wrong_credentials_are_access_denied_and_not_retried(
    seaweed: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_env: dict[str, str]
) -> None:
    """A 403 says to check the credentials and is tried exactly once."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    config = load_config(
        store={
            "url": s3_env["AGENT_STORE__URL"],
            "endpoint_url": seaweed.endpoint,
            "region": "us-east-1",
        },
        paths={"base_dir": str(tmp_path)},
    )
    waits: list[float] = []
    store = _s3_store(config, waits)
    try:
        with pytest.raises(AccessDeniedError, match="credentials"):
            store.put_bytes("k", b"x")
    finally:
        store.close()
    assert [] == waits


def test_unreachable_endpoint_is_transient_after_exactly_the_configured_tries(
    dead_endpoint: str, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    """Nothing listening: TransientStoreError after `attempts` tries, with exponential waits."""
    config = load_config(
        store={
            "url": "s3://bk1/x",
            "endpoint_url": dead_endpoint,
            "region": "us-east-1",
            "connect_timeout": 1,
        },
        paths={"base_dir": str(tmp_path)},
        retry={"attempts": 4, "initial_backoff": 0.5, "max_backoff": 1.5, "jitter": 0},
    )
    waits: list[float] = []
    store = _s3_store(config, waits)
    try:
        with pytest.raises(TransientStoreError, match="cannot reach"):
            store.get("k")
    finally:
        store.close()
    assert [0.5, 1.0, 1.5] == waits


def test_list_level_gives_one_level_objects_and_sub_prefixes(store: ObjectStore) -> None:
    """The lock board lists projects, then each project's top-level objects."""
    for key in ("lv/a.json", "lv/b.json", "lv/x/1", "lv/x/y/2", "lv/z/3", "lvl/other"):
        store.put_bytes(key, b"d")
    objects, subs = store.list_level("lv/")
    assert [o.key for o in objects] == ["lv/a.json", "lv/b.json"]
    assert subs == ["lv/x/", "lv/z/"]
    top_objects, top = store.list_level("")
    assert "lv/" in top and "lvl/" in top and top_objects == []
    assert store.list_level("nothing/") == ([], [])


ODD_KEYS = [
    "odd/a b&c+d.txt",
    "odd/100%/ü ß é.dwg",
    "odd/~tilde=eq;semi,comma'quote\".txt",
    "odd/P&ID/unit-1 (rev 2).dwg",
]


def test_keys_with_reserved_and_unicode_characters_round_trip_through_every_request(
    store: ObjectStore,
) -> None:
    """Signed requests quote keys as the store expects: every verb finds the same object."""
    written = {key: store.put_bytes(key, key.encode()).etag for key in ODD_KEYS}
    assert sorted(ODD_KEYS) == [o.key for o in store.list("odd/")]
    objects, subs = store.list_level("odd/")
    assert ["odd/a b&c+d.txt", "odd/~tilde=eq;semi,comma'quote\".txt"] == [o.key for o in objects]
    assert ["odd/100%/", "odd/P&ID/"] == subs
    for key in ODD_KEYS:
        assert key.encode() == store.get(key).body
        assert written[key] == store.head(key).etag
    copied = store.copy(ODD_KEYS[1], "odd-copy/ü & +.dwg", if_source_etag=written[ODD_KEYS[1]])
    assert copied.etag == store.head("odd-copy/ü & +.dwg").etag
    assert ODD_KEYS[1].encode() == store.get("odd-copy/ü & +.dwg").body
    store.delete("odd-copy/ü & +.dwg")
    with pytest.raises(NotFoundError):
        store.head("odd-copy/ü & +.dwg")


def test_get_many_reads_every_object_and_none_for_the_missing(store: ObjectStore) -> None:
    """The lock board's bulk read: bodies and ETags as ``get`` gives them, in order."""
    keys = [f"many/{n:03d}.json" for n in range(40)]
    etags = [store.put_bytes(key, f"body {n}".encode()).etag for n, key in enumerate(keys)]
    asked = [*keys[:20], "many/missing.json", *keys[20:]]
    got = store.get_many(asked)
    assert len(asked) == len(got)
    assert got[20] is None
    found = [g for g in got if g is not None]
    assert [f"body {n}".encode() for n in range(40)] == [g.body for g in found]
    assert etags == [g.etag for g in found]
    assert keys == [g.key for g in found]
    assert abs((found[0].server_time - store.server_time()).total_seconds()) < 60
    assert [] == store.get_many([])
