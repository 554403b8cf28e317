"""Watching + journal + streaming to staging, with real observers and both real stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import load_config
from agent.errors import NotFoundError, WorkFolderReplacedError
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore
from tests.conftest import s3_config
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
DEADLINE = 15.0


def _wait(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    return wait_for(predicate, timeout)


@pytest.fixture
def session(store: ObjectStore, tmp_path: Path) -> Iterator[PlantDesignSession]:
    """An open, watching session with short debounce values."""
    config = load_config(
        paths={"base_dir": str(tmp_path / "m1")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        watch={"debounce": 0.1, "max_delay": 1.0, "min_interval_per_path": 0.2},
    )
    s = PlantDesignSession(config, store=store)
    s.open(P, "admin", STAGE)
    yield s
    if not s.is_closed:
        s.abort()


def _staged(store: ObjectStore, s: PlantDesignSession) -> dict[str, bytes]:
    """What the session has sent, by path: the journal's confirmed puts, read back from
    ``.objects/{sha256}`` (the content is stored once, under its hash)."""
    journal = s._journal
    if journal is None:
        return {}
    return {
        rel: store.get(KEYS.version(st.sha256)).body
        for rel, st in journal.staged().items()
        if st.op == "put"
    }


def test_a_saved_file_is_staged_without_close(
    session: PlantDesignSession, store: ObjectStore
) -> None:
    """A save lands in the store (by its content) on its own, and nothing is pending after."""
    assert session.work_path is not None
    (session.work_path / "plan.dwg").write_bytes(b"drawing v1")
    assert _wait(lambda: _staged(store, session).get("plan.dwg") == b"drawing v1")
    assert _wait(lambda: session.status()["pending"] == 0)
    assert [] == [o.key for o in store.list(KEYS.committed_prefix)], "nothing committed yet"
    report = session.close()
    assert ["plan.dwg"] == report.uploaded
    assert b"drawing v1" == store.get(KEYS.committed("plan.dwg")).body


def test_word_save_streams_only_the_document(
    session: PlantDesignSession, store: ObjectStore
) -> None:
    """Word's temp and owner files never reach staging or the committed copy."""
    work = session.work_path
    assert work is not None
    (work / "report.docx").write_bytes(b"v1")
    assert _wait(lambda: "report.docx" in _staged(store, session))
    (work / "~$report.docx").write_bytes(b"owner")
    (work / "~WRL0001.tmp").write_bytes(b"v2")
    os.replace(work / "report.docx", work / "~WRL0002.tmp")
    os.replace(work / "~WRL0001.tmp", work / "report.docx")
    (work / "~WRL0002.tmp").unlink()
    (work / "~$report.docx").unlink()
    assert _wait(lambda: _staged(store, session) == {"report.docx": b"v2"})
    assert session.flush(timeout=DEADLINE)
    session.close()
    assert [KEYS.committed("report.docx")] == [o.key for o in store.list(KEYS.committed_prefix)]
    assert b"v2" == store.get(KEYS.committed("report.docx")).body


