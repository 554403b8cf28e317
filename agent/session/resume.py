"""After a crash: find orphans, re-lock, finish a cut commit, restore, merge theirs."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import (
    AgentError,
    SessionCancelledError,
    SessionError,
)
from agent.folder.entries import LocalEntry, fd_sha256
from agent.folder.journal import Journal
from agent.folder.merge import plan_merge
from agent.folder.snapshot import scan
from agent.folder.transfer import Download, Transfers
from agent.folder.workfolder import WorkFolder, folder_identity, local_path_for
from agent.log import get_logger
from agent.names import unsupported_reason
from agent.session.records import SessionRecord
from agent.session.recovery import LocalChanges, RecoveryInfo, local_changes
from agent.session.recovery import find_orphans as orphans_on_disk
from agent.stage.commit import Committed
from agent.stage.intent import read_manifest
from agent.stage.keys import StageKeys
from agent.stage.lock import RemoteLock
from agent.stage.manifest import Manifest
from agent.state import SessionState
from agent.store.parallel import Progress

log = get_logger(__name__)


if TYPE_CHECKING:
    from agent.session import PlantDesignSession


def check_previous_crash(s: PlantDesignSession) -> RecoveryInfo | None:
    """An unfinished session on this machine whose process is gone, or ``None``.

    The result carries ``projekt_id``, ``user``, ``stage``, ``backup_path`` and
    the ``pending`` paths, for the host's resume / discard dialog.
    """
    orphans = find_orphans(s)
    return orphans[0] if orphans else None


def find_orphans(s: PlantDesignSession) -> list[RecoveryInfo]:
    """Every orphaned session on this machine (``agent recover`` lists them)."""

    def changes_of(record: SessionRecord) -> LocalChanges:
        path = s._journal_path(record.session_id)
        journal = None
        if path.exists():
            try:
                journal = Journal.open(path)
            except AgentError as exc:
                log.warning("journal_unreadable", session_id=record.session_id, error=str(exc))
        try:
            base = s.records.load_base(record.session_id)
            return local_changes(record.work_path, base, journal, s.rules)
        except AgentError as exc:
            log.warning("changes_unknown", session_id=record.session_id, error=str(exc))
            return LocalChanges()
        finally:
            if journal is not None:
                journal.close()

    found = orphans_on_disk(s.records, s.config.paths.recovery_root, changes_of)
    orphans = []
    for info in found:
        try:
            phase = s.records.load(info.session_id).phase
        except AgentError:
            phase = None
        if phase == "closing":
            # Committed and released before the process died: only the clean-up was cut.
            # The folder stays where it is if the move into the cache had not happened.
            s.records.remove(info.session_id)
            shutil.rmtree(s.config.paths.recovery_root / info.session_id, ignore_errors=True)
            log.info("close_cleanup_finished", session_id=info.session_id)
            continue
        orphans.append(info)
    return orphans


def resume(
    s: PlantDesignSession,
    session_id: str | None = None,
    *,
    take_over: bool = False,
    watch: bool = True,
) -> Path:
    """Continue an orphaned session: re-lock, restore the folder, replay the journal.

    IDLE -> ACQUIRING -> RESTORING -> ACTIVE. A commit a crash interrupted is
    finished first; a file changed both here and in a commit by someone else
    is kept twice (theirs at its name, ours beside it).
    """
    with s._verb("resume"):
        return _resume(s, session_id, take_over=take_over, watch=watch)


def _resume(s: PlantDesignSession, session_id: str | None, *, take_over: bool, watch: bool) -> Path:
    if s._state is not SessionState.IDLE:
        raise SessionError(f"resume() needs a fresh session (this one is {s._state})")
    session_id = s._pick_orphan(session_id, "resume")
    orphans = {o.session_id: o for o in find_orphans(s)}
    info = orphans[session_id]
    record = s.records.load(session_id)
    if record.phase == "aborting":
        raise SessionError(
            f"session {session_id} was being aborted when its process ended: finish the abort "
            "with `agent recover --discard`"
        )
    if record.phase == "opening":
        raise SessionError(
            f"session {session_id} crashed while opening (nothing was edited yet): "
            "discard it with `agent recover --discard` and open again"
        )
    s._work_folder(record).check_identity()  # before the lock: refused, nothing changes
    keys = StageKeys(record.projekt_id, record.stage)
    s.record = record
    s._set_state(SessionState.ACQUIRING)
    lock = RemoteLock(s.store, keys.lock, s._holder(record), s.config.lock)
    try:
        _check_cancel(s)
        lock.acquire(take_over=take_over)
    except BaseException as exc:
        s.record = None
        s._set_state(SessionState.CLOSED)
        _raise_cancelled_or(s, exc)
        raise
    s._lock = lock
    try:
        _check_cancel(s)
        s._set_state(SessionState.RESTORING)
        _restore(s, keys, record, info, lock)
        _check_cancel(s)
    except BaseException as exc:
        log.error("resume_failed", session_id=session_id, error=str(exc))
        if s._journal is not None:
            s._journal.close()
            s._journal = None
        s._release_quietly()
        if s.record is not None:
            s._update_record(pid=0)  # an orphan again, for this process too
        s._set_state(SessionState.CLOSED)
        _raise_cancelled_or(s, exc)
        raise
    s._start_heartbeat()
    if watch:
        s.start_streaming()
    else:
        s._ensure_streamer(watch=False)
    s._set_state(SessionState.ACTIVE)
    log.info("session_resumed", session_id=session_id, pending=len(info.pending))
    return s.record.work_path


def _restore(
    s: PlantDesignSession,
    keys: StageKeys,
    record: SessionRecord,
    info: RecoveryInfo,
    lock: RemoteLock,
) -> None:
    """RESTORING: finish a cut commit, rebuild the folder, take in others' commits."""
    s._update_record(pid=os.getpid(), agent_pid=None, agent_address=None, lock_etag=lock.etag)
    s._journal = _open_journal_for_resume(s, record.session_id)
    s._base_files = s.records.load_base(record.session_id)
    s._base_manifest = s.records.load_base_manifest(record.session_id)
    _finish_interrupted_commit(s, keys)
    _restore_folder(s, keys, info)
    s._update_record(work_identity=folder_identity(record.work_path))  # made again if gone
    _merge_remote(s, keys)
    s._update_record(phase="active", lock_etag=lock.etag)


