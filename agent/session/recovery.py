"""Crash recovery: the recovery info file, finding orphaned sessions, what is unsaved.

A crash the agent sees (atexit, SIGTERM/SIGINT/SIGHUP, SIGBREAK or console close
on Windows) runs the emergency save (``agent.session.crash``): within a bounded
time it flushes what it can, copies every file changed since the session's base
that the store has not committed into ``<recovery>/<session>/files/``, backs up
the journal, writes ``recovery.json`` and releases the lock by CAS.

A crash it cannot see (kill -9, power loss) leaves the session record, the
journal and the working folder; ``find_orphans`` recognises the session by its
recorded process being gone, and its backup is the working folder itself.

What is unsaved is computed from the folder against the session's base snapshot
(``local_changes``), not from the journal alone: a change the watcher never saw
is still listed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import AgentError, SessionError
from agent.folder.entries import LocalEntry, fd_sha256
from agent.folder.ignore import IgnoreRules
from agent.folder.journal import Journal
from agent.folder.snapshot import scan
from agent.folder.workfolder import WorkFolder
from agent.log import get_logger
from agent.names import unsupported_reason
from agent.platform import machine_name, make_private_dirs, pid_alive, write_private_file
from agent.session.records import SessionRecord, SessionStore

__all__ = [
    "LocalChanges",
    "RecoveryInfo",
    "find_orphans",
    "local_changes",
    "read_info",
    "write_info",
]

log = get_logger(__name__)

INFO_NAME = "recovery.json"


class RecoveryInfo(BaseModel):
    """What ``check_previous_crash`` returns: enough for the host's recovery dialog.

    ``pending``: files changed here that the store has no copy of at all; ``staged``:
    changes only in this session's staging (not committed). ``discard`` loses both
    (``unsaved``). ``backup_path`` is a folder holding the files: the copies a
    handled crash made, or (``kind == "unseen"``) the working folder itself, left
    in place. ``as_dict()`` gives the seed's dict (``projekt_id``, ``user``,
    ``stage``, ``backup_path``) plus the rest.
    """

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
    staged: list[str] = []
    deleted: list[str] = []
    """Of those, the files deleted here (resume keeps them deleted; close commits that)."""
    crashed_at: datetime
    kind: Literal["handled", "unseen"]
    reason: str = ""
    lock_released: bool = False

    @property
    def unsaved(self) -> list[str]:
        """Every change that ``discard`` would lose (pending and staged)."""
        return sorted({*self.pending, *self.staged})

    def as_dict(self) -> dict[str, object]:
        """The seed's recovery dict (``projekt_id, user, stage, backup_path``) and the rest."""
        data = self.model_dump(mode="json")
        data["unsaved"] = self.unsaved
        return data


@dataclass(frozen=True)
class LocalChanges:
    """Paths changed in a working folder since the session's base."""

    pending: list[str] = field(default_factory=list)  # not in the store at all
    staged: list[str] = field(default_factory=list)  # in this session's staging only
    deleted: list[str] = field(default_factory=list)  # of both: deleted here


def local_changes(
    work: Path,
    base: dict[str, LocalEntry],
    journal: Journal | None,
    rules: IgnoreRules,
) -> LocalChanges:
    """Compare the folder with the base snapshot; staged copies that match are ``staged``.

    A changed stat tuple is only a candidate: its content is hashed (links are never
    followed), so a file changed and changed back is not a change. A file whose name
    the store cannot hold is left out (abort and discard keep it aside anyway).
    ``deleted``: the changes that are files missing here (and not sent again since).
    """
    current = scan(work, rules) if work.is_dir() else {}
    folder = WorkFolder(work)
    changed: dict[str, str | None] = {}
    for rel, st in current.items():
        if unsupported_reason(rel) is not None:
            continue
        known = base.get(rel)
        if known is not None and known.matches(st):
            continue
        try:
            with folder.open_file(rel) as (fd, _st):
                sha: str | None = fd_sha256(fd)
        except (OSError, AgentError):
            continue  # gone meanwhile, or a link / special file: nothing to keep
        if known is None or known.sha256 != sha:
            changed[rel] = sha
    for rel in base:
        if rel not in current:
            changed[rel] = None
    staged = journal.staged() if journal is not None else {}
    pending, in_staging = [], []
    for rel, sha in sorted(changed.items()):
        held = staged.get(rel)
        if held is not None and (
            (sha is None and held.op == "delete") or (sha is not None and held.sha256 == sha)
        ):
            in_staging.append(rel)
        else:
            pending.append(rel)
    # A file missing here is deleted, unless this session had sent newer content for it
    # (a staged put): resume brings that back.
    deleted = [
        rel
        for rel, sha in sorted(changed.items())
        if sha is None and ((held := staged.get(rel)) is None or held.op == "delete")
    ]
    return LocalChanges(pending=pending, staged=in_staging, deleted=deleted)


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
    changes_of: Callable[[SessionRecord], LocalChanges],
) -> list[RecoveryInfo]:
    """Sessions on this machine whose process is gone, with what is unsaved."""
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
        changes = changes_of(record)
        if info is None:
            # Unseen (kill -9, power loss): the working folder itself is the backup.
            info = RecoveryInfo(
                session_id=record.session_id,
                projekt_id=record.projekt_id,
                user=record.user,
                stage=record.stage,
                machine=record.machine,
                work_path=record.work_path,
                backup_path=record.work_path if record.work_path.is_dir() else None,
                base_manifest_etag=record.base_manifest_etag,
                pending=changes.pending,
                staged=changes.staged,
                deleted=changes.deleted if record.work_path.is_dir() else [],
                crashed_at=record.updated_at,
                kind="unseen",
            )
        else:
            # Handled: what the folder holds now (it may have changed since) counts too.
            info = info.model_copy(
                update={
                    "pending": sorted({*info.pending, *changes.pending} - set(changes.staged)),
                    "staged": sorted({*info.staged, *changes.staged}),
                    "deleted": sorted(set(changes.deleted) if record.work_path.is_dir() else ()),
                }
            )
        found.append(info)
    return found


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
