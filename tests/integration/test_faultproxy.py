"""The fault proxy itself, against the real SeaweedFS with plain boto3 clients
(and, for the link profile of issue 18, with the agent's sessions)."""

from __future__ import annotations

import dataclasses
import random
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from agent.config import load_config
from agent.session import PlantDesignSession
from tests.conftest import (
    PROXY_READ_TIMEOUT,
    PROXY_RETRY,
    proxy_config,
    proxy_env,
    s3_config,
)
from tests.faultproxy import (
    LINK_RULE,
    LOSE_ANSWER,
    OFFICE_LINK,
    RESET_BEFORE,
    Delay,
    FaultProxy,
    LinkProfile,
    Rule,
    Status,
)
from tests.servers import SeaweedServer
from tests.waiting import wait_for


def _client(endpoint: str, *, read_timeout: float = 5.0) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="pdagent-test-access",
        aws_secret_access_key="pdagent-test-secret-0123456789",
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            connect_timeout=2,
            read_timeout=read_timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@pytest.fixture
def direct(seaweed: SeaweedServer) -> Iterator[Any]:
    """A client straight to SeaweedFS (the truth)."""
    client = _client(seaweed.endpoint)
    yield client
    client.close()


@pytest.fixture
def via(fault_proxy: FaultProxy) -> Iterator[Any]:
    """A client through the proxy, with a 1 s read timeout and no retries."""
    client = _client(fault_proxy.endpoint, read_timeout=1.0)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix."""
    return f"fp{uuid.uuid4().hex[:12]}"


def _body(client: Any, bucket: str, key: str) -> bytes | None:
    try:
        data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise
    return data


def test_without_rules_every_operation_passes_through(
    via: Any, direct: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """PUT, conditional PUT, GET, HEAD, list, copy, multipart and delete work unchanged."""
    b = shared_bucket
    key = f"{prefix}/a.txt"
    via.put_object(Bucket=b, Key=key, Body=b"alpha", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        via.put_object(Bucket=b, Key=key, Body=b"again", IfNoneMatch="*")
    assert 412 == info.value.response["ResponseMetadata"]["HTTPStatusCode"]
    assert b"alpha" == via.get_object(Bucket=b, Key=key)["Body"].read()
    assert 5 == via.head_object(Bucket=b, Key=key)["ContentLength"]
    via.copy_object(Bucket=b, Key=f"{prefix}/b.txt", CopySource={"Bucket": b, "Key": key})
    listed = via.list_objects_v2(Bucket=b, Prefix=f"{prefix}/")
    assert [f"{prefix}/a.txt", f"{prefix}/b.txt"] == [o["Key"] for o in listed["Contents"]]
    part = b"p" * (5 * 1024 * 1024)
    up = via.create_multipart_upload(Bucket=b, Key=f"{prefix}/big")
    etags = [
        via.upload_part(
            Bucket=b, Key=f"{prefix}/big", UploadId=up["UploadId"], PartNumber=n, Body=part
        )["ETag"]
        for n in (1, 2)
    ]
    via.complete_multipart_upload(
        Bucket=b,
        Key=f"{prefix}/big",
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, 1)]},
    )
    assert 2 * len(part) == direct.head_object(Bucket=b, Key=f"{prefix}/big")["ContentLength"]
    via.delete_object(Bucket=b, Key=f"{prefix}/b.txt")
    assert _body(direct, b, f"{prefix}/b.txt") is None
    seen = fault_proxy.seen
    assert any("uploads" in s.query for s in seen)
    assert any("partNumber" in s.query for s in seen)
    assert any("list-type" in s.query for s in seen)
    assert any("x-amz-copy-source" in s.headers for s in seen)
    assert any("if-none-match" in s.headers for s in seen)
    assert [] == fault_proxy.faults()


def _raw(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


def _read_answer(stream: Any) -> tuple[int, bytes]:
    status = stream.readline()
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(status.split()[1]), body


def test_chunked_bodies_expect_continue_and_keep_alive_on_one_connection(
    via: Any, direct: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """A presigned PUT sent chunked, one sent after 100-continue, and a GET share a connection."""
    b = shared_bucket
    url = urlsplit(
        via.generate_presigned_url("put_object", Params={"Bucket": b, "Key": f"{prefix}/c"})
    )
    target = f"{url.path}?{url.query}"
    host = f"127.0.0.1:{fault_proxy.port}"
    with socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        _raw(
            sock,
            (
                f"PUT {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                "5\r\nchunk\r\n3\r\ned!\r\n0\r\n\r\n"
            ).encode(),
        )
        assert 200 == _read_answer(stream)[0]
        _raw(
            sock,
            (
                f"PUT {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 6\r\n"
                "Expect: 100-continue\r\n\r\n"
            ).encode(),
        )
        assert stream.readline().startswith(b"HTTP/1.1 100")
        assert b"\r\n" == stream.readline()
        _raw(sock, b"second")
        assert 200 == _read_answer(stream)[0]
        get = urlsplit(
            via.generate_presigned_url("get_object", Params={"Bucket": b, "Key": f"{prefix}/c"})
        )
        _raw(sock, f"GET {get.path}?{get.query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert (200, b"second") == _read_answer(stream)
        head = urlsplit(
            via.generate_presigned_url("head_object", Params={"Bucket": b, "Key": f"{prefix}/c"})
        )
        _raw(sock, f"HEAD {head.path}?{head.query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status = stream.readline()
        while stream.readline() not in (b"\r\n", b""):
            pass
        assert b" 200 " in status
        _raw(sock, f"GET {get.path}?{get.query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert (200, b"second") == _read_answer(stream)  # the HEAD answer had no body
        stream.close()
    assert 5 == len(fault_proxy.seen)


def test_lose_answer_applies_the_write_but_the_client_hears_nothing(
    via: Any, direct: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """lose_answer: the store has the object, the client sees a dropped connection."""
    rule = fault_proxy.add(Rule(LOSE_ANSWER, method="PUT", headers=("If-None-Match",)))
    with pytest.raises((BotoCoreError, ClientError)):
        via.put_object(Bucket=shared_bucket, Key=f"{prefix}/x", Body=b"landed", IfNoneMatch="*")
    assert 1 == rule.fired
    assert b"landed" == _body(direct, shared_bucket, f"{prefix}/x")
    via.put_object(Bucket=shared_bucket, Key=f"{prefix}/y", Body=b"y", IfNoneMatch="*")
    assert ["lose_answer", None] == [s.action for s in fault_proxy.seen]


def test_delay_delivers_the_request_after_the_client_timed_out(
    via: Any, direct: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """delay: the client times out, the store has nothing, then the write lands late."""
    rule = fault_proxy.add(Rule(Delay(60), method="PUT", path=r"/late$"))
    with pytest.raises(BotoCoreError, match=r"timeout|Read timed out"):
        via.put_object(Bucket=shared_bucket, Key=f"{prefix}/late", Body=b"old")
    assert _body(direct, shared_bucket, f"{prefix}/late") is None
    via.put_object(Bucket=shared_bucket, Key=f"{prefix}/late", Body=b"new")
    rule.release()
    assert wait_for(rule.delivered.is_set, timeout=10)
    assert b"old" == _body(direct, shared_bucket, f"{prefix}/late")


def test_delay_with_seconds_delivers_by_itself(
    via: Any, direct: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """delay(seconds) without release: delivered once the time has passed."""
    rule = fault_proxy.add(Rule(Delay(1.5), method="PUT"))
    with pytest.raises(BotoCoreError):
        via.put_object(Bucket=shared_bucket, Key=f"{prefix}/d", Body=b"d")
    assert wait_for(rule.delivered.is_set, timeout=10)
    assert b"d" == _body(direct, shared_bucket, f"{prefix}/d")


def test_reset_before_forwards_nothing(
    via: Any, direct: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """reset_before: the connection is reset and the store never sees the request."""
    rule = fault_proxy.add(Rule(RESET_BEFORE, method="PUT"))
    with pytest.raises(BotoCoreError):
        via.put_object(Bucket=shared_bucket, Key=f"{prefix}/r", Body=b"r")
    assert 1 == rule.fired
    assert _body(direct, shared_bucket, f"{prefix}/r") is None


S3_CODES = {500: "InternalError", 503: "SlowDown", 429: "SlowDown", 501: "NotImplemented"}


@pytest.mark.parametrize("code", sorted(S3_CODES))
def test_status_answers_an_s3_error_without_forwarding(
    via: Any, direct: Any, shared_bucket: str, fault_proxy: FaultProxy, code: int
) -> None:
    """status(code): the client gets that S3 error; the store has nothing; HEAD works too."""
    prefix = f"fp{uuid.uuid4().hex[:12]}"
    fault_proxy.add(Rule(Status(code), method="PUT"))
    with pytest.raises(ClientError) as info:
        via.put_object(Bucket=shared_bucket, Key=f"{prefix}/s", Body=b"s")
    assert code == info.value.response["ResponseMetadata"]["HTTPStatusCode"]
    assert S3_CODES[code] == info.value.response["Error"]["Code"]
    assert _body(direct, shared_bucket, f"{prefix}/s") is None
    via.put_object(Bucket=shared_bucket, Key=f"{prefix}/s", Body=b"s")
    fault_proxy.add(Rule(Status(code), method="HEAD"))
    with pytest.raises(ClientError) as head:
        via.head_object(Bucket=shared_bucket, Key=f"{prefix}/s")
    assert code == head.value.response["ResponseMetadata"]["HTTPStatusCode"]
    assert b"s" == via.get_object(Bucket=shared_bucket, Key=f"{prefix}/s")["Body"].read()


def test_rules_match_on_query_headers_and_body_and_fire_on_the_nth_match(
    via: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """skip/times pick the Nth match; query, header and body conditions narrow the match."""
    b = shared_bucket
    listing = fault_proxy.add(Rule(Status(503), method="GET", query=("list-type",), skip=1))
    via.list_objects_v2(Bucket=b, Prefix=prefix)
    with pytest.raises(ClientError):
        via.list_objects_v2(Bucket=b, Prefix=prefix)
    via.list_objects_v2(Bucket=b, Prefix=prefix)
    assert (3, 1) == (listing.matched, listing.fired)
    held = fault_proxy.add(Rule(Status(500), method="PUT", body=rb'"state": "held"', times=None))
    via.put_object(Bucket=b, Key=f"{prefix}/l", Body=b'{"state": "released"}')
    with pytest.raises(ClientError):
        via.put_object(Bucket=b, Key=f"{prefix}/l", Body=b'{"state": "held"}')
    cond = fault_proxy.add(Rule(Status(500), method="PUT", headers=("If-Match",), no_query=("x",)))
    via.put_object(Bucket=b, Key=f"{prefix}/m", Body=b"plain")
    with pytest.raises(ClientError):
        via.put_object(Bucket=b, Key=f"{prefix}/m", Body=b"cas", IfMatch='"nope"')
    assert (1, 1) == (held.fired, cond.fired)
    fault_proxy.remove(cond)
    fault_proxy.clear()
    via.put_object(Bucket=b, Key=f"{prefix}/l", Body=b'{"state": "held"}')


def test_every_and_probability_rules_are_deterministic() -> None:
    """every=N fires on each Nth match; a seeded probability rule fires the same way twice."""
    every = Rule(LOSE_ANSWER, every=3, times=None)
    assert [False, False, True] * 3 == [every.decide() for _ in range(9)]
    runs = []
    for _ in range(2):
        rule = Rule(LOSE_ANSWER, probability=0.3, rng=random.Random(7), times=None)
        runs.append([rule.decide() for _ in range(200)])
    assert runs[0] == runs[1]
    assert 40 <= sum(runs[0]) <= 80
    with pytest.raises(ValueError, match="seeded rng"):
        Rule(LOSE_ANSWER, probability=0.5)


def test_proxy_env_points_a_loaded_config_at_the_proxy(
    s3_env: dict[str, str], fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CLI subprocess would load from ``proxy_env``: the proxy, short timeouts."""
    for name, value in proxy_env(s3_env, fault_proxy).items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert fault_proxy.endpoint == config.store.endpoint_url
    assert PROXY_READ_TIMEOUT == config.store.read_timeout
    assert PROXY_RETRY["attempts"] == config.retry.attempts


