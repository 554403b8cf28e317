"""``PlantDesignSession``: the lifecycle of one editing session (the library API).

The facade: configuration, signals, the state and its one setter, the verb lock,
the one record writer. Each verb lives in its own module and takes the session as
its first argument: ``checkout`` (open), ``checkin`` (close and the commit),
``runtime`` (streaming, heartbeat, flush, status), ``resume`` (crash recovery and
merge), ``discard`` (abort, discard), ``crash`` (the emergency save).

::

    Online: IDLE -> ACQUIRING -> DOWNLOADING -> ACTIVE -> UPLOADING -> CLOSED
    Abort:  any -> CLOSED

``open`` takes the stage lock, brings the committed copy down (from the local
cache where it can), records the session on disk and returns the folder.
``close`` finds what changed, uploads it to the session's staging prefix,
commits (server-side copies, deletes, manifest last with ``If-Match`` of the base
manifest), releases the lock and moves the folder into the cache. ``abort``
discards. ``_set_state`` is the only way the state changes.

A failure never leaves the lock released with unsaved work: if ``close`` fails,
the session goes back to ACTIVE with the lock, the record and the folder intact.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from agent.config import AgentConfig, load_config
from agent.errors import LockLostError, SessionError
from agent.folder.cache import StageCache
from agent.folder.entries import LocalEntry
from agent.folder.ignore import IgnoreRules
from agent.folder.journal import Journal
from agent.folder.streamer import Streamer
from agent.folder.workfolder import WorkFolder
from agent.log import get_logger
from agent.platform import machine_name, on_main_thread
from agent.session import checkin, checkout, crash, discard, resume, runtime, versions
from agent.session.records import SessionRecord, SessionStore
from agent.session.recovery import RecoveryInfo
from agent.session.reports import CloseReport
from agent.session.versions import RestorePlan, RestoreReport
from agent.signals import Signal
from agent.stage.commit import Commit
from agent.stage.history import FileVersion, PrunePlan
from agent.stage.intent import StagedCopy
from agent.stage.keys import CommitInfo, StageKeys
from agent.stage.lock import Heartbeat, RemoteLock
from agent.stage.lockboard import LockRow, list_locks
from agent.stage.lockbody import Holder
from agent.stage.manifest import Manifest
from agent.stage.repair import RepairReport
from agent.state import SessionState, check_transition
from agent.store import ObjectStore, open_store
from agent.version import __version__

__all__ = ["CloseReport", "PlantDesignSession"]

log = get_logger(__name__)


class PlantDesignSession:
    """One user's editing session on one project stage.

    ``state_changed(int)`` is emitted on every transition, ``progress(str, int)``
    during transfers; a Qt application connects them to its own signals.
    """

    def __init__(
        self,
        config: AgentConfig | None = None,
        *,
        store: ObjectStore | None = None,
        crash_hooks: bool = True,
    ) -> None:
        self.config = config if config is not None else load_config()
        self.state_changed: Signal[int] = Signal("state_changed")
        self.progress: Signal[str, int] = Signal("progress")
        # Problems the user must know about while ACTIVE (lock lost, uploads failing).
        self.error: Signal[str] = Signal("error")
        self.lock_lost: LockLostError | None = None
        # A close's refusal of a crafted commit intent, shown by status until one gets past it.
        self.intent_refused: str | None = None
        self._state = SessionState.IDLE
        self._state_since = time.monotonic()
        self._state_lock = threading.Lock()
        self._store = store
        self._owns_store = store is None
        self.records = SessionStore(self.config.paths.state_dir)
        self.cache = StageCache(
            self.config.paths.cache_dir,
            max_bytes=self.config.transfer.cache_max_bytes,
            enabled=self.config.transfer.cache_enabled,
            rules=IgnoreRules((*self.config.watch.ignore, *self.config.watch.extra_ignore)),
        )
        self.rules = self.cache.rules
        self.record: SessionRecord | None = None
        self._lock: RemoteLock | None = None
        self._heartbeat: Heartbeat | None = None
        self._base_manifest: Manifest | None = None
        self._journal: Journal | None = None
        self._streamer: Streamer | None = None
        self._base_files: dict[str, LocalEntry] = {}
        # The background check of the stage's plain tree (agent.stage.repair) and what it found.
        self._repair: tuple[threading.Thread, threading.Event] | None = None
        self.repair_report: RepairReport | None = None
        # Set by abort()/discard() when they finished this session's interrupted commit
        # (a started commit is only rolled forward): the changes are committed, not lost.
        self.finished_commit: str | None = None
        # True from a fresh open's download until streaming starts: the folder is exactly
        # ``_base_files`` (nobody has the path yet), so the streamer skips its first walk.
        self._fresh_folder = False
        # Set by ``abort()`` while open/resume runs: the transfer stops, open raises
        # ``SessionCancelledError`` (agent.session.checkout).
        self._cancel = threading.Event()
        # One verb at a time (open/close/abort/flush/resume/discard); status never waits.
        self._verb_lock = threading.RLock()
        # One writer of the session record: read-modify-write under this lock.
        self._record_lock = threading.Lock()
        if crash_hooks and on_main_thread():
            # Signal handlers can only be set here; open() may then run on any thread.
            crash.register(self)

    @property
    def state(self) -> SessionState:
        """The current state."""
        return self._state

    def _set_state(self, new: SessionState) -> None:
        """The only state mutator: validate, stamp, log, then emit outside the lock."""
        with self._state_lock:
            old = self._state
            check_transition(old, new)
            now = time.monotonic()
            duration = now - self._state_since
            self._state, self._state_since = new, now
        log.info(
            "state_changed",
            session_id=self.record.session_id if self.record else None,
            **{"from": str(old), "to": str(new)},
            duration=round(duration, 3),
        )
        if new is SessionState.CLOSED:
            crash.unregister(self)  # from whichever thread closes: restored when the last goes
        self.state_changed.emit(int(new))

    @contextlib.contextmanager
    def _verb(self, action: str, *, wait: float | None = None) -> Iterator[None]:
        """Serialize the verbs; ``wait`` set: refuse after that many seconds instead."""
        if not self._verb_lock.acquire(timeout=-1 if wait is None else wait):
            raise SessionError(
                f"cannot {action} now: another operation (a close that is committing, or a "
                "resume) is running on this session; wait for it (`agent status` shows it) "
                "and try again"
            )
        try:
            yield
        finally:
            self._verb_lock.release()

    def _update_record(self, **changes: object) -> SessionRecord:
        """The one writer of the session record: apply ``changes`` to the latest and save."""
        with self._record_lock:
            assert self.record is not None
            self.record = self.records.save(self.record.model_copy(update=changes))
            return self.record

    @property
    def store(self) -> ObjectStore:
        """The object store (opened on first use, so `status` never imports boto3)."""
        if self._store is None:
            self._store = open_store(self.config)
        return self._store

    @property
    def work_path(self) -> Path | None:
        """The working folder of the open session."""
        return self.record.work_path if self.record else None

    def _require(self, *states: SessionState, action: str) -> None:
        if self._state in states:
            return
        if self._state is SessionState.CLOSED:
            raise SessionError(
                f"cannot {action}: this session is already closed (another close or abort "
                "finished it meanwhile); nothing more to do. To work on the stage again, "
                "open it again"
            )
        if self._state is SessionState.IDLE:
            raise SessionError(f"cannot {action}: no session is open (call open() first)")
        raise SessionError(f"cannot {action} while the session is {self._state}")

    def open(
        self,
        projekt_id: str,
        user: str,
        stage: str,
        *,
        take_over: bool = False,
        watch: bool = True,
        crash_hooks: bool = True,
    ) -> Path:
        """Take the stage lock, bring the working copy down, return its folder.

        With ``watch`` (the default) the folder is watched and every saved change
        streams to the session's staging prefix until ``close``/``abort``. An
        unfinished commit that someone left on the stage is finished first.

        Blocks for the whole download: call it off the GUI thread. ``abort()`` from
        another thread cancels it (``SessionCancelledError``, lock released, nothing
        left on disk). With ``crash_hooks`` (the default) SIGTERM/SIGINT/SIGHUP and
        interpreter exit save the session (``agent.session.crash``).
        """
        if crash_hooks:
            crash.register(self)
        else:
            crash.unregister(self)
        return checkout.open(self, projekt_id, user, stage, take_over=take_over, watch=watch)

    def _holder(self, record: SessionRecord) -> Holder:
        """This process as the holder of ``record``'s lock."""
        return Holder(
            user=record.user,
            machine=machine_name(),
            pid=os.getpid(),
            session_id=record.session_id,
            agent_version=__version__,
        )

    def _committer(self, keys: StageKeys, *, reupload: bool) -> Commit:
        """The commit protocol on ``keys``; ``reupload`` from this session's working folder."""
        return checkin._committer(self, keys, reupload=reupload)

    def _reupload(self, rel: str, staged: StagedCopy) -> str | None:
        """Send the local file again to staging if it still has the recorded content."""
        return checkin._reupload(self, rel, staged)

    @classmethod
    def attach(
        cls,
        config: AgentConfig | None = None,
        *,
        projekt_id: str | None = None,
        stage: str | None = None,
        session_id: str | None = None,
        store: ObjectStore | None = None,
        to_discard: bool = False,
    ) -> PlantDesignSession:
        """Continue a session recorded on disk by another process (the background agent).

        A session that never finished opening can only be attached ``to_discard``.
        """
        session = cls(config, store=store)
        record = session.records.find_one(projekt_id, stage, session_id)
        if record.phase == "opening" and not to_discard:
            raise SessionError(
                f"session {record.session_id} never finished opening; "
                "run `agent abort` to discard it"
            )
        session.record = record
        keys = StageKeys(record.projekt_id, record.stage)
        holder = session._holder(record)
        session._lock = RemoteLock(session.store, keys.lock, holder, session.config.lock)
        if record.lock_etag:
            session._lock.adopt(record.lock_etag)
            if not to_discard:
                # The lock names the process that wrote it: until this process's first
                # heartbeat it named `agent open`, which has exited, and a second HOME of
                # the same user on this machine took that for a holder that is gone.
                session._lock.renew()
        session._base_files = session.records.load_base(record.session_id)
        session._journal = Journal.open(session._journal_path(record.session_id))
        session._set_state(SessionState.ACTIVE)
        return session

    def close(
        self, *, allow_mass_delete: bool = False, skip_unsupported: bool = False
    ) -> CloseReport:
        """Flush what is still pending, commit the staged changes, release the lock.

        On any failure the session goes back to ACTIVE with the lock held (a commit
        that had started is finished by the next close, resume, abort or discard).
        A local file whose name the store cannot hold makes close refuse
        (``LocalFileError``, exit 11) unless ``skip_unsupported``; it is never deleted.
        """
        return checkin.close(
            self, allow_mass_delete=allow_mass_delete, skip_unsupported=skip_unsupported
        )

    def abort(self) -> None:
        """Discard the session: remove staging and the working folder, release the lock.

        A commit of this session that a failure cut is finished first (a started
        commit is only ever rolled forward): then ``finished_commit`` names it, and the
        session's changes are committed, not discarded. Never returns with the lock still
        held by us: a release that cannot be confirmed raises, and nothing local is removed.
        """
        discard.abort(self)

    def detach(self) -> None:
        """Stop streaming and the heartbeat, persist the lock's ETag: another process goes on.

        The crash hooks no longer save this session here (the other process has its own).
        """
        crash.unregister(self)
        runtime.detach(self)

    def _journal_path(self, session_id: str) -> Path:
        return self.records.folder(session_id) / "journal.sqlite"

    def _work_folder(self, record: SessionRecord | None = None) -> WorkFolder:
        """The session's working folder, which must still be the folder open made."""
        record = record or self.record
        assert record is not None
        return WorkFolder(record.work_path, record.work_identity)

    @property
    def is_closed(self) -> bool:
        """True once the session reached CLOSED."""
        return self._state is SessionState.CLOSED

    def start_streaming(self, *, watch: bool = True) -> None:
        """Start (or continue) watching the folder and streaming changes to staging."""
        runtime.start_streaming(self, watch=watch)

    def _ensure_streamer(self, *, watch: bool, reconcile: bool = True) -> Streamer:
        return runtime._ensure_streamer(self, watch=watch, reconcile=reconcile)

    def _stop_streaming(self) -> None:
        runtime._stop_streaming(self)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every change seen so far is in staging (True) or ``timeout`` passed."""
        return runtime.flush(self, timeout)

    def status(self) -> dict[str, object]:
        """What ``agent status`` shows: state, lock, pending changes, last upload, errors."""
        return runtime.status(self)

    def publish_agent(self, pid: int, address: str) -> None:
        """Record the background agent's pid and address in the session record."""
        runtime.publish_agent(self, pid, address)

    def _start_heartbeat(self) -> None:
        runtime._start_heartbeat(self)

    def _stop_heartbeat(self) -> None:
        runtime._stop_heartbeat(self)

    def _on_lock_lost(self, exc: LockLostError) -> None:
        """Heartbeat CAS refused: stop streaming, keep journal and staging, tell everyone."""
        runtime._on_lock_lost(self, exc)

    def _note_error(self, message: str) -> None:
        runtime._note_error(self, message)

    def _release_quietly(self) -> None:
        runtime._release_quietly(self)

    def _close_store(self) -> None:
        if self._owns_store and self._store is not None:
            self._store.close()
            self._store = None

    def install_crash_handler(self) -> None:
        """Save what can be saved on SIGTERM/SIGINT/SIGHUP/atexit (bounded in time).

        ``open`` and ``resume`` already do this; for a session from ``attach``.
        """
        crash.install_crash_handler(self)

    def _uninstall_crash_handler(self) -> None:
        crash._uninstall_crash_handler(self)

    def emergency_save(self, reason: str) -> None:
        """The crash path: flush, back up pending files and journal, write info, release.

        ACTIVE -> RECOVERING -> CLOSED. The session record, journal and folder stay
        on disk for ``resume``.
        """
        crash.emergency_save(self, reason)

    def check_previous_crash(self) -> RecoveryInfo | None:
        """An unfinished session on this machine whose process is gone, or ``None``.

        The result carries ``projekt_id``, ``user``, ``stage``, ``backup_path`` and
        the ``pending`` paths, for the host's resume / discard dialog.
        """
        return resume.check_previous_crash(self)

    def find_orphans(self) -> list[RecoveryInfo]:
        """Every orphaned session on this machine (``agent recover`` lists them)."""
        return resume.find_orphans(self)

    def resume(
        self,
        session_id: str | None = None,
        *,
        take_over: bool = False,
        watch: bool = True,
        crash_hooks: bool = True,
    ) -> Path:
        """Continue an orphaned session: re-lock, restore the folder, replay the journal.

        IDLE -> ACQUIRING -> RESTORING -> ACTIVE. A commit a crash interrupted is
        finished first; a file changed both here and in a commit by someone else
        is kept twice (theirs at its name, ours beside it). ``abort()`` from another
        thread cancels it (``SessionCancelledError``; the orphan stays as it was).
        """
        if crash_hooks:
            crash.register(self)
        else:
            crash.unregister(self)
        return resume.resume(self, session_id, take_over=take_over, watch=watch)

    def _adopt_new_base(self, manifest: Manifest, etag: str | None) -> None:
        """Make ``manifest`` the session's base (after our own or a merged commit)."""
        checkin._adopt_new_base(self, manifest, etag)

    def _load_base_manifest_unchecked(self) -> Manifest:
        """The base manifest as the session started (from the snapshot; etags unknown)."""
        return checkin._load_base_manifest_unchecked(self)

    def discard(
        self, session_id: str | None = None, *, confirm_loss: Iterable[str] | bool = ()
    ) -> None:
        """Throw an orphaned session away: staging, folder, backup, and the lock if ours.

        A commit of that session that a crash cut is finished first (roll forward).
        Changes the store has not committed (``RecoveryInfo.unsaved``) are deleted
        only if ``confirm_loss`` names each of them (or is ``True``); otherwise
        ``UnsavedWorkError`` lists them and nothing is removed.
        """
        discard.discard(self, session_id, confirm_loss=confirm_loss)

    def _pick_orphan(self, session_id: str | None, action: str) -> str:
        """The orphaned session to ``action``: the one named, or the only one."""
        return discard._pick_orphan(self, session_id, action)

    # ------------------------------------------------------------ version history

    def history(
        self, projekt_id: str, stage: str, path: str | None = None
    ) -> list[CommitInfo] | list[FileVersion]:
        """The stage's commits, oldest first; with ``path``, the versions of that file.

        Needs no lock and no open session.
        """
        return versions.history(self, projekt_id, stage, path)

    def show(
        self, projekt_id: str, stage: str, *, commit: str, path: str, output: Path
    ) -> FileVersion:
        """Write ``path`` as ``commit`` left it to ``output`` (no lock needed)."""
        return versions.show(self, projekt_id, stage, commit=commit, path=path, output=output)

    def plan_restore(
        self, projekt_id: str, stage: str, *, commit: str, paths: Sequence[str] = ()
    ) -> RestorePlan:
        """What ``restore`` would add, change and remove in the stage now (no lock needed)."""
        return versions.plan_restore(self, projekt_id, stage, commit=commit, paths=paths)

    def restore(
        self,
        projekt_id: str,
        user: str,
        stage: str,
        *,
        commit: str,
        paths: Sequence[str] = (),
        expected: RestorePlan | None = None,
    ) -> RestoreReport:
        """Bring the stage (or ``paths``) back to ``commit``, committed as a new commit.

        Runs a whole session (open, put the versions in place, close) on this object,
        which must be idle; the lock is taken and released like any other session.
        Calling it is the confirmation: it removes every file the commit did not have,
        however many (no mass-delete guard; the state before stays in the history).
        With ``expected`` (from ``plan_restore``, as shown to the user) it refuses with
        ``ConflictError``, changing nothing, if the stage was committed to since.
        """
        return versions.restore(
            self, projekt_id, user, stage, commit=commit, paths=paths, expected=expected
        )

    def prune_history(self, projekt_id: str, *, dry_run: bool = False) -> PrunePlan:
        """Delete the commits and versions that ``[history]`` retention lets go."""
        return versions.prune(self, projekt_id, dry_run=dry_run)

    def list_locks(self, projekt_ids: Sequence[str] = ()) -> list[LockRow]:
        """Every stage lock under the store prefix (or of ``projekt_ids``): who works on what."""
        return list_locks(
            self.store, self.config.lock, projekt_ids, workers=self.config.transfer.workers
        )
