"""Issue 18: content-addressed objects, one copy per changed file, a stage that repairs itself.

Every case runs against SeaweedFS; the requests a close makes are counted at the
fault proxy (what reached the store), the outcome read straight from the bucket
(``Truth``). A co-worker with write access is a second boto3 client.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from datetime import datetime

import pytest
from structlog.testing import capture_logs

from agent.state import SessionState
from tests.faultproxy import Delay, FaultProxy, Rule, Seen, Status
from tests.integration.bucket import (
    STAGE,
    MakeSession,
    P,
    Truth,
    folder_files,
    seed_stage,
    sha,
    write_files,
)
from tests.waiting import wait_for

HISTORY_OFF = {"prune_on_close": False}


def _body_uploads(seen: Sequence[Seen]) -> list[str]:
    """File bodies sent to the store (by content, to a staging prefix or to a plain key):
    PUTs and multipart parts that are not copies and not the protocol's JSON objects."""
    return [
        s.path
        for s in seen
        if s.method in ("PUT", "POST")
        and "x-amz-copy-source" not in s.headers
        and any(where in s.path for where in ("/.objects/", "/.sessions/", f"/{P}/{STAGE}/"))
        and "delete" not in s.query
        and s.status is not None
        and 200 <= s.status < 300
    ]


def _copies_to(seen: Sequence[Seen], where: str) -> list[str]:
    return [
        s.path
        for s in seen
        if s.method == "PUT" and "x-amz-copy-source" in s.headers and where in s.path
    ]


def _stage_checked(session: object) -> dict[str, object]:
    """Wait for the background check of the plain tree; what it found."""
    status = getattr(session, "status")  # noqa: B009 - any session-like object
    assert wait_for(lambda: status().get("stage_check") not in (None, "running"), timeout=30)
    found: dict[str, object] = status()["stage_check"]
    return found


# ------------------------------------------------------------------ requests


def _close_requests(
    via_proxy: MakeSession, fault_proxy: FaultProxy, changed: int, round_: int
) -> tuple[list[Seen], list[str]]:
    """Open, change ``changed`` files (all streamed before close), close: the close's requests."""
    alice = via_proxy(f"m{round_}", history=HISTORY_OFF)
    work = alice.open(P, "alice", STAGE)
    _stage_checked(alice)
    files = {f"f{i:03d}.txt": f"round {round_} file {i} ".encode() * 50 for i in range(changed)}
    write_files(work, files)
    assert alice.flush(timeout=60)
    before = len(fault_proxy.seen)
    report = alice.close()
    assert sorted(files) == report.uploaded
    return fault_proxy.seen[before:], sorted(files)


