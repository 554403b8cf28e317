"""The commit protocol and the lock keeper under lost answers and failures (in-memory store).

The same cases run against the real server through the fault proxy in
``tests/integration``; here every step boundary is hit deterministically.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import LockConfig
from agent.errors import (
    CommitBlockedError,
    LockLostError,
    PreconditionFailedError,
    TransientStoreError,
)
from agent.stage.cas import new_write_id, put_fenced
from agent.stage.commit import Commit
from agent.stage.intent import StagedCopy, read_intent, read_manifest
from agent.stage.keys import StageKeys
from agent.stage.lock import RemoteLock
from agent.stage.lockbody import Holder
from agent.stage.manifest import Manifest, ManifestEntry
from agent.store.base import WriteResult
from tests.fakes import FaultyStore, MemoryStore

KEYS = StageKeys("P1", "planning")
SID = "20260101T000000-aaaaaaaa"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stage(store: MemoryStore, files: dict[str, bytes]) -> dict[str, StagedCopy]:
    """Upload ``files`` to ``.objects/{sha256}`` as the streamer would."""
    out = {}
    for rel, data in files.items():
        key = KEYS.version(_sha(data))
        etag = store.put_bytes(key, data).etag
        store.metadata[key] = {"sha256": _sha(data)}
        out[rel] = StagedCopy(size=len(data), sha256=_sha(data), etag=etag)
    return out


def _begin(
    store: Any,
    copies: dict[str, StagedCopy],
    deletes: list[str] | None = None,
    *,
    commit: Commit | None = None,
    base: Any = None,
) -> Any:
    """``commit.begin`` by alice on ``base`` (a ``Committed``; None: an empty stage)."""
    commit = commit or Commit(store, KEYS, workers=2)
    return commit, commit.begin(
        session_id=SID,
        user="alice",
        machine="m1",
        base=base.manifest if base is not None else Manifest(),
        base_etag=base.etag if base is not None else None,
        copies=copies,
        deletes=deletes or [],
        previous=read_intent(commit.store, KEYS),
    )


def _assert_stage_is_one_manifest(store: MemoryStore) -> Manifest:
    """Every manifest entry's object has that content, and nothing else is committed."""
    manifest, _etag = read_manifest(store, KEYS)
    assert manifest is not None
    committed = {k: v for k, v in store.objects.items() if k.startswith(KEYS.committed_prefix)}
    assert {KEYS.committed(r) for r in manifest.files} == set(committed)
    for rel, entry in manifest.files.items():
        assert entry.sha256 == _sha(committed[KEYS.committed(rel)])
    return manifest


def test_a_commit_cut_after_some_copies_is_finished_by_the_next_settle() -> None:
    """Copies fail half-way: the stage keeps its old manifest; settle() rolls forward."""
    inner = MemoryStore()
    store = FaultyStore(inner)
    copies = _stage(inner, {f"f{i}.txt": f"v{i}".encode() for i in range(6)})
    commit, (intent, etag) = _begin(store, copies)
    done: list[str] = []

    def flaky_copy(
        src: str, dst: str, *, if_source_etag: str | None = None, size: int | None = None
    ) -> WriteResult:
        if len(done) >= 2:
            raise TransientStoreError("store went away")
        done.append(dst)
        return inner.copy(src, dst, if_source_etag=if_source_etag)

    store.faults["copy"] = flaky_copy
    with pytest.raises(TransientStoreError):
        commit.apply(intent, etag)
    assert (None, None) == read_manifest(inner, KEYS)
    assert "applying" == read_intent(inner, KEYS)[0].state  # type: ignore[index]
    del store.faults["copy"]
    previous, finished = Commit(store, KEYS, workers=2).settle()
    assert finished is not None
    assert previous is not None and "done" == previous[0].state
    assert set(copies) == set(_assert_stage_is_one_manifest(inner).files)
    assert [] == [k for k in inner.objects if k.startswith(KEYS.staging_prefix(SID))]


def test_a_lost_answer_to_the_manifest_put_is_our_commit_not_a_conflict() -> None:
    """The manifest PUT lands but its answer is lost: the retry's 412 is resolved by read-back."""
    inner = MemoryStore()
    store = FaultyStore(inner)
    commit, (intent, etag) = _begin(store, _stage(inner, {"a.txt": b"A"}))

    def lose_answer(key: str, data: bytes, **kwargs: Any) -> WriteResult:
        inner.put_bytes(key, data, **kwargs)
        if key == KEYS.manifest:
            raise TransientStoreError("answer lost")
        return inner.put_bytes(key, data, **kwargs)  # pragma: no cover - not reached for others

    def put(key: str, data: bytes, **kwargs: Any) -> WriteResult:
        if key == KEYS.manifest:
            return lose_answer(key, data, **kwargs)
        return inner.put_bytes(key, data, **kwargs)

    store.faults["put_bytes"] = put
    committed = commit.apply(intent, etag)
    assert intent.commit_id == committed.manifest.commit_id
    assert ["a.txt"] == sorted(_assert_stage_is_one_manifest(inner).files)


