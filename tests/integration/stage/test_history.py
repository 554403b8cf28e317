"""Version history (issue 11) on both real stores: list, show, restore, prune.

Two users commit in turn; every version of every file must come back byte for byte,
a restore must be a new commit, and retention must never drop what a kept commit
needs (checked by restoring each kept commit).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConflictError, VersionNotFoundError
from agent.session import PlantDesignSession
from agent.stage.history import FileVersion
from agent.stage.keys import CommitInfo, StageKeys
from agent.store.base import ObjectStore
from tests.integration.conftest import MakeSession
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)


def _commit(
    make_session: MakeSession,
    user: str,
    write: dict[str, bytes],
    delete: tuple[str, ...] = (),
    **sections: Any,
) -> None:
    s = make_session(user, **sections)
    work = s.open(P, user, STAGE, watch=False)
    for rel, data in write.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    for rel in delete:
        (work / rel).unlink()
    s.close()


def _committed(store: ObjectStore) -> dict[str, bytes]:
    return {
        KEYS.rel_from_committed(o.key): store.get(o.key).body
        for o in store.list(KEYS.committed_prefix)
    }


def _commits(s: PlantDesignSession) -> list[CommitInfo]:
    found = s.history(P, STAGE)
    assert all(isinstance(c, CommitInfo) for c in found)
    return [c for c in found if isinstance(c, CommitInfo)]


# The states the stage goes through, alice and bob in turn.
STATES: list[dict[str, bytes]] = [
    {"plan.dwg": b"v1 alice", "notes.txt": b"n1"},
    {"plan.dwg": b"v2 bob, longer", "notes.txt": b"n1"},
    {"plan.dwg": b"v2 bob, longer", "notes.txt": b"n1", "extra.txt": b"e"},
    {"plan.dwg": b"v3", "extra.txt": b"e"},
]


def _make_history(make_session: MakeSession, **sections: Any) -> None:
    _commit(make_session, "alice", STATES[0], **sections)
    _commit(make_session, "bob", {"plan.dwg": STATES[1]["plan.dwg"]}, **sections)
    _commit(make_session, "alice", {"extra.txt": b"e"}, **sections)
    _commit(make_session, "bob", {"plan.dwg": b"v3"}, delete=("notes.txt",), **sections)


def test_history_lists_every_commit_in_order_with_its_counts(
    make_session: MakeSession,
) -> None:
    _make_history(make_session)
    commits = _commits(make_session("reader"))
    assert [(c.seq, c.user) for c in commits] == [
        (1, "alice"),
        (2, "bob"),
        (3, "alice"),
        (4, "bob"),
    ]
    assert [(c.added, c.changed, c.removed) for c in commits] == [
        (2, 0, 0),
        (0, 1, 0),
        (1, 0, 0),
        (0, 1, 1),
    ]
    assert [c.bytes for c in commits] == [10, 14, 1, 2]
    assert len({c.commit_id for c in commits}) == 4


def test_show_returns_every_committed_version_of_every_file(
    make_session: MakeSession, tmp_path: Path
) -> None:
    _make_history(make_session)
    reader = make_session("reader")
    for commit, state in zip(_commits(reader), STATES, strict=True):
        for rel, data in state.items():
            out = tmp_path / "out" / commit.commit_id / rel
            reader.show(P, STAGE, commit=commit.commit_id[:8], path=rel, output=out)
            assert out.read_bytes() == data, (commit.seq, rel)
    with pytest.raises(VersionNotFoundError):
        reader.show(P, STAGE, commit="#4", path="notes.txt", output=tmp_path / "gone")


def test_the_versions_of_one_file_are_the_commits_that_changed_it(
    make_session: MakeSession,
) -> None:
    _make_history(make_session)
    found = make_session("reader").history(P, STAGE, path="notes.txt")
    versions = [v for v in found if isinstance(v, FileVersion)]
    assert [(v.commit.seq, v.entry is None) for v in versions] == [(1, False), (4, True)]
    found = make_session("reader").history(P, STAGE, path="plan.dwg")
    assert [v.commit.seq for v in found if isinstance(v, FileVersion)] == [1, 2, 4]


def test_restore_of_a_whole_commit_is_that_state_as_a_new_commit(
    make_session: MakeSession, store: ObjectStore
) -> None:
    _make_history(make_session)
    carol = make_session("carol")
    report = carol.restore(P, "carol", STAGE, commit="#2")
    assert _committed(store) == STATES[1]
    assert sorted(report.written) == ["notes.txt", "plan.dwg"]
    assert report.removed == ["extra.txt"]
    commits = _commits(make_session("reader"))
    assert (commits[-1].seq, commits[-1].user, commits[-1].commit_id) == (
        5,
        "carol",
        report.commit_id,
    )
    assert len(commits) == 5  # nothing rewritten


def test_restore_of_one_path_leaves_the_rest_as_it_is(
    make_session: MakeSession, store: ObjectStore
) -> None:
    _make_history(make_session)
    make_session("carol").restore(P, "carol", STAGE, commit="#1", paths=["plan.dwg"])
    assert _committed(store) == {"plan.dwg": b"v1 alice", "extra.txt": b"e"}
    make_session("carol").restore(P, "carol", STAGE, commit="#1", paths=["notes.txt"])
    assert _committed(store) == {"plan.dwg": b"v1 alice", "extra.txt": b"e", "notes.txt": b"n1"}
    with pytest.raises(VersionNotFoundError):
        make_session("carol").restore(P, "carol", STAGE, commit="#1", paths=["nothing.txt"])


def test_an_unknown_commit_is_a_clear_error(make_session: MakeSession) -> None:
    _make_history(make_session)
    with pytest.raises(VersionNotFoundError, match="agent history"):
        make_session("carol").restore(P, "carol", STAGE, commit="0123456789")


def test_retention_prunes_old_commits_and_keeps_what_kept_commits_need(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """keep_commits=2 of 4: the two oldest go, with versions only they needed."""
    never_prune = {"history": {"prune_on_close": False}}
    _make_history(make_session, **never_prune)
    objects_before = {o.key for o in store.list(KEYS.objects_prefix)}
    # History stamps and the store's clock (HTTP Date) have whole seconds: wait until the
    # store's clock is past the last commit's second, so "older than keep_days" can hold.
    last = _commits(make_session("reader"))[-1].committed_at
    assert wait_for(lambda: store.server_time() > last, timeout=10)
    policy = {"keep_commits": 2, "keep_days": 1e-9, "grace": 0.001, "prune_on_close": False}
    pruner = make_session("ops", history=policy)
    dry = pruner.prune_history(P, dry_run=True)
    assert [c.seq for c in dry.commits] == [1, 2]
    assert {o.key for o in store.list(KEYS.objects_prefix)} == objects_before  # dry: nothing
    done = pruner.prune_history(P)
    assert [c.seq for c in done.commits] == [1, 2]
    # v1 of plan.dwg was needed by commit 1 only; n1 is needed by commit 3 (kept).
    assert KEYS.version(_sha(b"v1 alice")) in done.versions
    assert KEYS.version(_sha(b"n1")) not in done.versions
    remaining = _commits(make_session("reader"))
    assert [c.seq for c in remaining] == [3, 4]
    for commit, state in zip(remaining, STATES[2:], strict=True):
        make_session("carol", history={"prune_on_close": False}).restore(
            P, "carol", STAGE, commit=commit.commit_id
        )
        assert _committed(store) == state


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_restore_of_the_first_commit_removes_what_the_stage_gained_without_consent_flags(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """#1 had 2 files; the stage then gained 3 and lost 1: restoring #1 removes 3 of 4
    (more than the mass-delete guard lets a close do), and the restore needs no flag."""
    _commit(make_session, "alice", {"a.dwg": b"a1", "b.dwg": b"b1"})
    _commit(make_session, "bob", {"a.dwg": b"a2", "c.dwg": b"c", "d.dwg": b"d"})
    _commit(make_session, "alice", {"e.dwg": b"e"}, delete=("b.dwg",))
    report = make_session("carol").restore(P, "carol", STAGE, commit="#1")
    assert {"a.dwg": b"a1", "b.dwg": b"b1"} == _committed(store)
    assert (["b.dwg"], ["a.dwg"], ["c.dwg", "d.dwg", "e.dwg"]) == (
        report.plan.added,
        report.plan.changed,
        report.plan.removed,
    )
    assert [1, 2, 3, 4] == [c.seq for c in _commits(make_session("reader"))]


def test_a_restore_shown_before_someone_committed_changes_nothing(
    make_session: MakeSession, store: ObjectStore
) -> None:
    """The plan shown to the user no longer fits the stage (bob committed since): the
    restore refuses with a conflict, commits nothing and leaves the lock released."""
    _make_history(make_session)
    carol = make_session("carol")
    shown = carol.plan_restore(P, STAGE, commit="#1")
    assert (["notes.txt"], ["plan.dwg"], ["extra.txt"]) == (
        shown.added,
        shown.changed,
        shown.removed,
    )
    _commit(make_session, "bob", {"late.txt": b"late"})
    before = _committed(store)
    with pytest.raises(ConflictError, match="agent restore"):
        carol.restore(P, "carol", STAGE, commit="#1", expected=shown)
    assert before == _committed(store)
    assert 5 == len(_commits(make_session("reader")))
    assert "released" == json.loads(store.get(KEYS.lock).body)["state"]
