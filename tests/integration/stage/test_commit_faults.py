"""Issue 7: commit and lock under lost answers, late writes and tampering (through the proxy).

The agent talks to SeaweedFS through ``FaultProxy``; every outcome is read straight
from the bucket (``Truth``), never through the proxy. Each fault test first checks
that its fault really fired (a test whose fault never fired would prove nothing).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.session import PlantDesignSession
from agent.stage.keys import CommitInfo
from tests.conftest import proxy_config
from tests.faultproxy import (
    LOSE_ANSWER,
    RESET_BEFORE,
    Action,
    CutBody,
    Delay,
    FaultProxy,
    Rule,
    Status,
)
from tests.integration.bucket import (
    MakeSession,
    Truth,
    folder_files,
    other_user_sees,
    seed_stage,
    sha,
    write_files,
)
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
LOCK_PATH = rf"/{P}/{STAGE}\.lock\.json$"
HELD = rb'"state":\s*"held"'
RELEASED = rb'"state":\s*"released"'


def _object(truth: Truth, data: bytes) -> bytes | None:
    """What ``.objects/{sha256(data)}`` holds (where the streamer sends ``data``)."""
    return truth.get(f"{P}/.objects/{sha(data)}")


def _save(work: Path, truth: Truth, rel: str, data: bytes) -> None:
    """Save a file and wait until its content is in the store (``.objects/{sha256}``)."""
    write_files(work, {rel: data})
    assert wait_for(lambda: _object(truth, data) == data, timeout=15), f"{rel} was never sent"


def _store_now(truth: Truth) -> datetime:
    headers = truth.client.head_bucket(Bucket=truth.bucket)["ResponseMetadata"]["HTTPHeaders"]
    return parsedate_to_datetime(headers["date"])


def _wait_for_the_store_clock_to_tick(truth: Truth) -> None:
    """Wait until the store's clock passed the lock's last write, so its next body differs.

    Lock bodies carry the store's time in whole seconds; a rewrite within the same second
    is byte-identical, has the same ETag, and would hide a lost answer's 412.
    """
    last = datetime.fromisoformat(truth.lock()["heartbeat_at"])
    assert wait_for(lambda: _store_now(truth) > last, timeout=5)


def _session_id(session: PlantDesignSession) -> str:
    return str(session.status()["session_id"])


def _assert_closed_cleanly(truth: Truth, session_id: str) -> dict[str, bytes]:
    committed = truth.assert_consistent()
    lock = truth.lock()
    assert ("released", session_id) == (lock["state"], lock["session_id"])
    assert session_id == truth.manifest()["session_id"]
    return committed


# ------------------------------------------------------------ lost answers


@pytest.mark.parametrize(
    "case",
    [(False, "If-None-Match", None), (True, "If-Match", HELD)],
    ids=["put-if-absent", "take-a-released-lock"],
)
def test_open_takes_the_lock_when_the_answer_to_its_put_is_lost(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    case: tuple[bool, str, bytes | None],
) -> None:
    """A lost answer to the lock's conditional put still opens the session; close commits."""
    released_lock_there, condition, body = case
    if released_lock_there:
        seed_stage(direct, {"a.txt": b"v0"})
    rule = fault_proxy.add(
        Rule(LOSE_ANSWER, method="PUT", path=LOCK_PATH, headers=(condition,), body=body)
    )
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE, watch=False)
    assert 1 == rule.fired
    sid = _session_id(alice)
    assert ("held", sid) == (truth.lock()["state"], truth.lock()["session_id"])
    write_files(work, {"a.txt": b"v1"})
    alice.close()
    assert {"a.txt": b"v1"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, {"a.txt": b"v1"})


