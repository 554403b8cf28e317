"""Closing a session: flush, fence, commit through ``agent.stage.commit``, release (``close``)."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from typing import TYPE_CHECKING

from agent.errors import (
    AgentError,
    ConflictError,
    IntentRefusedError,
    LockLostError,
    MassDeleteError,
)
from agent.folder.entries import fd_sha256
from agent.folder.journal import Staged
from agent.folder.transfer import Transfers, Upload
from agent.folder.workfolder import WorkFolder
from agent.log import get_logger
from agent.names import printable
from agent.session import runtime, versions
from agent.session.closing import flush_all, folder_after_commit, release_hold
from agent.session.reports import CloseReport
from agent.stage.commit import Commit
from agent.stage.intent import CommitIntent, StagedCopy, read_manifest
from agent.stage.keys import StageKeys
from agent.stage.manifest import Manifest, ManifestEntry
from agent.state import SessionState

log = get_logger(__name__)

_MASS_DELETE_FRACTION = 0.5


if TYPE_CHECKING:
    from agent.session import PlantDesignSession


def _committer(s: PlantDesignSession, keys: StageKeys, *, reupload: bool) -> Commit:
    """The commit protocol on ``keys``; ``reupload`` from this session's working folder."""
    return Commit(
        s.store,
        keys,
        workers=s.config.transfer.workers,
        reupload=s._reupload if reupload else None,
        progress=s.progress.emit,
    )


def _reupload(s: PlantDesignSession, rel: str, staged: StagedCopy) -> str | None:
    """Send the local file again to ``.objects/{sha256}`` if it still has the recorded
    content (the object vanished, or holds other bytes: replaced, never trusted)."""
    assert s.record is not None
    keys = StageKeys(s.record.projekt_id, s.record.stage)
    folder = WorkFolder(s.record.work_path)
    try:
        path = folder.path(rel)
        with folder.open_file(rel) as (fd, _st):
            if fd_sha256(fd) != staged.sha256:
                return None
    except (OSError, AgentError):
        return None
    done = Transfers(s.store, 1, folder=folder).upload_one(
        Upload(rel=rel, key=keys.version(staged.sha256), src=path), None
    )
    if done.sha256 != staged.sha256:
        return None
    log.warning("object_sent_again", path=rel, etag=done.etag)
    return done.etag


def close(
    s: PlantDesignSession, *, allow_mass_delete: bool = False, skip_unsupported: bool = False
) -> CloseReport:
    """Flush what is still pending, commit the staged changes, release the lock.

    On any failure the session goes back to ACTIVE with the lock held (a commit
    that had started is finished by the next close, resume, abort or discard).
    """
    with s._verb("close"):
        s._require(SessionState.ACTIVE, action="close")
        if s.lock_lost is not None:
            raise s.lock_lost
        return _close(s, allow_mass_delete, skip_unsupported)


