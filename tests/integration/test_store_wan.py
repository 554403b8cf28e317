"""The store over a WAN, on the bed: complete listings, errors told by code, slow links (issue 12).

Everything runs against the real SeaweedFS through the fault proxy, which injects
5xx answers on chosen requests and throttles answers to a few hundred KiB/s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import NotFoundError, PermanentStoreError, TransientStoreError
from agent.store import open_store
from agent.store.base import ObjectStore
from tests.conftest import proxy_config
from tests.faultproxy import FaultProxy, Rule, Status


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