def test_a_swapped_object_is_sent_again_from_the_local_file() -> None:
    """Someone overwrites a content object: the copy is refused and the local bytes re-sent."""
    store = MemoryStore()
    copies = _stage(store, {"a.txt": b"mine"})
    store.put_bytes(KEYS.version(_sha(b"mine")), b"foreign")
    sent: list[str] = []

    def reupload(rel: str, item: StagedCopy) -> str:
        sent.append(rel)
        return store.put_bytes(KEYS.version(item.sha256), b"mine").etag

    commit = Commit(store, KEYS, workers=1, reupload=reupload)
    _, (intent, etag) = _begin(store, copies, commit=commit)
    commit.apply(intent, etag)
    assert ["a.txt"] == sent
    assert b"mine" == store.objects[KEYS.committed("a.txt")]


def test_a_swapped_object_without_a_local_copy_blocks_the_commit() -> None:
    """Nobody can re-send the bytes: CommitBlockedError, the committed stage untouched."""
    store = MemoryStore()
    store.put_bytes(KEYS.committed("a.txt"), b"old")
    copies = _stage(store, {"a.txt": b"mine"})
    store.put_bytes(KEYS.version(_sha(b"mine")), b"foreign")
    commit, (intent, etag) = _begin(store, copies)
    with pytest.raises(CommitBlockedError, match="changed or removed by someone else"):
        commit.apply(intent, etag)
    assert b"old" == store.objects[KEYS.committed("a.txt")]
    assert "applying" == read_intent(store, KEYS)[0].state  # type: ignore[index]


def test_a_store_ignoring_the_copy_condition_still_commits_only_the_recorded_bytes() -> None:
    """The store copies a planted object despite the pin: the answer's ETag gives it away,
    the local bytes are sent again and copied again, and the stage holds exactly them."""
    inner = MemoryStore()
    store = FaultyStore(inner)
    copies = _stage(inner, {"a.txt": b"mine"})
    inner.put_bytes(KEYS.version(_sha(b"mine")), b"planted")

    def ignore_pin(
        src: str, dst: str, *, if_source_etag: str | None = None, size: int | None = None
    ) -> WriteResult:
        return inner.copy(src, dst)  # moto's server: x-amz-copy-source-if-match ignored

    store.faults["copy"] = ignore_pin
    sent: list[str] = []

    def reupload(rel: str, item: StagedCopy) -> str:
        sent.append(rel)
        return inner.put_bytes(KEYS.version(item.sha256), b"mine").etag

    commit = Commit(store, KEYS, workers=1, reupload=reupload)
    _, (intent, etag) = _begin(store, copies, commit=commit)
    commit.apply(intent, etag)
    assert ["a.txt"] == sent
    assert b"mine" == inner.objects[KEYS.committed("a.txt")]
    assert b"mine" == inner.objects[KEYS.version(_sha(b"mine"))]
    _assert_stage_is_one_manifest(inner)


def test_a_commit_on_a_content_addressed_base_copies_nothing_but_the_changes() -> None:
    """Replaced and deleted versions are already in .objects/: no keep-copies, one copy per
    changed path, and the new manifest says its content is all in .objects/."""
    inner = MemoryStore()
    store = FaultyStore(inner)
    first = _stage(inner, {"a.txt": b"A1", "b.txt": b"B1", "c.txt": b"C1"})
    commit, (intent, etag) = _begin(store, first)
    base = commit.apply(intent, etag)
    assert base.manifest.content_addressed
    copied: list[tuple[str, str]] = []

    def counting(
        src: str, dst: str, *, if_source_etag: str | None = None, size: int | None = None
    ) -> WriteResult:
        copied.append((src, dst))
        return inner.copy(src, dst, if_source_etag=if_source_etag)

    store.faults["copy"] = counting
    second = Commit(store, KEYS, workers=2)
    _, (intent2, etag2) = _begin(
        inner, _stage(inner, {"a.txt": b"A2"}), ["b.txt"], commit=second, base=base
    )
    second.apply(intent2, etag2)
    history = intent2.history_key
    assert [(KEYS.version(_sha(b"A2")), KEYS.committed("a.txt"))] == [
        (src, dst) for src, dst in copied if dst != history
    ]
    assert [(KEYS.manifest, history)] == [(src, dst) for src, dst in copied if dst == history]
    assert {} == intent2.keeps
    assert b"A1" == inner.objects[KEYS.version(_sha(b"A1"))]  # the old version, kept free
    assert b"B1" == inner.objects[KEYS.version(_sha(b"B1"))]
    _assert_stage_is_one_manifest(inner)