def _close(s: PlantDesignSession, allow_mass_delete: bool, skip_unsupported: bool) -> CloseReport:
    assert s.record is not None and s._lock is not None
    started = time.monotonic()
    s._set_state(SessionState.UPLOADING)
    record = s.record
    keys = StageKeys(record.projekt_id, record.stage)
    streamer = s._ensure_streamer(watch=False, reconcile=False)  # rescanned just below
    was_watching = streamer.is_watching
    try:
        # A link or another folder in its place: nothing of it is sent, moved or committed.
        s._work_folder().check_identity()
        streamer, walked = flush_all(s, streamer)
        runtime.check_before_commit(s)  # the commit alone writes plain keys now
        unsupported = streamer.check_storable(skip=skip_unsupported)
        # From here on the lock keeper writes for close alone: the heartbeat rests.
        s._stop_heartbeat()
        s._lock.renew()  # fencing: prove we still hold the lock right before committing
        puts, deletes, manifest, manifest_etag = _commit(s, keys, allow_mass_delete)
        s._lock.release()  # read back: the close fails unless it says `released`
    except BaseException as exc:
        log.error("close_failed", session_id=record.session_id, error=str(exc))
        if isinstance(exc, LockLostError):
            s._on_lock_lost(exc)
        s._note_error(str(exc))
        # A failure before the heartbeat rested (flush, unsupported names) keeps it running:
        # starting another would leave the first one running unseen.
        if s._heartbeat is None and s._lock.etag is not None and s.lock_lost is None:
            s._start_heartbeat()
        if was_watching and s.lock_lost is None:
            streamer.start_watching()
        release_hold(streamer)
        s._set_state(SessionState.ACTIVE)
        raise
    # Committed and released: from here only local clean-up is left, which a crash
    # recovery finishes (the record says so) instead of offering a resume.
    s._update_record(phase="closing")
    kept: list[str] = []
    replaced, changed_after, unsynced, walked_after = folder_after_commit(s, streamer, manifest)
    known = streamer.known()
    s._uninstall_crash_handler()
    s._stop_streaming()
    if replaced:
        pass  # not the session's folder (logged above): nothing there is cached or moved
    elif changed_after:
        log.warning(
            "close_kept_folder_changed_after_commit",
            paths=changed_after[:20],
            count=len(changed_after),
            path=str(record.work_path),
        )
    else:
        files = manifest.files
        snapshot = {
            rel: e
            for rel, e in known.items()
            if (m := files.get(rel)) is not None and m.sha256 == e.sha256
        }
        kept = s.cache.put(
            keys.projekt_id, keys.stage, record.work_path, snapshot, unsynced=unsynced
        )
    s.records.remove(record.session_id)
    shutil.rmtree(s.config.paths.recovery_root / record.session_id, ignore_errors=True)
    if puts or deletes:
        versions.prune_after_close(s, keys)
    report = CloseReport(
        session_id=record.session_id,
        uploaded=sorted(puts),
        deleted=sorted(deletes),
        bytes_uploaded=sum(p.size for p in puts.values()),
        manifest_etag=manifest_etag,
        seconds=time.monotonic() - started,
        conflicts=list(record.conflicts),
        changed_after_commit=changed_after,
        not_synchronised=sorted(printable(rel) for rel in unsupported),
        kept_aside=[printable(rel) for rel in kept],
        folder_walked=walked or walked_after,
    )
    s._set_state(SessionState.CLOSED)
    s._close_store()
    log.info(
        "session_closed",
        session_id=record.session_id,
        uploaded=len(report.uploaded),
        deleted=len(report.deleted),
        bytes=report.bytes_uploaded,
        seconds=round(report.seconds, 3),
    )
    return report


def _commit(
    s: PlantDesignSession, keys: StageKeys, allow_mass_delete: bool
) -> tuple[dict[str, Staged], list[str], Manifest, str | None]:
    """The commit protocol (``agent.stage.commit``) on this session's staged changes."""
    assert s.record is not None and s._journal is not None
    committer = _committer(s, keys, reupload=True)
    try:
        previous, finished = committer.settle()
    except IntentRefusedError as exc:
        s.intent_refused = str(exc)  # status shows it until a close gets past it
        raise
    s.intent_refused = None
    if finished is not None and finished.manifest.session_id == s.record.session_id:
        _adopt_new_base(s, finished.manifest, finished.etag)
    base, current = _check_base(s, keys, previous)
    puts, deletes = _staged_changes(s, base)
    _check_mass_delete(base, deletes, puts, allow_mass_delete)
    if not puts and not deletes:
        log.info("commit_nothing_changed", session_id=s.record.session_id)
        s._journal.clear_staged()
        return puts, deletes, base, s.record.base_manifest_etag
    intent, intent_etag = committer.begin(
        session_id=s.record.session_id,
        user=s.record.user,
        machine=s.record.machine,
        base=base,
        base_etag=s.record.base_manifest_etag,
        copies={
            rel: StagedCopy(
                size=p.size, sha256=p.sha256, etag=p.etag or "", executable=p.executable
            )
            for rel, p in puts.items()
        },
        deletes=deletes,
        previous=previous,
        now=s._lock.store_now() if s._lock is not None else None,  # one clock: the store's
    )
    s._update_record(phase="committing", commit_id=intent.commit_id)
    committed = committer.apply(intent, intent_etag, current)  # the manifest read once
    s._journal.clear_staged()
    # Not persisted: the session ends here (a crash from now on only cleans up), and
    # writing a 100,000-file manifest to disk cost a close 0.3 s.
    _adopt_new_base(s, committed.manifest, committed.etag, persist=False)
    return puts, deletes, committed.manifest, committed.etag