def test_a_close_of_streamed_changes_makes_one_copy_per_file_and_a_constant_rest(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """N changed files streamed before close: N copies, no body sent, no version kept by a
    copy, and the same number of other requests for 5 and for 40 files."""
    seed_stage(direct, {f"f{i:03d}.txt": b"seeded" for i in range(40)})
    others = []
    for round_, changed in enumerate((5, 40)):
        seen, files = _close_requests(via_proxy, fault_proxy, changed, round_)
        copies = _copies_to(seen, f"/{P}/{STAGE}/")
        assert changed == len(copies), copies
        assert [] == _body_uploads(seen), "close sent file bodies that were streamed already"
        assert [] == _copies_to(seen, "/.objects/"), "a version was kept by a copy"
        others.append(len(seen) - len(copies))
        assert {rel: truth.get(f"{P}/{STAGE}/{rel}") for rel in files} == {
            rel: f"round {round_} file {int(rel[1:4])} ".encode() * 50 for rel in files
        }
    assert others[0] == others[1], f"other requests grow with the files: {others}"
    assert others[0] <= 16, others
    truth.assert_consistent()


def test_close_fences_with_a_head_and_keeps_its_history_entry_by_a_copy(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """A stage still at the session's base: close reads no manifest body (a HEAD says
    so; the manifest write stays fenced by If-Match), and the history entry is a
    server-side copy of the manifest just written (at 100,000 files that is 16 MB not
    fetched and 16 MB not sent again)."""
    seed_stage(direct, {f"f{i:03d}.txt": b"seeded" for i in range(10)})
    seen, _files = _close_requests(via_proxy, fault_proxy, 3, 0)
    manifest = f"/{P}/{STAGE}.manifest.json"
    assert [] == [s.method for s in seen if s.method == "GET" and s.path.endswith(manifest)]
    assert [] != [s.method for s in seen if s.method == "HEAD" and s.path.endswith(manifest)]
    history = [s for s in seen if s.method == "PUT" and f"/.history/{STAGE}/" in s.path]
    assert [True] == ["x-amz-copy-source" in s.headers for s in history], history
    entries = truth.listing(f"{P}/.history/{STAGE}/")
    assert truth.get(entries[-1]) == truth.get(f"{P}/{STAGE}.manifest.json")


def test_a_history_copy_that_meets_another_manifest_is_written_from_the_bytes(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """The copy is pinned to the ETag the commit wrote: refused (the manifest moved
    since, or the store refuses), the entry is PUT from the commit's own bytes."""
    seed_stage(direct, {f"f{i:03d}.txt": b"seeded" for i in range(10)})
    rule = fault_proxy.add(
        Rule(Status(412), method="PUT", path=f"/.history/{STAGE}/", headers=("x-amz-copy-source",))
    )
    _close_requests(via_proxy, fault_proxy, 3, 0)
    assert 1 == rule.fired
    entries = truth.listing(f"{P}/.history/{STAGE}/")
    assert truth.get(entries[-1]) == truth.get(f"{P}/{STAGE}.manifest.json")
    truth.assert_consistent()


# -------------------------------------------------------------- moves, copies

FOLDER = {f"pkg/sub{i % 6}/part{i:03d}.dwg": b"part %03d " % i * 40 for i in range(300)}


@pytest.mark.parametrize("op", ["mv", "cp -r"])
def test_moving_or_copying_a_committed_folder_sends_no_file_body(
    via_proxy: MakeSession,
    direct: MakeSession,
    truth: Truth,
    fault_proxy: FaultProxy,
    op: str,
) -> None:
    """``mv`` and ``cp -r`` of a committed 300-file folder: zero uploads, a correct commit."""
    seed_stage(direct, {**FOLDER, "keep.txt": b"keep"})
    alice = via_proxy(history=HISTORY_OFF)
    work = alice.open(P, "alice", STAGE)
    before = len(fault_proxy.seen)
    if op == "mv":
        subprocess.run(["mv", str(work / "pkg"), str(work / "moved")], check=True)
    else:
        shutil.copytree(work / "pkg", work / "moved")
    assert alice.flush(timeout=120)
    report = alice.close(allow_mass_delete=True)
    seen = fault_proxy.seen[before:]
    assert [] == _body_uploads(seen), f"{len(_body_uploads(seen))} bodies sent"
    assert 300 == len(report.uploaded)
    moved = {rel.replace("pkg/", "moved/", 1): data for rel, data in FOLDER.items()}
    expected = (
        {**moved, "keep.txt": b"keep"} if op == "mv" else {**FOLDER, **moved, "keep.txt": b"keep"}
    )
    assert expected == truth.assert_consistent()


# ------------------------------------------------------------- self-repair


def test_a_plain_tool_deleting_or_overwriting_committed_files_is_repaired_by_the_next_open(
    direct: MakeSession, truth: Truth
) -> None:
    """A DELETE, an overwrite with other bytes and a foreign key in the plain tree: the next
    lock holder opens the committed bytes, puts the plain tree right and reports it."""
    files = {"a.txt": b"alpha", "b/b.txt": b"bravo", "c.txt": b"charlie"}
    seed_stage(direct, files)
    truth.delete(f"{P}/{STAGE}/a.txt")
    truth.put(f"{P}/{STAGE}/b/b.txt", b"overwritten by a sync tool")
    truth.put(f"{P}/{STAGE}/stray.txt", b"not in any manifest")
    alice = direct("alice")
    with capture_logs() as logs:
        work = alice.open(P, "alice", STAGE)
        found = _stage_checked(alice)
    assert files == folder_files(work)
    assert ["a.txt", "b/b.txt"] == found["recopied"]
    assert [f"{P}/{STAGE}/stray.txt"] == found["removed"]
    assert [] == found["lost"]
    assert files == truth.assert_consistent()
    assert any(e["event"] == "stage_repaired" for e in logs)
    assert any(e["event"] == "plain_object_damaged" for e in logs)
    alice.abort()


@pytest.mark.parametrize("finish", ["close", "close-after-edit"])
def test_an_unwatched_open_still_repairs_the_plain_tree_before_its_close(
    direct: MakeSession, truth: Truth, finish: str
) -> None:
    """``open(watch=False)`` (a script, the bench, the random fault sessions' last holder)
    holds the lock too: its close leaves the plain tree whole, not only a watched one's.
    Before, only streaming started the check, so an unwatched open and close left a
    damaged plain object in place (the random fault sessions, seed 3925404437)."""
    files = {"a.txt": b"alpha", "b/b.txt": b"bravo", "c.txt": b"charlie"}
    seed_stage(direct, files)
    truth.delete(f"{P}/{STAGE}/a.txt")
    truth.put(f"{P}/{STAGE}/b/b.txt", b"overwritten by a sync tool, longer than bravo")
    alice = direct("alice")
    work = alice.open(P, "alice", STAGE, watch=False)
    assert files == folder_files(work)
    if finish == "close-after-edit":
        write_files(work, {"c.txt": b"charlie, edited"})
        files = {**files, "c.txt": b"charlie, edited"}
    alice.close()
    assert files == truth.assert_consistent()
    found = alice.status()["stage_check"]
    assert isinstance(found, dict)
    assert ["a.txt", "b/b.txt"] == found["recopied"]


def test_a_watched_open_reads_the_manifest_body_once_and_its_check_still_repairs(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """The background check of the plain tree compares against the manifest the open read
    (a HEAD shows it is still the stage's), not a second GET and parse of it: at 100,000
    files that was 16 MB fetched again and ~40 MiB more held beside the open's copy."""
    files = {"a.txt": b"alpha", "b/b.txt": b"bravo"}
    seed_stage(direct, files)
    truth.delete(f"{P}/{STAGE}/a.txt")
    alice = via_proxy("alice")
    before = len(fault_proxy.seen)
    work = alice.open(P, "alice", STAGE)
    found = _stage_checked(alice)
    manifest = f"/{P}/{STAGE}.manifest.json"
    seen = fault_proxy.seen[before:]
    assert 1 == sum(1 for r in seen if r.method == "GET" and r.path.endswith(manifest))
    assert any(r.method == "HEAD" and r.path.endswith(manifest) for r in seen)
    assert ["a.txt"] == found["recopied"]
    assert files == folder_files(work)
    assert files == truth.assert_consistent()
    alice.abort()


def test_content_gone_from_both_places_fails_the_open_naming_it(
    direct: MakeSession, truth: Truth
) -> None:
    """The plain key and its object both deleted: open fails clearly, the lock is released."""
    seed_stage(direct, {"a.txt": b"alpha", "b.txt": b"bravo"})
    truth.delete(f"{P}/{STAGE}/a.txt")
    truth.delete(f"{P}/.objects/{sha(b'alpha')}")
    alice = direct("alice")
    with pytest.raises(Exception, match="gone from the store") as caught:
        alice.open(P, "alice", STAGE)
    assert "a.txt" in str(caught.value)
    assert "released" == truth.lock()["state"]
    assert SessionState.CLOSED == alice.state


def test_a_late_copy_landing_after_another_users_commit_is_repaired(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """Alice's copy of a.txt is delayed past her timeout (her retry commits); Bob commits a
    newer a.txt; then Alice's first copy lands on it. The next opener gets Bob's bytes and
    the plain tree is repaired."""
    seed_stage(direct, {"a.txt": b"v0", "b.txt": b"bravo"})
    alice = via_proxy(history=HISTORY_OFF)
    work = alice.open(P, "alice", STAGE)
    _stage_checked(alice)
    rule = fault_proxy.add(
        Rule(
            Delay(3600), method="PUT", path=rf"/{P}/{STAGE}/a\.txt$", headers=("x-amz-copy-source",)
        )
    )
    write_files(work, {"a.txt": b"alice's a"})
    assert alice.flush(timeout=30)
    alice.close()
    assert 1 == rule.fired and not rule.delivered.is_set()
    bob = direct("bob", history=HISTORY_OFF)
    write_files(bob.open(P, "bob", STAGE, watch=False), {"a.txt": b"bob's newer a"})
    bob.close()
    rule.release()
    assert wait_for(rule.delivered.is_set, timeout=30)
    assert b"alice's a" == truth.get(f"{P}/{STAGE}/a.txt"), "the late copy did not land"
    carol = direct("carol")
    work = carol.open(P, "carol", STAGE)
    assert {"a.txt": b"bob's newer a", "b.txt": b"bravo"} == folder_files(work)
    assert ["a.txt"] == _stage_checked(carol)["recopied"]
    assert {"a.txt": b"bob's newer a", "b.txt": b"bravo"} == truth.assert_consistent()
    carol.abort()


def test_a_late_delete_landing_after_another_users_commit_is_repaired(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """Alice deletes b.txt; her DELETE is held past her timeout (her retry commits). Bob
    brings b.txt back and commits; then Alice's first DELETE lands on it. The next opener
    still gets b.txt (from .objects/) and the plain tree is repaired."""
    seed_stage(direct, {"a.txt": b"alpha", "b.txt": b"bravo"})
    alice = via_proxy(history=HISTORY_OFF)
    work = alice.open(P, "alice", STAGE)
    _stage_checked(alice)
    rule = fault_proxy.add(Rule(Delay(3600), method="POST", query=("delete",)))
    (work / "b.txt").unlink()
    assert alice.flush(timeout=30)
    alice.close()
    assert 1 == rule.fired and not rule.delivered.is_set()
    bob = direct("bob", history=HISTORY_OFF)
    write_files(bob.open(P, "bob", STAGE, watch=False), {"b.txt": b"bravo, again"})
    bob.close()
    rule.release()
    assert wait_for(rule.delivered.is_set, timeout=30)
    assert wait_for(lambda: truth.get(f"{P}/{STAGE}/b.txt") is None, timeout=30)
    carol = direct("carol")
    work = carol.open(P, "carol", STAGE)
    assert {"a.txt": b"alpha", "b.txt": b"bravo, again"} == folder_files(work)
    assert ["b.txt"] == _stage_checked(carol)["recopied"]
    assert {"a.txt": b"alpha", "b.txt": b"bravo, again"} == truth.assert_consistent()
    carol.abort()


# ----------------------------------------------------------- planted objects


def test_a_planted_object_under_a_real_hash_is_replaced_and_never_committed(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth
) -> None:
    """A co-worker plants other bytes at ``.objects/{sha256 of our file}`` before we save it:
    the conditional PUT finds it, its ETag gives it away, our bytes replace it."""
    seed_stage(direct, {"keep.txt": b"keep"})
    mine = b"the user's drawing, which a co-worker also has"
    truth.put(f"{P}/.objects/{sha(mine)}", b"planted bytes")
    alice = via_proxy(history=HISTORY_OFF)
    work = alice.open(P, "alice", STAGE)
    with capture_logs() as logs:
        write_files(work, {"plan.dwg": mine})
        assert alice.flush(timeout=30)
    assert any(e["event"] == "object_replaced" for e in logs)
    assert mine == truth.get(f"{P}/.objects/{sha(mine)}")
    alice.close()
    assert {"keep.txt": b"keep", "plan.dwg": mine} == truth.assert_consistent()


def test_content_already_in_the_store_is_checked_not_sent(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """The same drawing saved under a new name and in another stage: no body is sent."""
    drawing = b"a drawing shared by two stages " * 100
    seed_stage(direct, {"plan.dwg": drawing})
    alice = via_proxy(history=HISTORY_OFF)
    work = alice.open(P, "alice", "detail")
    before = len(fault_proxy.seen)
    write_files(work, {"copy-of-plan.dwg": drawing})
    assert alice.flush(timeout=30)
    assert alice.status()["already_stored"] == 1
    alice.close()
    assert [] == _body_uploads(fault_proxy.seen[before:])
    assert drawing == truth.get(f"{P}/detail/copy-of-plan.dwg")


# ------------------------------------------------------------------ collection


def test_a_prune_delete_arriving_after_a_commit_that_needs_the_object_is_undone(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """The prune's DELETE of an unreferenced version is held past the client's timeout;
    meanwhile a commit brings that content back (no upload: it is still there); then the
    DELETE lands. The next lock holder restores the object from the plain key, so every
    version a kept manifest names is in .objects/ again."""
    x, y = b"version X of the drawing", b"version Y of the drawing"
    seed_stage(direct, {"a.txt": x, "b.txt": b"bravo"})
    bob = direct("bob", history=HISTORY_OFF)
    write_files(bob.open(P, "bob", STAGE, watch=False), {"a.txt": y})
    bob.close()
    last = datetime.fromisoformat(truth.manifest()["committed_at"])
    assert wait_for(lambda: truth.server_time() > last, timeout=10)
    policy = {"keep_commits": 1, "keep_days": 1e-9, "grace": 0.001, "prune_on_close": False}
    pruner = via_proxy("ops", history=policy, retry={"attempts": 1})
    held = fault_proxy.add(Rule(Delay(3600), method="POST", query=("delete",), times=None))
    plan = pruner.prune_history(P)
    assert f"{P}/.objects/{sha(x)}" in plan.versions
    assert held.fired >= 1 and not held.delivered.is_set()
    assert x == truth.get(f"{P}/.objects/{sha(x)}"), "the held DELETE reached the store early"
    carol = direct("carol", history=HISTORY_OFF)
    write_files(carol.open(P, "carol", STAGE), {"a.txt": x})
    assert carol.flush(timeout=30)
    assert 0 == carol.status()["uploads"], "content still in .objects/ was sent again"
    carol.close()
    held.release()
    assert wait_for(held.delivered.is_set, timeout=30)
    assert wait_for(lambda: truth.get(f"{P}/.objects/{sha(x)}") is None, timeout=30)
    dave = direct("dave")
    dave.open(P, "dave", STAGE, watch=False)
    dave.start_streaming()
    found = _stage_checked(dave)
    assert ["a.txt"] == found["objects_restored"]
    assert x == truth.get(f"{P}/.objects/{sha(x)}")
    for entry in truth.manifest()["files"].values():
        assert truth.get(f"{P}/.objects/{entry['sha256']}") is not None
    dave.abort()
