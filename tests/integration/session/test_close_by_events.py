"""Close knows what changed from the watcher's events (issue 18).

A watcher that has run on kernel events and lost none since the folder was last
compared whole has journalled every change: close then does not walk the folder (at
100,000 files a walk costs a second, twice per close). What is saved while the commit
runs is held, not sent, and tells which files changed after the commit. When the
watcher polls, was not running, or lost events, close walks the folder as before.
Real observers, real files, both stores (and SeaweedFS through the fault proxy).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.store.base import ObjectStore
from tests.faultproxy import FaultProxy, Rule, Status
from tests.integration.bucket import (
    MakeSession,
    Truth,
    committed_files,
    seed_stage,
    write_files,
)
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
SEED = {f"dir{d}/file{i}.txt": f"v0 of {d}/{i}".encode() for d in range(3) for i in range(6)}
# Quick delivery, except where a test holds events back (a rescan asked for by a lost
# event waits for ``debounce`` unless close flushes it).
FAST = {"debounce": 0.1, "max_delay": 1.0, "min_interval_per_path": 0.2}
SLOW = {"debounce": 600, "max_delay": 1200, "min_interval_per_path": 0.2}


def _seed(make_session: MakeSession) -> None:
    s = make_session("seed")
    write_files(s.open(P, "seeder", STAGE, watch=False), SEED)
    s.close()


def _edit(work: Path) -> dict[str, bytes]:
    """A burst of saves, new files (one in a new folder), deletes and a rename; what the
    folder holds afterwards."""
    expected = dict(SEED)
    for i in range(4):
        expected[f"dir0/file{i}.txt"] = f"v1 of 0/{i}, longer".encode()
    for i in range(3):
        expected[f"new/sub/n{i}.txt"] = f"new {i}".encode()
    expected["dir1/added.txt"] = b"added"
    write_files(
        work, {rel: data for rel, data in expected.items() if rel not in SEED or data != SEED[rel]}
    )
    for rel in ("dir2/file0.txt", "dir2/file1.txt"):
        (work / rel).unlink()
        del expected[rel]
    (work / "dir1/file5.txt").rename(work / "dir1/renamed.txt")
    expected["dir1/renamed.txt"] = expected.pop("dir1/file5.txt")
    return expected


@pytest.mark.parametrize("repeat", range(3))
def test_changes_saved_right_before_close_are_committed_without_a_walk_of_the_folder(
    make_session: MakeSession, store: ObjectStore, repeat: int
) -> None:
    """Saves made the instant before close reach the commit through the events alone."""
    _seed(make_session)
    s = make_session(watch=FAST)
    work = s.open(P, "alice", STAGE)
    expected = _edit(work)
    report = s.close()  # at once: some events are still on their way from the kernel
    assert not report.folder_walked
    assert expected == committed_files(store)
    assert [] == report.changed_after_commit


@pytest.mark.parametrize("lost", [True, False], ids=["events-lost", "nothing-lost"])
def test_a_watcher_that_lost_events_makes_close_walk_the_folder(
    make_session: MakeSession,
    store: ObjectStore,
    lost: bool,
) -> None:
    """A queue overflow (watchdog's report of it) makes close walk; without it, no walk.

    The rescan the overflow asks for waits for a 600 s debounce, so close meets the
    watcher untrusted; close's flush delivers the held events either way.
    """
    _seed(make_session)
    s = make_session(watch=SLOW)
    work = s.open(P, "alice", STAGE)
    expected = _edit(work)
    if lost:
        logging.getLogger("watchdog.observers.inotify_buffer").warning("inotify queue overflow")
    report = s.close()
    assert lost == report.folder_walked
    assert expected == committed_files(store)


@pytest.mark.parametrize("watch", ["events", "polling"])
def test_a_file_saved_while_the_commit_runs_is_not_committed_and_keeps_the_folder(
    make_session: MakeSession,
    store: ObjectStore,
    watch: str,
) -> None:
    """An autosave during the commit is neither committed nor lost: the folder stays in
    place with it, and the report names it (events: from the held reports; polling:
    from a walk)."""
    _seed(make_session)
    # One watch for a folder with subfolders: the whole folder is polled at once.
    s = make_session(watch={**FAST, **({"max_watches": 1} if watch == "polling" else {})})
    work = s.open(P, "alice", STAGE)
    write_files(work, {"dir0/file0.txt": b"saved before close"})
    saved: list[str] = []

    def autosave(message: str, _percent: int) -> None:
        if message.startswith("Committing") and not saved:
            write_files(work, {"dir1/file0.txt": b"autosaved during the commit"})
            (work / "dir2/file3.txt").unlink()
            saved.append(message)

    s.progress.connect(autosave)
    report = s.close()
    assert saved, "the commit reported no progress: the autosave never ran"
    assert (watch == "polling") == report.folder_walked
    assert ["dir1/file0.txt", "dir2/file3.txt"] == report.changed_after_commit
    committed = committed_files(store)
    assert b"saved before close" == committed["dir0/file0.txt"]
    assert SEED["dir1/file0.txt"] == committed["dir1/file0.txt"]
    assert SEED["dir2/file3.txt"] == committed["dir2/file3.txt"]
    assert b"autosaved during the commit" == (work / "dir1/file0.txt").read_bytes()
    assert not (work / "dir2/file3.txt").exists()


def test_a_file_saved_during_a_close_that_fails_is_committed_by_the_next_close(
    via_proxy: MakeSession, direct: MakeSession, truth: Truth, fault_proxy: FaultProxy
) -> None:
    """Close holds the watcher's reports while it commits; when the commit fails, what
    was held is journalled, so the session goes on with it (no walk would find it: the
    watcher lost nothing)."""
    seed_stage(direct, SEED)
    # Reads (and HEADs) of the manifest fail for about 10 s: close fails after its final flush.
    alice = via_proxy(watch=FAST, retry={"attempts": 10, "initial_backoff": 1, "max_backoff": 1})
    work = alice.open(P, "alice", STAGE)
    assert wait_for(lambda: alice.repair_report is not None, timeout=30)
    write_files(work, {"dir0/file0.txt": b"saved before close"})
    rule = fault_proxy.add(Rule(Status(500), path=rf"/{P}/{STAGE}\.manifest\.json$", times=None))
    failed: list[BaseException] = []

    def close() -> None:
        try:
            alice.close()
        except AgentError as exc:
            failed.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    assert wait_for(lambda: rule.fired >= 1, timeout=30), "close never read the manifest"
    write_files(work, {"dir1/file0.txt": b"saved while close failed"})
    streamer = alice._streamer
    assert streamer is not None
    assert wait_for(lambda: "dir1/file0.txt" in getattr(streamer.held(), "paths", ()), timeout=8), (
        "the save was not held while the commit ran"
    )
    closer.join(timeout=120)
    assert not closer.is_alive()
    assert failed, "close should have failed on the manifest reads"
    fault_proxy.remove(rule)
    report = alice.close()
    assert not report.folder_walked
    committed = truth.assert_consistent()
    assert b"saved before close" == committed["dir0/file0.txt"]
    assert b"saved while close failed" == committed["dir1/file0.txt"]
