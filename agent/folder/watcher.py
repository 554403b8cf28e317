"""The watcher: watchdog events, debounced per path, delivered in batches.

The only module that imports watchdog. ``Debouncer`` is the pure, clock-driven
core (unit-tested without sleeping); ``Watcher`` is the thin adapter around a
real observer and one delivery thread.

When a dirty path is delivered (``Debouncer.due``):

* **quiet or overdue**: no event for it for ``debounce`` seconds, or it has been
  dirty for ``max_delay`` seconds (events that never stop, e.g. an editor
  touching a file it keeps open, do not hold it back forever);
* **and stable**: its ``(size, mtime_ns)``, or its absence, has been the same for
  at least ``debounce`` seconds; except a file still being written (a log, a
  long export) once it has been dirty for ``max_delay``: it is delivered as it
  is, so the store is never more than about ``max_delay`` behind it, and again
  after it stops changing (the consumer sends consistent copies; ``flush``
  still waits for it to stop). A missing file is stable too: it is delivered
  as missing and the consumer turns it into a delete. Because absence must
  always last ``debounce``, the moment between "rename the old file away" and
  "rename the new one in" of an editor's save is never delivered;
* **and spaced**: at least ``min_interval_per_path`` seconds after the same
  path's previous delivery (R2 takes about one write per second per key). It
  stays dirty meanwhile.

Paths due at the same tick are delivered together as one set, always from the
one delivery thread, never concurrently. Directory events (created, deleted,
moved: both sides), the loss of events (inotify queue overflow, a dead emitter
thread) and every ``rescan_interval`` ask the consumer to rescan a subtree
(``""`` is the whole root) instead: it compares the folder with what it knows.
Those rescans are debounced too (``Debouncer.request_rescan``): one rescan per
subtree once no event happened inside it for ``debounce`` seconds.

``flush`` is close's "now, please": see its docstring.

A folder that cannot get its watch, at any time (the system's watch limit or
``max_watches``, a permission, a folder gone and back), switches the whole folder
to polling at once (``mode``, ``mode_reason``): every watch is added in one place,
``_GuardedInotify.add_callback``, which tells the watcher.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import wait_exponential
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

try:  # Linux: every watch of a folder goes through one call of ours (see _GuardedInotify)
    from watchdog.observers.inotify import InotifyObserver
    from watchdog.observers.inotify_c import InotifyFD
except (ImportError, OSError):  # pragma: no cover - no inotify on this platform
    InotifyObserver = None  # type: ignore[assignment,misc]
    InotifyFD = None  # type: ignore[assignment,misc]

from agent.config import WatchConfig
from agent.errors import LocalFileError
from agent.folder.ignore import IgnoreRules, temp_name_for
from agent.log import get_logger
from agent.retry import delay_after

__all__ = ["Debouncer", "StatFn", "Watcher"]

log = get_logger(__name__)

StatFn = Callable[[str], tuple[int, int] | None]
"""``rel_path -> (size, mtime_ns)``, or None when the file does not exist."""

# The only events delivered (watchdog turns the list into the inotify mask, and the
# polling observer filters by it). Opens and closes without a write are not wanted:
# every read of a file (our own hashing and uploads included) made two events that
# watchdog parsed only for us to drop; streaming a 2,000-file folder spent most of
# its watcher time on them.
_WANTED_EVENTS = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    DirModifiedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileClosedEvent,
]
_HEALTH_INTERVAL = 2.0  # how often the delivery thread checks that the observer still runs
# Waits when the consumer's callback keeps failing: 0.2 s doubling, at most 5 s.
_DELIVERY_BACKOFF = wait_exponential(multiplier=0.2, max=5.0)
_STOP_DEADLINE = 10.0
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_RESCAN_MAX_DELAY_FACTOR = 10  # a busy subtree is rescanned after max_delay * 10 at the latest


@dataclass
class _Dirty:
    first_seen: float
    last_event: float
    needs_stat: bool = True
    observed: bool = False
    last_stat: tuple[int, int] | None = None
    stat_since: float = 0.0
    observed_since: float = 0.0  # the first stat


def _inside(subtree: str, other: str) -> bool:
    """True if ``subtree`` lies strictly inside ``other`` ("" is the root)."""
    return subtree != other and (not other or subtree.startswith(other + "/"))


@dataclass
class _Rescan:
    first_seen: float
    last_event: float


class Debouncer:
    """Per-path quiet period, maximum delay, stability wait and spacing (pure, clock-injected).

    Not thread-safe: the ``Watcher`` calls it under its own lock. ``stat`` is only
    called for paths that had an event since their last check or that are
    otherwise ready, so a large dirty set waiting for its quiet period costs
    nothing per tick.
    """

    def __init__(self, debounce: float, max_delay: float, min_interval: float) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self.min_interval = min_interval
        self._dirty: dict[str, _Dirty] = {}
        self._delivered_at: dict[str, float] = {}
        self._next_prune = 0.0
        self._rescans: dict[str, _Rescan] = {}
        self.rescan_max_delay = max_delay * _RESCAN_MAX_DELAY_FACTOR

    def touch(self, path: str, now: float) -> None:
        """An event for ``path`` arrived at ``now``."""
        d = self._dirty.get(path)
        if d is None:
            self._dirty[path] = _Dirty(first_seen=now, last_event=now)
        else:
            d.last_event = max(d.last_event, now)
            d.needs_stat = True
        self._quieten(path, now)

    def request_rescan(self, subtree: str, now: float) -> None:
        """A directory event (or lost events) asks for a rescan of ``subtree`` ("" = all).

        The rescan is debounced like a path, but its quiet period restarts with every
        event anywhere inside the subtree: a ``cp -r`` or ``git clone`` is rescanned
        once, after it finished, instead of at its first folder event while its files
        are still being written (which sent many files twice; issue 8).
        """
        r = self._rescans.get(subtree)
        if r is None:
            self._rescans[subtree] = _Rescan(first_seen=now, last_event=now)
        else:
            r.last_event = max(r.last_event, now)
        self._quieten(subtree, now)

    def _quieten(self, path: str, now: float) -> None:
        for subtree, r in self._rescans.items():
            if not subtree or path == subtree or path.startswith(subtree + "/"):
                r.last_event = max(r.last_event, now)

    @property
    def rescan_count(self) -> int:
        """How many subtrees wait for a rescan."""
        return len(self._rescans)

    def due_rescans(self, now: float, *, force: bool = False) -> set[str]:
        """The subtrees to rescan at ``now`` (quiet for ``debounce``, or waiting too long).

        "Too long" is ``max_delay`` times 10: a subtree that never quietens is still
        rescanned now and then. ``force`` (flush) takes them all. A subtree inside
        another pending one (due or not) is covered by it and dropped: the parent's
        rescan, when due, walks it too.
        """
        due = {
            subtree
            for subtree, r in self._rescans.items()
            if force
            or now - r.last_event >= self.debounce
            or now - r.first_seen >= self.rescan_max_delay
        }
        covered = {s for s in self._rescans if any(_inside(s, o) for o in self._rescans)}
        for subtree in due | covered:
            del self._rescans[subtree]
        return due - covered

    @property
    def dirty_count(self) -> int:
        """How many paths wait."""
        return len(self._dirty)

    def is_dirty(self, path: str) -> bool:
        """True while ``path`` waits for delivery."""
        return path in self._dirty

    def _spaced(self, path: str, now: float) -> bool:
        last = self._delivered_at.get(path)
        return last is None or now - last >= self.min_interval

    def due(self, now: float, stat: StatFn, *, force: bool = False) -> set[str]:
        """The paths to deliver at ``now``; they leave the table.

        ``force`` (flush) skips the quiet period, ``max_delay`` and spacing, and
        shortens the stability wait to "unchanged since the previous check": a
        path is delivered on the second of two consecutive ``due`` calls that see
        the same stat, so a file that changes between two calls keeps waiting.
        """
        out: set[str] = set()
        for path, d in list(self._dirty.items()):
            overdue = now - d.first_seen >= self.max_delay
            ready = force or (
                (now - d.last_event >= self.debounce or overdue) and self._spaced(path, now)
            )
            if not ready and not d.needs_stat:
                continue
            current = stat(path)
            d.needs_stat = False
            if not d.observed:
                d.observed_since = now
            changed = not d.observed or current != d.last_stat
            if changed:
                d.observed, d.last_stat, d.stat_since = True, current, now
            # A file seen changing for at least ``debounce`` (still being written) is
            # delivered anyway once overdue; never a missing one (that may be the middle
            # of an editor's save), nor one stat'ed late and seen changing once (a burst).
            growing = (
                changed
                and not force
                and overdue
                and current is not None
                and now - d.observed_since >= self.debounce
            )
            if not ready or (changed and not growing):
                continue
            if not force and not growing and now - d.stat_since < self.debounce:
                continue
            out.add(path)
            del self._dirty[path]
            self._delivered_at[path] = now
        self._forget_old_deliveries(now)
        return out

    def _forget_old_deliveries(self, now: float) -> None:
        if now >= self._next_prune and len(self._delivered_at) > 4096:
            self._next_prune = now + self.min_interval
            horizon = now - self.min_interval
            self._delivered_at = {p: t for p, t in self._delivered_at.items() if t > horizon}


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._on_event(event)


class _LostEventsHook(logging.Handler):
    """watchdog reports a kernel queue overflow (and failed re-watches) only in its log."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__(level=logging.WARNING)
        self.watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().lower()
        if message.startswith("unable to watch"):  # a new subfolder got no watch
            if os.fspath(self.watcher.root) in record.getMessage():  # ours, not another's
                self.watcher._polling_from_now(record.getMessage())
        elif "overflow" in message or record.levelno >= logging.ERROR:
            self.watcher._request_rescan("", reason=message)