def _open_journal_for_resume(s: PlantDesignSession, session_id: str) -> Journal:
    """Open the journal; a damaged one is set aside and rebuilt from the folder.

    Nothing is lost: the working folder is compared with the base snapshot by the
    first rescan, so every change is journalled again (and re-sent if needed).
    """
    path = s._journal_path(session_id)
    try:
        return Journal.open(path)
    except AgentError as exc:
        aside = Journal.set_aside(path)
        log.warning("journal_rebuilt", session_id=session_id, damaged=str(aside), error=str(exc))
        return Journal.open(path)


def _finish_interrupted_commit(s: PlantDesignSession, keys: StageKeys) -> Committed | None:
    """Roll forward a commit a crash cut (ours, or anyone's left on the stage)."""
    assert s.record is not None and s._journal is not None
    intent, finished = s._committer(keys, reupload=True).settle()
    ours = intent is not None and intent[0].session_id == s.record.session_id
    if finished is not None:
        log.warning(
            "interrupted_commit_finished",
            session_id=s.record.session_id,
            of_session=finished.manifest.session_id,
        )
    if ours and intent is not None:
        manifest, etag = read_manifest(s.store, keys)
        if manifest is not None and manifest.commit_id == intent[0].commit_id:
            # Our commit is the stage now: it is our new base, its staged entries done.
            s._adopt_new_base(manifest, etag)
            s._journal.drop_staged(
                rel
                for rel, st in s._journal.staged().items()
                if (st.op == "delete" and rel not in manifest.files)
                or (
                    st.op == "put"
                    and rel in manifest.files
                    and manifest.files[rel].sha256 == st.sha256
                )
            )
    if s.record.phase == "committing":
        s._update_record(phase="active")
    return finished