def test_delete_and_move_while_streaming_are_applied_at_commit(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A deleted file is removed at commit; a moved one is a delete plus a put."""
    s = _seeded(
        store, tmp_path, {name: name.encode() for name in ("a.txt", "b.txt", "c.txt", "d.txt")}
    )
    work = s.work_path
    assert work is not None
    (work / "a.txt").unlink()
    (work / "sub").mkdir()
    os.replace(work / "b.txt", work / "sub" / "b.txt")
    assert s.flush(timeout=DEADLINE)
    report = s.close()
    assert ["a.txt", "b.txt"] == report.deleted
    assert ["sub/b.txt"] == report.uploaded
    committed = sorted(
        o.key[len(KEYS.committed_prefix) :] for o in store.list(KEYS.committed_prefix)
    )
    assert ["c.txt", "d.txt", "sub/b.txt"] == committed


def test_abort_commits_nothing_of_what_was_streamed(
    session: PlantDesignSession, store: ObjectStore
) -> None:
    """Abort commits nothing: no plain key, no manifest names the streamed content, which
    stays only as an unreferenced object for ``history prune`` to collect after its grace."""
    assert session.work_path is not None
    (session.work_path / "x.txt").write_text("draft")
    assert _wait(lambda: "x.txt" in _staged(store, session))
    session.abort()
    assert [] == list(store.list(f"{P}/.sessions/"))
    assert [] == list(store.list(KEYS.committed_prefix))
    with pytest.raises(NotFoundError):
        store.get(KEYS.manifest)


def test_heartbeat_finding_the_lock_taken_stops_streaming_and_close_refuses(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path
) -> None:
    """Another client takes the lock: the heartbeat signals it, streaming stops, close refuses."""
    from agent.errors import LockLostError
    from agent.stage.lock import RemoteLock
    from agent.stage.lockbody import Holder
    from agent.stage.locktools import force_unlock
    from agent.store import open_store

    config = s3_config(
        s3_env,
        tmp_path / "m1",
        lock={"heartbeat_interval": 0.1},
        watch={"debounce": 0.1, "max_delay": 1.0, "min_interval_per_path": 0.2},
    )
    session = PlantDesignSession(config, store=s3_store)
    errors: list[str] = []
    session.error.connect(errors.append)
    work = session.open(P, "admin", STAGE)
    bob_store = open_store(s3_config(s3_env, tmp_path / "bob"))
    try:
        started = time.monotonic()
        (work / "before.txt").write_text("streamed")
        assert _wait(lambda: "before.txt" in _staged(s3_store, session))
        took = time.monotonic() - started
        with capture_logs() as logs:
            force_unlock(bob_store, KEYS.lock, operator="op", machine="ops", reason="test")
            bob = Holder(user="bob", machine="m2", pid=1, session_id="s-bob", agent_version="t")
            RemoteLock(bob_store, KEYS.lock, bob, config.lock).acquire()
            assert _wait(lambda: bool(errors)), "the heartbeat never noticed the lock was taken"
        assert "taken from this session" in errors[0]
        assert [("error", errors[0])] == [
            (e["log_level"], e["error"]) for e in logs if e["event"] == "lock_lost"
        ]
        assert isinstance(session.lock_lost, LockLostError)
        assert "lock_lost" in session.status()
        (work / "late.txt").write_text("not sent")
        # Long after a save would have been staged while streaming, it still is not.
        window = max(3 * took, 2 * config.watch.max_delay)
        assert not wait_for(lambda: "late.txt" in _staged(s3_store, session), timeout=window)
        with pytest.raises(LockLostError):
            session.close()
        assert "late.txt" not in _staged(s3_store, session)
        assert "bob" == json.loads(s3_store.get(KEYS.lock).body)["user"]
    finally:
        if not session.is_closed:
            session.abort()
        bob_store.close()


def test_an_upload_due_while_the_folder_is_replaced_by_a_link_waits_and_deletes_nothing(
    session: PlantDesignSession, store: ObjectStore, tmp_path: Path
) -> None:
    """A save whose upload comes due while the working folder is a link to another folder:
    the upload fails with the reason shown and is retried, never read through the link and
    never taken for a delete; with the folder back, close commits the save."""
    work, journal = session.work_path, session._journal
    assert work is not None and journal is not None
    (work / "plan.dwg").write_bytes(b"saved")
    assert _wait(lambda: _staged(store, session).get("plan.dwg") == b"saved")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "plan.dwg").write_bytes(b"not the session's")
    work.rename(tmp_path / "moved")
    work.symlink_to(outside, target_is_directory=True)
    try:
        # The save of a moment ago, still to send when the folder was swapped.
        journal.record("plan.dwg", "put", size=5, mtime_ns=1)
        with pytest.raises(WorkFolderReplacedError):
            session.flush(timeout=1)
        assert _wait(lambda: "is a link" in str(session.status().get("last_error")))
        staged = journal.staged().get("plan.dwg")
        assert staged is not None and "put" == staged.op, "the save was taken for a delete"
        assert [] == [o for o in store.list("") if store.get(o.key).body == b"not the session's"]
    finally:
        work.unlink()
        (tmp_path / "moved").rename(work)
    session.close()
    assert b"saved" == store.get(KEYS.committed("plan.dwg")).body


def test_a_write_through_one_hard_link_streams_every_name_of_the_file_promptly(
    session: PlantDesignSession, store: ObjectStore, tmp_path: Path
) -> None:
    """Two names of one file in the folder and a third outside it: a write through any
    of them reaches staging under every name in the folder, long before the 10-minute
    rescan (the other names get no event of their own), and status shows it pending."""
    work = session.work_path
    assert work is not None
    (work / "a.dwg").write_bytes(b"v1")
    os.link(work / "a.dwg", work / "b.dwg")
    outside = tmp_path / "outside.dwg"
    os.link(work / "a.dwg", outside)
    both = {"a.dwg", "b.dwg"}
    assert _wait(
        lambda: {k: _staged(store, session).get(k) for k in both} == dict.fromkeys(both, b"v1")
    )
    assert _wait(lambda: session.status()["pending"] == 0)

    with (work / "a.dwg").open("r+b") as fh:  # the same inode, written in place
        fh.write(b"v2")
    assert _wait(lambda: _staged(store, session).get("b.dwg") == b"v2"), _staged(store, session)

    with outside.open("r+b") as fh:  # no event in the folder at all
        fh.write(b"v3")
    assert _wait(
        lambda: {k: _staged(store, session).get(k) for k in both} == dict.fromkeys(both, b"v3")
    ), _staged(store, session)
    report = session.close()
    assert b"v3" == store.get(KEYS.committed("b.dwg")).body
    assert both <= set(report.uploaded)


def _seeded(store: ObjectStore, tmp_path: Path, files: dict[str, bytes]) -> PlantDesignSession:
    """A stage committed with ``files``, then opened (watching) by a second session."""
    config = load_config(
        paths={"base_dir": str(tmp_path / "seed")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
    )
    seed = PlantDesignSession(config, store=store)
    work = seed.open(P, "seeder", STAGE, watch=False)
    for name, data in files.items():
        (work / name).write_bytes(data)
    seed.close()
    config2 = load_config(
        paths={"base_dir": str(tmp_path / "m2")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        watch={"debounce": 0.1, "max_delay": 1.0, "min_interval_per_path": 0.2},
    )
    s = PlantDesignSession(config2, store=store)
    s.open(P, "admin", STAGE)
    return s


def test_links_and_special_files_show_in_status_and_the_log_within_a_second(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A link that replaced a committed file, a new link and a FIFO are listed by status
    (with why, and which committed file close will delete) about a second after they
    appear, each logged once as not_synchronised; a file replaced by a folder is not
    called a link."""
    s = _seeded(store, tmp_path, {"plan.dwg": b"committed", "notes.txt": b"n"})
    work = s.work_path
    assert work is not None
    try:
        with capture_logs() as logs:
            (work / "plan.dwg").unlink()
            (work / "plan.dwg").symlink_to("/etc/hostname")
            (work / "new-link").symlink_to(work / "notes.txt")
            os.mkfifo(work / "pipe")
            (work / "notes.txt").unlink()
            (work / "notes.txt").mkdir()
            (work / "notes.txt" / "inside.txt").write_bytes(b"i")
            started = time.monotonic()

            def listed() -> dict[str, dict[str, object]]:
                rows = s.status().get("not_synchronised") or []
                assert isinstance(rows, list)
                return {r["path"]: r for r in rows}

            assert _wait(lambda: {"plan.dwg", "new-link", "pipe"} <= set(listed())), listed()
            took = time.monotonic() - started
            assert s.flush(timeout=DEADLINE)
        rows = listed()
        assert set(rows) == {"plan.dwg", "new-link", "pipe"}, rows
        assert rows["plan.dwg"]["reason"] == "symbolic link"
        assert rows["plan.dwg"]["deletes_committed"] is True
        assert rows["new-link"]["deletes_committed"] is False
        assert rows["pipe"]["reason"] == "FIFO"
        logged = sorted(e["path"] for e in logs if e["event"] == "not_synchronised")
        assert ["new-link", "pipe", "plan.dwg"] == logged, logs
        about_notes = [e for e in logs if "notes.txt" in str(e.get("path", ""))]
        assert not [e for e in about_notes if "link" in json.dumps(e, default=str)], about_notes
        assert took < 5.0, f"listed {took:.1f} s after the link appeared"
        (work / "pipe").unlink()
        assert _wait(lambda: "pipe" not in listed()), listed()
    finally:
        s.abort()


def test_a_file_replaced_by_a_folder_before_its_upload_is_not_called_a_link(
    session: PlantDesignSession,
) -> None:
    """The uploader finds a folder where the file to send was: the log says so, and
    says nothing about links (there is none)."""
    work, streamer = session.work_path, session._streamer
    assert work is not None and streamer is not None
    streamer.pause()  # hold the upload so the swap happens between journal and upload
    (work / "notes.txt").write_bytes(b"a file for now")
    assert _wait(lambda: session.status()["pending"] == 1)
    (work / "notes.txt").unlink()
    (work / "notes.txt").mkdir()
    with capture_logs() as logs:
        streamer._paused = False  # resume sending (no public resume: a lost lock is final)
        streamer._wake.set()
        assert _wait(lambda: any(e["event"] == "file_replaced_by_folder" for e in logs)), logs
    about = [e for e in logs if e.get("path") == "notes.txt"]
    assert ["file_replaced_by_folder"] == [e["event"] for e in about], about
    assert not [e for e in logs if "link" in json.dumps(e, default=str)], logs


_WRITER = """
import sys, time
end = time.monotonic() + float(sys.argv[2])
with open(sys.argv[1], "ab", buffering=0) as fh:
    n = 0
    while time.monotonic() < end:
        fh.write(b"%08d log line of a long-running program\\n" % n)
        n += 1
        time.sleep(0.0005)
"""


def test_a_file_that_keeps_growing_is_sent_every_max_delay_and_committed_whole(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A real writer appends to a log for eight max_delay periods: staging gets a copy of
    it again and again while it grows (each one a true prefix of the file, never an error),
    and close commits all of it."""
    config = load_config(
        paths={"base_dir": str(tmp_path / "m1")},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        watch={"debounce": 0.1, "max_delay": 0.5, "min_interval_per_path": 0.2},
    )
    s = PlantDesignSession(config, store=store)
    work = s.open(P, "admin", STAGE)
    try:
        log_file = work / "run.log"
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(log_file), "4.0"])
        seen: list[bytes] = []
        while writer.poll() is None:
            staged = _staged(store, s).get("run.log")
            if staged is not None and (not seen or staged != seen[-1]):
                seen.append(staged)
            time.sleep(0.1)  # sampling what staging holds while the writer runs
        assert 0 == writer.wait()
        final = log_file.read_bytes()
        assert len(seen) >= 2, f"staging got {len(seen)} copies while the file grew for 4 s"
        assert all(final.startswith(copy) for copy in seen), "a staged copy is not a prefix"
        assert s.status().get("last_error") is None, s.status()
        report = s.close()
        assert ["run.log"] == report.uploaded
        assert final == store.get(KEYS.committed("run.log")).body
        assert [] == list((tmp_path / "m1" / "state" / "copies").glob("**/*")), "copies left"
    finally:
        if not s.is_closed:
            s.abort()
