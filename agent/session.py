"""``PlantDesignSession``: the lifecycle of one editing session (the library API).

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

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog

from agent import __version__
from agent.cache import StageCache
from agent.config import AgentConfig, load_config
from agent.errors import (
    AgentError,
    ConflictError,
    LocalFileError,
    LockLostError,
    MassDeleteError,
    NotFoundError,
    PreconditionFailedError,
    PreviousCrashError,
    SessionError,
    TransferError,
)
from agent.ignore import IgnoreRules
from agent.journal import Journal, Staged
from agent.keys import StageKeys, WorkFolder, local_path_for, printable, validate_name
from agent.lock import Heartbeat, Holder, RemoteLock
from agent.manifest import (
    LocalEntry,
    Manifest,
    ManifestEntry,
    file_sha256,
    is_unchanged,
    plan_open,
)
from agent.platform import machine_name
from agent.records import SessionRecord, SessionStore, new_session_id
from agent.recovery import CrashHandler, RecoveryInfo, copy_pending, find_orphans, write_info
from agent.signals import Signal
from agent.snapshot import scan
from agent.state import SessionState, check_transition
from agent.store import ObjectStore, open_store
from agent.sync import Streamer
from agent.transfer import Download, Progress, Transfers

__all__ = ["CloseReport", "PlantDesignSession"]

log = structlog.get_logger(__name__)

_MASS_DELETE_FRACTION = 0.5


@dataclass
class CloseReport:
    """What a ``close`` did."""

    session_id: str
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    manifest_etag: str | None = None
    seconds: float = 0.0
    conflicts: list[str] = field(default_factory=list)
    not_synchronised: list[str] = field(default_factory=list)
    kept_aside: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """For ``--json`` and the agent channel."""
        return {
            "session_id": self.session_id,
            "uploaded": self.uploaded,
            "deleted": self.deleted,
            "bytes_uploaded": self.bytes_uploaded,
            "manifest_etag": self.manifest_etag,
            "seconds": round(self.seconds, 3),
            "conflicts": self.conflicts,
            "not_synchronised": self.not_synchronised,
            "kept_aside": self.kept_aside,
        }


class PlantDesignSession:
    """One user's editing session on one project stage.

    ``state_changed(int)`` is emitted on every transition, ``progress(str, int)``
    during transfers; a Qt application connects them to its own signals.
    """

    def __init__(
        self, config: AgentConfig | None = None, *, store: ObjectStore | None = None
    ) -> None:
        self.config = config if config is not None else load_config()
        self.state_changed: Signal[int] = Signal("state_changed")
        self.progress: Signal[str, int] = Signal("progress")
        # Problems the user must know about while ACTIVE (lock lost, uploads failing).
        self.error: Signal[str] = Signal("error")
        self.lock_lost: LockLostError | None = None
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
        self._crash: CrashHandler | None = None

    # ------------------------------------------------------------------ state

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
        self.state_changed.emit(int(new))

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
                f"cannot {action}: this session is closed; create a new PlantDesignSession"
            )
        if self._state is SessionState.IDLE:
            raise SessionError(f"cannot {action}: no session is open (call open() first)")
        raise SessionError(f"cannot {action} while the session is {self._state}")

    # ------------------------------------------------------------------- open

    def open(
        self,
        projekt_id: str,
        user: str,
        stage: str,
        *,
        take_over: bool = False,
        watch: bool = True,
    ) -> Path:
        """Take the stage lock, bring the working copy down, return its folder.

        With ``watch`` (the default) the folder is watched and every saved change
        streams to the session's staging prefix until ``close``/``abort``.
        """
        if self._state is not SessionState.IDLE:
            raise SessionError(
                f"open() was already called on this session (it is {self._state}); "
                "close or abort it, or create a new PlantDesignSession"
            )
        keys = StageKeys(projekt_id, stage)
        validate_name("user", user)
        existing = self.records.find(projekt_id, stage)
        if existing:
            rec = existing[0]
            raise PreviousCrashError(
                f"a session on {projekt_id}/{stage} is already recorded on this machine "
                f"(session {rec.session_id}, user {rec.user}, "
                f"since {rec.created_at:%Y-%m-%d %H:%M} "
                "UTC): finish it with `agent close` or `agent abort`, or `agent recover` if it "
                "crashed"
            )
        work = self.config.paths.work_root / projekt_id / stage
        if work.exists() and any(work.iterdir()):
            raise SessionError(
                f"the working folder {work} already holds files but no session is recorded for "
                "it; it may hold unsaved work from a crash. Run `agent recover`, or move the "
                "folder away, then open again"
            )
        session_id = new_session_id()
        holder = Holder(
            user=user,
            machine=machine_name(),
            pid=os.getpid(),
            session_id=session_id,
            agent_version=__version__,
        )
        bound = log.bind(session_id=session_id, projekt_id=projekt_id, stage=stage, user=user)
        now = datetime.now(UTC)
        self.record = SessionRecord(
            session_id=session_id,
            projekt_id=projekt_id,
            stage=stage,
            user=user,
            machine=holder.machine,
            pid=holder.pid,
            work_path=work,
            created_at=now,
            updated_at=now,
        )
        self._set_state(SessionState.ACQUIRING)
        lock = RemoteLock(self.store, keys.lock, holder, self.config.lock)
        try:
            lock.acquire(take_over=take_over)
        except BaseException:
            self._set_state(SessionState.CLOSED)
            raise
        self._lock = lock
        self._set_state(SessionState.DOWNLOADING)
        try:
            self.record = self.records.save(self.record.model_copy(update={"lock_etag": lock.etag}))
            base_etag, base_files = self._download(keys, work)
            self.records.save_base(session_id, base_files)
            self.record = self.records.save(
                self.record.model_copy(
                    update={
                        "phase": "active",
                        "base_manifest_etag": base_etag,
                        "lock_etag": lock.etag,
                    }
                )
            )
        except BaseException as exc:
            bound.error("open_failed", error=str(exc))
            shutil.rmtree(work, ignore_errors=True)
            self.records.remove(session_id)
            self._release_quietly()
            self._set_state(SessionState.CLOSED)
            raise
        self._start_heartbeat()
        self._journal = Journal.open(self._journal_path(session_id))
        self._base_files = base_files
        if watch:
            self.start_streaming()
        self._set_state(SessionState.ACTIVE)
        bound.info("session_opened", path=str(work), files=len(base_files))
        return work

    def _read_manifest(self, keys: StageKeys) -> tuple[Manifest | None, str | None]:
        try:
            data = self.store.get(keys.manifest)
        except NotFoundError:
            return None, None
        return Manifest.parse(data.body, key=keys.manifest), data.etag

    def _download(self, keys: StageKeys, work: Path) -> tuple[str | None, dict[str, LocalEntry]]:
        manifest, etag = self._read_manifest(keys)
        if manifest is None:
            # No manifest yet: a stage written by the old module, or a new one.
            sizes = {
                keys.rel_from_committed(o.key): o
                for o in self.store.list(keys.committed_prefix)
                if not o.key.endswith("/")  # a folder marker ("docs/") holds no file
            }
            expected: dict[str, tuple[int, str | None]] = {
                rel: (o.size, None) for rel, o in sizes.items()
            }
        else:
            expected = {rel: (e.size, e.sha256) for rel, e in manifest.files.items()}
        self._base_manifest = manifest
        folder = WorkFolder(work)
        folder.check_root()  # a linked work path would make downloads land outside (issue 8)
        for rel in expected:
            folder.path(rel, key=keys.committed(rel))  # refuse escaping keys up front
        snapshot = self.cache.take(keys.projekt_id, keys.stage, work)
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalFileError(
                f"cannot create the working folder {work}: {exc.strerror}"
            ) from exc
        current = scan(work, self.rules)
        wanted = Manifest(
            files={
                rel: ManifestEntry(size=size, sha256=sha or "", etag="")
                for rel, (size, sha) in expected.items()
            }
        )
        plan = plan_open(wanted, snapshot, current, hasher=lambda r: file_sha256(folder.path(r)))
        for rel in plan.remove:
            folder.unlink(rel)
        items = [
            Download(
                key=keys.committed(rel),
                dest=folder.path(rel, key=keys.committed(rel)),
                size=expected[rel][0],
                sha256=expected[rel][1],
            )
            for rel in plan.download
        ]
        total = sum(expected[rel][0] for rel in plan.download)
        progress = Progress(f"Downloading {len(items)} files", total, self.progress.emit)
        transfers = Transfers(self.store, self.config.transfer.workers, folder=folder)
        digests = transfers.download(items, progress)
        files: dict[str, LocalEntry] = {}
        for rel in plan.keep:
            files[rel] = plan.kept[rel]
        for rel, digest in zip(plan.download, digests, strict=True):
            st = folder.path(rel).stat()
            files[rel] = LocalEntry.from_stat(st, digest)
        if manifest is None and expected:
            self._base_manifest = Manifest(
                files={
                    rel: ManifestEntry(
                        size=files[rel].size, sha256=files[rel].sha256, etag=sizes[rel].etag
                    )
                    for rel in expected
                }
            )
        log.info(
            "working_copy_ready",
            downloaded=len(plan.download),
            kept=len(plan.keep),
            removed=len(plan.remove),
            bytes=total,
        )
        return etag, files

    # ----------------------------------------------------------------- attach

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
        holder = Holder(
            user=record.user,
            machine=record.machine,
            pid=os.getpid(),
            session_id=record.session_id,
            agent_version=__version__,
        )
        session._lock = RemoteLock(session.store, keys.lock, holder, session.config.lock)
        if record.lock_etag:
            session._lock.adopt(record.lock_etag)
        session._base_files = session.records.load_base(record.session_id)
        session._journal = Journal.open(session._journal_path(record.session_id))
        session._state = SessionState.ACTIVE
        return session

    # ------------------------------------------------------------------ close

    def close(
        self, *, allow_mass_delete: bool = False, skip_unsupported: bool = False
    ) -> CloseReport:
        """Flush what is still pending, commit the staged changes, release the lock.

        A local file whose name the store cannot hold makes close refuse
        (``LocalFileError``, exit 11) unless ``skip_unsupported``; it is never deleted.
        """
        self._require(SessionState.ACTIVE, action="close")
        assert self.record is not None and self._lock is not None
        if self.lock_lost is not None:
            raise self.lock_lost
        started = time.monotonic()
        self._set_state(SessionState.UPLOADING)
        record = self.record
        keys = StageKeys(record.projekt_id, record.stage)
        streamer = self._ensure_streamer(watch=False)
        was_watching = streamer.is_watching
        try:
            streamer.stop_watching()
            streamer.rescan("")
            self._flush_or_raise(streamer)
            unsupported = streamer.check_storable(skip=skip_unsupported)
            base = self._load_base_manifest(keys)
            puts, deletes = self._staged_changes(base)
            self._check_mass_delete(base, deletes, allow_mass_delete)
            manifest_etag, manifest = self._commit(keys, base, puts, deletes)
        except BaseException as exc:
            log.error("close_failed", session_id=record.session_id, error=str(exc))
            self._note_error(str(exc))
            if was_watching:
                streamer.start_watching()
            self._set_state(SessionState.ACTIVE)
            raise
        known = streamer.known()
        self._uninstall_crash_handler()
        self._stop_streaming()
        self._stop_heartbeat()
        self._release_quietly()
        snapshot = {
            rel: e
            for rel, e in known.items()
            if rel in manifest.files and manifest.files[rel].sha256 == e.sha256
        }
        kept = self.cache.put(keys.projekt_id, keys.stage, record.work_path, snapshot)
        self.records.remove(record.session_id)
        shutil.rmtree(self.config.paths.recovery_root / record.session_id, ignore_errors=True)
        report = CloseReport(
            session_id=record.session_id,
            uploaded=sorted(puts),
            deleted=sorted(deletes),
            bytes_uploaded=sum(p.size for p in puts.values()),
            manifest_etag=manifest_etag,
            seconds=time.monotonic() - started,
            conflicts=list(record.conflicts),
            not_synchronised=sorted(printable(rel) for rel in unsupported),
            kept_aside=[printable(rel) for rel in kept],
        )
        self._set_state(SessionState.CLOSED)
        self._close_store()
        log.info(
            "session_closed",
            session_id=record.session_id,
            uploaded=len(report.uploaded),
            deleted=len(report.deleted),
            bytes=report.bytes_uploaded,
            seconds=round(report.seconds, 3),
        )
        return report

    def _flush_or_raise(self, streamer: Streamer) -> None:
        total = streamer.journal.pending_count()
        if total:
            self.progress.emit(f"Uploading {total} changes", 0)
        if not streamer.flush(timeout=self.config.transfer.close_timeout):
            pending = streamer.journal.pending()
            raise TransferError(
                f"{len(pending)} changes could not be sent to the store "
                f"(last error: {streamer.last_error or 'timed out'}). Nothing was committed and "
                "the lock is kept; check the connection and run close again",
                failed=len(pending),
            )
        if total:
            self.progress.emit(f"Uploading {total} changes", 100)

    def _load_base_manifest(self, keys: StageKeys) -> Manifest:
        assert self.record is not None
        if self._base_manifest is not None:
            return self._base_manifest
        if self.record.base_manifest_etag is None:
            base_files = self.records.load_base(self.record.session_id)
            manifest = Manifest(
                files={
                    rel: ManifestEntry(size=e.size, sha256=e.sha256, etag="")
                    for rel, e in base_files.items()
                }
            )
        else:
            try:
                data = self.store.get(keys.manifest)
            except NotFoundError:
                data = None
            if data is None or data.etag != self.record.base_manifest_etag:
                raise ConflictError(
                    f"{keys.projekt_id}/{keys.stage} was committed by someone else since this "
                    "session opened; nothing was overwritten. Your files are still in "
                    f"{self.record.work_path}; see `agent recover` for keeping both"
                )
            manifest = Manifest.parse(data.body, key=keys.manifest)
        self._base_manifest = manifest
        return manifest

    def _staged_changes(self, base: Manifest) -> tuple[dict[str, Staged], list[str]]:
        """What the commit applies: staged puts that differ from base, deletes of base files."""
        assert self._journal is not None
        puts: dict[str, Staged] = {}
        deletes: list[str] = []
        for rel, staged in self._journal.staged().items():
            if staged.op == "delete":
                if rel in base.files:
                    deletes.append(rel)
            elif base.files.get(rel) is None or base.files[rel].sha256 != staged.sha256:
                puts[rel] = staged
        return puts, sorted(deletes)

    @staticmethod
    def _check_mass_delete(base: Manifest, deletes: list[str], allowed: bool) -> None:
        total = len(base.files)
        if allowed or not deletes or total == 0:
            return
        if len(deletes) == total or len(deletes) > total * _MASS_DELETE_FRACTION:
            raise MassDeleteError(
                f"closing would delete {len(deletes)} of {total} files from the stage; "
                "nothing was committed. If that is what you want, close again with "
                "--allow-mass-delete (library: close(allow_mass_delete=True))"
            )

    def _commit(
        self, keys: StageKeys, base: Manifest, puts: dict[str, Staged], deletes: list[str]
    ) -> tuple[str | None, Manifest]:
        """Make the staged changes the committed copy; the manifest goes last, fenced."""
        assert self.record is not None and self._lock is not None
        record = self.record
        if not puts and not deletes:
            log.info("commit_nothing_changed", session_id=record.session_id)
            self._remove_staging(keys)
            return record.base_manifest_etag, base
        self._check_base_unchanged(keys)  # someone else's commit: a conflict, not an overwrite
        self._lock.renew()  # fencing: prove we still hold the lock right before committing
        self.record = self.records.save(
            record.model_copy(update={"phase": "committing", "lock_etag": self._lock.etag})
        )
        files = dict(base.files)
        order = sorted(puts)
        results = Transfers(self.store, self.config.transfer.workers).map(
            order,
            lambda rel: self.store.copy(
                keys.staged(record.session_id, rel), keys.committed(rel), src_etag=puts[rel].etag
            ),
        )
        for rel, result in zip(order, results, strict=True):
            files[rel] = ManifestEntry(
                size=puts[rel].size, sha256=puts[rel].sha256, etag=result.etag
            )
        if deletes:
            self.store.delete_many([keys.committed(rel) for rel in deletes])
            for rel in deletes:
                files.pop(rel, None)
        manifest = Manifest(
            files=files,
            committed_at=datetime.now(UTC),
            committed_by=record.user,
            machine=record.machine,
            session_id=record.session_id,
        )
        try:
            written = self.store.put_bytes(
                keys.manifest,
                manifest.to_bytes(),
                if_none_match=record.base_manifest_etag is None,
                if_match=record.base_manifest_etag,
                content_type="application/json",
            )
        except PreconditionFailedError as exc:
            raise ConflictError(
                f"someone else committed {keys.projekt_id}/{keys.stage} during this close; the "
                "manifest was not overwritten. Your files are still in "
                f"{record.work_path} and staged under {keys.staging_prefix(record.session_id)}"
            ) from exc
        self._remove_staging(keys)
        log.info(
            "session_committed",
            session_id=record.session_id,
            uploaded=len(puts),
            deleted=len(deletes),
            manifest_etag=written.etag,
        )
        return written.etag, manifest

    def _remove_staging(self, keys: StageKeys) -> None:
        assert self.record is not None
        staged = [o.key for o in self.store.list(keys.staging_prefix(self.record.session_id))]
        if staged:
            self.store.delete_many(staged)

    def _check_base_unchanged(self, keys: StageKeys) -> None:
        """Refuse to touch committed keys if someone committed since our base (fencing)."""
        assert self.record is not None
        try:
            current: str | None = self.store.head(keys.manifest).etag
        except NotFoundError:
            current = None
        if current != self.record.base_manifest_etag:
            raise ConflictError(
                f"{keys.projekt_id}/{keys.stage} was committed by someone else since this session "
                "opened; nothing was overwritten. Your files are still in "
                f"{self.record.work_path}; see `agent recover` for keeping both"
            )

    # ------------------------------------------------------------------ abort

    def abort(self) -> None:
        """Discard the session: release the lock, remove staging and the working folder."""
        if self._state is SessionState.CLOSED:
            raise SessionError("cannot abort: this session is already closed")
        if self._state is SessionState.IDLE or self.record is None:
            raise SessionError("cannot abort: no session is open (call open() first)")
        record = self.record
        keys = StageKeys(record.projekt_id, record.stage)
        self._uninstall_crash_handler()
        self._stop_streaming()
        self._stop_heartbeat()
        try:
            staged = [o.key for o in self.store.list(keys.staging_prefix(record.session_id))]
            if staged:
                self.store.delete_many(staged)
        except AgentError as exc:
            log.warning("abort_staging_left", session_id=record.session_id, error=str(exc))
        self._release_quietly()
        self.cache.keep_unsynced(record.work_path)
        shutil.rmtree(record.work_path, ignore_errors=True)
        self.records.remove(record.session_id)
        shutil.rmtree(self.config.paths.recovery_root / record.session_id, ignore_errors=True)
        self._set_state(SessionState.CLOSED)
        self._close_store()
        log.info("session_aborted", session_id=record.session_id)

    # ---------------------------------------------------------------- helpers

    def detach(self) -> None:
        """Stop streaming and the heartbeat, persist the lock's ETag: another process goes on."""
        self._stop_streaming()
        self._stop_heartbeat()
        if self.record is not None and self._lock is not None:
            self.record = self.records.save(
                self.record.model_copy(update={"lock_etag": self._lock.etag})
            )
        self._close_store()

    def _journal_path(self, session_id: str) -> Path:
        return self.records.folder(session_id) / "journal.sqlite"

    @property
    def is_closed(self) -> bool:
        """True once the session reached CLOSED."""
        return self._state is SessionState.CLOSED

    def start_streaming(self, *, watch: bool = True) -> None:
        """Start (or continue) watching the folder and streaming changes to staging."""
        self._require(
            SessionState.ACTIVE, SessionState.DOWNLOADING, SessionState.RESTORING, action="stream"
        )
        streamer = self._ensure_streamer(watch=watch)
        if watch and not streamer.is_watching:
            streamer.start_watching()
        if self._heartbeat is None:
            self._start_heartbeat()

    def _ensure_streamer(self, *, watch: bool) -> Streamer:
        if self._streamer is None:
            assert self.record is not None and self._journal is not None
            keys = StageKeys(self.record.projekt_id, self.record.stage)
            base = self._base_manifest
            if base is None:
                base = Manifest(
                    files={
                        rel: ManifestEntry(size=e.size, sha256=e.sha256, etag="")
                        for rel, e in self._base_files.items()
                    }
                )
            self._streamer = Streamer(
                root=self.record.work_path,
                keys=keys,
                session_id=self.record.session_id,
                store=self.store,
                journal=self._journal,
                config=self.config,
                base=base,
                known=self._base_files,
                on_error=self._note_error,
            )
            self._streamer.start(watch=watch)
        return self._streamer

    def _stop_streaming(self) -> None:
        if self._streamer is not None:
            self._streamer.stop()
            self._streamer = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every change seen so far is in staging (True) or ``timeout`` passed."""
        self._require(SessionState.ACTIVE, action="flush")
        return self._ensure_streamer(watch=False).flush(timeout)

    def status(self) -> dict[str, object]:
        """What ``agent status`` shows: state, lock, pending changes, last upload, errors."""
        record = self.record
        out: dict[str, object] = {"state": str(self._state)}
        if record is not None:
            out.update(
                session_id=record.session_id,
                projekt_id=record.projekt_id,
                stage=record.stage,
                user=record.user,
                path=str(record.work_path),
                since=record.created_at.isoformat(),
            )
        if self._lock is not None:
            out["lock_etag"] = self._lock.etag
            out["heartbeat_age_seconds"] = (
                round(self._heartbeat.age(), 1) if self._heartbeat is not None else None
            )
        if self.lock_lost is not None:
            out["lock_lost"] = str(self.lock_lost)
        if self._streamer is not None:
            out.update(self._streamer.status())
        elif self._journal is not None:
            out["pending"] = self._journal.pending_count()
        if self.record is not None and self.record.last_error and "last_error" not in out:
            out["last_error"] = self.record.last_error
        return out

    def publish_agent(self, pid: int, address: str) -> None:
        """Record the background agent's pid and address in the session record."""
        assert self.record is not None
        self.record = self.records.save(
            self.record.model_copy(update={"agent_pid": pid, "agent_address": address})
        )

    def _start_heartbeat(self) -> None:
        assert self._lock is not None
        self._heartbeat = Heartbeat(
            self._lock, self.config.lock.heartbeat_interval, on_lost=self._on_lock_lost
        )
        self._heartbeat.start()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def _on_lock_lost(self, exc: LockLostError) -> None:
        """Heartbeat CAS refused: stop streaming, keep journal and staging, tell everyone."""
        log.error("lock_lost", error=str(exc))
        self.lock_lost = exc
        if self._streamer is not None:
            self._streamer.stop_watching()
            self._streamer.pause()
        self._note_error(str(exc))
        self.error.emit(str(exc))

    def _note_error(self, message: str) -> None:
        if (
            self.record is not None
            and (self.records.folder(self.record.session_id) / "session.json").exists()
        ):
            self.record = self.records.save(self.record.model_copy(update={"last_error": message}))

    def _release_quietly(self) -> None:
        if self._lock is None:
            return
        try:
            self._lock.release()
        except AgentError as exc:
            log.warning("lock_release_failed", error=str(exc))

    def _close_store(self) -> None:
        if self._owns_store and self._store is not None:
            self._store.close()
            self._store = None

    # --------------------------------------------------------------- recovery

    def install_crash_handler(self) -> None:
        """Save what can be saved on SIGTERM/SIGINT/SIGHUP/atexit (bounded in time)."""
        self._crash = CrashHandler(self.emergency_save, self.config.recovery.crash_timeout)
        self._crash.install()

    def _uninstall_crash_handler(self) -> None:
        if self._crash is not None:
            self._crash.uninstall()
            self._crash = None

    def emergency_save(self, reason: str) -> None:
        """The crash path: flush, back up pending files and journal, write info, release.

        ACTIVE -> RECOVERING -> CLOSED. The session record, journal and folder stay
        on disk for ``resume``.
        """
        if self._state is not SessionState.ACTIVE or self.record is None:
            return
        record = self.record
        budget = self.config.recovery.crash_timeout
        started = time.monotonic()
        self._set_state(SessionState.RECOVERING)
        if self._streamer is not None:
            self._streamer.stop_watching()
            try:
                self._streamer.rescan("")
                self._streamer.flush(timeout=budget * 0.4)
            except AgentError as exc:
                log.warning("crash_flush_failed", error=str(exc))
        backup = self.config.paths.recovery_root / record.session_id
        pending = [e.path for e in self._journal.pending()] if self._journal else []
        copy_pending(record.work_path, backup, pending)
        if self._journal is not None:
            self._journal.backup(backup / "journal.sqlite")
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
        write_info(self.config.paths.recovery_root, info)
        self._stop_heartbeat()
        released = False
        if self._lock is not None and time.monotonic() - started < budget * 0.9:
            try:
                self._lock.release()
                released = True
            except AgentError as exc:
                log.warning("crash_release_failed", error=str(exc))
        write_info(
            self.config.paths.recovery_root, info.model_copy(update={"lock_released": released})
        )
        log.warning(
            "crash_saved",
            session_id=record.session_id,
            reason=reason,
            pending=len(pending),
            lock_released=released,
        )
        if self._streamer is not None:
            self._streamer.stop()
            self._streamer = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._set_state(SessionState.CLOSED)

    def check_previous_crash(self) -> RecoveryInfo | None:
        """An unfinished session on this machine whose process is gone, or ``None``.

        The result carries ``projekt_id``, ``user``, ``stage``, ``backup_path`` and
        the ``pending`` paths, for the host's resume / discard dialog.
        """
        orphans = self.find_orphans()
        return orphans[0] if orphans else None

    def find_orphans(self) -> list[RecoveryInfo]:
        """Every orphaned session on this machine (``agent recover`` lists them)."""

        def pending_of(record: SessionRecord) -> list[str]:
            path = self._journal_path(record.session_id)
            if not path.exists():
                return []
            try:
                journal = Journal.open(path)
            except AgentError as exc:
                log.warning("journal_unreadable", session_id=record.session_id, error=str(exc))
                return []
            try:
                return [e.path for e in journal.pending()]
            finally:
                journal.close()

        return find_orphans(self.records, self.config.paths.recovery_root, pending_of)

    def resume(
        self, session_id: str | None = None, *, take_over: bool = False, watch: bool = True
    ) -> Path:
        """Continue an orphaned session: re-lock, restore the folder, replay the journal.

        IDLE -> ACQUIRING -> RESTORING -> ACTIVE. A commit a crash interrupted is
        finished first; a file changed both here and in a commit by someone else
        is kept twice (theirs at its name, ours beside it).
        """
        if self._state is not SessionState.IDLE:
            raise SessionError(f"resume() needs a fresh session (this one is {self._state})")
        orphans = {o.session_id: o for o in self.find_orphans()}
        if session_id is None:
            if len(orphans) != 1:
                raise SessionError(
                    "no orphaned session to resume"
                    if not orphans
                    else f"{len(orphans)} orphaned sessions: name one ({', '.join(orphans)})"
                )
            session_id = next(iter(orphans))
        if session_id not in orphans:
            raise SessionError(
                f"session {session_id} is not orphaned (its agent is running, or it does not "
                "exist); `agent status` shows it"
            )
        info = orphans[session_id]
        record = self.records.load(session_id)
        if record.phase == "opening":
            raise SessionError(
                f"session {session_id} crashed while opening (nothing was edited yet): "
                "discard it with `agent recover --discard` and open again"
            )
        keys = StageKeys(record.projekt_id, record.stage)
        holder = Holder(
            user=record.user,
            machine=machine_name(),
            pid=os.getpid(),
            session_id=record.session_id,
            agent_version=__version__,
        )
        self.record = record
        self._set_state(SessionState.ACQUIRING)
        lock = RemoteLock(self.store, keys.lock, holder, self.config.lock)
        try:
            lock.acquire(take_over=take_over)
        except BaseException:
            self.record = None
            self._set_state(SessionState.CLOSED)
            raise
        self._lock = lock
        self._set_state(SessionState.RESTORING)
        try:
            self._restore(keys, record, info, lock)
        except BaseException as exc:
            log.error("resume_failed", session_id=session_id, error=str(exc))
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self._release_quietly()
            self._set_state(SessionState.CLOSED)
            raise
        self._start_heartbeat()
        if watch:
            self.start_streaming()
        else:
            self._ensure_streamer(watch=False)
        self._set_state(SessionState.ACTIVE)
        log.info("session_resumed", session_id=session_id, pending=len(info.pending))
        return self.record.work_path

    def _restore(
        self, keys: StageKeys, record: SessionRecord, info: RecoveryInfo, lock: RemoteLock
    ) -> None:
        """RESTORING: finish a cut commit, rebuild the folder, take in others' commits."""
        self.record = self.records.save(
            record.model_copy(
                update={
                    "pid": os.getpid(),
                    "agent_pid": None,
                    "agent_address": None,
                    "lock_etag": lock.etag,
                }
            )
        )
        self._journal = self._open_journal_for_resume(record.session_id)
        self._base_files = self.records.load_base(record.session_id)
        if self.record.phase == "committing":
            self._finish_interrupted_commit(keys)
        self._restore_folder(keys, info)
        self._merge_remote(keys)
        self.record = self.records.save(
            self.record.model_copy(update={"phase": "active", "lock_etag": lock.etag})
        )

    def _open_journal_for_resume(self, session_id: str) -> Journal:
        """Open the journal; a damaged one is set aside and rebuilt from the folder.

        Nothing is lost: the working folder is compared with the base snapshot by the
        first rescan, so every change is journalled again (and re-sent if needed).
        """
        path = self._journal_path(session_id)
        try:
            return Journal.open(path)
        except AgentError as exc:
            aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S}")
            for suffix in ("", "-wal", "-shm"):
                part = path.with_name(path.name + suffix)
                if part.exists():
                    os.replace(part, aside.with_name(aside.name + suffix))
            log.warning(
                "journal_rebuilt", session_id=session_id, damaged=str(aside), error=str(exc)
            )
            if self.record is not None and self.record.phase == "committing":
                self.record = self.records.save(self.record.model_copy(update={"phase": "active"}))
            return Journal.open(path)

    def _finish_interrupted_commit(self, keys: StageKeys) -> None:
        """Redo a commit a crash cut (idempotent), then carry on from the new manifest."""
        assert self.record is not None and self._journal is not None
        manifest, etag = self._read_manifest(keys)
        if manifest is not None and manifest.session_id == self.record.session_id:
            log.info("interrupted_commit_was_complete", session_id=self.record.session_id)
        else:
            base = self._load_base_manifest(keys)
            puts, deletes = self._staged_changes(base)
            self.record = self.records.save(self.record.model_copy(update={"phase": "active"}))
            etag, manifest = self._commit(keys, base, puts, deletes)
            log.info("interrupted_commit_finished", session_id=self.record.session_id)
        assert manifest is not None
        self._adopt_new_base(manifest, etag)
        self._journal.clear_staged()
        self._remove_staging(keys)

    def _adopt_new_base(self, manifest: Manifest, etag: str | None) -> None:
        """Make ``manifest`` the session's base (after our own or a merged commit)."""
        assert self.record is not None
        self._base_manifest = manifest
        self.record = self.records.save(self.record.model_copy(update={"base_manifest_etag": etag}))

    def _restore_folder(self, keys: StageKeys, info: RecoveryInfo) -> None:
        """Make sure the working folder has every file of the session."""
        assert self.record is not None and self._journal is not None
        work = self.record.work_path
        current, _etag = self._read_manifest(keys)
        base = current if current is not None else self._load_base_manifest_unchecked()
        staged = self._journal.staged()
        missing_base = [
            rel
            for rel in base.files
            if not work.joinpath(*rel.split("/")).exists() and rel not in staged
        ]
        if not work.is_dir() or missing_base:
            work.mkdir(parents=True, exist_ok=True)
            items = [
                Download(
                    key=keys.committed(rel),
                    dest=local_path_for(work, rel),
                    size=base.files[rel].size,
                    sha256=base.files[rel].sha256,
                )
                for rel in missing_base
                if not self._pending_delete(rel)
            ]
            items += [
                Download(
                    key=keys.staged(self.record.session_id, rel),
                    dest=local_path_for(work, rel),
                    size=st.size,
                    sha256=st.sha256,
                )
                for rel, st in staged.items()
                if st.op == "put" and not work.joinpath(*rel.split("/")).exists()
            ]
            progress = Progress(
                f"Restoring {len(items)} files", sum(i.size or 0 for i in items), self.progress.emit
            )
            transfers = Transfers(self.store, self.config.transfer.workers, folder=WorkFolder(work))
            digests = transfers.download(items, progress)
            for item, digest in zip(items, digests, strict=True):
                if item.key.startswith(keys.committed_prefix):
                    rel = keys.rel_from_committed(item.key)
                    st = item.dest.stat()
                    self._base_files[rel] = LocalEntry.from_stat(st, digest)
            self.records.save_base(self.record.session_id, self._base_files)
        backup = info.backup_path
        if backup is not None and (backup / "files").is_dir():
            for src in (backup / "files").rglob("*"):
                if not src.is_file():
                    continue
                rel = src.relative_to(backup / "files").as_posix()
                dest = local_path_for(work, rel)
                if not os.path.lexists(dest):  # a link there is never written through
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)
                    log.info("restored_from_backup", path=rel)

    def _pending_delete(self, rel: str) -> bool:
        assert self._journal is not None
        return any(e.path == rel and e.op == "delete" for e in self._journal.pending())

    def _merge_remote(self, keys: StageKeys) -> None:
        """Someone committed since our base: take their changes, keep both where we collide."""
        assert self.record is not None and self._journal is not None
        theirs, etag = self._read_manifest(keys)
        if etag == self.record.base_manifest_etag or theirs is None:
            return
        base = self._load_base_manifest_unchecked()
        work = self.record.work_path
        ours = set(self._journal.staged()) | {e.path for e in self._journal.pending()}
        for rel, st in scan(work, self.rules).items():
            known = self._base_files.get(rel)
            if not is_unchanged(known, st, partial(file_sha256, local_path_for(work, rel))):
                ours.add(rel)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
        conflicts: list[str] = []
        downloads: list[str] = []
        for rel, entry in theirs.files.items():
            if base.files.get(rel) == entry:
                continue
            if rel in ours:
                local = local_path_for(work, rel)
                if local.exists():
                    if file_sha256(local) == entry.sha256:
                        continue
                    p = Path(rel)
                    mine = p.with_name(
                        f"{p.stem}.conflict-{self.record.user}-{stamp}{p.suffix}"
                    ).as_posix()
                    os.replace(local, local_path_for(work, mine))
                    conflicts.append(rel)
                self._journal.forget(rel)
                self.store.delete(keys.staged(self.record.session_id, rel))
            downloads.append(rel)
        for rel in set(base.files) - set(theirs.files):
            if rel not in ours:
                WorkFolder(work).unlink(rel)
        items = [
            Download(
                key=keys.committed(rel),
                dest=local_path_for(work, rel),
                size=theirs.files[rel].size,
                sha256=theirs.files[rel].sha256,
            )
            for rel in downloads
        ]
        Transfers(self.store, self.config.transfer.workers, folder=WorkFolder(work)).download(items)
        for rel in downloads:
            got = local_path_for(work, rel).stat()
            self._base_files[rel] = LocalEntry.from_stat(got, theirs.files[rel].sha256)
        self.records.save_base(self.record.session_id, self._base_files)
        self._adopt_new_base(theirs, etag)
        self.record = self.records.save(
            self.record.model_copy(update={"conflicts": [*self.record.conflicts, *conflicts]})
        )
        log.warning(
            "merged_remote_commit",
            conflicts=conflicts,
            downloaded=len(downloads),
            committed_by=theirs.committed_by,
        )

    def _load_base_manifest_unchecked(self) -> Manifest:
        """The base manifest as the session started (from the snapshot; etags unknown)."""
        return Manifest(
            files={
                r: ManifestEntry(size=e.size, sha256=e.sha256, etag="")
                for r, e in self._base_files.items()
            }
        )

    def discard(self, session_id: str | None = None) -> None:
        """Throw an orphaned session away: staging, folder, backup, and the lock if ours."""
        if self._state is not SessionState.IDLE:
            raise SessionError(f"discard() needs a fresh session (this one is {self._state})")
        orphans = {o.session_id: o for o in self.find_orphans()}
        if session_id is None:
            if len(orphans) != 1:
                raise SessionError(
                    "no orphaned session to discard"
                    if not orphans
                    else f"{len(orphans)} orphaned sessions: name one ({', '.join(orphans)})"
                )
            session_id = next(iter(orphans))
        if session_id not in orphans:
            raise SessionError(f"session {session_id} is not orphaned; `agent status` shows it")
        record = self.records.load(session_id)
        keys = StageKeys(record.projekt_id, record.stage)
        self._remove_staging_of(keys, session_id)
        status = RemoteLock(
            self.store,
            keys.lock,
            Holder(
                user=record.user,
                machine=machine_name(),
                pid=os.getpid(),
                session_id=session_id,
                agent_version=__version__,
            ),
            self.config.lock,
        )
        current = status.read()
        if (
            current is not None
            and current.body.state == "held"
            and current.body.session_id == session_id
        ):
            status.adopt(current.etag)
            status.release()
        self.cache.keep_unsynced(record.work_path)
        shutil.rmtree(record.work_path, ignore_errors=True)
        shutil.rmtree(self.config.paths.recovery_root / session_id, ignore_errors=True)
        self.records.remove(session_id)
        self._set_state(SessionState.CLOSED)
        self._close_store()
        log.warning("session_discarded", session_id=session_id)

    def _remove_staging_of(self, keys: StageKeys, session_id: str) -> None:
        staged = [o.key for o in self.store.list(keys.staging_prefix(session_id))]
        if staged:
            self.store.delete_many(staged)
