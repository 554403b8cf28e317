"""While a session is open: streaming, heartbeat, flush, status, errors."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

from agent.errors import (
    AgentError,
    JournalCorruptError,
    LockLostError,
    NotFoundError,
)
from agent.folder.journal import Journal
from agent.folder.streamer import Streamer
from agent.log import get_logger
from agent.stage.intent import read_manifest
from agent.stage.keys import StageKeys
from agent.stage.lock import Heartbeat
from agent.stage.manifest import Manifest, ManifestEntry
from agent.stage.repair import RepairReport, repair_stage
from agent.state import SessionState

log = get_logger(__name__)

# How long an abort, detach or crash save waits for a stopped stage check's last request.
_REPAIR_CANCEL_WAIT = 5.0


if TYPE_CHECKING:
    from agent.session import PlantDesignSession


def detach(s: PlantDesignSession) -> None:
    """Stop streaming and the heartbeat, persist the lock's ETag: another process goes on."""
    _stop_streaming(s)
    _stop_heartbeat(s)
    if s.record is not None and s._lock is not None:
        s._update_record(lock_etag=s._lock.etag)
    s._close_store()


def start_streaming(s: PlantDesignSession, *, watch: bool = True) -> None:
    """Start (or continue) watching the folder and streaming changes to staging."""
    s._require(
        SessionState.ACTIVE, SessionState.DOWNLOADING, SessionState.RESTORING, action="stream"
    )
    streamer = _ensure_streamer(s, watch=watch)
    if watch and not streamer.is_watching:
        streamer.start_watching()
    if s._heartbeat is None:
        _start_heartbeat(s)
    start_check(s)


def start_check(s: PlantDesignSession) -> None:
    """Check the stage's plain tree against its manifest in the background (``agent.stage.repair``).

    The process that holds the lock runs the check once per session: with streaming
    (``start_streaming``, after the folder is handed over), or at the close of an
    unwatched session; close waits for it before committing, abort and detach stop it.
    """
    if s._repair is not None or s.record is None:
        return
    record = s.record
    keys = StageKeys(record.projekt_id, record.stage)
    stop = threading.Event()

    def run() -> None:
        try:
            # The base the open just read and parsed, if the stage still has it: at
            # 100,000 files a second GET and parse held 16 MB of body and ~40 MiB more.
            manifest, etag = base_if_unchanged(s, keys) or read_manifest(s.store, keys)
        except AgentError as exc:
            s.repair_report = RepairReport(error=str(exc))
            return
        if manifest is None or etag != record.base_manifest_etag or stop.is_set():
            # No manifest yet (nothing to compare), or not the base we hold: done, and
            # said so (status would otherwise show the check running for ever).
            s.repair_report = RepairReport()
            return
        s.repair_report = repair_stage(
            s.store, keys, manifest, workers=s.config.transfer.workers, stop=stop
        )

    thread = threading.Thread(target=run, name="pdagent-repair", daemon=True)
    s._repair = (thread, stop)
    thread.start()


def base_if_unchanged(
    s: PlantDesignSession, keys: StageKeys
) -> tuple[Manifest | None, str | None] | None:
    """The session's base manifest and ETag if the stage's manifest still has that ETag
    (a HEAD, not a GET: a 100,000-file manifest is 16 MB to fetch and 0.8 s to parse);
    None when it must be read. A close's manifest write stays fenced by ``If-Match``; the
    background check of the plain tree reads the manifest it checks against this way."""
    assert s.record is not None
    base, etag = s._base_manifest, s.record.base_manifest_etag
    if base is None or etag is None:
        return None
    try:
        found = s.store.head(keys.manifest).etag
    except NotFoundError:
        return None
    return (base, etag) if found == etag else None


def check_before_commit(s: PlantDesignSession) -> None:
    """The lock holder's check of the plain tree, finished: started with streaming, or
    here for an unwatched session (not at its open: a CLI open hands the session to the
    agent process, whose streaming runs the check)."""
    start_check(s)
    finish_repair(s, cancel=False)