def test_the_first_commit_on_a_stage_from_before_content_addressing_migrates_it() -> None:
    """A version-1 base (plain keys only): every version it names is copied into .objects/
    once, pinned to its ETag, and the new manifest is content-addressed."""
    store = MemoryStore()
    files = {"a.txt": b"A1", "b.txt": b"B1"}
    entries = {}
    for rel, data in files.items():
        etag = store.put_bytes(KEYS.committed(rel), data).etag
        entries[rel] = ManifestEntry(size=len(data), sha256=_sha(data), etag=etag)
    old = Manifest(files=entries)
    old_etag = store.put_bytes(KEYS.manifest, old.to_bytes()).etag
    commit = Commit(store, KEYS, workers=2)
    intent, etag = commit.begin(
        session_id=SID,
        user="alice",
        machine="m1",
        base=old,
        base_etag=old_etag,
        copies=_stage(store, {"a.txt": b"A2"}),
        deletes=[],
        previous=None,
    )
    done = commit.apply(intent, etag)
    assert done.manifest.content_addressed
    for data in (b"A1", b"B1", b"A2"):
        assert data == store.objects[KEYS.version(_sha(data))]
    _assert_stage_is_one_manifest(store)


def test_a_new_commit_refuses_to_start_over_an_unfinished_one() -> None:
    """begin() over an intent that is still applying is refused: it must be finished first."""
    store = MemoryStore()
    _commit, (intent, etag) = _begin(store, _stage(store, {"a.txt": b"A"}))
    with pytest.raises(CommitBlockedError, match="unfinished commit"):
        Commit(store, KEYS, workers=1).begin(
            session_id=SID,
            user="alice",
            machine="m1",
            base=Manifest(),
            base_etag=None,
            copies={},
            deletes=[],
            previous=(intent, etag),
        )


def test_deletes_are_applied_and_the_manifest_drops_them() -> None:
    """A delete in the intent removes the committed key and its manifest entry."""
    store = MemoryStore()
    store.put_bytes(KEYS.committed("gone.txt"), b"x")
    base = Manifest(files={"gone.txt": ManifestEntry(size=1, sha256=_sha(b"x"), etag="e")})
    commit = Commit(store, KEYS, workers=1)
    intent, etag = commit.begin(
        session_id=SID,
        user="alice",
        machine="m1",
        base=base,
        base_etag=None,
        copies={},
        deletes=["gone.txt"],
        previous=None,
    )
    assert {} == commit.apply(intent, etag).manifest.files
    assert KEYS.committed("gone.txt") not in store.objects


# --------------------------------------------------------------------- lock keeper


def _keeper(store: Any, session: str = "s1") -> RemoteLock:
    holder = Holder(user="alice", machine="m1", pid=1, session_id=session, agent_version="t")
    return RemoteLock(store, KEYS.lock, holder, LockConfig(write_gap=0))


def _lose_answers_to(inner: MemoryStore, key: str, times: int) -> Callable[..., WriteResult]:
    """A put_bytes that applies the write, then loses the answer ``times`` times."""
    left = [times]

    def put(k: str, data: bytes, **kwargs: Any) -> WriteResult:
        result = inner.put_bytes(k, data, **kwargs)
        if k == key and left[0] > 0:
            left[0] -= 1
            raise TransientStoreError("answer lost")
        return result

    return put


@pytest.mark.parametrize("verb", ["acquire", "renew", "release"])
def test_a_lost_answer_to_a_lock_write_is_recognised_as_ours(verb: str) -> None:
    """The write landed, its answer did not: never a false 'lock lost' or 'held'."""
    inner = MemoryStore()
    store = FaultyStore(inner)
    lock = _keeper(store)
    if verb != "acquire":
        lock.acquire()
    store.faults["put_bytes"] = _lose_answers_to(inner, KEYS.lock, 1)
    getattr(lock, verb)()
    status = lock.read()
    assert status is not None
    assert ("released" if verb == "release" else "held") == status.body.state
    if verb != "release":
        assert status.etag == lock.etag
        del store.faults["put_bytes"]
        lock.renew()  # and the next write goes on from the adopted ETag


def test_a_renewal_whose_outcome_stayed_unknown_is_adopted_at_the_next_one() -> None:
    """Answer lost and the read-back failed too: the next renewal finds our write, not a loss."""
    inner = MemoryStore()
    store = FaultyStore(inner)
    lock = _keeper(store)
    lock.acquire()
    store.faults["put_bytes"] = _lose_answers_to(inner, KEYS.lock, 1)
    store.faults["get"] = lambda key: (_ for _ in ()).throw(TransientStoreError("down"))
    with pytest.raises(TransientStoreError):
        lock.renew()
    del store.faults["get"], store.faults["put_bytes"]
    lock.renew()
    status = lock.read()
    assert status is not None and status.etag == lock.etag


