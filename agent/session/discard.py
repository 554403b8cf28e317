"""Throwing a session away: ``abort`` (open session) and ``discard`` (an orphan)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from typing import TYPE_CHECKING

from agent.errors import (
    AgentError,
    LockLostError,
    SessionError,
    UnsavedWorkError,
)
from agent.folder.journal import Journal
from agent.log import get_logger
from agent.stage.commit import remove_staging
from agent.stage.intent import read_intent
from agent.stage.keys import StageKeys
from agent.stage.lock import RemoteLock
from agent.state import SessionState

log = get_logger(__name__)

_MASS_DELETE_FRACTION = 0.5
# How long `abort` waits for a running close before refusing.
_ABORT_WAIT = 2.0
# How long `abort` waits for a cancelled open/resume to unwind (a store call in flight
# finishes first: its own timeouts bound this).
_CANCEL_WAIT = 120.0
_CANCELLABLE = (
    SessionState.IDLE,
    SessionState.ACQUIRING,
    SessionState.DOWNLOADING,
    SessionState.RESTORING,
)


if TYPE_CHECKING:
    from agent.session import PlantDesignSession


def abort(s: PlantDesignSession) -> None:
    """Discard the session: remove staging and the working folder, release the lock.

    A commit of this session that a failure cut is finished first (a started
    commit is only ever rolled forward). Never returns with the lock still held
    by us: a release that cannot be confirmed raises, and nothing local is removed.
    """
    cancelling = _request_cancel(s)
    with s._verb("abort", wait=_CANCEL_WAIT if cancelling else _ABORT_WAIT):
        if cancelling and s._state in (SessionState.CLOSED, SessionState.IDLE):
            return  # the open/resume unwound: lock released, nothing left behind
        if s._state is SessionState.CLOSED:
            raise SessionError("cannot abort: this session is already closed")
        if s._state is SessionState.IDLE or s.record is None:
            raise SessionError("cannot abort: no session is open (call open() first)")
        # A link or another folder in its place: refused before anything is given up.
        s._work_folder().check_identity()
        before = s.record.phase
        record = s._update_record(phase="aborting")  # a crash from here on finishes the abort
        keys = StageKeys(record.projekt_id, record.stage)
        s._uninstall_crash_handler()
        s._stop_streaming()
        s._stop_heartbeat()
        try:
            if s._lock is not None and s.lock_lost is None:
                try:
                    s._lock.renew()  # only the holder may finish a commit or release
                except LockLostError as exc:
                    s.lock_lost = exc
            if s._lock is not None and s.lock_lost is None:
                finished = s._committer(keys, reupload=True).settle()[1]
                if finished is not None:
                    log.warning(
                        "abort_finished_interrupted_commit",
                        session_id=record.session_id,
                        commit_id=finished.manifest.commit_id,
                    )
                    if finished.manifest.session_id == record.session_id:
                        s.finished_commit = finished.manifest.commit_id
            try:
                remove_staging(s.store, keys, record.session_id)
            except AgentError as exc:
                log.warning("abort_staging_left", session_id=record.session_id, error=str(exc))
            if s._lock is not None and s.lock_lost is None:
                s._lock.release()
        except BaseException as exc:
            log.error("abort_failed", session_id=record.session_id, error=str(exc))
            s._update_record(phase=before)
            s._journal = Journal.open(s._journal_path(record.session_id))
            if s._lock is not None and s._lock.etag is not None:
                s._start_heartbeat()
            raise
        s.cache.keep_unsynced(record.work_path)  # links and unstorable names are kept
        shutil.rmtree(record.work_path, ignore_errors=True)
        s.records.remove(record.session_id)
        shutil.rmtree(s.config.paths.recovery_root / record.session_id, ignore_errors=True)
        s._set_state(SessionState.CLOSED)
        s._close_store()
        log.info("session_aborted", session_id=record.session_id)


def _request_cancel(s: PlantDesignSession) -> bool:
    """If open() or resume() runs on another thread: ask it to stop and clean up."""
    busy = not s._verb_lock.acquire(blocking=False)
    if not busy:
        s._verb_lock.release()
    if not (busy and s._state in _CANCELLABLE):
        return False
    s._cancel.set()
    log.info("cancel_requested", state=str(s._state))
    return True


def discard(
    s: PlantDesignSession,
    session_id: str | None = None,
    *,
    confirm_loss: Iterable[str] | bool = (),
) -> None:
    """Throw an orphaned session away: staging, folder, backup, and the lock if ours.

    A commit of that session that a crash cut is finished first (roll forward).
    Uncommitted changes are deleted only when ``confirm_loss`` covers them.
    """
    with s._verb("discard"):
        if s._state is not SessionState.IDLE:
            raise SessionError(f"discard() needs a fresh session (this one is {s._state})")
        session_id = _pick_orphan(s, session_id, "discard")
        _check_loss_confirmed(s, session_id, confirm_loss)
        record = s.records.load(session_id)
        s._work_folder(record).check_identity()
        s.record = record
        keys = StageKeys(record.projekt_id, record.stage)
        lock = RemoteLock(s.store, keys.lock, s._holder(record), s.config.lock)
        found = read_intent(s.store, keys)
        if found is not None and found[0].state != "done" and found[0].session_id == session_id:
            lock.acquire()
            s._committer(keys, reupload=True).settle()
            s.finished_commit = found[0].commit_id
            log.warning("discard_finished_interrupted_commit", session_id=session_id)
        else:
            current = lock.read()
            if (
                current is not None
                and current.body.state == "held"
                and current.body.session_id == session_id
            ):
                lock.adopt(current.etag)
        remove_staging(s.store, keys, session_id)
        lock.release()
        s.cache.keep_unsynced(record.work_path)  # links and unstorable names are kept
        shutil.rmtree(record.work_path, ignore_errors=True)
        shutil.rmtree(s.config.paths.recovery_root / session_id, ignore_errors=True)
        s.records.remove(session_id)
        s._set_state(SessionState.CLOSED)
        s._close_store()
        log.warning("session_discarded", session_id=session_id)


def _check_loss_confirmed(
    s: PlantDesignSession, session_id: str, confirm_loss: Iterable[str] | bool
) -> None:
    """Refuse (``UnsavedWorkError``) unless every change the store lacks was confirmed."""
    if confirm_loss is True:
        return
    info = next((o for o in s.find_orphans() if o.session_id == session_id), None)
    unsaved = info.unsaved if info is not None else []
    confirmed = set() if confirm_loss is False else set(confirm_loss)
    missing = [rel for rel in unsaved if rel not in confirmed]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        shown = ", ".join(missing[:10]) + more
        raise UnsavedWorkError(
            f"discarding session {session_id} would delete {len(missing)} change(s) the store "
            f"has no committed copy of: {shown}. Resume and close to keep them, or confirm "
            "the loss (`agent recover --discard --yes`, or discard(confirm_loss=[...]))",
            files=missing,
        )


def _pick_orphan(s: PlantDesignSession, session_id: str | None, action: str) -> str:
    """The orphaned session to ``action``: the one named, or the only one."""
    orphans = [o.session_id for o in s.find_orphans()]
    if session_id is None:
        if len(orphans) != 1:
            raise SessionError(
                f"no orphaned session to {action}"
                if not orphans
                else f"{len(orphans)} orphaned sessions: name one ({', '.join(orphans)})"
            )
        return orphans[0]
    if session_id not in orphans:
        raise SessionError(
            f"session {session_id} is not orphaned (its agent is running, or it does not "
            "exist); `agent status` shows it"
        )
    return session_id