def finish_repair(s: PlantDesignSession, *, cancel: bool) -> None:
    """Wait for the background check of the plain tree (``cancel``: stop it first)."""
    if s._repair is None:
        return
    thread, stop = s._repair
    if cancel:
        stop.set()
    thread.join(timeout=_REPAIR_CANCEL_WAIT if cancel else None)


def _ensure_streamer(s: PlantDesignSession, *, watch: bool, reconcile: bool = True) -> Streamer:
    """The session's streamer, started now if need be.

    ``reconcile=False``: the caller knows the folder equals what the streamer is told
    the store holds (an open that has just built it, a close that rescans at once), so
    the start-up walk of the whole folder is skipped.
    """
    if s._streamer is None:
        assert s.record is not None and s._journal is not None
        keys = StageKeys(s.record.projekt_id, s.record.stage)
        base = s._base_manifest
        if base is None:
            base = Manifest(
                files={
                    rel: ManifestEntry(size=e.size, sha256=e.sha256, etag="")
                    for rel, e in s._base_files.items()
                }
            )
        s._streamer = Streamer(
            root=s.record.work_path,
            identity=s.record.work_identity,
            keys=keys,
            session_id=s.record.session_id,
            store=s.store,
            journal=s._journal,
            config=s.config,
            base=base.files,
            known=s._base_files,
            on_error=s._note_error,
        )
        s._streamer.start(watch=watch, reconcile=reconcile and not s._fresh_folder)
        s._fresh_folder = False
    return s._streamer


def rebuild_journal(s: PlantDesignSession, error: JournalCorruptError) -> Streamer:
    """The journal went bad under a running session: set it aside, start a fresh one.

    Nothing is lost: the new streamer compares the folder with the base snapshot and
    journals every difference again; content already in ``.objects/`` is checked, not
    sent again. The returned streamer watches if the old one did.
    """
    assert s.record is not None
    was_watching = s._streamer is not None and s._streamer.is_watching
    if s._streamer is not None:
        s._streamer.stop(wait=False)
        s._streamer = None
    if s._journal is not None:
        with contextlib.suppress(Exception):  # it is damaged: closing may fail too
            s._journal.close()
        s._journal = None
    path = s._journal_path(s.record.session_id)
    aside = Journal.set_aside(path)
    log.warning(
        "journal_rebuilt", session_id=s.record.session_id, damaged=str(aside), error=str(error)
    )
    s._journal = Journal.open(path)
    return _ensure_streamer(s, watch=was_watching)


def _stop_streaming(s: PlantDesignSession) -> None:
    finish_repair(s, cancel=True)
    if s._streamer is not None:
        s._streamer.stop()
        s._streamer = None
    if s._journal is not None:
        s._journal.close()
        s._journal = None


def flush(s: PlantDesignSession, timeout: float = 60.0) -> bool:
    """Wait until every change seen so far is in staging (True) or ``timeout`` passed."""
    with s._verb("flush"):
        s._require(SessionState.ACTIVE, action="flush")
        streamer = _ensure_streamer(s, watch=False)
        # A save whose event the watcher has not delivered yet is found by the
        # rescan: flush never says "nothing pending" while a saved file is not sent.
        try:
            streamer.rescan("")
            return streamer.flush(timeout)
        except JournalCorruptError as exc:
            streamer = rebuild_journal(s, exc)
            streamer.rescan("")
            return streamer.flush(timeout)


def _stage_check_status(s: PlantDesignSession, out: dict[str, object]) -> list[str]:
    """The background check of the plain tree into ``out``; the problems it found."""
    if s._repair is None:
        return []
    report = s.repair_report
    out["stage_check"] = "running" if report is None else report.as_dict()
    if report is not None and report.lost:
        return [
            f"{len(report.lost)} committed files are missing from the store: "
            "restore them from `agent history`"
        ]
    return []