def test_heartbeat_survives_a_lost_answer_to_a_renewal(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """A lost renewal answer is not a lost lock: heartbeats go on, saves stream, close commits."""
    seed_stage(direct, {"a.txt": b"v0"})
    # Renewals 1.5 s apart carry different store times, so a retried one is never a no-op.
    alice = via_proxy(lock={"heartbeat_interval": 1.5})
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    rule = fault_proxy.add(
        Rule(LOSE_ANSWER, method="PUT", path=LOCK_PATH, headers=("If-Match",), body=HELD)
    )
    assert wait_for(lambda: rule.fired == 1, timeout=10)

    def renewed_after_fault() -> bool:
        puts = [s for s in fault_proxy.seen if s.method == "PUT" and s.path.endswith(".lock.json")]
        fault = next(i for i, s in enumerate(puts) if s.rule is not None)
        return sum(1 for s in puts[fault + 1 :] if s.status == 200) >= 2

    assert wait_for(renewed_after_fault, timeout=8), "the heartbeat stopped after the fault"
    _save(work, truth, "a.txt", b"saved while the heartbeat ran")
    assert alice.flush(timeout=10)
    alice.close()
    assert {"a.txt": b"saved while the heartbeat ran"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth)


def test_close_commits_when_the_answer_to_its_fencing_renewal_is_lost(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """A lost answer to close's lock renewal is recognised as ours; the commit goes on."""
    seed_stage(direct, {"a.txt": b"v0"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    _save(work, truth, "a.txt", b"v1")
    _wait_for_the_store_clock_to_tick(truth)
    rule = fault_proxy.add(
        Rule(LOSE_ANSWER, method="PUT", path=LOCK_PATH, headers=("If-Match",), body=HELD)
    )
    alice.close()
    assert 1 == rule.fired
    assert {"a.txt": b"v1"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, {"a.txt": b"v1"})


def test_close_releases_the_lock_when_the_answer_to_the_release_is_lost(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """A lost answer to the release still leaves the lock released and close successful."""
    seed_stage(direct, {"a.txt": b"v0"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    write_files(work, {"a.txt": b"v1"})
    rule = fault_proxy.add(
        Rule(LOSE_ANSWER, method="PUT", path=LOCK_PATH, headers=("If-Match",), body=RELEASED)
    )
    alice.close()
    assert 1 == rule.fired
    assert {"a.txt": b"v1"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, {"a.txt": b"v1"})


def test_abort_releases_the_lock_when_the_answer_to_the_release_is_lost(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """abort with a lost release answer leaves the lock released and the stage untouched."""
    seed_stage(direct, {"a.txt": b"v0"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    write_files(work, {"a.txt": b"thrown away"})
    rule = fault_proxy.add(
        Rule(LOSE_ANSWER, method="PUT", path=LOCK_PATH, headers=("If-Match",), body=RELEASED)
    )
    alice.abort()
    assert 1 == rule.fired
    assert "released" == truth.lock()["state"]
    assert {"a.txt": b"v0"} == truth.assert_consistent()
    other_user_sees(direct, truth, {"a.txt": b"v0"})


def test_close_recognises_its_own_manifest_when_the_answer_is_lost(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """A lost answer to the manifest PUT is our own commit, not someone else's conflict."""
    seed_stage(direct, {"a.txt": b"v0", "b.txt": b"b"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    write_files(work, {"a.txt": b"v1"})
    rule = fault_proxy.add(Rule(LOSE_ANSWER, method="PUT", path=rf"/{P}/{STAGE}\.manifest\.json$"))
    alice.close()
    assert 1 == rule.fired
    assert {"a.txt": b"v1", "b.txt": b"b"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, {"a.txt": b"v1", "b.txt": b"b"})


def test_open_survives_a_lost_answer_to_the_capability_probe_and_leaves_no_probe(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """A lost answer to the probe's first write neither fails open nor leaves the probe object."""
    rule = fault_proxy.add(
        Rule(LOSE_ANSWER, method="PUT", path=r"probe", headers=("If-None-Match",))
    )
    alice = via_proxy()
    alice.open(P, "alice", STAGE, watch=False)
    assert 1 == rule.fired
    alice.abort()
    assert [] == [k for k in truth.listing() if "probe" in k]


def test_close_commits_when_the_answer_to_the_commit_intent_is_lost(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """A lost answer to the commit intent's PUT is recognised; the commit completes."""
    seed_stage(direct, {"a.txt": b"v0"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    write_files(work, {"a.txt": b"v1", "new.txt": b"new"})
    rule = fault_proxy.add(Rule(LOSE_ANSWER, method="PUT", path=rf"/{P}/{STAGE}\.commit\.json$"))
    alice.close()
    assert 1 == rule.fired, "no commit intent was written"
    assert {"a.txt": b"v1", "new.txt": b"new"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, {"a.txt": b"v1", "new.txt": b"new"})


def test_force_unlock_retries_when_a_live_heartbeat_renews_in_between(
    via_proxy: MakeSession,
    s3_env: dict[str, str],
    truth: Truth,
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    """An operator's break that meets a renewal (412) reads again and succeeds."""
    from agent.stage.locktools import force_unlock
    from agent.store import open_store

    alice = via_proxy()
    alice.open(P, "alice", STAGE, watch=False)
    rule = fault_proxy.add(
        Rule(Status(412), method="PUT", path=LOCK_PATH, headers=("If-Match",), times=2)
    )
    operator_store = open_store(proxy_config(s3_env, fault_proxy, tmp_path / "op"))
    status = force_unlock(
        operator_store, f"{P}/{STAGE}.lock.json", operator="op", machine="ops", reason="t"
    )
    assert 2 == rule.fired
    assert ("released", "op@ops") == (status.body.state, status.body.broken_by)
    assert ("released", "op@ops") == (truth.lock()["state"], truth.lock()["broken_by"])
    alice.abort()


# ------------------------------------------------------- late and foreign


def test_close_commits_newer_bytes_when_an_old_upload_arrives_late(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """An upload delivered after the newer save's upload does not win at close."""
    seed_stage(direct, {"a.txt": b"v0"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    # held until rule.release(): far past the client's 2 s timeout
    old = sha(b"old save")
    rule = fault_proxy.add(Rule(Delay(60), method="PUT", path=rf"/\.objects/{old}"))
    _save(work, truth, "a.txt", b"old save")  # the held PUT timed out; a retry landed
    assert 1 == rule.fired
    assert not rule.delivered.is_set()
    _save(work, truth, "a.txt", b"the newer, longer save")
    assert alice.flush(timeout=15)
    rule.release()
    assert wait_for(rule.delivered.is_set, timeout=10)
    alice.close()
    assert {"a.txt": b"the newer, longer save"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, {"a.txt": b"the newer, longer save"})


def test_close_commits_the_users_bytes_when_a_sent_object_was_overwritten(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth
) -> None:
    """A co-worker's overwrite of a sent object is not committed under the user's name."""
    seed_stage(direct, {"a.txt": b"v0"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    _save(work, truth, "a.txt", b"mine")
    assert alice.flush(timeout=15)
    truth.put(f"{P}/.objects/{sha(b'mine')}", b"foreign bytes")
    assert b"foreign bytes" == _object(truth, b"mine")
    alice.close()
    assert {"a.txt": b"mine"} == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, {"a.txt": b"mine"})


# ----------------------------------------------------- failed mid-commit

FILES_V0 = {f"f{i}.txt": f"v0 of {i}".encode() for i in range(5)}
FILES_V1 = {f"f{i}.txt": f"v1 of {i}, longer".encode() for i in range(5)}
COPY_FAULTS: dict[str, Action] = {"status500": Status(500), "reset": RESET_BEFORE}


def _fail_mid_commit(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    fault: Action,
) -> tuple[PlantDesignSession, str]:
    """Alice edits every file; her close dies after two server-side copies."""
    seed_stage(direct, FILES_V0)
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    write_files(work, FILES_V1)
    assert alice.flush(timeout=15)
    rule = fault_proxy.add(
        Rule(fault, method="PUT", headers=("x-amz-copy-source",), skip=2, times=None)
    )
    with pytest.raises(AgentError):
        alice.close()
    assert rule.fired >= 1
    fault_proxy.remove(rule)
    assert ("held", sid) == (truth.lock()["state"], truth.lock()["session_id"])
    return alice, sid


@pytest.mark.parametrize("fault", sorted(COPY_FAULTS))
def test_retried_close_after_a_failed_commit_commits_everything(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """close after a close that failed mid-commit commits every edit; the lock is released."""
    alice, sid = _fail_mid_commit(via_proxy, direct, truth, fault_proxy, COPY_FAULTS[fault])
    alice.close()
    assert FILES_V1 == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, FILES_V1)


@pytest.mark.parametrize("fault", sorted(COPY_FAULTS))
def test_abort_after_a_failed_commit_leaves_a_consistent_stage(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """abort after a cut commit finishes it (says so: ``finished_commit``) and ends with the
    stage equal to one manifest, and free."""
    alice, _sid = _fail_mid_commit(via_proxy, direct, truth, fault_proxy, COPY_FAULTS[fault])
    alice.abort()
    assert truth.manifest()["commit_id"] == alice.finished_commit
    assert FILES_V1 == truth.assert_consistent()
    assert "released" == truth.lock()["state"]
    other_user_sees(direct, truth)


def _crash(alice: PlantDesignSession) -> None:
    """The process dies (the handled path: backup, info file, lock released)."""
    alice.emergency_save("test")


@pytest.mark.parametrize("fault", sorted(COPY_FAULTS))
def test_discard_after_a_failed_commit_leaves_a_consistent_stage(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """discard of the orphan of a cut commit ends with a stage equal to one manifest."""
    alice, sid = _fail_mid_commit(via_proxy, direct, truth, fault_proxy, COPY_FAULTS[fault])
    _crash(alice)
    via_proxy().discard(sid, confirm_loss=True)
    truth.assert_consistent()
    assert "released" == truth.lock()["state"]
    other_user_sees(direct, truth)


@pytest.mark.parametrize("fault", sorted(COPY_FAULTS))
def test_resume_after_a_failed_commit_commits_everything(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """resume of the orphan of a cut commit finishes it; close leaves every edit committed."""
    alice, sid = _fail_mid_commit(via_proxy, direct, truth, fault_proxy, COPY_FAULTS[fault])
    _crash(alice)
    again = via_proxy()
    again.resume(sid)
    truth.assert_consistent()
    again.close()
    assert FILES_V1 == truth.assert_consistent()
    assert "released" == truth.lock()["state"]
    other_user_sees(direct, truth, FILES_V1)


@pytest.mark.parametrize("fault", sorted(COPY_FAULTS))
def test_another_users_open_after_a_failed_commit_sees_a_consistent_stage(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    """Bob's open after Alice's process died mid-commit gets a stage equal to one manifest."""
    alice, _sid = _fail_mid_commit(via_proxy, direct, truth, fault_proxy, COPY_FAULTS[fault])
    _crash(alice)
    bob = direct("bob")
    work = bob.open(P, "bob", STAGE, watch=False)
    committed = truth.assert_consistent()
    assert committed == folder_files(work)
    bob.abort()


@pytest.mark.parametrize("finish", ["abort", "close"])
def test_a_commit_cut_after_its_copies_began_still_keeps_the_replaced_versions(
    via_proxy: MakeSession,
    *,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    finish: str,
) -> None:
    """History (issue 11): the versions a cut commit replaced are kept once it is finished."""
    seed_stage(direct, FILES_V0)
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    write_files(work, FILES_V1)
    assert alice.flush(timeout=15)
    # Copies onto committed keys fail after two; the keep copies (to .objects/) pass.
    rule = fault_proxy.add(
        Rule(
            Status(500),
            method="PUT",
            path=rf"/{P}/{STAGE}/",
            headers=("x-amz-copy-source",),
            skip=2,
            times=None,
        )
    )
    with pytest.raises(AgentError):
        alice.close()
    assert rule.fired >= 1
    fault_proxy.remove(rule)
    if finish == "abort":
        alice.abort()
    else:
        alice.close()
    assert FILES_V1 == truth.assert_consistent()  # rolled forward either way
    reader = direct("reader")
    commits = reader.history(P, STAGE)
    assert [c.seq for c in commits if isinstance(c, CommitInfo)] == [1, 2]
    for rel, data in FILES_V0.items():
        out = tmp_path / "shown" / rel
        reader.show(P, STAGE, commit="#1", path=rel, output=out)
        assert out.read_bytes() == data


# ----------------------------------------------------------------- resume


def test_resume_after_someone_elses_commit_of_another_file_keeps_our_edit(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth
) -> None:
    """We edit a.txt, Bob commits only b.txt: resume keeps our edit, close commits both."""
    seed_stage(direct, {"a.txt": b"a0", "b.txt": b"b0"})
    alice = via_proxy()
    work = alice.open(P, "alice", STAGE)
    sid = _session_id(alice)
    write_files(work, {"a.txt": b"alice's edit"})
    assert alice.flush(timeout=15)
    _crash(alice)
    bob = direct("bob")
    write_files(bob.open(P, "bob", STAGE, watch=False), {"b.txt": b"bob's edit"})
    bob.close()
    again = via_proxy()
    again.resume(sid)
    assert [] == sorted(p.name for p in work.glob("*.conflict-*"))
    assert b"alice's edit" == (work / "a.txt").read_bytes()
    report = again.close()
    assert [] == report.conflicts
    expected = {"a.txt": b"alice's edit", "b.txt": b"bob's edit"}
    assert expected == _assert_closed_cleanly(truth, sid)
    other_user_sees(direct, truth, expected)


# ------------------------------------------------------------------ stress
# ``pytest -m stress tests/integration/stage/test_commit_faults.py -s`` prints the seed;
# ``PDAGENT_STRESS_SEED=<seed>`` replays the same fault draws (thread timing still varies).

USERS = ("alice", "bob", "carol")
NAMES = tuple(f"dir{i % 2}/file{i}.txt" for i in range(6))


class Faults:
    """The random fault rules, switched on and off as a group."""

    def __init__(self, proxy: FaultProxy, rng: random.Random) -> None:
        self.proxy = proxy

        def seeded() -> random.Random:
            return random.Random(rng.getrandbits(64))

        self.rules = [
            Rule(LOSE_ANSWER, probability=0.1, rng=seeded(), times=None, name="lose"),
            Rule(RESET_BEFORE, probability=0.08, rng=seeded(), times=None, name="reset"),
            Rule(Status(503), probability=0.08, rng=seeded(), times=None, name="503"),
            Rule(Status(500), probability=0.03, rng=seeded(), times=None, name="500"),
            # delivered 0.5 s after the client (2 s timeout) gave up: late writes
            Rule(Delay(2.5), method="PUT", probability=0.03, rng=seeded(), times=None, name="late"),
            # a download's body cut part-way (the commonest fault of an office link)
            Rule(CutBody(7), method="GET", probability=0.05, rng=seeded(), times=None, name="cut"),
            Rule(
                CutBody(3, reset=True),
                method="GET",
                probability=0.03,
                rng=seeded(),
                times=None,
                name="cut-reset",
            ),
        ]
        self.on_since = 0
        self.requests_with_faults_on = 0

    def on(self) -> None:
        """Start injecting."""
        self.on_since = len(self.proxy.seen)
        for rule in self.rules:
            self.proxy.add(rule)

    def off(self) -> None:
        """Stop injecting (held requests are still delivered)."""
        self.proxy.clear()
        self.requests_with_faults_on += len(self.proxy.seen) - self.on_since

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No faults inside the block."""
        self.off()
        try:
            yield
        finally:
            self.on()


def _try(times: int, fn: Callable[[], object]) -> str | None:
    """Call ``fn`` up to ``times`` times; None once it succeeds, else the last error."""
    error = "not tried"
    for _ in range(times):
        try:
            fn()
            return None
        except AgentError as exc:
            error = f"{type(exc).__name__}: {exc}"
    return error


def _open_somehow(
    via_proxy: MakeSession, faults: Faults, user: str, *, watch: bool
) -> tuple[PlantDesignSession, Path] | str:
    """Open with faults (3 tries, a fresh session each), then once without; else the error."""
    error = ""
    for attempt in range(4):
        session = via_proxy(user)
        try:
            if attempt < 3:
                return session, session.open(P, user, STAGE, watch=watch)
            with faults.paused():
                return session, session.open(P, user, STAGE, watch=watch)
        except AgentError as exc:
            error = f"{type(exc).__name__}: {exc}"
    return error


@pytest.mark.stress
def test_50_random_sessions_with_faults_lose_no_save_and_leave_no_inconsistent_stage(
    via_proxy: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """50 sessions with faults on over 20 % of requests, of every kind (lost answers,
    resets, 5xx, late writes, cut download bodies): no saved byte lost, every stage whole."""
    _random_sessions(via_proxy, truth, fault_proxy, 50)


def test_10_random_sessions_with_faults_lose_no_save_and_leave_no_inconsistent_stage(
    via_proxy: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """The same as the stress run, 10 sessions, in the default suite (seed printed)."""
    _random_sessions(via_proxy, truth, fault_proxy, 10)


def _random_sessions(
    via_proxy: MakeSession, truth: Truth, fault_proxy: FaultProxy, sessions: int
) -> None:
    seed = int(os.environ.get("PDAGENT_STRESS_SEED") or random.SystemRandom().getrandbits(32))
    print(f"\nstress seed: {seed} (PDAGENT_STRESS_SEED={seed} to replay)")
    rng = random.Random(seed)
    faults = Faults(fault_proxy, rng)
    expected: dict[str, bytes] = {}
    lost: list[str] = []
    inconsistent: list[str] = []
    stuck: list[str] = []
    faults.on()
    for n in range(sessions):
        user = rng.choice(USERS)
        opened = _open_somehow(via_proxy, faults, user, watch=rng.random() < 0.5)
        if isinstance(opened, str):
            stuck.append(f"session {n}: {user} cannot open even without faults: {opened}")
            continue
        session, work = opened
        edits = {
            name: f"session {n} by {user}: {rng.random()}".encode() * rng.randint(1, 50)
            for name in rng.sample(NAMES, rng.randint(1, 3))
        }
        write_files(work, edits)
        if _try(3, session.close) is not None:
            with faults.paused():
                if (error := _try(1, session.close)) is not None:
                    stuck.append(f"session {n}: close fails even without faults: {error}")
                    with contextlib.suppress(AgentError):
                        session.abort()
                    # Whether its edits landed is unknown (counted above): start from the store.
                    expected = truth.committed()
                    continue
        expected.update(edits)
        with faults.paused():
            # The truth is manifest + objects, whole after every close. The plain tree is
            # a view: a late copy or delete of an earlier session may land after this
            # close (a PUT held past the client's timeout, issue 18); the next lock
            # holder's check repairs it, and the end of the run checks it strictly.
            try:
                committed = truth.assert_content_consistent()
            except AssertionError as exc:
                inconsistent.append(f"session {n}: {exc}")
                continue
            for rel, data in expected.items():
                if committed.get(rel) != data:
                    lost.append(f"session {n}: {rel} is not the last saved version")
            expected = dict(committed)
            with contextlib.suppress(AssertionError):
                if truth.assert_consistent() == committed:
                    continue
            print(f"session {n}: the plain tree differs (a late write), to be repaired")
    faults.off()
    fired = len(fault_proxy.faults())
    share = fired / max(1, faults.requests_with_faults_on)
    print(f"faults: {fired} of {faults.requests_with_faults_on} requests ({share:.0%})")
    assert share >= 0.2
    # Every late write has landed; then a lock holder's check makes the view whole.
    assert wait_for(lambda: fault_proxy.late_in_flight == 0, timeout=60)
    checker = via_proxy()
    checker.open(P, "admin", STAGE, watch=False)
    checker.close()  # waits for the check the open started
    try:
        if truth.assert_consistent() != expected:
            lost.append("the plain tree is whole but not the last saved versions")
    except AssertionError as exc:
        inconsistent.append(f"after a lock holder's check: {exc}")
    for problem in (*lost, *inconsistent, *stuck):
        print(problem)
    assert ([], [], []) == (lost, inconsistent, stuck), f"seed {seed}"
