"""The watcher: watchdog events, debounced per path, delivered in batches.

The only module that imports watchdog. ``Debouncer`` is the pure, clock-driven
core (unit-tested without sleeping); ``Watcher`` is the thin adapter around a
real observer.

A path is delivered when its file has been stable (same size and mtime) for
``debounce`` seconds and either no event came for ``debounce`` seconds or it
has been dirty for ``max_delay``; and never sooner than ``min_interval_per_path``
after its previous delivery (R2 takes about one write per second per key). A
missing file is delivered at once (the consumer turns it into a delete).
Directory events ask the consumer to rescan that subtree; a periodic
reconciliation asks for a rescan of everything.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.config import WatchConfig
from agent.ignore import IgnoreRules

__all__ = ["Debouncer", "StatFn", "Watcher"]

log = structlog.get_logger(__name__)

StatFn = Callable[[str], tuple[int, int] | None]
"""``rel_path -> (size, mtime_ns)``, or None when the file does not exist."""


@dataclass
class _Dirty:
    first_seen: float
    last_event: float
    last_stat: tuple[int, int] | None = None
    stat_since: float = 0.0
    checked: bool = False


class Debouncer:
    """Per-path quiet period, maximum delay, stability wait and spacing (pure)."""

    def __init__(self, debounce: float, max_delay: float, min_interval: float) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self.min_interval = min_interval
        self._dirty: dict[str, _Dirty] = {}
        self._delivered_at: dict[str, float] = {}

    def touch(self, path: str, now: float) -> None:
        """An event for ``path`` arrived at ``now``."""
        d = self._dirty.get(path)
        if d is None:
            self._dirty[path] = _Dirty(first_seen=now, last_event=now)
        else:
            d.last_event = now

    @property
    def dirty_count(self) -> int:
        """How many paths wait."""
        return len(self._dirty)

    def due(self, now: float, stat: StatFn, *, force: bool = False) -> set[str]:
        """The paths to deliver now (removed from the table). ``force`` skips quiet/spacing."""
        out: set[str] = set()
        for path, d in list(self._dirty.items()):
            current = stat(path)
            if not d.checked or current != d.last_stat:
                d.last_stat, d.stat_since, d.checked = current, now, True
                if current is not None and not force:
                    continue
            if current is not None and now - d.stat_since < self.debounce and not force:
                continue  # still being written
            quiet = now - d.last_event >= self.debounce
            overdue = now - d.first_seen >= self.max_delay
            if not force and not (quiet or overdue or current is None):
                continue
            last = self._delivered_at.get(path)
            if not force and last is not None and now - last < self.min_interval:
                continue
            out.add(path)
            del self._dirty[path]
            self._delivered_at[path] = now
        if len(self._delivered_at) > 100_000:
            horizon = now - self.min_interval
            self._delivered_at = {p: t for p, t in self._delivered_at.items() if t >= horizon}
        return out


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._on_event(event)


class Watcher:
    """A real watchdog observer on ``root`` feeding a ``Debouncer``."""

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
        self._debouncer = Debouncer(config.debounce, config.max_delay, config.min_interval_per_path)
        self._lock = threading.Lock()
        self._rescans: set[str] = set()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self._deliver_lock = threading.Lock()

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the observer and the delivery thread."""
        self._observer = Observer()
        self._observer.schedule(_Handler(self), str(self.root), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="pdagent-watch", daemon=True)
        self._thread.start()
        log.info("watching", path=str(self.root))

    def stop(self) -> None:
        """Stop both threads (bounded waits)."""
        self._stop.set()
        self._kick.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- events

    def _rel(self, raw: str | bytes) -> str | None:
        path = os.fsdecode(raw)
        try:
            rel = os.path.relpath(path, self.root)
        except ValueError:
            return None
        if rel == "." or rel.startswith(".."):
            return None
        return rel.replace(os.sep, "/")

    def _on_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path]
        if getattr(event, "dest_path", None):
            paths.append(event.dest_path)
        now = self._clock()
        with self._lock:
            for raw in paths:
                rel = self._rel(raw)
                if rel is None or self.rules.is_ignored(rel):
                    continue
                if event.is_directory:
                    if event.event_type != "modified":
                        self._rescans.add(rel)
                else:
                    self._debouncer.touch(rel, now)
        self._kick.set()

    def _stat(self, rel: str) -> tuple[int, int] | None:
        try:
            st = self.root.joinpath(*rel.split("/")).stat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns)

    # -------------------------------------------------------------- delivery

    def _tick(self) -> float:
        return max(0.01, min(self.config.debounce, self.config.min_interval_per_path) / 3)

    def _run(self) -> None:
        next_reconcile = self._clock() + self.config.rescan_interval
        while not self._stop.is_set():
            self._kick.wait(self._tick())
            self._kick.clear()
            try:
                self._deliver(force=False)
                if self._clock() >= next_reconcile:
                    next_reconcile = self._clock() + self.config.rescan_interval
                    if self._on_rescan is not None:
                        self._on_rescan("")
            except Exception:
                log.exception("watch_delivery_failed")

    def _deliver(self, *, force: bool) -> int:
        with self._deliver_lock:
            with self._lock:
                rescans, self._rescans = self._rescans, set()
                due = self._debouncer.due(self._clock(), self._stat, force=force)
            if self._on_rescan is not None:
                for subtree in sorted(rescans):
                    self._on_rescan(subtree)
            if due:
                self._on_dirty(due)
            return len(due) + len(rescans)

    def flush(self, timeout: float) -> bool:
        """Deliver everything waiting now; True when nothing is left."""
        deadline = self._clock() + timeout
        while True:
            self._deliver(force=True)
            with self._lock:
                left = self._debouncer.dirty_count + len(self._rescans)
            if not left or self._clock() >= deadline:
                return not left
            time.sleep(0.01)

    @property
    def pending(self) -> int:
        """Paths waiting for their quiet period."""
        with self._lock:
            return self._debouncer.dirty_count
