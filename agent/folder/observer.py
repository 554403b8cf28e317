"""The observer of a watched folder: the only module that imports watchdog.

``Observing`` starts a watchdog observer on the folder for its ``Watcher``, hands it
every event, checks that the observer still runs (and restarts it), and switches the
whole folder to polling at once (``mode``, ``mode_reason``) when a folder cannot get its
watch, at any time (the system's watch limit or ``max_watches``, a permission, a folder
gone and back): every watch is added in one place, ``_GuardedInotify.add_callback``,
which tells it. The loss of events (inotify queue overflow, a dead emitter thread) is
reported to the watcher, which asks for a rescan.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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
from agent.log import get_logger

__all__ = ["FileSystemEvent", "Observing"]

log = get_logger(__name__)

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
_STOP_DEADLINE = 10.0


class _Handler(FileSystemEventHandler):
    def __init__(self, on_event: Callable[[FileSystemEvent], None]) -> None:
        self.on_event = on_event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.on_event(event)


class _LostEventsHook(logging.Handler):
    """watchdog reports a kernel queue overflow (and failed re-watches) only in its log."""

    def __init__(self, observing: Observing) -> None:
        super().__init__(level=logging.WARNING)
        self.observing = observing

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().lower()
        if message.startswith("unable to watch"):  # a new subfolder got no watch
            if os.fspath(self.observing.root) in record.getMessage():  # ours, not another's
                self.observing.polling_from_now(record.getMessage())
        elif "overflow" in message or record.levelno >= logging.ERROR:
            self.observing.on_lost(message)


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


class Observing:
    """The watchdog observer of one ``Watcher``: started, checked, restarted, or polling.

    ``on_event`` is called on the observer's thread for every event; ``on_lost(reason)``
    when watchdog says events were lost; ``rescan_all`` after a restart or the switch
    to polling (what the old observer may have missed); ``kick`` wakes the delivery
    thread, which calls ``poll_from_now`` once ``switch_to_polling`` is set and
    ``check`` now and then. ``stopping`` is the watcher's stop: set, nothing restarts.
    """

    def __init__(
        self,
        root: Path,
        config: WatchConfig,
        *,
        stopping: threading.Event,
        on_event: Callable[[FileSystemEvent], None],
        on_lost: Callable[[str], None],
        rescan_all: Callable[[], None],
        kick: Callable[[], None],
        rel: Callable[[bytes], str | None],
    ) -> None:
        self.root = root
        self.config = config
        self.on_lost = on_lost
        self._stopping = stopping
        self._on_event = on_event
        self._rescan_all = rescan_all
        self._kick = kick
        self._rel = rel
        self._observer: Any = None
        self._lock = threading.Lock()  # start/stop/restart of the observer
        self._hook: _LostEventsHook | None = None
        self._polling_reason: str | None = None  # why the folder is polled (set once)
        # How often events may have been lost (a queue overflow, a dead observer, a switch
        # to polling): while it stays put, the events alone tell what changed (``losses``).
        self.losses = 0
        self.switch_to_polling = threading.Event()

    def start(self) -> None:
        """Start the observer and listen to watchdog's log; raises ``LocalFileError``."""
        with self._lock:
            self._observer = self._start_observer()
        self._hook = _LostEventsHook(self)
        logging.getLogger("watchdog").addHandler(self._hook)
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
                _Handler(self._on_event),
                os.fspath(self.root),
                recursive=True,
                event_filter=_WANTED_EVENTS,
            )
            observer.start()
        except BaseException:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=_STOP_DEADLINE)
            raise
        return observer

    def stop(self) -> None:
        """Stop listening and stop the observer (its join bounded by 10 s); idempotent."""
        if self._hook is not None:
            logging.getLogger("watchdog").removeHandler(self._hook)
            self._hook = None
        with self._lock:
            observer, self._observer = self._observer, None
            if observer is not None:
                self._stop_observer(observer)

    @staticmethod
    def _stop_observer(observer: Any) -> None:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=_STOP_DEADLINE)
            if observer.is_alive():
                log.error("watch_observer_did_not_stop")

    def _watch_failed(self, raw: bytes, exc: OSError) -> None:
        """A folder could not get its watch (any thread, watchdog's locks held): poll.

        A folder that is gone by now needs no watch (made and removed at once); one
        that is there (or came back) would be seen only by the next rescan.
        """
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not Path(os.fsdecode(raw)).is_dir():
            return
        rel = self._rel(raw) or "."
        if exc.errno in (errno.ENOSPC, errno.EMFILE):
            self.polling_from_now(f"no watch could be added for {rel}: {exc.strerror}")
        else:
            self.polling_from_now(f"{rel} cannot be watched: {exc.strerror or exc}")

    def polling_from_now(self, why: str) -> None:
        """Ask the delivery thread to switch to polling (the first reason is kept)."""
        if self._polling_reason is not None:
            return
        self.losses += 1
        self._polling_reason = why
        log.warning("watch_failed_polling", path=str(self.root), reason=why)
        self.switch_to_polling.set()
        self._kick()

    def poll_from_now(self) -> None:
        """Replace the events observer with a polling one; rescan what it may have missed."""
        with self._lock:
            observer = self._observer
            if observer is None or self._stopping.is_set() or isinstance(observer, PollingObserver):
                return
            self._stop_observer(observer)
            try:
                self._observer = self._start_observer()
            except LocalFileError as exc:
                log.error("watch_restart_failed", path=str(self.root), error=str(exc))
                self._observer = _DeadObserver()
            else:
                log.info("watching", path=str(self.root), observer="PollingObserver")
        self._rescan_all()

    @property
    def mode(self) -> str:
        """How the folder is watched now: ``events`` (inotify, FSEvents, ReadDirectoryChanges),
        ``polling`` (the system's watch limit was reached), or ``stopped`` (the observer
        died and could not be restarted yet; the health check keeps trying)."""
        with self._lock:
            observer = self._observer
        if observer is None or isinstance(observer, _DeadObserver):
            return "stopped"
        return "polling" if isinstance(observer, PollingObserver) else "events"

    @property
    def mode_reason(self) -> str | None:
        """Why the folder is polled (``mode`` is ``polling``), else None."""
        return self._polling_reason if self.mode == "polling" else None

    def check(self) -> None:
        """Restart a dead observer (e.g. the root was deleted, or is back) and ask for a rescan."""
        with self._lock:
            observer = self._observer
            if observer is None or self._stopping.is_set():
                return
            emitters: Iterable[Any] = getattr(observer, "emitters", ())
            if observer.is_alive() and all(e.is_alive() for e in emitters):
                return
            dead_before = isinstance(observer, _DeadObserver)
            self.losses += 1
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
        self._rescan_all()


class _DeadObserver:
    """Stands in for an observer that could not be restarted, so the health check retries."""

    emitters: tuple[Any, ...] = ()

    def is_alive(self) -> bool:
        return False

    def stop(self) -> None:
        """Nothing runs."""

    def join(self, timeout: float | None = None) -> None:
        """Nothing runs."""
