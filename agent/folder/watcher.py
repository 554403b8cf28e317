"""The watcher: watchdog events, debounced per path, delivered in batches.

``Watcher`` is the thin adapter between a real observer (``agent.folder.observer``, the
only module that imports watchdog) and one delivery thread; ``Debouncer``
(``agent.folder.debounce``) is the pure, clock-driven core that says when a dirty
path is due (quiet or overdue, stable, spaced: see there).

Paths due at the same tick are delivered together as one set, always from the
one delivery thread, never concurrently. Directory events (created, deleted,
moved: both sides), the loss of events (inotify queue overflow, a dead emitter
thread) and every ``rescan_interval`` ask the consumer to rescan a subtree
(``""`` is the whole root) instead: it compares the folder with what it knows.
Those rescans are debounced too (``Debouncer.request_rescan``): one rescan per
subtree once no event happened inside it for ``debounce`` seconds.

``flush`` is close's "now, please": see its docstring.

A folder that cannot get its watch, at any time, switches the whole folder to
polling at once (``mode``, ``mode_reason``; see ``agent.folder.observer``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tenacity import wait_exponential

from agent.config import WatchConfig
from agent.folder.debounce import Debouncer, StatFn
from agent.folder.ignore import IgnoreRules, temp_name_for
from agent.folder.observer import FileSystemEvent, Observing
from agent.log import get_logger
from agent.retry import delay_after

__all__ = ["Debouncer", "StatFn", "Watcher"]

log = get_logger(__name__)

_HEALTH_INTERVAL = 2.0  # how often the delivery thread checks that the observer still runs
# Waits when the consumer's callback keeps failing: 0.2 s doubling, at most 5 s.
_DELIVERY_BACKOFF = wait_exponential(multiplier=0.2, max=5.0)
_STOP_DEADLINE = 10.0
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
        self._thread: threading.Thread | None = None
        self._started = False
        self._barriers: dict[str, threading.Event] = {}  # marker path -> set when seen
        self._observing = Observing(
            root,
            config,
            stopping=self._stop,
            # Looked up at each event, not bound once: ``_on_event`` stays replaceable.
            on_event=lambda event: self._on_event(event),  # noqa: PLW0108
            on_lost=lambda reason: self._request_rescan("", reason=reason),
            rescan_all=self._rescan_all,
            kick=self._kick.set,
            rel=self._rel,
        )

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the observer and the delivery thread.

        Raises ``LocalFileError`` if the folder cannot be watched (missing, or the
        inotify limits are exhausted and even polling fails).
        """
        if self._started:
            raise RuntimeError("a Watcher starts once; create a new one to watch again")
        self._started = True
        self._observing.start()
        self._thread = threading.Thread(target=self._run, name="pdagent-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the observer and the delivery thread (each join bounded by 10 s); idempotent.

        What is still dirty is not delivered: call ``flush`` first if it matters.
        """
        self._stop.set()
        self._kick.set()
        with self._cond:
            self._cond.notify_all()
        self._observing.stop()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_STOP_DEADLINE)
            if thread.is_alive():
                log.error("watch_thread_did_not_stop", path=str(self.root))

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

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
        self._observing.losses += 1
        log.warning("watch_rescan_requested", path=str(self.root), subtree=subtree, reason=reason)
        with self._lock:
            self._debouncer.request_rescan(subtree, self._clock())
        self._kick.set()

    def _rescan_all(self) -> None:
        """After a restart of the observer, or the switch to polling: rescan everything."""
        with self._lock:
            self._debouncer.request_rescan("", self._clock())

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
            if self._observing.switch_to_polling.is_set():
                self._observing.switch_to_polling.clear()
                self._observing.poll_from_now()
            if now >= next_health:
                next_health = now + _HEALTH_INTERVAL
                self._observing.check()
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
        return self._observing.mode

    @property
    def losses(self) -> int:
        """How many times events may have been lost so far (queue overflow, a dead observer,
        the switch to polling). A consumer that knew the folder whole when this read N, and
        reads N again in ``events`` mode, knows every change since from the events alone."""
        return self._observing.losses

    @property
    def mode_reason(self) -> str | None:
        """Why the folder is polled (``mode`` is ``polling``), else None."""
        return self._observing.mode_reason

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