# ------------------------------------------------------------ link profile (issue 18)

P, STAGE = "Kraftwerk_1800018", "planning"
LOCK = {"heartbeat_interval": 3600, "stale_after": 7200}


def _stage_files(direct: Any, s3_env: dict[str, str]) -> dict[str, bytes]:
    """The committed plain tree of the stage, read straight from SeaweedFS."""
    bucket, _, prefix = s3_env["AGENT_STORE__URL"].removeprefix("s3://").partition("/")
    base = f"{prefix}/{P}/{STAGE}/"
    out: dict[str, bytes] = {}
    for page in direct.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            body = _body(direct, bucket, obj["Key"])
            assert body is not None
            out[obj["Key"][len(base) :]] = body
    return out


def _working_files(root: Path) -> dict[str, bytes]:
    """The user's files in a working copy (the agent's own markers left out)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".pdagent")
    }


def _seed_stage(s3_env: dict[str, str], tmp_path: Path, files: dict[str, bytes]) -> None:
    """Commit ``files`` as the stage, straight to SeaweedFS (not through the proxy)."""
    seeder = PlantDesignSession(s3_config(s3_env, tmp_path / "seed", lock=LOCK))
    work = seeder.open(P, "seeder", STAGE, watch=False)
    for rel, data in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    seeder.close()


def test_a_link_profile_is_a_validated_frozen_value_and_office_link_is_15_ms_100_mbit() -> None:
    """LinkProfile refuses nonsense; OFFICE_LINK is 15 ms each way at 100 Mbit/s, no resets."""
    assert (0.015, 12_500_000, 0.0) == (
        OFFICE_LINK.latency,
        OFFICE_LINK.bytes_per_second,
        OFFICE_LINK.reset_probability,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        OFFICE_LINK.latency = 0.0  # type: ignore[misc]
    for bad in ({"latency": -1.0}, {"bytes_per_second": 0}, {"reset_probability": 1.5}):
        with pytest.raises(ValueError, match="must be"):
            LinkProfile(**bad)


def test_link_resets_are_retried_and_the_session_commits_exactly_the_local_files(
    s3_env: dict[str, str],
    fault_proxy: FaultProxy,
    direct: Any,
    tmp_path: Path,
) -> None:
    """Seeded resets before forwarding fire during open and close; the commit is exact."""
    rng = random.Random(18)
    _seed_stage(s3_env, tmp_path, {f"cad/p{i:02d}.dwg": rng.randbytes(8 * 1024) for i in range(30)})
    fault_proxy.link_profile(LinkProfile(latency=0.002, reset_probability=0.15, seed=18))
    alice = PlantDesignSession(
        proxy_config(s3_env, fault_proxy, tmp_path / "alice", lock=LOCK, retry={"attempts": 10})
    )
    try:
        work = alice.open(P, "alice", STAGE, watch=False)
        resets_in_open = fault_proxy.link_stats.resets
        for i in range(0, 30, 3):
            (work / f"cad/p{i:02d}.dwg").write_bytes(rng.randbytes(12 * 1024))
        (work / "cad/p01.dwg").unlink()
        (work / "notes/new.txt").parent.mkdir()
        (work / "notes/new.txt").write_bytes(b"added through a flaky link")
        local = _working_files(work)
        alice.close()
    finally:
        if not alice.is_closed:
            alice.abort()
    resets = [s for s in fault_proxy.seen if s.rule == LINK_RULE]
    assert resets_in_open > 0, "no reset fired while the copy was opened"
    assert fault_proxy.link_stats.resets > resets_in_open, "no reset fired while closing"
    assert len(resets) == fault_proxy.link_stats.resets
    assert {"reset_before"} == {s.action for s in resets}
    assert all(s.status is None for s in resets), "a reset request reached the store"
    assert local == _stage_files(direct, s3_env)


def test_latency_holds_each_request_and_answer_without_serializing_parallel_transfers(
    s3_env: dict[str, str],
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    """A cold open's parallel downloads are held side by side; every request and answer once."""
    rng = random.Random(5)
    files = {f"f{i:02d}.bin": rng.randbytes(4 * 1024) for i in range(40)}
    _seed_stage(s3_env, tmp_path, files)
    fault_proxy.link_profile(LinkProfile(latency=0.05))
    bob = PlantDesignSession(proxy_config(s3_env, fault_proxy, tmp_path / "bob", lock=LOCK))
    try:
        work = bob.open(P, "bob", STAGE, watch=False)
        assert files == _working_files(work)
        bob.close()
    finally:
        if not bob.is_closed:
            bob.abort()
    stats = fault_proxy.link_stats
    forwarded = [s for s in fault_proxy.seen if s.status is not None]
    assert len(fault_proxy.seen) == len(forwarded) >= len(files)
    assert (len(forwarded), len(forwarded)) == (stats.held_requests, stats.held_answers)
    assert stats.peak_held > 1, "the latency holds ran one after another"
    assert 0 == stats.resets


def test_lifting_the_link_profile_stops_holding_and_resetting(
    via: Any, shared_bucket: str, prefix: str, fault_proxy: FaultProxy
) -> None:
    """After link_profile(None) requests pass straight through; the stats start again."""
    fault_proxy.link_profile(LinkProfile(latency=0.01, reset_probability=1.0))
    with pytest.raises(BotoCoreError):
        via.put_object(Bucket=shared_bucket, Key=f"{prefix}/gone", Body=b"x")
    assert (1, 1, 0) == (
        fault_proxy.link_stats.resets,
        fault_proxy.link_stats.held_requests,
        fault_proxy.link_stats.held_answers,
    )
    fault_proxy.link_profile(None)
    via.put_object(Bucket=shared_bucket, Key=f"{prefix}/kept", Body=b"y")
    assert b"y" == via.get_object(Bucket=shared_bucket, Key=f"{prefix}/kept")["Body"].read()
    assert (0, 0, 0) == (
        fault_proxy.link_stats.resets,
        fault_proxy.link_stats.held_requests,
        fault_proxy.link_stats.held_answers,
    )
