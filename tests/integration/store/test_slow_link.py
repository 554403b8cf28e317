"""A 500 MB drawing through an office link of a few MB/s (issue 12), behind ``-m stress``.

The fault proxy paces every body in both directions to one shared rate, as a real
link does: the open's parallel ranged GETs and the streamed upload's parallel
parts share it. Nothing may time out or start again from zero; the committed
object must be the saved bytes exactly. About three minutes.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest

from agent.session import PlantDesignSession
from agent.store import open_store
from tests.conftest import proxy_config, s3_config
from tests.faultproxy import FaultProxy

BIG = 500 * 10**6
RATE = 8 * 10**6  # bytes per second: a 64 Mbit/s office link
MiB = 1024 * 1024
P, STAGE = "Kraftwerk_5000001", "planning"
LOCK = {"heartbeat_interval": 3600, "stale_after": 7200}
WATCH = {"debounce": 0.2, "max_delay": 2.0}


def _sha(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_big(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("wb") as f:
        for _ in range(BIG // (10 * 10**6)):
            f.write(rng.randbytes(10 * 10**6))


@pytest.mark.stress
@pytest.mark.timeout(1200)
def test_a_500_mb_drawing_opens_streams_and_commits_through_a_slow_link(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    seeder = PlantDesignSession(s3_config(s3_env, tmp_path / "seed", lock=LOCK))
    work = seeder.open(P, "seed", STAGE, watch=False)
    _write_big(work / "plan.dwg", seed=1)
    first = _sha(work / "plan.dwg")
    seeder.close()

    fault_proxy.link(RATE)
    # The production read timeout (an idle timeout): a 500 MB body takes a minute.
    alice = PlantDesignSession(
        proxy_config(
            s3_env,
            fault_proxy,
            tmp_path / "alice",
            lock=LOCK,
            watch=WATCH,
            store={"read_timeout": 30.0},
        )
    )
    started = time.monotonic()
    work = alice.open(P, "alice", STAGE)
    took = time.monotonic() - started
    assert first == _sha(work / "plan.dwg")
    assert took > 0.8 * BIG / RATE, f"the link was not slow: {took:.0f} s"

    # The user saves the drawing with 1 MiB changed in the middle; the agent streams it.
    with (work / "plan.dwg").open("r+b") as f:
        f.seek(BIG // 2)
        f.write(random.Random(2).randbytes(MiB))
    saved = _sha(work / "plan.dwg")
    assert alice.flush(timeout=900), "the saved drawing did not reach the store"
    assert not alice.status().get("last_error")
    alice.close()

    fault_proxy.link(None)
    store = open_store(s3_config(s3_env, tmp_path / "check"))
    try:
        store.download_file(f"{P}/{STAGE}/plan.dwg", tmp_path / "committed.dwg")
    finally:
        store.close()
    assert saved == _sha(tmp_path / "committed.dwg")
    reads = [s for s in fault_proxy.seen if s.method == "GET" and s.path.endswith("plan.dwg")]
    assert all(s.status in (200, 206) for s in reads), "a download was refused or cut"
