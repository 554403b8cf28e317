"""The streamer: watch the working copy, journal every change, send its content.

::

    watcher --dirty paths--> journal (durable, coalesced) --pending rows--> uploader pool
                                                                     |
                                       content: {projekt}/.objects/{sha256} (sent once)

A path the watcher reports is journalled as a ``put`` if it is a file, as a
``delete`` if it is gone, before the watcher moves on. The uploader sends
pending rows with the transfer pool; a row is done only when the store
confirmed the object (its ETag is recorded in the journal's staged table). A
failed upload stays pending and is retried with backoff. ``known`` is what the
store holds for each path (the base copy updated by each confirmed upload),
used by reconciliation scans to find what the events missed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError, LocalFileError, WorkFolderReplacedError
from agent.folder.entries import LocalEntry, fd_sha256
from agent.folder.ignore import IgnoreRules
from agent.folder.journal import Change, Journal
from agent.folder.snapshot import FileStat, scan
from agent.folder.transfer import FileKeptChangingError, Transfers, Upload, Uploaded, same_stat
from agent.folder.watcher import Watcher
from agent.folder.workfolder import FolderIdentity, WorkFolder
from agent.log import get_logger
from agent.names import printable, unsupported_reason
from agent.platform import executable_bit, held_by_another_program
from agent.retry import backoff, delay_after
from agent.stage.keys import StageKeys
from agent.stage.manifest import Manifest
from agent.store.base import ObjectStore

__all__ = ["Held", "Streamer", "describe_unsupported", "special_kind"]

log = get_logger(__name__)

_MAX_BACKOFF = 30.0
_MAX_WAIT_BACKOFF = 5.0
_FULL_PASS_INTERVAL = 1.0  # a full read of the pending rows at least this often
_GROWING_TRIES = 2  # a file changing during this many upload tries is sent as a copy
_COPY_CHUNK = 1 << 20
_LINKED_CHECK_INTERVAL = 1.0  # the names of files with several hard links: stat this often


@dataclass
class Held:
    """What the watcher reported while close committed: paths, and subtrees to rescan
    (``""`` is the whole folder)."""

    paths: set[str] = field(default_factory=set)
    subtrees: set[str] = field(default_factory=set)


def special_kind(st: os.stat_result | FileStat) -> str:
    """What a folder entry that is neither a regular file nor a folder is, in words."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if getattr(st, "st_reparse_tag", 0):  # pragma: no cover - Windows
        return "junction or reparse point"
    return "not a regular file"


def describe_unsupported(unsupported: dict[str, str]) -> str:
    """Close's refusal: which local files the store cannot hold, and the two ways on."""
    shown = [f"{printable(rel)} ({why})" for rel, why in sorted(unsupported.items())[:10]]
    more = f" and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
    return (
        f"{len(unsupported)} local files have names the store cannot hold: "
        f"{'; '.join(shown)}{more}. Nothing was committed and the lock is kept. Rename them "
        "(no backslash, control character or invalid UTF-8), or close with --skip-unsupported "
        "(library: close(skip_unsupported=True)) to commit without them; they are then kept "
        "beside the working folder, never deleted."
    )


