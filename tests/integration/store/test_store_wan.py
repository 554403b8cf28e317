"""The store over a WAN, on the bed: complete listings, errors told by code, slow links (issue 12).

Everything runs against the real SeaweedFS through the fault proxy, which injects
5xx answers on chosen requests and throttles answers to a few hundred KiB/s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import (
    NotFoundError,
    PermanentStoreError,
    PreconditionFailedError,
    TransientStoreError,
)
from agent.store import open_store
from agent.store.base import ObjectStore
from tests.conftest import proxy_config
from tests.faultproxy import RESET_BEFORE, FaultProxy, LinkProfile, Rule, Status, Throttle


@pytest.fixture
def wan_store(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> Iterator[ObjectStore]:
    """An S3Store through the proxy that lists two keys per page."""
    store = open_store(
        proxy_config(s3_env, fault_proxy, tmp_path / "cfg", store={"list_page_size": 2})
    )
    yield store
    store.close()


def _put_keys(store: ObjectStore, count: int) -> list[str]:
    keys = [f"list/k{i:02d}.dwg" for i in range(count)]
    for key in keys:
        store.put_bytes(key, key.encode())
    return keys


def test_a_500_on_the_second_listing_page_retries_that_page_and_the_listing_is_complete(
    wan_store: ObjectStore, fault_proxy: FaultProxy
) -> None:
    """Page 2 answered 500 once: that page is asked again, and every key is listed."""
    keys = _put_keys(wan_store, 7)
    rule = fault_proxy.add(Rule(Status(500), method="GET", query=("continuation-token",)))
    listed = [o.key for o in wan_store.list("list/")]
    assert 1 == rule.fired
    assert keys == listed


def test_a_listing_that_keeps_failing_raises_and_never_returns_a_short_list(
    wan_store: ObjectStore, fault_proxy: FaultProxy
) -> None:
    """Page 2 answered 500 every time: the listing raises after the tries, not a short list."""
    _put_keys(wan_store, 5)
    rule = fault_proxy.add(
        Rule(Status(500), method="GET", query=("continuation-token",), times=None)
    )
    got: list[Any] = []
    with pytest.raises(TransientStoreError):
        got.extend(wan_store.list("list/"))
    assert rule.fired >= 2
    assert 2 == len(got), "only the first page was listed before the error"


def test_a_permanent_error_on_a_key_named_like_a_network_fault_is_not_retried(
    wan_store: ObjectStore, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """400 on ``preset.dwg`` (the name holds "reset"): one request, a permanent error."""
    wan_store.put_bytes("cad/preset.dwg", b"x")
    rule = fault_proxy.add(
        Rule(Status(400, "InvalidRequest"), method="GET", path=r"preset\.dwg$", times=None)
    )
    with pytest.raises(PermanentStoreError, match="400 InvalidRequest") as info:
        wan_store.download_file("cad/preset.dwg", tmp_path / "out")
    assert not isinstance(info.value, TransientStoreError)
    assert 1 == rule.fired


def test_a_5xx_on_a_download_is_retried_by_its_status(
    wan_store: ObjectStore, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """503 SlowDown on a download's GET: retried, and the bytes arrive."""
    wan_store.put_bytes("cad/plan.dwg", b"plan")
    rule = fault_proxy.add(Rule(Status(503), method="GET", path=r"plan\.dwg$"))
    info = wan_store.download_file("cad/plan.dwg", tmp_path / "out")
    assert 1 == rule.fired
    assert (4, b"plan") == (info.size, (tmp_path / "out").read_bytes())


def test_a_download_of_a_missing_object_is_not_found(
    wan_store: ObjectStore, tmp_path: Path
) -> None:
    """obstore's 404 (a FileNotFoundError) is the store's NotFoundError, not a local file error."""
    with pytest.raises(NotFoundError):
        wan_store.download_file("cad/none.dwg", tmp_path / "out")


MiB = 1024 * 1024


