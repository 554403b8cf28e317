"""What R2 and other S3 stores answer, told apart (through the fault proxy, real SeaweedFS).

R2 answers a conditional write that raced another with ``409
ConditionalRequestConflict`` (retry it), a store without conditional writes
answers ``501 NotImplemented`` (it cannot lock), and a wrong local clock is
``RequestTimeTooSkewed`` (fix the clock, retrying will not help).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import PermanentStoreError, UnsafeStoreError
from agent.session import PlantDesignSession
from tests.conftest import proxy_config
from tests.faultproxy import FaultProxy, Rule, Status

P, STAGE = "Kraftwerk_1234567", "planning"


def _session(s3_env: dict[str, str], proxy: FaultProxy, tmp_path: Path) -> PlantDesignSession:
    return PlantDesignSession(
        proxy_config(s3_env, proxy, tmp_path / "m1", lock={"heartbeat_interval": 3600})
    )


def test_a_409_conditional_conflict_on_a_renewal_is_retried_not_a_lost_lock(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """R2's 409 ConditionalRequestConflict on close's fencing renewal: retried, close commits."""
    session = _session(s3_env, fault_proxy, tmp_path)
    work = session.open(P, "admin", STAGE, watch=False)
    (work / "a.txt").write_text("saved")
    rule = fault_proxy.add(
        Rule(
            Status(409, "ConditionalRequestConflict"),
            method="PUT",
            path=r"\.lock\.json$",
            headers=("If-Match",),
            body=rb'"state":\s*"held"',
        )
    )
    report = session.close()
    assert 1 == rule.fired
    assert ["a.txt"] == report.uploaded


def test_a_store_answering_501_to_conditional_writes_is_refused_as_unable_to_lock(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """501 NotImplemented to If-None-Match (Backblaze B2 does this): "cannot lock", exit 4."""
    rule = fault_proxy.add(Rule(Status(501), method="PUT", headers=("If-None-Match",), times=None))
    session = _session(s3_env, fault_proxy, tmp_path)
    with pytest.raises(UnsafeStoreError, match="does not implement conditional writes") as info:
        session.open(P, "admin", STAGE, watch=False)
    assert rule.fired >= 1
    assert 4 == info.value.exit_code


def test_a_skewed_clock_says_fix_the_clock_and_is_not_retried(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """403 RequestTimeTooSkewed: a clear 'clock' error after one request, not 'unreachable'."""
    rule = fault_proxy.add(
        Rule(Status(403, "RequestTimeTooSkewed"), method="GET", path=r"\.lock\.json$", times=None)
    )
    session = _session(s3_env, fault_proxy, tmp_path)
    with pytest.raises(PermanentStoreError, match="clock") as info:
        session.open(P, "admin", STAGE, watch=False)
    assert 1 == rule.fired, "a clock error must not be retried"
    assert "unreachable" not in str(info.value)
    lock_writes = [r for r in fault_proxy.seen if r.method == "PUT" and "lock.json" in r.path]
    assert [] == lock_writes, json.dumps([r.path for r in lock_writes])