def test_heartbeat_and_fencing_renewals_in_parallel_never_lose_the_lock() -> None:
    """Two threads renewing the one keeper: serialized, no false LockLostError."""
    store = MemoryStore()
    lock = _keeper(store)
    lock.acquire()
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(50):
                lock.renew()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=hammer, name=f"pdagent-test-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [] == errors


def test_someone_elses_write_is_a_real_lock_loss() -> None:
    """An operator's forced write in between: LockLostError, not adopted."""
    store = MemoryStore()
    lock = _keeper(store)
    lock.acquire()
    other = _keeper(store, session="s2")
    current = other.read()
    assert current is not None
    body = current.body.model_copy(update={"session_id": "s2", "write_id": new_write_id()})
    assert body.write_id is not None
    put_fenced(store, KEYS.lock, body.to_bytes(), body.write_id, if_match=current.etag)
    with pytest.raises(LockLostError):
        lock.renew()


def test_put_fenced_raises_for_someone_elses_write() -> None:
    """A 412 whose read-back holds another write id is a real precondition failure."""
    store = MemoryStore()
    wid = new_write_id()
    store.put_bytes(KEYS.manifest, b'{"write_id": "theirs"}')
    with pytest.raises(PreconditionFailedError):
        put_fenced(
            store, KEYS.manifest, f'{{"write_id": "{wid}"}}'.encode(), wid, if_none_match=True
        )


def test_put_fenced_demands_the_write_id_in_the_body(tmp_path: Path) -> None:
    """A body that does not carry its write id is a programming error."""
    with pytest.raises(ValueError, match="write_id"):
        put_fenced(MemoryStore(), "k", b"{}", new_write_id())


def test_the_intent_names_what_changes_not_the_whole_manifest() -> None:
    """A commit of one file over a 2,000-file base writes an intent of a few hundred bytes,
    and the manifest it applies is the base with that one change."""
    store = MemoryStore()
    base_files = {f"f{i:04d}.txt": f"v0 {i}".encode() for i in range(2000)}
    commit, (intent, etag) = _begin(store, _stage(store, base_files))
    base = commit.apply(intent, etag)
    second = Commit(store, KEYS, workers=2)
    _, (intent2, etag2) = _begin(
        store, _stage(store, {"f0001.txt": b"v1"}), ["f0002.txt"], commit=second, base=base
    )
    assert len(store.objects[KEYS.intent]) < 1500
    done = second.apply(intent2, etag2)
    assert 1999 == len(done.manifest.files)
    assert _sha(b"v1") == done.manifest.files["f0001.txt"].sha256
    assert base.manifest.commit_id == done.manifest.parent_commit_id
    assert base.manifest.seq + 1 == done.manifest.seq
    _assert_stage_is_one_manifest(store)


def test_an_intent_an_older_agent_wrote_is_rolled_forward_as_written() -> None:
    """An intent carrying the whole manifest and copying from the session's staging prefix
    (written before content addressing) is finished from there; the prefix is left."""
    store = MemoryStore()
    key = KEYS.staged(SID, "a.txt")
    etag = store.put_bytes(key, b"staged by an old agent").etag
    entry = ManifestEntry(size=22, sha256=_sha(b"staged by an old agent"), etag=etag)
    old: dict[str, object] = {
        "state": "applying",
        "session_id": SID,
        "commit_id": "c" * 32,
        "write_id": new_write_id(),
        "user": "alice",
        "machine": "m1",
        "created_at": "2026-11-01T10:00:00Z",
        "base_manifest_etag": None,
        "manifest": Manifest(files={"a.txt": entry}, commit_id="c" * 32).model_dump(mode="json"),
        "copies": {"a.txt": {"size": 22, "sha256": entry.sha256, "etag": etag}},
        "deletes": [],
    }
    body = json.dumps(old).encode()
    put_fenced(store, KEYS.intent, body, str(old["write_id"]), if_none_match=True)
    _previous, finished = Commit(store, KEYS, workers=1).settle()
    assert finished is not None
    assert b"staged by an old agent" == store.objects[KEYS.committed("a.txt")]
    # Its staging is left for its own session's discard: a roll-forward deletes nothing an
    # intent names by session (a crafted one could name someone else's).
    assert [key] == [k for k in store.objects if k.startswith(KEYS.staging_prefix(SID))]
    _assert_stage_is_one_manifest(store)