def _big_store(
    s3_env: dict[str, str], proxy: FaultProxy, tmp_path: Path, **transfer: Any
) -> ObjectStore:
    """Through the proxy, with multipart from 1 MiB and 5 MiB parts (the smallest S3 allows)."""
    config = proxy_config(
        s3_env,
        proxy,
        tmp_path / "big",
        transfer={"multipart_threshold": MiB, "multipart_chunksize": 5 * MiB, **transfer},
    )
    return open_store(config)


def test_a_download_slower_than_the_read_timeout_overall_still_finishes(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """1 MiB at 256 KiB/s takes twice the 2 s read timeout: the idle timeout never fires."""
    store = _big_store(s3_env, fault_proxy, tmp_path)
    try:
        data = os.urandom(MiB)
        store.put_bytes("slow/plan.dwg", data)
        rule = fault_proxy.add(
            Rule(Throttle(256 * 1024), method="GET", path=r"plan\.dwg$", times=None)
        )
        info = store.download_file("slow/plan.dwg", tmp_path / "out")
        assert 1 == rule.fired, "the download was cut and sent again"
        assert data == (tmp_path / "out").read_bytes()
        assert len(data) == info.size
    finally:
        store.close()


def test_a_large_download_is_read_in_ranges_and_a_failed_range_alone_is_read_again(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """11 MiB: the first GET's first part, two ranged GETs; a 500 on one re-reads it only."""
    store = _big_store(s3_env, fault_proxy, tmp_path)
    try:
        data = os.urandom(11 * MiB)
        (tmp_path / "src").write_bytes(data)
        store.upload_file("big/model.step", tmp_path / "src")
        rule = fault_proxy.add(
            Rule(Status(500), method="GET", path=r"model\.step$", headers=("Range",), skip=1)
        )
        moved: list[int] = []
        info = store.download_file("big/model.step", tmp_path / "out", progress=moved.append)
        assert 1 == rule.fired
        ranged = [s for s in fault_proxy.seen if s.method == "GET" and s.rule is None]
        assert 1 + 2 == len(ranged), "the first part with the size, then two ranges, none twice"
        assert data == (tmp_path / "out").read_bytes()
        assert (len(data), len(data)) == (info.size, sum(moved))
    finally:
        store.close()


def test_a_copy_above_the_copy_limit_goes_in_parts_with_metadata_and_pinned_source(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """copy_limit 1 MiB: an 11 MiB copy is three UploadPartCopy parts; metadata and bytes kept."""
    store = _big_store(s3_env, fault_proxy, tmp_path, copy_limit=MiB, copy_chunksize=5 * MiB)
    try:
        data = os.urandom(11 * MiB)
        (tmp_path / "src").write_bytes(data)
        sent = store.upload_file(
            "stage/a.dwg", tmp_path / "src", metadata={"sha256": "abc"}, content_type="image/x"
        )
        with pytest.raises(PreconditionFailedError):
            store.copy("stage/a.dwg", "main/a.dwg", if_source_etag="0" * 32, size=len(data))
        store.copy("stage/a.dwg", "main/a.dwg", if_source_etag=sent.etag, size=len(data))
        parts = [
            s
            for s in fault_proxy.seen
            if s.method == "PUT" and "partNumber" in s.query and "x-amz-copy-source" in s.headers
        ]
        assert 3 == len(parts)
        assert all(sent.etag in p.headers["x-amz-copy-source-if-match"] for p in parts)
        assert "abc" == store.head("main/a.dwg").metadata.get("sha256")
        store.download_file("main/a.dwg", tmp_path / "out")
        assert data == (tmp_path / "out").read_bytes()
    finally:
        store.close()


def test_requests_in_flight_never_exceed_the_process_wide_limit(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """max_requests 2 with 4 workers: ranged parts of four files never run more than 2 at once."""
    from agent.folder.transfer import Download, Transfers
    from agent.store.s3_parts import REQUEST_SLOTS

    store = _big_store(s3_env, fault_proxy, tmp_path, max_requests=2, workers=4)
    try:
        data = os.urandom(6 * MiB)
        (tmp_path / "src").write_bytes(data)
        for i in range(4):
            store.upload_file(f"many/{i}.dwg", tmp_path / "src")
        REQUEST_SLOTS.peak = 0
        items = [Download(f"many/{i}.dwg", tmp_path / "dl" / f"{i}.dwg") for i in range(4)]
        Transfers(store, 4).download(items)
        assert 2 == REQUEST_SLOTS.peak
        assert all(data == item.dest.read_bytes() for item in items)
    finally:
        store.close()


def test_the_capability_probe_writes_each_probe_key_once_and_is_refused_once(
    wan_store: ObjectStore, fault_proxy: FaultProxy
) -> None:
    """R2's one write a second per key: the probe uses a key per step, never three writes to one."""
    from agent.stage.locktools import probe_conditional_writes

    probe_conditional_writes(wan_store)
    puts = [s.path for s in fault_proxy.seen if s.method == "PUT" and "pdagent-probe" in s.path]
    assert 4 == len(puts)
    assert {2} == {puts.count(p) for p in puts}, puts


def test_a_500_on_the_second_page_of_a_level_listing_still_lists_the_whole_level(
    wan_store: ObjectStore, fault_proxy: FaultProxy
) -> None:
    """``list_level`` pages the same way: page 2 answered 500 once, every entry listed."""
    keys = _put_keys(wan_store, 5)
    for sub in ("a", "b", "c"):
        wan_store.put_bytes(f"list/{sub}/x.dwg", b"x")
    rule = fault_proxy.add(Rule(Status(500), method="GET", query=("continuation-token",)))
    objects, subs = wan_store.list_level("list/")
    assert 1 == rule.fired
    assert keys == [o.key for o in objects]
    assert ["list/a/", "list/b/", "list/c/"] == subs


def test_a_bulk_read_whose_gets_fail_reads_those_keys_again_and_misses_nothing(
    wan_store: ObjectStore, fault_proxy: FaultProxy
) -> None:
    """get_many: a 503, a 500 and a reset on three keys; each is read again, all come back."""
    keys = [f"board/k{i:02d}.lock.json" for i in range(12)]
    etags = [wan_store.put_bytes(key, f"lock {i}".encode()).etag for i, key in enumerate(keys)]
    rules = [
        fault_proxy.add(Rule(Status(503, "SlowDown"), method="GET", path=r"k03\.lock\.json$")),
        fault_proxy.add(Rule(Status(500), method="GET", path=r"k07\.lock\.json$")),
        fault_proxy.add(Rule(RESET_BEFORE, method="GET", path=r"k10\.lock\.json$")),
    ]
    got = wan_store.get_many([*keys, "board/absent.lock.json"])
    assert [1, 1, 1] == [rule.fired for rule in rules]
    assert got[-1] is None
    assert [f"lock {i}".encode() for i in range(12)] == [g.body for g in got[:-1] if g]
    assert etags == [g.etag for g in got[:-1] if g]


def test_a_bulk_read_of_a_key_that_keeps_failing_raises_and_never_says_absent(
    wan_store: ObjectStore, fault_proxy: FaultProxy
) -> None:
    """A lock that cannot be read is an error, never a missing lock (a free stage)."""
    keys = [f"board/j{i:02d}.lock.json" for i in range(4)]
    for key in keys:
        wan_store.put_bytes(key, b"{}")
    rule = fault_proxy.add(Rule(Status(500), method="GET", path=r"j02\.lock\.json$", times=None))
    with pytest.raises(TransientStoreError):
        wan_store.get_many(keys)
    assert rule.fired >= 2  # the bulk GET and the retried reads


def test_the_capability_probe_writes_its_two_keys_at_once(
    wan_store: ObjectStore, fault_proxy: FaultProxy
) -> None:
    """Each probe request is a round trip (30 ms or more to an office): the two keys'
    requests overlap, so the probe costs four round trips, not eight."""
    from agent.stage.locktools import probe_conditional_writes

    fault_proxy.link_profile(LinkProfile(latency=0.3))
    try:
        probe_conditional_writes(wan_store)
        stats = fault_proxy.link_stats
    finally:
        fault_proxy.link_profile(None)
    assert stats.held_requests >= 8
    assert stats.peak_held >= 2, "every probe request waited for the one before it"
    assert [] == list(wan_store.list(".pdagent-probe/"))
