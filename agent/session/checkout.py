"""Opening a session: lock, roll forward what others left, download (the ``open`` verb)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, overload

from agent.errors import (
    InvalidNameError,
    LocalFileError,
    PreviousCrashError,
    SessionCancelledError,
    SessionError,
)
from agent.folder.entries import LocalEntry, StatLike, file_sha256, is_unchanged
from agent.folder.journal import Journal
from agent.folder.snapshot import scan_each
from agent.folder.transfer import Download, Transfers
from agent.folder.workfolder import WorkFolder, folder_identity
from agent.log import get_logger
from agent.names import case_collisions, unsupported_reason, validate_name
from agent.platform import folds_case, machine_name, paused_gc, release_free_memory
from agent.session.records import SessionRecord, new_session_id
from agent.stage.intent import read_manifest
from agent.stage.keys import StageKeys
from agent.stage.lock import RemoteLock
from agent.stage.manifest import Manifest, ManifestEntry
from agent.state import SessionState
from agent.store.parallel import Progress

log = get_logger(__name__)


if TYPE_CHECKING:
    from agent.session import PlantDesignSession


def open(
    s: PlantDesignSession,
    projekt_id: str,
    user: str,
    stage: str,
    *,
    take_over: bool = False,
    watch: bool = True,
) -> Path:
    """Take the stage lock, bring the working copy down, return its folder.

    With ``watch`` (the default) the folder is watched and every saved change
    streams to the session's staging prefix until ``close``/``abort``. An
    unfinished commit that someone left on the stage is finished first.
    """
    with s._verb("open"):
        if s._state is not SessionState.IDLE:
            raise SessionError(
                f"open() was already called on this session (it is {s._state}); "
                "close or abort it, or create a new PlantDesignSession"
            )
        keys = StageKeys(projekt_id, stage)
        validate_name("user", user)
        # One open per stage on this machine at a time: the record (phase
        # "opening") exists before the lock is written, so a crash in between
        # leaves something `agent recover` sees.
        with s.records.stage_lock(projekt_id, stage):
            _check_no_local_session(s, keys)
            return _open_locked(s, keys, user, take_over=take_over, watch=watch)


def _check_no_local_session(s: PlantDesignSession, keys: StageKeys) -> None:
    existing = s.records.find(keys.projekt_id, keys.stage)
    if existing:
        rec = existing[0]
        raise PreviousCrashError(
            f"a session on {keys.projekt_id}/{keys.stage} is already recorded on this "
            f"machine (session {rec.session_id}, user {rec.user}, "
            f"since {rec.created_at:%Y-%m-%d %H:%M} "
            "UTC): finish it with `agent close` or `agent abort`, or `agent recover` if it "
            "crashed"
        )
    work = s.config.paths.work_root / keys.projekt_id / keys.stage
    if work.exists() and any(work.iterdir()):
        raise SessionError(
            f"the working folder {work} already holds files but no session is recorded for "
            "it; it may hold unsaved work from a crash. Run `agent recover`, or move the "
            "folder away, then open again"
        )


def _open_locked(
    s: PlantDesignSession, keys: StageKeys, user: str, *, take_over: bool, watch: bool
) -> Path:
    work = s.config.paths.work_root / keys.projekt_id / keys.stage
    session_id = new_session_id()
    bound = log.bind(session_id=session_id, projekt_id=keys.projekt_id, stage=keys.stage, user=user)
    now = datetime.now(UTC)
    s.record = s.records.save(
        SessionRecord(
            session_id=session_id,
            projekt_id=keys.projekt_id,
            stage=keys.stage,
            user=user,
            machine=machine_name(),
            pid=os.getpid(),
            work_path=work,
            created_at=now,
            updated_at=now,
        )
    )
    s._set_state(SessionState.ACQUIRING)
    lock = RemoteLock(s.store, keys.lock, s._holder(s.record), s.config.lock)
    try:
        _check_cancel(s)
        lock.acquire(take_over=take_over)
    except BaseException as exc:
        s.records.remove(session_id)
        s._set_state(SessionState.CLOSED)
        _raise_cancelled_or(s, exc)
        raise
    s._lock = lock
    try:
        _check_cancel(s)  # cancelled while the lock was being taken: give it back
        s._set_state(SessionState.DOWNLOADING)
        s._update_record(lock_etag=lock.etag)
        # The manifest is read beside the check for an unfinished commit (one round
        # trip instead of two); it is read again only if a commit was finished here.
        with ThreadPoolExecutor(1, thread_name_prefix="pdagent-manifest") as ahead:
            manifest_read = ahead.submit(_read_manifest, s, keys)
            finished = s._committer(keys, reupload=False).settle()[1]
            base = manifest_read.result() if finished is None else None
        if finished is not None:
            bound.warning(
                "open_finished_unfinished_commit",
                of_session=finished.manifest.session_id,
                committed_by=finished.manifest.committed_by,
            )
        _check_cancel(s)
        base_etag, base_files = _download(s, keys, work, base)
        _check_cancel(s)
        with paused_gc():
            s.records.save_base(session_id, base_files)
        s._update_record(
            phase="active",
            base_manifest_etag=base_etag,
            lock_etag=lock.etag,
            work_identity=folder_identity(work),
        )
    except BaseException as exc:
        bound.error("open_failed", error=str(exc), cancelled=s._cancel.is_set())
        shutil.rmtree(work, ignore_errors=True)
        s.records.remove(session_id)
        s._release_quietly()
        s._set_state(SessionState.CLOSED)
        _raise_cancelled_or(s, exc)
        raise
    s._start_heartbeat()
    s._journal = Journal.open(s._journal_path(session_id))
    s._base_files = base_files
    if watch:
        # Nobody has the path yet: the folder is exactly base_files, no need to walk it.
        s._fresh_folder = True
        s.start_streaming()
    s._set_state(SessionState.ACTIVE)
    bound.info("session_opened", path=str(work), files=len(base_files))
    return work


def _read_manifest(s: PlantDesignSession, keys: StageKeys) -> tuple[Manifest | None, str | None]:
    """The stage's manifest and its ETag; the collector paused over its parse (an object
    per file), not over whatever runs beside it for longer (a roll-forward's copies)."""
    with paused_gc():
        return read_manifest(s.store, keys)


def _check_cancel(s: PlantDesignSession) -> None:
    if s._cancel.is_set():
        raise SessionCancelledError("cancelled")


def _raise_cancelled_or(s: PlantDesignSession, exc: BaseException) -> None:
    """After the clean-up: a cancelled open raises ``SessionCancelledError``."""
    if s._cancel.is_set() and not isinstance(exc, SessionCancelledError):
        raise SessionCancelledError(
            "the open was cancelled: nothing is left behind (the lock is released, the "
            "partial working folder and the session record are removed)"
        ) from exc
    if isinstance(exc, SessionCancelledError):
        raise SessionCancelledError(
            "the open was cancelled: nothing is left behind (the lock is released, the "
            "partial working folder and the session record are removed)"
        ) from None


def _download(
    s: PlantDesignSession,
    keys: StageKeys,
    work: Path,
    base: tuple[Manifest | None, str | None] | None = None,
) -> tuple[str | None, dict[str, LocalEntry]]:
    """Bring ``work`` to the committed stage; ``base``: the manifest read already."""
    manifest, etag = base if base is not None else _read_manifest(s, keys)
    release_free_memory()  # what the manifest's body and parse left (~30 MiB at 100,000 files)
    if manifest is None:
        # No manifest yet: a stage written by the old module, or a new one.
        sizes = {
            keys.rel_from_committed(o.key): o
            for o in s.store.list(keys.committed_prefix)
            if not o.key.endswith("/")  # a folder marker ("docs/") holds no file
        }
        expected: Mapping[str, tuple[int, str | None]] = {
            rel: (o.size, None) for rel, o in sizes.items()
        }
    else:
        # A view, not a copy: at 100,000 files a dict of tuples held 17 MiB more at the peak.
        expected = _Wanted(manifest.files)
    s._base_manifest = manifest
    folder = WorkFolder(work)
    folder.check_root()  # a linked work path would make downloads land outside (issue 8)
    with paused_gc():  # per-file work of this process alone (the transfers run the GC)
        folder.check_names(expected, key_of=keys.committed)  # refuse unusable names up front
        _refuse_case_clashes(keys, expected, work.parent)
        plan = _plan_folder(s, keys, work, expected)
    for rel in plan.remove:
        folder.unlink(rel)

    def item(rel: str) -> Download:
        size, sha = expected[rel]
        fallback = keys.version(sha) if sha else None
        # The names were checked above; the folders on the way are checked as the
        # download walks them (``Transfers``: O_NOFOLLOW opens, or ``folder.path``).
        return Download(keys.committed(rel), work.joinpath(*rel.split("/")), size, sha, fallback)

    # Made as the pool takes them: the first downloads start at once, not after every
    # file's item (0.1-0.7 s at 1,000 files on two busy cores, the stat calls waiting
    # for the GIL the running downloads hold).
    items = _Lazy(plan.download, item)
    total = sum(expected[rel][0] for rel in plan.download)
    progress = Progress(f"Downloading {len(items)} files", total, s.progress.emit, cancel=s._cancel)
    transfers = Transfers(s.store, s.config.transfer.workers, folder=folder)
    digests = transfers.download(items, progress)
    with paused_gc():
        files = _entries_after(folder, manifest, plan, digests)
    if manifest is None and expected:
        s._base_manifest = Manifest(
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


def _entries_after(
    folder: WorkFolder, manifest: Manifest | None, plan: OpenPlan, digests: Sequence[str]
) -> dict[str, LocalEntry]:
    """The entry of every file of the working copy once ``plan`` was carried out (the
    executable bits set as the manifest says)."""
    files: dict[str, LocalEntry] = {}
    entries = manifest.files if manifest else {}
    for rel in plan.keep:
        kept = plan.kept.pop(rel)
        wanted_x = (was := entries.get(rel)) is not None and was.executable
        if kept.executable is not None and kept.executable != wanted_x:
            kept = LocalEntry.from_stat(folder.set_executable(rel, wanted_x), kept.sha256)
        files[rel] = kept
    for rel, digest in zip(plan.download, digests, strict=True):
        # A download is a new file, not executable: open it again only to set the bit.
        wanted_x = (was := entries.get(rel)) is not None and was.executable
        st = folder.set_executable(rel, True) if wanted_x else folder.path(rel).stat()
        files[rel] = LocalEntry.from_stat(st, digest)
    return files


def _plan_folder(
    s: PlantDesignSession,
    keys: StageKeys,
    work: Path,
    expected: Mapping[str, tuple[int, str | None]],
) -> OpenPlan:
    """Put the cached copy (if any) at ``work`` and judge each of its files against
    ``expected``; what the store cannot hold is set aside. The cached snapshot is freed
    on return: the plan holds what is kept of it."""
    folder = WorkFolder(work)
    snapshot = s.cache.take(keys.projekt_id, keys.stage, work, set_aside=False, known=expected)
    release_free_memory()  # what the cached snapshot's parse left
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalFileError(f"cannot create the working folder {work}: {exc.strerror}") from exc
    others: list[str] = []
    unstorable: list[str] = []
    planner = OpenPlanner(expected, snapshot, hasher=lambda r: file_sha256(folder.path(r)))

    failed: list[Exception] = []

    def found(rel: str, st: os.stat_result) -> None:
        # Links, special files and unstorable names (a cache written before issue 8) are
        # set aside, never put in place nor deleted as "not in the manifest".
        if failed:
            return
        if rel not in expected and unsupported_reason(rel) is not None:
            unstorable.append(rel)
            return
        try:
            planner.see(rel, st)
        except Exception as exc:  # noqa: BLE001 - raised below, not read as an unreadable folder
            failed.append(exc)

    # Each file is judged as the walk meets it: no stat per file is held (at 100,000
    # files the whole scan was 19-26 MiB of the open's peak).
    scan_each(work, s.rules, found, others=others)
    if failed:  # a file that could not be hashed fails the open, as before the walk judged
        raise failed[0]
    s.cache.set_aside(work, others + unstorable)
    return planner.finish()


def _refuse_case_clashes(keys: StageKeys, rels: Iterable[str], parent: Path) -> None:
    """Keys differing only in case cannot both be files where the file system folds case.

    One would overwrite the other, and the next close would commit the loser's delete.
    """
    clashes = case_collisions(rels)
    if not clashes:
        return
    try:
        parent.mkdir(parents=True, exist_ok=True)
        folding = folds_case(parent)
    except OSError as exc:
        raise LocalFileError(f"cannot create the working folder {parent}: {exc}") from exc
    if folding:
        shown = "; ".join(" and ".join(keys.committed(rel) for rel in group) for group in clashes)
        raise InvalidNameError(
            f"the stage holds keys that differ only in case ({shown}); the file system of "
            f"{parent} treats them as one name, so one would overwrite the other. Rename or "
            "remove one of them in the bucket, or open the stage on a case-sensitive folder"
        )


@dataclass
class OpenPlan:
    """What ``open`` must do to make a local folder equal a manifest.

    ``kept`` holds the refreshed entry of each kept file (its current stat).
    """

    download: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    kept: dict[str, LocalEntry] = field(default_factory=dict)

    @property
    def is_noop(self) -> bool:
        """True when the local folder already equals the manifest."""
        return not self.download and not self.remove


def plan_open(
    manifest: Manifest | Mapping[str, tuple[int, str | None]],
    local: Mapping[str, LocalEntry],
    current: Mapping[str, StatLike],
    hasher: Callable[[str], str] | None = None,
) -> OpenPlan:
    """Compare a cached copy with the manifest (or ``path -> (size, sha256)``, ``None``
    for a sha256 not known: such a file is always downloaded); see ``OpenPlanner``.

    ``current`` is a fresh scan of the folder (``path -> stat``).
    """
    planner = OpenPlanner(manifest, local, hasher)
    for rel, st in current.items():
        planner.see(rel, st)
    return planner.finish()


class OpenPlanner:
    """Builds an ``OpenPlan`` from the folder's files one by one, as a walk meets them.

    ``local`` is the snapshot recorded when the copy was cached (with hashes). A file is
    kept only if it is unchanged since the snapshot (``is_unchanged``: the stat tuple,
    or, when only ctime/inode moved, ``hasher(path)``; without a hasher such a file is
    downloaded) and the snapshot's sha256 equals the manifest's; everything else in the
    manifest is downloaded, and local files the manifest does not name are removed.
    """

    def __init__(
        self,
        manifest: Manifest | Mapping[str, tuple[int, str | None]],
        local: Mapping[str, LocalEntry],
        hasher: Callable[[str], str] | None = None,
    ) -> None:
        self._wanted = _Wanted(manifest.files) if isinstance(manifest, Manifest) else manifest
        self._local = local
        self._hasher = hasher
        self._plan = OpenPlan()

    def see(self, rel: str, now: StatLike) -> None:
        """One file of the folder as it is now."""
        wanted = self._wanted.get(rel)
        if wanted is None:
            self._plan.remove.append(rel)
            return
        size, sha256 = wanted
        snap = self._local.get(rel)
        if snap is None or sha256 is None or snap.sha256 != sha256 or snap.size != size:
            return
        if snap.matches(now):
            # A cached copy put back untouched: the snapshot's own entry, no second one.
            self._plan.kept[rel] = snap
            return
        hasher = self._hasher
        if is_unchanged(snap, now, partial(hasher, rel) if hasher else str):
            self._plan.kept[rel] = LocalEntry.from_stat(now, snap.sha256)

    def finish(self) -> OpenPlan:
        """The plan, its lists in path order; every file not seen and kept is downloaded."""
        plan = self._plan
        kept = plan.kept
        plan.keep = sorted(kept)
        plan.download = sorted(rel for rel in self._wanted if rel not in kept)
        plan.remove.sort()
        return plan


class _Lazy(Sequence[Download]):
    """``[make(rel) for rel in rels]``, each made when it is read."""

    __slots__ = ("_make", "_rels")

    def __init__(self, rels: Sequence[str], make: Callable[[str], Download]) -> None:
        self._rels = rels
        self._make = make

    @overload
    def __getitem__(self, index: int) -> Download: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Download]: ...
    def __getitem__(self, index: int | slice) -> Download | Sequence[Download]:
        if isinstance(index, slice):
            return [self._make(rel) for rel in self._rels[index]]
        return self._make(self._rels[index])

    def __len__(self) -> int:
        return len(self._rels)


class _Wanted(Mapping[str, tuple[int, str | None]]):
    """``path -> (size, sha256)`` of a manifest's files, made per lookup (no copy held)."""

    __slots__ = ("_files",)

    def __init__(self, files: Mapping[str, ManifestEntry]) -> None:
        self._files = files

    def __getitem__(self, rel: str) -> tuple[int, str | None]:
        entry = self._files[rel]
        return entry.size, entry.sha256

    def __contains__(self, rel: object) -> bool:
        return rel in self._files

    def get(  # type: ignore[override]  # one lookup, not Mapping's try/except around two
        self, rel: str, default: None = None
    ) -> tuple[int, str | None] | None:
        entry = self._files.get(rel)
        return None if entry is None else (entry.size, entry.sha256)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