WatchFailed = Callable[[bytes, OSError], None]


def _guarded_observer(on_failed: WatchFailed, max_watches: int) -> Any:
    """An events observer whose every folder watch goes through ``_GuardedInotify``.

    Only inotify adds one watch per folder (FSEvents and ReadDirectoryChanges watch a
    tree at once): elsewhere this is the platform's observer as it is.
    """
    if InotifyObserver is None or Observer is not InotifyObserver:
        return Observer()
    observer = InotifyObserver()
    if not isinstance(getattr(observer, "_emitter_kwargs", None), dict):  # pragma: no cover
        return observer  # another watchdog: its log line is still caught (_LostEventsHook)
    fd = _GuardedInotify(on_failed, max_watches)
    fd.start()
    # watchdog allocates its reader at the first schedule unless one is there already.
    observer._inotify_fd = fd
    observer._emitter_kwargs["inotify_fd"] = fd
    return observer


if InotifyFD is not None:

    class _GuardedInotify(InotifyFD):
        """watchdog's inotify reader, with the one place a watch is added watched.

        watchdog logs a refused watch of a new subfolder and goes on without it (or,
        for a permission, says nothing): the folder's saves would then be seen only
        by the next rescan. Here any refusal is reported (``on_failed``), and
        ``max_watches`` (when not 0) refuses watches past it as the system's limit
        does.
        """

        def __init__(self, on_failed: WatchFailed, max_watches: int) -> None:
            super().__init__()
            self._on_failed = on_failed
            self._max_watches = max_watches

        def add_callback(self, path: bytes, mask: Any, callback: Any, id_: Any) -> Any:
            if self._max_watches and len(self._watch_for_wd) >= self._max_watches:
                refused = OSError(errno.ENOSPC, "watch.max_watches reached")
                self._on_failed(path, refused)
                raise refused
            try:
                wd = super().add_callback(path, mask, callback, id_)
            except OSError as exc:
                self._on_failed(path, exc)
                raise
            if wd == -1:  # watchdog lets a permission refusal through silently
                self._on_failed(path, PermissionError(errno.EACCES, "permission denied"))
            return wd