def _restore_folder(s: PlantDesignSession, keys: StageKeys, info: RecoveryInfo) -> None:
    """Make sure the working folder has every file of the session, and no file it deleted.

    A base file missing from the folder was deleted by the user (the watcher may not
    have told the journal before the crash): it stays deleted, and close commits the
    delete. It comes back only if it never was in this folder (a restore a crash cut),
    or the whole folder is gone. A file this session had sent newer content for (a
    staged put) comes back with that content.
    """
    assert s.record is not None and s._journal is not None
    work = s.record.work_path
    current, _etag = read_manifest(s.store, keys)
    base = current if current is not None else s._load_base_manifest_unchecked()
    staged = s._journal.staged()
    folder_lost = not work.is_dir()
    missing = [
        rel
        for rel in base.files
        if not work.joinpath(*rel.split("/")).exists() and rel not in staged
    ]
    missing_base = [rel for rel in missing if folder_lost or rel not in s._base_files]
    if kept_deleted := sorted(set(missing) - set(missing_base)):
        log.info("resume_kept_deletes", paths=kept_deleted[:20], count=len(kept_deleted))
    if folder_lost or missing_base:
        work.mkdir(parents=True, exist_ok=True)
        # Not here until downloaded: a restore a failure cuts is finished by the next resume.
        for rel in missing_base:
            s._base_files.pop(rel, None)
        s.records.save_base(s.record.session_id, s._base_files)
        if folder_lost:  # the session's folder from now on
            s._update_record(work_identity=folder_identity(work))
        items = [
            Download(
                key=keys.committed(rel),
                dest=local_path_for(work, rel),
                size=base.files[rel].size,
                sha256=base.files[rel].sha256,
                fallback=keys.version(base.files[rel].sha256),
            )
            for rel in missing_base
            if not _pending_delete(s, rel)
        ]
        from_objects = [
            rel
            for rel, st in staged.items()
            if st.op == "put" and not work.joinpath(*rel.split("/")).exists()
        ]
        items += [
            Download(
                key=keys.version(staged[rel].sha256),
                dest=local_path_for(work, rel),
                size=staged[rel].size,
                sha256=staged[rel].sha256,
            )
            for rel in from_objects
        ]
        progress = Progress(
            f"Restoring {len(items)} files",
            sum(i.size or 0 for i in items),
            s.progress.emit,
            cancel=s._cancel,
        )
        transfers = Transfers(s.store, s.config.transfer.workers, folder=WorkFolder(work))
        digests = transfers.download(items, progress)
        for item, digest in zip(items, digests, strict=True):
            if item.key.startswith(keys.committed_prefix):
                rel = keys.rel_from_committed(item.key)
                was = base.files.get(rel)
                if was is not None and was.executable:
                    st = WorkFolder(work).set_executable(rel, True)
                else:
                    st = item.dest.stat()
                s._base_files[rel] = LocalEntry.from_stat(st, digest)
            else:  # content this session sent: the bit the journal recorded with it
                rel = from_objects.pop(0)
                if staged[rel].executable:
                    WorkFolder(work).set_executable(rel, True)
        s.records.save_base(s.record.session_id, s._base_files)
    _copy_from_backup(work, info)


def _copy_from_backup(work: Path, info: RecoveryInfo) -> None:
    """A handled crash's copies of unsaved files go back where the folder lacks them."""
    backup = info.backup_path
    if backup is not None and info.kind == "handled" and backup.name != "files":
        backup = backup / "files"  # written by an agent before issue 10
    if backup is not None and info.kind == "handled" and backup.is_dir():
        for src in backup.rglob("*"):
            if not src.is_file():
                continue
            rel = src.relative_to(backup).as_posix()
            dest = local_path_for(work, rel)
            if not os.path.lexists(dest):  # a link there is never written through
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
                log.info("restored_from_backup", path=rel)


def _check_cancel(s: PlantDesignSession) -> None:
    if s._cancel.is_set():
        raise SessionCancelledError("cancelled")


