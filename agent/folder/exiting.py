"""At interpreter exit: give up the uploads of every streamer still running.

``concurrent.futures`` runs the whole queue of every pool before the interpreter exits;
with an unreachable store each queued upload would first spend its retries (tens of
thousands of files: many minutes). ``abandon_all`` (a hook that runs before that) gives
them up instead (``Streamer.abandon``): uploads not started are cancelled, those in
flight end with their current request, and every row stays pending in the journal for
the next resume. Hooks run latest first, so a session's exit save
(``agent.session.crash_hooks``, registered later, at its first session) runs before it.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - its exit hook first: ours must run before it
import weakref
from typing import Protocol

from agent.platform import at_threads_exit

__all__ = ["abandon_all", "track", "untrack"]


class _Abandonable(Protocol):
    def abandon(self) -> None: ...


_LIVE: weakref.WeakSet[_Abandonable] = weakref.WeakSet()
"""The started streamers not stopped yet."""


def track(streamer: _Abandonable) -> None:
    """``streamer`` has started: give it up at exit unless it stops first."""
    _LIVE.add(streamer)


def untrack(streamer: _Abandonable) -> None:
    """``streamer`` has stopped (or was given up)."""
    _LIVE.discard(streamer)


def abandon_all() -> None:
    """Give up the uploads of every streamer still running."""
    for streamer in list(_LIVE):
        streamer.abandon()


at_threads_exit(abandon_all)