class Watcher:
    """A real watchdog observer on ``root`` feeding a ``Debouncer``; one delivery thread.

    ``on_dirty(paths)`` and ``on_rescan(subtree)`` are called from that thread only.
    If either raises, the paths (or subtree) are kept and offered again after a
    growing delay (up to 5 s), so a briefly locked journal loses nothing.
    """

    def __init__(
        self,
        root: Path,
        config: WatchConfig,
        on_dirty: Callable[[set[str]], None],
        *,
        on_rescan: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.config = config
        self.rules = IgnoreRules((*config.ignore, *config.extra_ignore))
        self._on_dirty = on_dirty
        self._on_rescan = on_rescan
        self._clock = clock
        self._root_prefix = os.fspath(root).rstrip("/\\") + os.sep
        self._debouncer = Debouncer(config.debounce, config.max_delay, config.min_interval_per_path)
        self._tick = min(max(config.debounce / 5, 0.01), 0.1)
        # _lock guards the debouncer and the sets below; _cond is signalled after each pass.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._retry_paths: set[str] = set()
        self._retry_rescans: set[str] = set()
        self._retry_at = 0.0
        self._failures = 0
        self._delivering = False
        self._flushers = 0
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._observer: Any = None
        self._observer_lock = threading.Lock()  # start/stop/restart of the observer
        self._hook: _LostEventsHook | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._polling_reason: str | None = None  # why the folder is polled (set once)
        # How often events may have been lost (a queue overflow, a dead observer, a switch
        # to polling): while it stays put, the events alone tell what changed (``losses``).
        self._losses = 0
        self._barriers: dict[str, threading.Event] = {}  # marker path -> set when seen
        self._switch_to_polling = threading.Event()

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the observer and the delivery thread.

        Raises ``LocalFileError`` if the folder cannot be watched (missing, or the
        inotify limits are exhausted and even polling fails).
        """
        if self._started:
            raise RuntimeError("a Watcher starts once; create a new one to watch again")
        self._started = True
        with self._observer_lock:
            self._observer = self._start_observer()
        self._hook = _LostEventsHook(self)
        logging.getLogger("watchdog").addHandler(self._hook)
        self._thread = threading.Thread(target=self._run, name="pdagent-watch", daemon=True)
        self._thread.start()
        log.info("watching", path=str(self.root), observer=type(self._observer).__name__)

    def _start_observer(self) -> Any:
        if self._polling_reason is None:
            try:
                observer = _guarded_observer(self._watch_failed, self.config.max_watches)
                return self._schedule(observer)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                    raise LocalFileError(f"cannot watch {self.root}: {exc}") from exc
                # inotify watch/instance limit: poll instead (slower, still correct).
                log.warning("watch_limit_reached_polling", path=str(self.root), error=str(exc))
                self._polling_reason = f"no watch could be added: {exc.strerror}"
        try:
            return self._schedule(PollingObserver(timeout=max(1.0, self.config.debounce)))
        except OSError as exc:
            raise LocalFileError(
                f"cannot watch {self.root}: {exc}. On Linux raise fs.inotify.max_user_watches "
                "(sysctl) and start the agent again"
            ) from exc

    def _schedule(self, observer: Any) -> Any:
        try:
            observer.schedule(
                _Handler(self), os.fspath(self.root), recursive=True, event_filter=_WANTED_EVENTS
            )
            observer.start()
        except BaseException:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=_STOP_DEADLINE)
            raise
        return observer

    def stop(self) -> None:
        """Stop the observer and the delivery thread (each join bounded by 10 s); idempotent.

        What is still dirty is not delivered: call ``flush`` first if it matters.
        """
        self._stop.set()
        self._kick.set()
        with self._cond:
            self._cond.notify_all()
        if self._hook is not None:
            logging.getLogger("watchdog").removeHandler(self._hook)
            self._hook = None
        with self._observer_lock:
            observer, self._observer = self._observer, None
            if observer is not None:
                self._stop_observer(observer)
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_STOP_DEADLINE)
            if thread.is_alive():
                log.error("watch_thread_did_not_stop", path=str(self.root))

    @staticmethod
    def _stop_observer(observer: Any) -> None:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=_STOP_DEADLINE)
            if observer.is_alive():
                log.error("watch_observer_did_not_stop")

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _watch_failed(self, raw: bytes, exc: OSError) -> None:
        """A folder could not get its watch (any thread, watchdog's locks held): poll.

        A folder that is gone by now needs no watch (made and removed at once); one
        that is there (or came back) would be seen only by the next rescan.
        """
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not Path(os.fsdecode(raw)).is_dir():
            return
        rel = self._rel(raw) or "."
        if exc.errno in (errno.ENOSPC, errno.EMFILE):
            self._polling_from_now(f"no watch could be added for {rel}: {exc.strerror}")
        else:
            self._polling_from_now(f"{rel} cannot be watched: {exc.strerror or exc}")

    def _polling_from_now(self, why: str) -> None:
        """Ask the delivery thread to switch to polling (the first reason is kept)."""
        if self._polling_reason is not None:
            return
        self._losses += 1
        self._polling_reason = why
        log.warning("watch_failed_polling", path=str(self.root), reason=why)
        self._switch_to_polling.set()
        self._kick.set()

    def _poll_from_now(self) -> None:
        """Replace the events observer with a polling one; rescan what it may have missed."""
        with self._observer_lock:
            observer = self._observer
            if observer is None or self._stop.is_set() or isinstance(observer, PollingObserver):
                return
            self._stop_observer(observer)
            try:
                self._observer = self._start_observer()
            except LocalFileError as exc:
                log.error("watch_restart_failed", path=str(self.root), error=str(exc))
                self._observer = _DeadObserver()
            else:
                log.info("watching", path=str(self.root), observer="PollingObserver")
        with self._lock:
            self._debouncer.request_rescan("", self._clock())

    # ---------------------------------------------------------------- events

    def _rel(self, raw: str | bytes) -> str | None:
        path = os.fsdecode(raw)
        if path.startswith(self._root_prefix):
            rel = path[len(self._root_prefix) :]
        else:
            try:
                rel = os.path.relpath(path, self.root)
            except ValueError:
                return None
            if rel == ".":
                rel = ""
        if rel.startswith(".."):
            return None
        return rel.replace(os.sep, "/").strip("/")

    def _on_event(self, event: FileSystemEvent) -> None:
        """Runs on the observer's thread: only bookkeeping, no I/O."""
        kind = event.event_type
        if event.is_directory and kind in ("modified", "attrib"):
            return
        raws = [event.src_path]
        if getattr(event, "dest_path", ""):
            raws.append(event.dest_path)
        if self._barriers and (seen := self._barriers.get(os.fsdecode(event.src_path))):
            seen.set()  # every event queued before the marker's has been taken in
            return
        now = self._clock()
        with self._lock:
            was_idle = not self._debouncer.dirty_count and not self._debouncer.rescan_count
            for raw in raws:
                rel = self._rel(raw)
                if rel is None or (rel and self.rules.is_ignored(rel)):
                    continue
                if event.is_directory:
                    self._debouncer.request_rescan(rel, now)  # "" when the root went away
                elif rel:
                    self._debouncer.touch(rel, now)
        if was_idle:
            self._kick.set()

    def barrier(self, timeout: float) -> bool:
        """True once every event of a change made before this call has been taken in.

        The kernel hands events over in order, but a moment late: a file saved just
        before close may not have reached the watcher yet. So a marker (one of our temp
        names, never sent) is made and removed in the root, and this waits for its event:
        every event queued before it has been taken in by then. False (the caller walks
        the folder instead) if the folder is not watched by events, the marker cannot
        be made, or its event does not come within ``timeout``.
        """
        if self.mode != "events":
            return False
        marker = temp_name_for(self.root / "watch-barrier")
        seen = threading.Event()
        self._barriers[os.fspath(marker)] = seen
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _O_NOFOLLOW, 0o600)
            os.close(fd)
            marker.unlink()
            return seen.wait(timeout)
        except OSError as exc:
            log.warning("watch_barrier_failed", path=str(self.root), error=str(exc))
            return False
        finally:
            del self._barriers[os.fspath(marker)]
            with contextlib.suppress(OSError):
                marker.unlink(missing_ok=True)  # made, but not removed: an error between

    def _request_rescan(self, subtree: str, *, reason: str) -> None:
        """Events were lost (watchdog said so): rescan ``subtree``."""
        self._losses += 1
        log.warning("watch_rescan_requested", path=str(self.root), subtree=subtree, reason=reason)
        with self._lock:
            self._debouncer.request_rescan(subtree, self._clock())
        self._kick.set()

    def _stat(self, rel: str) -> tuple[int, int] | None:
        try:
            st = self.root.joinpath(*rel.split("/")).lstat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns)

    # -------------------------------------------------------------- delivery

    def _idle_wait(self, now: float, next_reconcile: float, next_health: float) -> float:
        with self._lock:
            busy = self._debouncer.dirty_count or self._debouncer.rescan_count or self._flushers
            retrying = self._retry_paths or self._retry_rescans
        if busy:
            return self._tick
        wake = min(next_reconcile, next_health)
        if retrying:
            wake = min(wake, self._retry_at)
        return max(0.0, wake - now)

    def _run(self) -> None:
        now = self._clock()
        next_reconcile = now + self.config.rescan_interval
        next_health = now + _HEALTH_INTERVAL
        while not self._stop.is_set():
            self._kick.wait(self._idle_wait(self._clock(), next_reconcile, next_health))
            self._kick.clear()
            if self._stop.is_set():
                break
            now = self._clock()
            if now >= next_reconcile:
                next_reconcile = now + self.config.rescan_interval
                with self._lock:
                    self._debouncer.request_rescan("", now)
            if self._switch_to_polling.is_set():
                self._switch_to_polling.clear()
                self._poll_from_now()
            if now >= next_health:
                next_health = now + _HEALTH_INTERVAL
                self._check_observer()
            self._deliver()

    def _deliver(self) -> None:
        """One pass: take what is due (and due retries), hand it over, keep it on failure."""
        with self._lock:
            now = self._clock()
            force = self._flushers > 0
            paths = self._debouncer.due(now, self._stat, force=force)
            rescans = self._debouncer.due_rescans(now, force=force)
            if (self._retry_paths or self._retry_rescans) and now >= self._retry_at:
                paths |= self._retry_paths
                rescans |= self._retry_rescans
                self._retry_paths, self._retry_rescans = set(), set()
            self._delivering = bool(paths or rescans)
        try:
            if rescans and self._on_rescan is not None:
                # "" covers everything: one rescan of the root instead of many.
                for subtree in [""] if "" in rescans else sorted(rescans):
                    self._on_rescan(subtree)
                    rescans.discard(subtree)
                rescans.clear()
            if paths:
                self._on_dirty(paths)
                paths = set()
            self._failures = 0
        except Exception:  # the consumer's error: keep the work, retry, never die
            self._failures += 1
            delay = delay_after(_DELIVERY_BACKOFF, self._failures)
            log.exception("watch_delivery_failed", retry_in=delay, paths=len(paths))
            with self._lock:
                self._retry_paths |= paths
                self._retry_rescans |= rescans
                self._retry_at = self._clock() + delay
        finally:
            with self._cond:
                self._delivering = False
                self._cond.notify_all()

    @property
    def mode(self) -> str:
        """How the folder is watched now: ``events`` (inotify, FSEvents, ReadDirectoryChanges),
        ``polling`` (the system's watch limit was reached), or ``stopped`` (the observer
        died and could not be restarted yet; the health check keeps trying)."""
        with self._observer_lock:
            observer = self._observer
        if observer is None or isinstance(observer, _DeadObserver):
            return "stopped"
        return "polling" if isinstance(observer, PollingObserver) else "events"

    @property
    def losses(self) -> int:
        """How many times events may have been lost so far (queue overflow, a dead observer,
        the switch to polling). A consumer that knew the folder whole when this read N, and
        reads N again in ``events`` mode, knows every change since from the events alone."""
        return self._losses

    @property
    def mode_reason(self) -> str | None:
        """Why the folder is polled (``mode`` is ``polling``), else None."""
        return self._polling_reason if self.mode == "polling" else None

    def _check_observer(self) -> None:
        """Restart a dead observer (e.g. the root was deleted, or is back) and ask for a rescan."""
        with self._observer_lock:
            observer = self._observer
            if observer is None or self._stop.is_set():
                return
            emitters: Iterable[Any] = getattr(observer, "emitters", ())
            if observer.is_alive() and all(e.is_alive() for e in emitters):
                return
            dead_before = isinstance(observer, _DeadObserver)
            self._losses += 1
            if not dead_before:
                log.error("watch_observer_died", path=str(self.root))
                self._stop_observer(observer)
            elif not self.root.is_dir():
                return  # still gone; check again later
            try:
                self._observer = self._start_observer()
            except LocalFileError as exc:
                if not dead_before:
                    log.error("watch_restart_failed", path=str(self.root), error=str(exc))
                self._observer = _DeadObserver()
                if dead_before:
                    return
            else:
                log.info("watch_restarted", path=str(self.root))
        with self._lock:
            self._debouncer.request_rescan("", self._clock())

    def flush(self, timeout: float) -> bool:
        """Deliver everything dirty now, without quiet periods; True once nothing is left.

        While a flush waits, the delivery thread ignores quiet periods, ``max_delay``
        and per-path spacing, and delivers a path as soon as two consecutive checks
        (one tick apart, about ``debounce / 5``) see the same size and mtime; a file
        still changing between checks is held until it stops. Pending rescans and
        failed deliveries are retried at once. Returns False if something is still
        dirty (or its delivery still failing) after ``timeout`` seconds; it stays
        dirty. On a watcher that was never started or is stopped, flush delivers
        from the calling thread.
        """
        deadline = time.monotonic() + timeout
        if self._thread is None:
            return self._flush_inline(deadline)
        with self._cond:
            self._flushers += 1
        self._kick.set()
        try:
            with self._cond:
                while True:
                    if self._nothing_left():
                        return True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stop.is_set():
                        return self._nothing_left()
                    self._cond.wait(min(remaining, self._tick * 2))
                    self._kick.set()
        finally:
            with self._cond:
                self._flushers -= 1

    def _flush_inline(self, deadline: float) -> bool:
        with self._lock:
            self._flushers += 1
        try:
            while True:
                self._deliver()
                with self._lock:
                    if self._nothing_left():
                        return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(self._tick)  # no delivery thread to wait for
        finally:
            with self._lock:
                self._flushers -= 1

    def _nothing_left(self) -> bool:
        """Call with ``_lock`` held."""
        return not (
            self._debouncer.dirty_count
            or self._debouncer.rescan_count
            or self._retry_paths
            or self._retry_rescans
            or self._delivering
        )

    @property
    def pending(self) -> int:
        """Paths waiting for delivery (dirty, or kept after a failed delivery)."""
        with self._lock:
            return self._debouncer.dirty_count + len(self._retry_paths)


class _DeadObserver:
    """Stands in for an observer that could not be restarted, so the health check retries."""

    emitters: tuple[Any, ...] = ()

    def is_alive(self) -> bool:
        return False

    def stop(self) -> None:
        """Nothing runs."""

    def join(self, timeout: float | None = None) -> None:
        """Nothing runs."""