def _streaming_status(s: PlantDesignSession, out: dict[str, object]) -> list[str]:
    """The streamer's (or the journal's) counters into ``out``; the problems they show."""
    problems: list[str] = []
    if s._streamer is not None:
        out.update(s._streamer.status())
        stalled = s._streamer.stalled_for()
        if stalled > 2 * s.config.store.read_timeout:
            out["store_stalled_seconds"] = round(stalled, 1)
            problems.append(f"the store has not answered for {stalled:.0f} s")
        if s._streamer.last_error:
            problems.append(f"uploads failing: {s._streamer.last_error}")
        return problems
    if s._journal is not None:
        out["pending"] = s._journal.pending_count()
    if s.record is not None and s.record.last_error:
        out["last_error"] = s.record.last_error
    return problems


def status(s: PlantDesignSession) -> dict[str, object]:
    """What ``agent status`` shows: state, lock, pending changes, last upload, errors."""
    record = s.record
    out: dict[str, object] = {"state": str(s._state)}
    if record is not None:
        out.update(
            session_id=record.session_id,
            projekt_id=record.projekt_id,
            stage=record.stage,
            user=record.user,
            path=str(record.work_path),
            since=record.created_at.isoformat(),
        )
    if s._lock is not None:
        out["lock_etag"] = s._lock.etag
        out["heartbeat_age_seconds"] = (
            round(s._heartbeat.age(), 1) if s._heartbeat is not None else None
        )
    problems: list[str] = []
    if s.lock_lost is not None:
        out["lock_lost"] = str(s.lock_lost)
        problems.append(f"lock lost: {s.lock_lost}")
    if s._heartbeat is not None and s._heartbeat.last_error is not None:
        out["lock_error"] = s._heartbeat.last_error
        problems.append(f"lock renewal failing: {s._heartbeat.last_error}")
    if s.intent_refused is not None:
        out["intent_refused"] = s.intent_refused
        problems.append(f"close refused: {s.intent_refused}")
    problems += _stage_check_status(s, out)
    try:
        problems += _streaming_status(s, out)
    except JournalCorruptError as exc:
        out["journal_error"] = str(exc)
        problems.append(
            "the journal is damaged; `agent close` rebuilds it from the working folder "
            "(nothing saved is lost) and commits"
        )
    # One line a user (or the host's status bar) can show; absent when all is well.
    if problems:
        out["error"] = "; ".join(problems)
    return out


def publish_agent(s: PlantDesignSession, pid: int, address: str) -> None:
    """Record the background agent's pid and address in the session record."""
    s._update_record(agent_pid=pid, agent_address=address)


def _start_heartbeat(s: PlantDesignSession) -> None:
    assert s._lock is not None
    s._heartbeat = Heartbeat(s._lock, s.config.lock.heartbeat_interval, on_lost=s._on_lock_lost)
    s._heartbeat.start()


def _stop_heartbeat(s: PlantDesignSession) -> None:
    if s._heartbeat is not None:
        s._heartbeat.stop()
        s._heartbeat = None


def _on_lock_lost(s: PlantDesignSession, exc: LockLostError) -> None:
    """Heartbeat CAS refused: stop streaming, keep journal and staging, tell everyone."""
    log.error("lock_lost", error=str(exc))
    s.lock_lost = exc
    if s._streamer is not None:
        s._streamer.stop_watching()
        s._streamer.pause()
    _note_error(s, str(exc))
    s.error.emit(str(exc))


def _note_error(s: PlantDesignSession, message: str) -> None:
    if s.record is not None and (s.records.folder(s.record.session_id) / "session.json").exists():
        s._update_record(last_error=message)


def _release_quietly(s: PlantDesignSession) -> None:
    if s._lock is None:
        return
    try:
        s._lock.release()
    except AgentError as exc:
        log.warning("lock_release_failed", error=str(exc))
        s._lock.abandon()  # this process may take it again; the bucket's copy expires