def _check_base(
    s: PlantDesignSession, keys: StageKeys, intent: tuple[CommitIntent, str] | None
) -> tuple[Manifest, tuple[Manifest | None, str | None]]:
    """The base manifest, if the stage still is at it (or at our own commit): fencing.

    Also the stage's manifest and ETag as read (``None`` for a stage without one).
    """
    assert s.record is not None
    current, etag = runtime.base_if_unchanged(s, keys) or read_manifest(s.store, keys)
    if etag != s.record.base_manifest_etag:
        ours = (
            current is not None
            and etag is not None
            and intent is not None
            and intent[0].session_id == s.record.session_id
            and current.commit_id == intent[0].commit_id
        )
        if not ours:
            raise ConflictError(
                f"{keys.projekt_id}/{keys.stage} was committed by someone else since this "
                "session opened; nothing was overwritten. Your files are still in "
                f"{s.record.work_path}; see `agent recover` for keeping both"
            )
        assert current is not None
        _adopt_new_base(s, current, etag)  # our commit whose answer was lost
    if current is not None:
        s._base_manifest = current
        return current, (current, etag)
    return s._base_manifest or _load_base_manifest_unchecked(s), (None, None)


def _staged_changes(s: PlantDesignSession, base: Manifest) -> tuple[dict[str, Staged], list[str]]:
    """What the commit applies: staged puts that differ from base, deletes of base files."""
    assert s._journal is not None
    puts: dict[str, Staged] = {}
    deletes: list[str] = []
    for rel, staged in s._journal.staged().items():
        if staged.op == "delete":
            if rel in base.files:
                deletes.append(rel)
        elif _differs(base.files.get(rel), staged):
            puts[rel] = staged
    return puts, sorted(deletes)


def _differs(committed: ManifestEntry | None, staged: Staged) -> bool:
    """The staged put changes the file: other bytes, or another executable bit."""
    if committed is None or committed.sha256 != staged.sha256:
        return True
    return staged.executable is not None and staged.executable != committed.executable


def _check_mass_delete(
    base: Manifest, deletes: list[str], puts: dict[str, Staged], allowed: bool
) -> None:
    """Refuse a commit that deletes most of the stage, unless ``allowed``.

    A delete whose bytes this commit puts under another name is a move, not a loss
    (``mv other*.txt all/``, renaming the top folder): only the rest count. Each put
    accounts for one delete of the same content (issue 20).
    """
    total = len(base.files)
    if allowed or not deletes or total == 0:
        return
    re_added = Counter(  # content new at its path: not a changed executable bit
        p.sha256
        for rel, p in puts.items()
        if rel not in base.files or base.files[rel].sha256 != p.sha256
    )
    moved = 0
    for rel in deletes:
        sha = base.files[rel].sha256
        if re_added[sha] > 0:
            re_added[sha] -= 1
            moved += 1
    deleted = len(deletes) - moved
    if deleted and (deleted == total or deleted > total * _MASS_DELETE_FRACTION):
        raise MassDeleteError(
            f"closing would delete {deleted} of the stage's {total} files ({deleted} deleted, "
            f"{moved} moved); nothing was committed. If that is what you want, close again "
            "with --allow-mass-delete (library: close(allow_mass_delete=True))"
        )


def _adopt_new_base(
    s: PlantDesignSession, manifest: Manifest, etag: str | None, *, persist: bool = True
) -> None:
    """Make ``manifest`` the session's base (after our own or a merged commit)."""
    assert s.record is not None
    s._base_manifest = manifest
    if persist:
        s.records.save_base_manifest(s.record.session_id, manifest)
    s._update_record(base_manifest_etag=etag)


def _load_base_manifest_unchecked(s: PlantDesignSession) -> Manifest:
    """The base manifest as the session started (from the snapshot; etags unknown)."""
    return Manifest(
        files={
            r: ManifestEntry(size=e.size, sha256=e.sha256, etag="")
            for r, e in s._base_files.items()
        }
    )
