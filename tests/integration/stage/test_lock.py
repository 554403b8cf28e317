"""The stage lock on both real stores, including a multi-process race and the probe."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import LockConfig, load_config
from agent.errors import LockCorruptError, LockHeldError, LockLostError, UnsafeStoreError
from agent.stage.lock import Heartbeat, RemoteLock
from agent.stage.lockbody import Holder, LockBody, read_lock
from agent.stage.locktools import force_unlock, probe_conditional_writes
from agent.store.base import ObjectStore

KEY = "Kraftwerk_1234567/planning.lock.json"
CFG = LockConfig()


def _holder(user: str = "alice", machine: str = "m1", session: str = "s1") -> Holder:
    return Holder(
        user=user, machine=machine, pid=os.getpid(), session_id=session, agent_version="t"
    )


def _lock(store: ObjectStore, user: str = "alice", machine: str = "m1", **cfg: float) -> RemoteLock:
    config = LockConfig(**{"write_gap": 0, **cfg})  # R2's 1 s spacing: not on the bed
    return RemoteLock(store, KEY, _holder(user, machine, f"s-{user}-{machine}"), config)


def _body(store: ObjectStore) -> dict[str, Any]:
    return dict(json.loads(store.get(KEY).body))


def _backdate_heartbeat(store: ObjectStore, minutes: int = 30) -> None:
    """Make the holder look gone: its last heartbeat ``minutes`` ago (by CAS)."""
    data = store.get(KEY)
    body = LockBody.model_validate_json(data.body)
    old = body.model_copy(update={"heartbeat_at": body.heartbeat_at - timedelta(minutes=minutes)})
    store.put_bytes(KEY, old.to_bytes(), if_match=data.etag)


def test_acquire_creates_the_lock_and_same_user_machine_reenters(store: ObjectStore) -> None:
    """The first acquire creates the object; the same user on the same machine re-enters."""
    first = _lock(store)
    status = first.acquire()
    assert "held" == status.body.state
    again = _lock(store)
    again.acquire()
    assert "alice" == _body(store)["user"]
    assert status.body.since.isoformat() == LockBody.model_validate(_body(store)).since.isoformat()


def test_other_user_is_refused_with_holder_machine_and_heartbeat(store: ObjectStore) -> None:
    """LockHeldError names user, machine, since, expiry and heartbeat age."""
    _lock(store).acquire()
    with pytest.raises(LockHeldError) as info:
        _lock(store, user="bob", machine="m2").acquire()
    text = str(info.value)
    for part in ("alice", "m1", "since", "expires", "heartbeat"):
        assert part in text


def test_same_user_other_machine_needs_take_over_and_a_stale_holder(store: ObjectStore) -> None:
    """Same user elsewhere is refused; --take-over works only when the heartbeat is stale."""
    _lock(store).acquire()
    with pytest.raises(LockHeldError, match="another machine"):
        _lock(store, machine="m2").acquire()
    with pytest.raises(LockHeldError, match="fresh"):
        _lock(store, machine="m2").acquire(take_over=True)
    _backdate_heartbeat(store)
    _lock(store, machine="m2").acquire(take_over=True)
    assert "m2" == _body(store)["machine"]


def test_expired_lock_is_taken_judged_by_the_store_clock(store: ObjectStore) -> None:
    """A lock past its expiry (by the store's clock) is free for anyone."""
    old = _lock(store)
    old.acquire()
    body = LockBody.model_validate(_body(store))
    past = body.model_copy(update={"expires": body.since - timedelta(seconds=1)})
    store.put_bytes(KEY, past.to_bytes(), if_match=old.etag)
    _lock(store, user="bob", machine="m2").acquire()
    assert "bob" == _body(store)["user"]


def test_release_writes_released_and_never_deletes(store: ObjectStore) -> None:
    """Release is a CAS write of state=released; the object stays; the next user takes it."""
    lock = _lock(store)
    lock.acquire()
    lock.release()
    assert "released" == _body(store)["state"]
    _lock(store, user="bob", machine="m2").acquire()
    assert "bob" == _body(store)["user"]


def test_renew_after_someone_else_took_it_raises_lock_lost(store: ObjectStore) -> None:
    """A renewal whose CAS fails is LockLostError naming the new holder."""
    mine = _lock(store)
    mine.acquire()
    force_unlock(store, KEY, operator="op", machine="ops", reason="test")
    _lock(store, user="bob", machine="m2").acquire()
    with pytest.raises(LockLostError, match="bob"):
        mine.renew()
    with pytest.raises(LockLostError):
        mine.release()
    assert "bob" == _body(store)["user"]


def test_corrupt_lock_body_is_reported_and_force_unlock_repairs_it(store: ObjectStore) -> None:
    """A body that is not a lock names the operator command; force_unlock replaces it by CAS."""
    store.put_bytes(KEY, b"{not a lock")
    with pytest.raises(
        LockCorruptError, match="agent lock unlock Kraftwerk_1234567 --stage planning --force"
    ):
        _lock(store).acquire()
    force_unlock(store, KEY, operator="op", machine="ops", reason="corrupt")
    _lock(store).acquire()
    assert "held" == _body(store)["state"]


def test_force_unlock_records_operator_and_previous_holder(store: ObjectStore) -> None:
    """The operator's break is recorded in the body."""
    _lock(store).acquire()
    status = force_unlock(store, KEY, operator="carol", machine="ops1", reason="left for holiday")
    body = _body(store)
    assert "released" == body["state"]
    assert "carol@ops1" == body["broken_by"]
    assert "left for holiday" == body["broken_reason"]
    assert body["previous_holder"].startswith("alice@m1")
    assert any("broken by carol" in line for line in status.describe())


def test_heartbeat_renews_and_reports_loss(store: ObjectStore) -> None:
    """The heartbeat thread moves heartbeat_at forward and calls on_lost when the lock is gone."""
    import threading

    lock = _lock(store)
    lock.acquire()
    before = _body(store)["heartbeat_at"]
    renewed = threading.Event()
    lost: list[LockLostError] = []
    lost_event = threading.Event()

    def on_lost(exc: LockLostError) -> None:
        lost.append(exc)
        lost_event.set()

    beat = Heartbeat(lock, 0.05, on_lost=on_lost, on_renewed=lambda _etag: renewed.set())
    beat.start()
    try:
        assert renewed.wait(10)
        assert before <= _body(store)["heartbeat_at"]
        force_unlock(store, KEY, operator="op", machine="ops", reason="test")
        assert lost_event.wait(10)
    finally:
        beat.stop()
    assert isinstance(lost[0], LockLostError)


def test_show_reads_state_and_staleness(store: ObjectStore) -> None:
    """read_lock judges staleness by the heartbeat age."""
    assert read_lock(store, KEY, CFG) is None
    _lock(store).acquire()
    fresh = read_lock(store, KEY, CFG)
    assert fresh is not None
    assert not fresh.is_stale
    _backdate_heartbeat(store)
    status = read_lock(store, KEY, CFG)
    assert status is not None
    assert status.is_stale
    assert "holder appears gone" in "\n".join(status.describe())


def _race_worker(args: tuple[dict[str, Any], str, int]) -> str:
    """Try to acquire the lock in a child process; report 'won' or 'held'."""
    env, base_dir, index = args
    os.environ.update(env)
    from agent.store import open_store

    config = load_config(
        store={"url": env["AGENT_STORE__URL"], "endpoint_url": env.get("AGENT_STORE__ENDPOINT_URL")}
        if env.get("AGENT_STORE__ENDPOINT_URL")
        else {"url": env["AGENT_STORE__URL"]},
        paths={"base_dir": base_dir},
        lock={"ttl": 3600},
    )
    store = open_store(config)
    try:
        lock = RemoteLock(
            store, KEY, _holder(f"user{index}", f"m{index}", f"s{index}"), config.lock
        )
        try:
            lock.acquire()
        except LockHeldError:
            return "held"
        return "won"
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_racing_processes_have_exactly_one_winner_each_round(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Several processes acquiring one free lock at once: exactly one wins, every round."""
    if backend == "s3":
        env = dict(request.getfixturevalue("s3_env"))
        store = request.getfixturevalue("s3_store")
    else:
        folder = tmp_path / "racestore"
        env = {"AGENT_STORE__URL": folder.as_uri()}
        folder.mkdir()
        from agent.store.local import LocalStore

        store = LocalStore(folder)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        for round_no in range(3):
            results = pool.map(
                _race_worker, [(env, str(tmp_path / f"b{i}"), round_no * 10 + i) for i in range(4)]
            )
            assert 1 == results.count("won"), results
            force_unlock(store, KEY, operator="test", machine="t", reason="next round")


def test_probe_accepts_conforming_stores(store: ObjectStore) -> None:
    """The folder store and SeaweedFS honour conditional writes."""
    probe_conditional_writes(store)
    assert [] == list(store.list(".pdagent-probe/"))


def test_probe_and_lock_refuse_a_store_that_ignores_conditions(rclone_store: ObjectStore) -> None:
    """rclone's S3 server overwrites on If-None-Match: probing and locking are refused."""
    with pytest.raises(UnsafeStoreError, match="no mutual exclusion"):
        probe_conditional_writes(rclone_store)
    with pytest.raises(UnsafeStoreError):
        _lock(rclone_store).acquire()
