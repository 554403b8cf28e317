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

What enters the journal is ``agent.folder.intake``; one row to ``.objects/`` is
``agent.folder.sender``; both are mixins of ``Streamer`` (they share its tables).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.folder import exiting
from agent.folder.entries import LocalEntry
from agent.folder.ignore import IgnoreRules
from agent.folder.intake import Intake, describe_unsupported, special_kind
from agent.folder.journal import Journal
from agent.folder.sender import ContentKeys, Sender, StoredFile
from agent.folder.transfer import Transfers
from agent.folder.watcher import Watcher
from agent.folder.workfolder import FolderIdentity, WorkFolder
from agent.log import get_logger
from agent.names import printable
from agent.platform import held_by_another_program
from agent.retry import backoff, delay_after, stop_retrying_on
from agent.store.base import ObjectStore

__all__ = [
    "ContentKeys",
    "Held",
    "StoredFile",
    "Streamer",
    "describe_unsupported",
    "special_kind",
]

log = get_logger(__name__)

_MAX_BACKOFF = 30.0
_MAX_WAIT_BACKOFF = 5.0
_FULL_PASS_INTERVAL = 1.0  # a full read of the pending rows at least this often
_LINKED_CHECK_INTERVAL = 1.0  # the names of files with several hard links: stat this often


@dataclass
class Held:
    """What the watcher reported while close committed: paths, and subtrees to rescan
    (``""`` is the whole folder)."""

    paths: set[str] = field(default_factory=set)
    subtrees: set[str] = field(default_factory=set)


class Streamer(Intake, Sender):
    """Keeps the content of every change in the store close behind the working folder."""

    def __init__(
        self,
        *,
        root: Path,
        keys: ContentKeys,
        session_id: str,
        store: ObjectStore,
        journal: Journal,
        config: AgentConfig,
        base: Mapping[str, StoredFile],
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
        self.base = base  # the committed files (the base manifest's): path -> what is stored
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
        # Set when the uploads are given up (``abandon``): a request in flight is not retried.
        self._give_up = threading.Event()
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
        exiting.track(self)
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

        ``wait=False`` (the crash path, which has seconds): give the uploads up
        (``abandon``); a hung request must not keep a terminating process alive.
        """
        if not wait:
            self.abandon()
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
        exiting.untrack(self)

    def abandon(self) -> None:
        """Give the uploads up, from any thread, at once (the process is ending).

        Uploads that have not started are cancelled; one in flight ends with its current
        request (it is not retried, and makes no other). Their rows stay pending in the
        journal: the next resume sends them. Nothing is waited for.
        """
        self._give_up.set()
        self._stop.set()
        self._wake.set()
        pool = self._pool
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        exiting.untrack(self)

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
        if self._paused or self._stop.is_set():
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
            with stop_retrying_on(self._give_up):
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