class Streamer:
    """Keeps the content of every change in the store close behind the working folder."""

    def __init__(
        self,
        *,
        root: Path,
        keys: StageKeys,
        session_id: str,
        store: ObjectStore,
        journal: Journal,
        config: AgentConfig,
        base: Manifest,
        known: dict[str, LocalEntry],
        on_error: Callable[[str], None] | None = None,
        identity: FolderIdentity | None = None,
    ) -> None:
        self.root = root
        self._folder = WorkFolder(root, identity)
        self.keys = keys
        self.session_id = session_id
        self.store = store
        self.journal = journal
        self.config = config
        self._backoff = backoff(config.retry, cap=_MAX_BACKOFF)
        # A file an editor holds is retried often enough to send it soon after it is freed.
        self._wait_backoff = backoff(config.retry, cap=_MAX_WAIT_BACKOFF)
        self.base = base
        self.rules = IgnoreRules((*config.watch.ignore, *config.watch.extra_ignore))
        self._known = dict(known)
        for rel, staged in journal.staged().items():
            if staged.op == "delete":
                self._known.pop(rel, None)
            elif staged.mtime_ns is not None:
                self._known[rel] = LocalEntry(staged.size, staged.mtime_ns, staged.sha256)
        self._known_lock = threading.Lock()
        self._unsupported: dict[str, str] = {}
        # Files with several names (hard links): inode -> the names met in the folder.
        # A write through one name makes an event for that name only (none at all when
        # written through a name outside the folder): the others are checked here.
        self._linked: dict[int, set[str]] = {}
        # Links and special files in the folder (never sent): path -> what it is.
        self._others: dict[str, str] = {}
        # Copies of files still being written, while they are sent (``_send_copy``).
        self._copies = config.paths.state_dir / "copies" / session_id
        self._on_error = on_error
        self._transfers = Transfers(store, config.transfer.workers, folder=self._folder)
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: dict[str, Future[bool]] = {}
        self._started: dict[str, float] = {}  # path -> when its request began (monotonic)
        self._failing_since: float | None = None  # first failure since the last success
        self._waiting: dict[str, str] = {}  # files a program holds: path -> why (status)
        # Guards _in_flight, _started, _retry_at and _waiting (pool threads and the loop).
        self._flight_lock = threading.Lock()
        self._wake = threading.Event()
        self._paused = False
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._retry_at: dict[str, float] = {}
        self._redo: set[str] = set()  # finished with newer work waiting: dispatch again
        self._seen_seq = 0  # the highest journal seq the dispatcher has read
        self._full_pass = True  # read every pending row at the next dispatch
        self._thread: threading.Thread | None = None
        self._watcher: Watcher | None = None
        # The watcher's ``losses`` when the folder was last known whole (a full rescan, or a
        # start on a folder just built) with the watcher running: while it holds, the
        # events alone tell what changed, and close needs no walk (``watch_trusted``).
        self._trusted_at: int | None = None
        # While close commits, what the watcher reports is held here, not journalled.
        self._hold: Held | None = None
        self.uploads = 0
        self.reused = 0
        """Files whose content the store held already: checked, nothing sent."""
        self._stored: dict[str, str] | None = None  # sha256 -> object ETag, built on first use
        self.last_upload_at: datetime | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self, *, watch: bool = True, reconcile: bool = True) -> None:
        """Start the uploader and (unless ``watch=False``) the watcher, then reconcile once
        (unless ``reconcile=False``: the caller knows the folder is what ``known`` says)."""
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.transfer.workers, thread_name_prefix="pdagent-up"
        )
        self._thread = threading.Thread(target=self._run, name="pdagent-uploader", daemon=True)
        self._thread.start()
        if watch:
            self.start_watching()
        if reconcile:
            self.rescan("")
        elif self._watcher is not None:  # the caller knows the folder: whole from here on
            self._trusted_at = self._watcher.losses

    @property
    def is_watching(self) -> bool:
        """True while the watcher runs."""
        return self._watcher is not None

    def start_watching(self) -> None:
        """Start the watcher (after ``start``, or again after ``stop_watching``)."""
        if self._watcher is None:
            self._watcher = Watcher(
                self.root, self.config.watch, self.on_dirty, on_rescan=self.rescan
            )
            self._watcher.start()

    def stop_watching(self) -> None:
        """Stop the watcher (the uploader keeps going until ``stop``)."""
        self._trusted_at = None
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def watch_trusted(self) -> bool:
        """True if the watcher has run in ``events`` mode, losing nothing, since the folder
        was last known whole: every change it has taken in is journalled or on its way."""
        watcher = self._watcher
        return (
            watcher is not None
            and self._trusted_at is not None
            and watcher.mode == "events"
            and watcher.losses == self._trusted_at
        )

    def caught_up(self, timeout: float) -> bool:
        """True if the watcher is trusted (``watch_trusted``) and has taken in every event of
        a change made before this call (``Watcher.barrier``): then the events alone tell
        what changed, and no walk of the folder is needed."""
        watcher = self._watcher
        return (
            self.watch_trusted()
            and watcher is not None
            and watcher.barrier(timeout)
            and self.watch_trusted()
        )

    def flush_watcher(self, timeout: float) -> bool:
        """Deliver what the watcher holds now (to the journal, or to the hold)."""
        return self._watcher is None or self._watcher.flush(timeout=timeout)

    def hold(self) -> None:
        """From now on what the watcher reports is held, not journalled nor sent (close's
        commit); ``held`` reads it, ``release`` journals it after a failed commit."""
        with self._known_lock:
            if self._hold is None:
                self._hold = Held()

    def held(self) -> Held | None:
        """What was reported since ``hold`` (a copy; the hold stays)."""
        with self._known_lock:
            h = self._hold
            return None if h is None else Held(set(h.paths), set(h.subtrees))

    def release(self) -> None:
        """End the hold and journal what it kept (the commit failed: the session goes on)."""
        with self._known_lock:
            h, self._hold = self._hold, None
        if h is None:
            return
        if "" in h.subtrees:
            self.rescan("")
            return
        for subtree in sorted(h.subtrees):
            self.rescan(subtree)
        if h.paths:
            self.on_dirty(h.paths)

    def _held_back(self, paths: Iterable[str] = (), subtree: str | None = None) -> bool:
        """Keep ``paths`` (or ``subtree``) in the hold if there is one; True if so."""
        with self._known_lock:
            if self._hold is None:
                return False
            self._hold.paths.update(paths)
            if subtree is not None:
                self._hold.subtrees.add(subtree)
            return True

    def pause(self) -> None:
        """Stop sending (the lock is lost); rows stay pending in the journal."""
        self._paused = True

    def stop(self, *, wait: bool = True) -> None:
        """Stop watcher and uploader; pending rows stay in the journal.

        ``wait=False`` (the crash path, which has seconds): do not wait for uploads
        in flight; a hung request must not keep a terminating process alive.
        """
        self.stop_watching()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30 if wait else 1)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
        if wait:  # a copy left by a crash in the middle of one goes with the next stop
            shutil.rmtree(self._copies, ignore_errors=True)

    # ---------------------------------------------------------------- intake

    def on_dirty(
        self,
        paths: set[str],
        scanned: Mapping[str, FileStat] | None = None,
        *,
        other_names: bool = True,
    ) -> None:
        """Journal each path as a put (a file) or a delete (gone); wake the uploader.

        A file whose stat tuple is the one of the content the store holds is skipped
        (``LocalEntry.matches``); any other file is journalled and the uploader hashes
        it, sending it only if the hash differs from what the store holds. Links and
        special files are never files here: one that replaced a tracked file is a delete.
        ``scanned``: stats a ``scan`` just took (its walk never follows a link), used
        as they are instead of a second ``lstat`` of each path. ``other_names``: a changed
        file with several names (hard links) has its other known names looked at too.
        """
        if not self._held_back(paths):
            self._intake(paths, scanned, other_names=other_names)

    def _intake(
        self, paths: set[str], scanned: Mapping[str, FileStat] | None, *, other_names: bool
    ) -> None:
        items: list[Change] = []
        linked: set[int] = set()
        for rel in sorted(paths):
            if self.rules.is_ignored(rel):
                continue
            if (reason := unsupported_reason(rel)) is not None:
                self._note_unsupported(rel, reason)
                continue
            st: os.stat_result | FileStat | None = scanned.get(rel) if scanned else None
            try:
                if st is None:
                    st = self._folder.path(rel).lstat()
            except WorkFolderReplacedError as exc:  # nothing there is the session's: no delete
                self._report(str(exc))
                return
            except LocalFileError as exc:  # a folder on the way is a link: not followed
                log.warning("not_synchronised", path=rel, reason=str(exc))
            except AgentError:
                log.warning("path_refused", path=rel)
                continue
            except OSError:
                pass
            self._note_other(rel, st)
            if st is not None and stat.S_ISREG(st.st_mode):
                if self._note_links(rel, st):
                    linked.add(st.st_ino)
                with self._known_lock:
                    known = self._known.get(rel)
                if known is not None and known.matches(st):
                    continue
                items.append((rel, "put", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            elif self._is_tracked(rel):
                items.append((rel, "delete", None, None, None, None))
        self._journal(items, linked if other_names else set(), paths)

    def _journal(self, items: list[Change], linked: set[int], paths: set[str]) -> None:
        """Record ``items``; then look at the other names of a changed file with several."""
        if not items:
            return
        self.journal.record_many(items)
        self._wake.set()
        others = self._names_of(linked, {item[0] for item in items}) - paths
        if others:
            self.on_dirty(others, other_names=False)  # at once: they get no event of their own

    def _note_other(self, rel: str, st: os.stat_result | FileStat | None) -> None:
        """Remember (and log once) a link or special file at ``rel``; forget it otherwise."""
        kind = None
        if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            kind = special_kind(st)
        with self._known_lock:
            before = self._others.pop(rel, None) if kind is None else self._others.get(rel)
            if kind is not None:
                self._others[rel] = kind
        if kind is not None and kind != before:
            committed = rel in self.base.files
            log.warning(
                "not_synchronised",
                path=printable(rel),
                reason=f"a {kind}: never followed nor sent"
                + ("; close deletes the committed file of that name" if committed else ""),
            )

    def not_synchronised(self) -> list[dict[str, object]]:
        """The links and special files in the folder: path, what it is, and whether close
        deletes the committed file of that name (the link replaced it)."""
        with self._known_lock:
            others = dict(self._others)
        return [
            {"path": printable(rel), "reason": kind, "deletes_committed": rel in self.base.files}
            for rel, kind in sorted(others.items())
        ]

    def others(self) -> dict[str, str]:
        """The links and special files in the folder: path -> what it is."""
        with self._known_lock:
            return dict(self._others)

    def _note_links(self, rel: str, st: os.stat_result | FileStat) -> bool:
        """Remember ``rel`` under its inode if the file has several names; True if so."""
        with self._known_lock:
            if st.st_nlink > 1:
                self._linked.setdefault(st.st_ino, set()).add(rel)
                return True
            names = self._linked.get(st.st_ino)
            if names is not None:
                names.discard(rel)
                if not names:
                    del self._linked[st.st_ino]
            return False

    def _names_of(self, inodes: set[int], among: set[str]) -> set[str]:
        """Every known name of the ``inodes`` that had a change among ``among``."""
        with self._known_lock:
            return {
                name
                for ino in inodes
                if among & (names := self._linked.get(ino, set()))
                for name in names
            }

    def check_linked(self) -> None:
        """Check every name of the files with several names against what the store holds.

        A write through a name outside the working folder makes no event inside it; this
        (every second, from the uploader loop) finds it. A stat per such name.
        """
        with self._known_lock:
            names = {name for names in self._linked.values() for name in names}
            known = {name: self._known.get(name) for name in names}
        dirty = set()
        for rel in names:
            try:
                st = self._folder.path(rel).lstat()
            except (OSError, AgentError):
                dirty.add(rel)  # gone (or now a link): on_dirty decides
                continue
            entry = known[rel]
            if entry is None or not entry.matches(st) or st.st_nlink < 2:
                dirty.add(rel)
        if dirty:
            self.on_dirty(dirty)

    def _is_tracked(self, rel: str) -> bool:
        with self._known_lock:
            if rel in self._known:
                return True
        return rel in self.base.files or self.journal.staged_entry(rel) is not None

    def rescan(self, subtree: str = "") -> None:
        """Compare a subtree with what the store holds; journal the differences."""
        if self._held_back(subtree=subtree):
            return
        watcher = self._watcher
        losses = watcher.losses if watcher is not None and not subtree else None
        others: list[str] = []
        current = scan(
            self.root, self.rules, subtree, others=others, identity=self._folder.identity
        )
        prefix = f"{subtree}/" if subtree else ""
        with self._known_lock:
            known = {
                k: v
                for k, v in self._known.items()
                if not prefix or k.startswith(prefix) or k == subtree
            }
        dirty = {
            rel for rel, st in current.items() if (k := known.get(rel)) is None or not k.matches(st)
        }
        dirty |= set(known) - set(current)
        with self._known_lock:
            dirty |= {r for r in self._unsupported if r.startswith(prefix) or r == subtree}
            dirty |= {r for r in others if self._others.get(r) is None}
            dirty |= {r for r in self._others if r.startswith(prefix) or r == subtree} - set(others)
        if dirty:
            log.info("rescan_found_changes", subtree=subtree, paths=len(dirty))
            self.on_dirty(dirty, current)
        if losses is not None:  # the whole folder compared while watched: trusted from here
            self._trusted_at = losses

    # -------------------------------------------------------------- uploader

    def _run(self) -> None:
        last_full = last_linked = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(timeout=self._next_wait())
            self._wake.clear()
            if self._stop.is_set():
                break
            now = time.monotonic()
            check_linked = now - last_linked >= _LINKED_CHECK_INTERVAL and not self._paused
            with self._flight_lock:
                full, self._full_pass = self._full_pass or not woken, False
                full = full or any(at <= now for at in self._retry_at.values())
            full = full or now - last_full >= _FULL_PASS_INTERVAL
            try:
                if check_linked and self._linked:
                    last_linked = now
                    self.check_linked()
                self._dispatch(full=full)
                if full:
                    last_full = now
            except Exception as exc:  # the loop outlives any one failure
                self._report(f"uploader: {exc}")
                log.exception("uploader_loop_failed")
                self._stop.wait(1.0)

    def _next_wait(self) -> float:
        with self._flight_lock:
            if not self._retry_at:
                return 1.0
            soonest = min(self._retry_at.values())
        return max(0.01, soonest - time.monotonic())

    def _dispatch(self, *, full: bool = True) -> None:
        """Submit pending rows that are not in flight nor waiting for a retry.

        ``full`` reads every pending row; otherwise only the rows recorded since the
        last read and the paths whose upload finished with newer work waiting: during
        a burst of 2,000 files a full read after each wake-up made dispatch quadratic.
        """
        if self._paused:
            return
        now = time.monotonic()
        with self._flight_lock:
            redo, self._redo = self._redo, set()
        if full:
            entries = self.journal.pending()
        else:
            entries = self.journal.pending_since(self._seen_seq)
            entries += self.journal.pending_for(sorted(redo))
        if entries:
            self._seen_seq = max(self._seen_seq, *(e.seq for e in entries))
        for entry in entries:
            with self._flight_lock:
                if entry.path in self._in_flight:
                    continue
                if self._retry_at.get(entry.path, 0.0) > now:  # under _flight_lock
                    continue
                assert self._pool is not None
                fut = self._pool.submit(
                    self._process, entry.path, entry.op, entry.seq, entry.attempts
                )
                self._in_flight[entry.path] = fut
            fut.add_done_callback(self._done_callback(entry.path))

    def _done_callback(self, path: str) -> Callable[[Future[bool]], None]:
        return lambda future: self._finished(path, future)

    def _finished(self, path: str, future: Future[bool]) -> None:
        # Look at this path again only when it still has work (a newer save came in
        # during the upload): re-reading the journal after every upload made bursts slow.
        again = future.cancelled() or future.exception() is not None or future.result()
        with self._flight_lock:
            self._in_flight.pop(path, None)
            if again:
                self._redo.add(path)
        if again:
            self._wake.set()
        with self._idle:
            self._idle.notify_all()

    def _process(self, rel: str, op: str, seq: int, attempts: int) -> bool:
        """Send one row; True if the path still has pending work afterwards.

        Whatever fails, of any type, is counted in the journal, backed off and shown;
        a file another program holds open waits (``status`` lists it) without an error.
        """
        with self._flight_lock:
            self._started[rel] = time.monotonic()
        try:
            done = self._put(rel, seq) if op == "put" else self._delete(rel, seq)
        except Exception as exc:  # noqa: BLE001 - the uploader must never die of one file
            self._failed(rel, seq, attempts, exc)
            return True
        finally:
            with self._flight_lock:
                self._started.pop(rel, None)
        with self._flight_lock:
            self._retry_at.pop(rel, None)
            was_waiting = self._waiting.pop(rel, None) is not None
            self._failing_since = None
        self.last_error = None  # the store answers again: the condition has cleared
        if was_waiting:
            log.info("file_readable_again", path=printable(rel))
        return not done

    def _failed(self, rel: str, seq: int, attempts: int, exc: Exception) -> None:
        """Back off one failed row; a held file waits quietly, anything else is reported."""
        held = held_by_another_program(exc)
        delay = delay_after(self._wait_backoff if held else self._backoff, attempts + 1)
        message = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
        with self._flight_lock:
            self._retry_at[rel] = time.monotonic() + delay
            first_wait = held and rel not in self._waiting
            if held:
                self._waiting[rel] = message
            elif self._failing_since is None:
                self._failing_since = self._started.get(rel, time.monotonic())
        self.journal.mark_failed(rel, seq, message)
        if held:
            if first_wait:
                log.info("file_held_waiting", path=printable(rel), reason=message)
            return
        self._report(f"{printable(rel)}: {message}")
        log.warning(
            "stream_failed",
            path=printable(rel),
            attempt=attempts + 1,
            error=message,
            retry_in=round(delay, 2),
        )

    def stalled_for(self) -> float:
        """Seconds without a good answer: since uploads began failing, or the oldest in flight."""
        with self._flight_lock:
            since = [*self._started.values()]
            if self._failing_since is not None:
                since.append(self._failing_since)
        return time.monotonic() - min(since) if since else 0.0

    def _held(self, rel: str) -> tuple[str, int, bool | None] | None:
        """``(sha256, size, executable)`` the store holds for ``rel`` (staged, else base)."""
        staged = self.journal.staged_entry(rel)
        if staged is not None:
            if staged.op != "put":
                return None
            return (staged.sha256, staged.size, staged.executable)
        base = self.base.files.get(rel)
        return (base.sha256, base.size, base.executable) if base is not None else None

    def _put(self, rel: str, seq: int) -> bool:
        """Send a put row; True if the row is finished (no newer save arrived meanwhile).

        The file is hashed first when the store already holds something of its size:
        equal content is not sent again (a ``touch``, a ``chmod``, a tool that rewrote
        the same bytes), other content always is, whatever its size and mtime say.
        """
        failed: LocalFileError | None = None
        try:
            with self._folder.open_file(rel) as (fd, opened):
                st = opened
                held = self._held(rel)
                known: tuple[os.stat_result, str] | None = None
                for _try in range(3):  # a file written while hashed is hashed again
                    if held is None or st.st_size != held[1]:
                        break
                    digest = fd_sha256(fd)
                    after = os.fstat(fd)
                    if not same_stat(st, after):
                        st = after
                        continue
                    known = (st, digest)
                    mode_kept = held[2] is None or executable_bit(st.st_mode) in (None, held[2])
                    if digest == held[0] and mode_kept:
                        finished = self.journal.mark_done(rel, seq, unchanged=True)
                        self._remember(rel, LocalEntry.from_stat(st, digest))
                        return finished
                    break
                # Sent from this descriptor: the file is opened (and its path checked) once,
                # to ``.objects/{sha256}``, and only if that content is not there yet.
                item = Upload(
                    rel=rel,
                    key=self.keys.objects_prefix,
                    src=self._folder.root.joinpath(*rel.split("/")),
                )
                try:
                    done = self._transfers.upload_one(
                        item,
                        None,
                        known=known,
                        fd=fd,
                        objects=self.keys.version,
                        stored=self._stored_etag,
                        tries=_GROWING_TRIES,
                    )
                except FileKeptChangingError:  # still being written: a copy of it as it is
                    done = self._send_copy(rel, fd)
                except LocalFileError as exc:  # a read error, not a link: reported below
                    failed = exc
        except FileNotFoundError:
            return self._gone(rel, seq)
        except WorkFolderReplacedError:
            raise  # the folder, not the file: retried (and shown) until it is back
        except LocalFileError as exc:  # now a link, special file or folder: never followed
            self._replaced(rel, exc)
            return self._gone(rel, seq)
        if failed is not None:
            if not isinstance(failed.__cause__, FileNotFoundError):
                raise failed
            return self._gone(rel, seq)  # renamed away meanwhile (rsync's temp file): no error
        return self._sent(rel, seq, done)

    def _send_copy(self, rel: str, fd: int) -> Uploaded:
        """Send a copy of a file a program is still writing (a log, a long export).

        The bytes it has now (its size when the copy starts: a prefix, for a file that
        grows) are read once from ``fd`` into a private file outside the working folder,
        which is hashed and sent: the store holds exactly those bytes under their hash.
        The row is then done with the copy's stat, which the file never matches: its next
        save or scan sends it again, superseding this copy, and close (which waits until
        the file stops changing) sends its final bytes. Never committed half-way.
        """
        folder = self._copies
        folder.mkdir(parents=True, exist_ok=True)
        copy_fd, name = tempfile.mkstemp(prefix="growing-", dir=folder)
        try:
            left = os.fstat(fd).st_size
            os.lseek(fd, 0, os.SEEK_SET)  # our own descriptor, opened for this upload
            while left > 0 and (chunk := os.read(fd, min(left, _COPY_CHUNK))):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(copy_fd, view) :]
                left -= len(chunk)
            item = Upload(rel=rel, key=self.keys.objects_prefix, src=Path(name))
            done = self._transfers.upload_one(
                item, None, fd=copy_fd, objects=self.keys.version, stored=self._stored_etag
            )
        finally:
            os.close(copy_fd)
            Path(name).unlink(missing_ok=True)
        log.info("streamed_copy_of_growing_file", path=printable(rel), bytes=done.size)
        return done

    def _replaced(self, rel: str, exc: LocalFileError) -> None:
        """A file to send is no longer a file: say what it is now, truthfully."""
        try:
            st = self._folder.path(rel).lstat()
        except (OSError, AgentError):
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            log.info("file_replaced_by_folder", path=printable(rel))
        elif st is not None and not stat.S_ISREG(st.st_mode):
            self._note_other(rel, st)
        else:  # a folder on the way is a link
            log.warning("not_synchronised", path=printable(rel), reason=str(exc))

    def _sent(self, rel: str, seq: int, done: Uploaded) -> bool:
        """The store holds ``done``: mark the row, remember it; True if the row is finished."""
        finished = self.journal.mark_done(
            rel,
            seq,
            etag=done.etag,
            size=done.size,
            sha256=done.sha256,
            mtime_ns=done.mtime_ns,
            executable=executable_bit(done.mode),
        )
        if finished:
            self._remember(rel, done.entry())
        with self._known_lock:
            if self._stored is not None:
                self._stored[done.sha256] = done.etag
        if done.sent:
            self.uploads += 1
        else:
            self.reused += 1
        self.last_upload_at = datetime.now(UTC)
        log.info(
            "streamed",
            path=rel,
            key=done.key,
            bytes=done.size if done.sent else 0,
            already_stored=not done.sent,
            session_id=self.session_id,
        )
        return finished

    def _stored_etag(self, sha256: str) -> str | None:
        """The ETag of ``.objects/{sha256}`` as the base manifest or this session knows it."""
        with self._known_lock:
            if self._stored is None:
                self._stored = {e.sha256: e.etag for e in self.base.files.values() if e.etag}
                for staged in self.journal.staged().values():
                    if staged.op == "put" and staged.etag:
                        self._stored[staged.sha256] = staged.etag
            return self._stored.get(sha256)

    def _gone(self, rel: str, seq: int) -> bool:
        """The file is not there (any more): a delete if the store has it, else nothing."""
        if self._is_tracked(rel):
            self.journal.record(rel, "delete")
            return False
        return self.journal.mark_done(rel, seq)

    def _delete(self, rel: str, seq: int) -> bool:
        """Apply a delete row; True if finished."""
        # The object a put sent stays: content is shared by every name and stage that
        # has it, and only the collection (``history prune``) removes unreferenced ones.
        finished = self.journal.mark_done(rel, seq, deleted=True)
        with self._known_lock:
            self._known.pop(rel, None)
        return finished

    def _note_unsupported(self, rel: str, reason: str) -> None:
        """A name the store cannot hold: remembered (for status and close) while it exists."""
        try:
            st = self.root.joinpath(*rel.split("/")).lstat()
        except OSError:
            st = None
        with self._known_lock:
            if st is None or stat.S_ISDIR(st.st_mode):
                self._unsupported.pop(rel, None)
                return
            is_new = rel not in self._unsupported
            self._unsupported[rel] = reason
        if is_new:
            log.warning("name_not_supported", path=printable(rel), reason=reason)

    def unsupported(self) -> dict[str, str]:
        """Local files whose names the store cannot hold (never sent, never deleted): reasons."""
        with self._known_lock:
            return dict(self._unsupported)

    def check_storable(self, *, skip: bool) -> dict[str, str]:
        """The unsupported names; unless ``skip``, any at all is a ``LocalFileError`` (close)."""
        unsupported = self.unsupported()
        if unsupported and not skip:
            raise LocalFileError(describe_unsupported(unsupported))
        return unsupported

    def _remember(self, rel: str, entry: LocalEntry) -> None:
        with self._known_lock:
            self._known[rel] = entry

    def _report(self, message: str) -> None:
        self.last_error = message
        if self._on_error is not None:
            self._on_error(message)

    # ----------------------------------------------------------------- flush

    def flush(self, timeout: float) -> bool:
        """Deliver what the watcher holds and wait until nothing is pending or in flight."""
        deadline = time.monotonic() + timeout
        if self._watcher is not None:
            self._watcher.flush(timeout=max(0.0, deadline - time.monotonic()))
        with self._flight_lock:
            self._retry_at.clear()
            self._full_pass = True
        self._wake.set()
        with self._idle:
            while True:
                with self._flight_lock:
                    busy = bool(self._in_flight)
                if not busy and self.journal.pending_count() == 0:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._idle.wait(timeout=min(remaining, 0.2))

    def known(self) -> dict[str, LocalEntry]:
        """What the store holds for each path, as far as this session knows."""
        with self._known_lock:
            return dict(self._known)

    def status(self) -> dict[str, Any]:
        """Counters for ``agent status``."""
        with self._flight_lock:
            in_flight = len(self._in_flight)
        return {
            "pending": self.journal.pending_count(),
            "in_flight": in_flight,
            "uploads": self.uploads,
            "already_stored": self.reused,
            "last_upload_at": self.last_upload_at.isoformat() if self.last_upload_at else None,
            "last_error": self.last_error,
            "watching": self._watcher is not None,
            "watch_mode": self._watcher.mode if self._watcher is not None else None,
            "watch_mode_reason": self._watcher.mode_reason if self._watcher is not None else None,
            "unsupported": sorted(printable(r) for r in self.unsupported()),
            "not_synchronised": self.not_synchronised(),
            "waiting": self.waiting(),
        }

    def waiting(self) -> list[str]:
        """Files another program holds (or that cannot be read now): retried until readable."""
        with self._flight_lock:
            return sorted(printable(r) for r in self._waiting)
