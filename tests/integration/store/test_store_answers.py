"""What R2 and other S3 stores answer, told apart (through the fault proxy, real SeaweedFS).

R2 answers a conditional write that raced another with ``409
ConditionalRequestConflict`` (retry it), a store without conditional writes
answers ``501 NotImplemented`` (it cannot lock), and a wrong local clock is
``RequestTimeTooSkewed`` (fix the clock, retrying will not help).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.errors import AgentError, PermanentStoreError, UnsafeStoreError
from agent.session import PlantDesignSession
from agent.stage.keys import CommitInfo, StageKeys
from tests.conftest import PROXY_READ_TIMEOUT, proxy_config
from tests.faultproxy import Delay, FaultProxy, Rule, Status
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"


def _session(s3_env: dict[str, str], proxy: FaultProxy, tmp_path: Path) -> PlantDesignSession:
    return PlantDesignSession(
        proxy_config(
            s3_env, proxy, tmp_path / "m1", lock={"heartbeat_interval": 3600, "stale_after": 7200}
        )
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


def test_status_shows_a_hanging_store_while_it_lasts_and_clears_after(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Content PUTs get no answer: status says so past 2x the timeout, and not once they flow."""
    session = _session(s3_env, fault_proxy, tmp_path)
    work = session.open(P, "admin", STAGE, watch=True)
    rule = fault_proxy.add(Rule(Delay(60), method="PUT", path=r"/\.objects/", times=None))
    (work / "a.txt").write_text("saved while the store hangs")
    wait_for(lambda: "the store has not answered" in str(session.status().get("error")), 60)
    assert session.status()["store_stalled_seconds"] >= 2 * PROXY_READ_TIMEOUT  # type: ignore[operator]
    fault_proxy.remove(rule)
    rule.release()
    assert session.flush(timeout=60)
    status = session.status()
    assert "error" not in status, status
    assert status["last_error"] is None
    session.abort()


def test_status_shows_failing_lock_renewals_and_clears_when_they_succeed(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Heartbeat PUTs answered 500: status shows lock trouble; it clears after a renewal lands."""
    session = PlantDesignSession(
        proxy_config(
            s3_env,
            fault_proxy,
            tmp_path / "m1",
            lock={"heartbeat_interval": 0.3},
            retry={"attempts": 1},
        )
    )
    session.open(P, "admin", STAGE, watch=False)
    rule = fault_proxy.add(
        Rule(Status(500), method="PUT", path=r"\.lock\.json$", headers=("If-Match",), times=None)
    )
    wait_for(lambda: "lock renewal failing" in str(session.status().get("error")), 30)
    fault_proxy.remove(rule)
    wait_for(lambda: "error" not in session.status(), 30)
    assert session.lock_lost is None
    session.abort()


def test_an_open_that_failed_with_its_release_lost_does_not_lock_out_the_next_open(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Open fails half-way and its release fails too: the next open in this process re-enters."""
    seeder = _session(s3_env, fault_proxy, tmp_path / "seed")
    (seeder.open(P, "admin", STAGE, watch=False) / "a.txt").write_text("committed")
    seeder.close()
    broken = [
        fault_proxy.add(Rule(Status(500), method="GET", path=r"/planning/a\.txt$", times=None)),
        fault_proxy.add(
            Rule(Status(500), method="PUT", path=r"\.lock\.json$", body=rb"released", times=None)
        ),
    ]
    first = _session(s3_env, fault_proxy, tmp_path)
    with pytest.raises(AgentError):
        first.open(P, "admin", STAGE, watch=False)
    assert all(rule.fired for rule in broken)
    for rule in broken:
        fault_proxy.remove(rule)
    again = _session(s3_env, fault_proxy, tmp_path)
    assert "committed" == (again.open(P, "admin", STAGE, watch=False) / "a.txt").read_text()
    again.abort()


def test_commit_and_lock_times_are_on_the_stores_clock_when_this_machines_is_behind(
    s3_env: dict[str, str], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The store's answers say it is 20 minutes later than this machine thinks (its ``Date``
    through the proxy): the commit's history time is the store's, like the lock's heartbeat,
    not this machine's (issue 19: history used the client's clock, locks the store's)."""
    fault_proxy.clock_offset = 20 * 60
    session = _session(s3_env, fault_proxy, tmp_path)
    work = session.open(P, "admin", STAGE, watch=False)
    (work / "a.txt").write_text("saved")
    session.close()
    [commit] = _session(s3_env, fault_proxy, tmp_path).history(P, STAGE)
    assert isinstance(commit, CommitInfo)
    lock = json.loads(session.store.get(StageKeys(P, STAGE).lock).body)
    heartbeat = datetime.fromisoformat(lock["heartbeat_at"])
    assert abs(commit.committed_at - heartbeat) < timedelta(minutes=5), (commit, lock)
    assert commit.committed_at - datetime.now(UTC) > timedelta(minutes=10), commit
