"""Crash recovery: the recovery info file, finding orphaned sessions, the crash handler.

A crash the agent sees (atexit, SIGTERM/SIGINT/SIGHUP, SIGBREAK or console close
on Windows) runs ``CrashHandler``: within a bounded time it flushes what it
can, copies the files that still have pending journal rows and the journal
into ``persistent_data/plant_design/recovery/<session>/``, writes
``recovery.json`` and releases the lock by CAS.

A crash it cannot see (kill -9, power loss) leaves the session record, the
journal and the working folder; ``find_orphans`` recognises the session by its
recorded process being gone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import AgentError, SessionError
from agent.keys import WorkFolder
from agent.platform import (
    install_termination_handler,
    machine_name,
    make_private_dirs,
    pid_alive,
    write_private_file,
)
from agent.records import SessionRecord, SessionStore

__all__ = ["CrashHandler", "RecoveryInfo", "find_orphans", "read_info", "write_info"]

log = structlog.get_logger(__name__)

INFO_NAME = "recovery.json"


class RecoveryInfo(BaseModel):
    """What ``check_previous_crash`` returns: enough for the host's recovery dialog."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    projekt_id: str
    user: str
    stage: str
    machine: str
    work_path: Path
    backup_path: Path | None
    base_manifest_etag: str | None
    pending: list[str]
    crashed_at: datetime
    kind: Literal["handled", "unseen"]
    reason: str = ""
    lock_released: bool = False

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return self.model_dump(mode="json")


def info_path(recovery_root: Path, session_id: str) -> Path:
    """Where a session's recovery info file lives."""
    return recovery_root / session_id / INFO_NAME


def write_info(recovery_root: Path, info: RecoveryInfo) -> Path:
    """Write the recovery info file atomically."""
    path = info_path(recovery_root, info.session_id)
    write_private_file(path, info.model_dump_json(indent=1).encode())
    return path


def read_info(recovery_root: Path, session_id: str) -> RecoveryInfo | None:
    """Read a recovery info file; None if absent; a damaged one is a clear error."""
    path = info_path(recovery_root, session_id)
    try:
        return RecoveryInfo.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError) as exc:
        raise SessionError(
            f"the recovery info {path} is damaged ({exc.__class__.__name__}); the session "
            "record, journal and working folder are still used for recovery. Remove the file "
            "to silence this."
        ) from exc


def _owner_alive(record: SessionRecord) -> bool:
    if record.machine != machine_name():
        return True  # not ours to judge
    pids = [p for p in (record.agent_pid, record.pid) if p]
    return any(pid_alive(p) for p in pids)


def find_orphans(
    records: SessionStore,
    recovery_root: Path,
    pending_of: Callable[[SessionRecord], list[str]],
) -> list[RecoveryInfo]:
    """Sessions on this machine whose process is gone, with what is pending."""
    found: list[RecoveryInfo] = []
    for record in records.all():
        try:
            info = read_info(recovery_root, record.session_id)
        except SessionError as exc:
            log.warning("recovery_info_damaged", session_id=record.session_id, error=str(exc))
            info = None
        # A handled crash wrote its info file: orphaned even if the process is still exiting.
        if info is None and _owner_alive(record):
            continue
        if info is None:
            backup = recovery_root / record.session_id
            info = RecoveryInfo(
                session_id=record.session_id,
                projekt_id=record.projekt_id,
                user=record.user,
                stage=record.stage,
                machine=record.machine,
                work_path=record.work_path,
                backup_path=backup if backup.is_dir() else None,
                base_manifest_etag=record.base_manifest_etag,
                pending=pending_of(record),
                crashed_at=record.updated_at,
                kind="unseen",
            )
        found.append(info)
    return found


class CrashHandler:
    """Runs ``save(reason)`` once on a termination signal or at exit, within ``timeout``."""

    def __init__(self, save: Callable[[str], None], timeout: float) -> None:
        self._save = save
        self.timeout = timeout
        self._done = threading.Event()
        self._restore: Callable[[], None] | None = None
        self._fired = threading.Lock()

    def install(self) -> None:
        """Register the signal handlers (main thread only) and the atexit hook."""
        if threading.current_thread() is threading.main_thread():
            self._restore = install_termination_handler(self._on_signal)
        atexit.register(self._at_exit)

    def uninstall(self) -> None:
        """Forget the hooks (after a clean close or abort)."""
        self._done.set()
        atexit.unregister(self._at_exit)
        if self._restore is not None and threading.current_thread() is threading.main_thread():
            self._restore()
            self._restore = None
        # Off the main thread the handlers stay installed but do nothing (``_done``).

    def _on_signal(self, reason: str) -> None:
        self.run(reason)
        raise SystemExit(128 + 15)

    def _at_exit(self) -> None:
        self.run("atexit")

    def run(self, reason: str) -> bool:
        """Save within the time bound; True if the save finished in time."""
        if not self._fired.acquire(blocking=False) or self._done.is_set():
            return True
        worker = threading.Thread(
            target=self._guarded, args=(reason,), name="pdagent-crash", daemon=True
        )
        worker.start()
        worker.join(self.timeout)
        finished = not worker.is_alive()
        log.warning("crash_handler_ran", reason=reason, finished=finished)
        self._done.set()
        return finished

    def _guarded(self, reason: str) -> None:
        try:
            self._save(reason)
        except Exception:
            log.exception("crash_save_failed", reason=reason)


def copy_pending(work: Path, backup: Path, pending: list[str]) -> list[str]:
    """Copy the pending files (those that exist) from ``work`` to ``backup``; return copied.

    Each file is opened without following links (``WorkFolder.open_file``): a pending
    path that is now a link, or lies behind one, or is a special file is skipped, so
    a crash backup never copies what a link points to (issue 8).
    """
    folder = WorkFolder(work)
    copied = []
    for rel in pending:
        dst = backup / "files" / Path(*rel.split("/"))
        try:
            with folder.open_file(rel) as (fd, st):
                make_private_dirs(dst.parent)  # the backup is private state (issue 9)
                with os.fdopen(os.dup(fd), "rb") as src, dst.open("wb") as out:
                    shutil.copyfileobj(src, out)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            copied.append(rel)
        except FileNotFoundError:
            continue
        except AgentError as exc:
            log.warning("backup_skipped", path=rel, error=str(exc))
        except OSError as exc:
            log.warning("backup_copy_failed", path=rel, error=str(exc))
    return copied
