"""The crash path: hooks on termination signals and exit, and the emergency save."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from agent.errors import (
    AgentError,
)
from agent.recovery import CrashHandler, RecoveryInfo, copy_pending, write_info
from agent.state import SessionState

log = structlog.get_logger(__name__)

_MASS_DELETE_FRACTION = 0.5
# How long `abort` waits for a running close (or resume) before refusing.
_ABORT_WAIT = 2.0


if TYPE_CHECKING:
    from agent.session import PlantDesignSession


def install_crash_handler(s: PlantDesignSession) -> None:
    """Save what can be saved on SIGTERM/SIGINT/SIGHUP/atexit (bounded in time)."""
    s._crash = CrashHandler(s.emergency_save, s.config.recovery.crash_timeout)
    s._crash.install()


def _uninstall_crash_handler(s: PlantDesignSession) -> None:
    if s._crash is not None:
        s._crash.uninstall()
        s._crash = None


def emergency_save(s: PlantDesignSession, reason: str) -> None:
    """The crash path: flush, back up pending files and journal, write info, release.

    ACTIVE -> RECOVERING -> CLOSED. The session record, journal and folder stay
    on disk for ``resume``.
    """
    if s._state is not SessionState.ACTIVE or s.record is None:
        return
    record = s.record
    budget = s.config.recovery.crash_timeout
    started = time.monotonic()
    s._set_state(SessionState.RECOVERING)
    if s._streamer is not None:
        s._streamer.stop_watching()
        try:
            s._streamer.rescan("")
            s._streamer.flush(timeout=budget * 0.4)
        except AgentError as exc:
            log.warning("crash_flush_failed", error=str(exc))
    backup = s.config.paths.recovery_root / record.session_id
    pending = [e.path for e in s._journal.pending()] if s._journal else []
    copy_pending(record.work_path, backup, pending)
    if s._journal is not None:
        s._journal.backup(backup / "journal.sqlite")
    info = RecoveryInfo(
        session_id=record.session_id,
        projekt_id=record.projekt_id,
        user=record.user,
        stage=record.stage,
        machine=record.machine,
        work_path=record.work_path,
        backup_path=backup,
        base_manifest_etag=record.base_manifest_etag,
        pending=pending,
        crashed_at=datetime.now(UTC),
        kind="handled",
        reason=reason,
    )
    write_info(s.config.paths.recovery_root, info)
    s._stop_heartbeat()
    released = False
    if s._lock is not None and time.monotonic() - started < budget * 0.9:
        try:
            s._lock.release()
            released = True
        except AgentError as exc:
            log.warning("crash_release_failed", error=str(exc))
    write_info(s.config.paths.recovery_root, info.model_copy(update={"lock_released": released}))
    log.warning(
        "crash_saved",
        session_id=record.session_id,
        reason=reason,
        pending=len(pending),
        lock_released=released,
    )
    if s._streamer is not None:
        s._streamer.stop(wait=False)
        s._streamer = None
    if s._journal is not None:
        s._journal.close()
        s._journal = None
    s._set_state(SessionState.CLOSED)