def _raise_cancelled_or(s: PlantDesignSession, exc: BaseException) -> None:
    """After the clean-up: a cancelled resume raises ``SessionCancelledError``."""
    if s._cancel.is_set() or isinstance(exc, SessionCancelledError):
        raise SessionCancelledError(
            "the resume was cancelled: the lock is released and the interrupted session "
            "is kept as it was (resume or discard it later)"
        ) from None


def _pending_delete(s: PlantDesignSession, rel: str) -> bool:
    assert s._journal is not None
    return any(e.path == rel and e.op == "delete" for e in s._journal.pending())


def _merge_remote(s: PlantDesignSession, keys: StageKeys) -> None:
    """Someone committed since our base: take their changes, keep both where we collide."""
    assert s.record is not None and s._journal is not None
    theirs, etag = read_manifest(s.store, keys)
    if etag == s.record.base_manifest_etag or theirs is None:
        return
    base = s._base_manifest or s._load_base_manifest_unchecked()
    work = s.record.work_path
    plan = plan_merge(
        {rel: (e.size, e.sha256) for rel, e in base.files.items()},
        {rel: (e.size, e.sha256) for rel, e in theirs.files.items()},
        _our_changes(s, base),
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    for rel in plan.conflicts:
        p = Path(rel)
        mine = p.with_name(f"{p.stem}.conflict-{s.record.user}-{stamp}{p.suffix}")
        os.replace(local_path_for(work, rel), local_path_for(work, mine.as_posix()))
    for rel in plan.forget:
        s._journal.forget(rel)  # its content stays in .objects/ (shared; collected by prune)
    for rel in plan.remove:
        WorkFolder(work).unlink(rel)
        s._base_files.pop(rel, None)
    take = sorted({*plan.download, *plan.conflicts, *plan.revived})
    items = [
        Download(
            key=keys.committed(rel),
            dest=local_path_for(work, rel),
            size=theirs.files[rel].size,
            sha256=theirs.files[rel].sha256,
            fallback=keys.version(theirs.files[rel].sha256),
        )
        for rel in take
    ]
    Transfers(s.store, s.config.transfer.workers, folder=WorkFolder(work)).download(items)
    for rel in take:
        if theirs.files[rel].executable:
            got = WorkFolder(work).set_executable(rel, True)
        else:
            got = local_path_for(work, rel).stat()
        s._base_files[rel] = LocalEntry.from_stat(got, theirs.files[rel].sha256)
    s.records.save_base(s.record.session_id, s._base_files)
    s._adopt_new_base(theirs, etag)
    s._update_record(conflicts=[*s.record.conflicts, *plan.conflicts])
    log.warning(
        "merged_remote_commit",
        conflicts=plan.conflicts,
        downloaded=len(take),
        kept_ours=plan.kept_ours,
        revived=plan.revived,
        committed_by=theirs.committed_by,
    )


def _our_changes(s: PlantDesignSession, base: Manifest) -> dict[str, str | None]:
    """Every path this session changed, with its current sha256 (None: deleted here)."""
    assert s.record is not None and s._journal is not None
    work = s.record.work_path
    candidates = set(s._journal.staged()) | {e.path for e in s._journal.pending()}
    current = scan(work, s.rules)
    for rel, st in current.items():
        known = s._base_files.get(rel)
        if unsupported_reason(rel) is None and (known is None or not known.matches(st)):
            candidates.add(rel)  # hashed below: a changed stat tuple is only a candidate
    candidates |= set(base.files) - set(current)
    ours: dict[str, str | None] = {}
    folder = WorkFolder(work)
    for rel in candidates:
        try:
            with folder.open_file(rel) as (fd, _st):
                sha: str | None = fd_sha256(fd)
        except (OSError, AgentError):  # gone, or a link / special file: not a file here
            sha = None
        was = base.files.get(rel)
        if (was is None and sha is None) or (was is not None and was.sha256 == sha):
            continue  # changed and changed back: not a change
        ours[rel] = sha
    return ours
