"""The debounce table: which dirty paths, and which subtrees to rescan, are due.

``Debouncer`` is the pure, clock-driven core of the watcher (unit-tested without
sleeping); ``agent.folder.watcher.Watcher`` feeds it events and delivers what it says.

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

Rescans are debounced too (``Debouncer.request_rescan``): one rescan per subtree
once no event happened inside it for ``debounce`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Debouncer", "StatFn"]

StatFn = Callable[[str], tuple[int, int] | None]
"""``rel_path -> (size, mtime_ns)``, or None when the file does not exist."""


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
