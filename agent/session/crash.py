"""The crash path: process-wide termination hooks, and the emergency save.

One ``CrashHooks`` per process (``crash_hooks``) serves every session in it; its wake-up
socket and the relay thread that reads it are ``crash_relay``'s.

* A session created on the main thread registers itself there: the hooks set
  their Python handler for SIGTERM/SIGINT/SIGHUP (SIGBREAK and the console
  handler on Windows), make a socket of ours the interpreter's wake-up fd, and
  register one ``atexit`` hook. ``open()``/``resume()`` may then run on any
  thread (``open(crash_hooks=False)`` opts out).
* A signal reaches us twice: Python's C handler writes its number to the wake-up
  socket at once, and the Python handler runs when the main thread next runs
  Python. A relay thread of ours reads the socket, so the emergency save starts
  even while a Qt application idles in C++; the Python handler (when it runs)
  waits for the same save, then *chains*: the host's previous handler is called,
  or its default action is done (the process ends by the signal, or
  ``KeyboardInterrupt`` for SIGINT); never a ``SystemExit`` from inside a slot.
  If the main thread does not run Python within ``_CHAIN_GRACE`` after the save
  and the previous action was the default one, the relay ends the process
  (exit 128 + signal): the save never holds the process longer than
  ``recovery.crash_timeout + _CHAIN_GRACE`` seconds.
* An event loop (``agent.qt``) can read the socket itself instead of the relay
  (``use_event_loop``): the save then runs on the GUI thread, and the default
  action becomes the event loop's ``quit``.
* When the last session closes, aborts, is saved or is collected, the previous
  handlers and wake-up fd are put back, from whichever thread that happens: off
  the main thread the main thread is asked (``_thread.interrupt_main``) to do it
  the next time it runs Python. A handler the host set after ours is left alone;
  if the host replaced every one of ours (SIGINT and SIGHUP ignored, its own
  SIGTERM handler), the request goes through the interpreter's queue of calls for
  the main thread instead (``Py_AddPendingCall``): no signal, no handler of the
  host's runs for it, and the relay thread ends all the same.

The host's say (issue 20):

* A signal ignored (SIG_IGN) when the hooks are installed (SIGHUP under ``nohup``)
  is not hooked: it stays ignored and never ends a session.
* A handler the host sets *after* ours is the one Python runs: the relay still saves
  (the wake-up fd is ours), then leaves the rest to that handler
  (``crash_signal_left_to_host``): never ``exit_now``, whatever the handler decides.
  A host handler that calls ours (the ``signal.signal`` return value) gets our chain.
* Only the signals we hooked act: a host's own SIGUSR1/SIGCHLD handler writes its
  byte to the same wake-up fd, and that byte is only forwarded.
* At interpreter exit the save runs before the thread pools stop (a hook of
  ``threading``'s, which runs before ``concurrent.futures`` shuts its pools down and
  before ``atexit``), so a session still ACTIVE is saved with its uploader and pools
  working and stopped in order; the ``atexit`` hook stays as the fallback.
"""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from agent.errors import AgentError
from agent.log import get_logger
from agent.platform import make_private_dirs
from agent.session.crash_hooks import CrashHooks, hooks
from agent.session.recovery import RecoveryInfo, copy_pending, local_changes, write_info
from agent.state import SessionState

if TYPE_CHECKING:
    from agent.session import PlantDesignSession

log = get_logger(__name__)

__all__ = [
    "CrashHooks",
    "emergency_save",
    "hooks",
    "host_handles",
    "install_crash_handler",
    "register",
    "unregister",
]


def register(s: PlantDesignSession) -> None:
    """Protect ``s`` (see the module's docstring)."""
    hooks().register(s)


def unregister(s: PlantDesignSession) -> None:
    """Stop protecting ``s``, from any thread."""
    hooks().unregister(s)


def host_handles(*names: str) -> None:
    """Signals (by name, e.g. ``"SIGINT"``) the host handles itself: chained, no save."""
    hooks().host_handles(*(int(getattr(signal, n)) for n in names if hasattr(signal, n)))


def install_crash_handler(s: PlantDesignSession) -> None:
    """Save ``s`` on SIGTERM/SIGINT/SIGHUP/atexit (``open`` already does this)."""
    register(s)


def _uninstall_crash_handler(s: PlantDesignSession) -> None:
    unregister(s)


def emergency_save(s: PlantDesignSession, reason: str) -> None:
    """The crash path: flush, back up every unsaved change and the journal, release.

    ACTIVE -> RECOVERING -> CLOSED. The session record, journal and folder stay
    on disk for ``resume``; ``<recovery>/<session>/files/`` holds a copy of every
    file changed since the session's base that the store has not committed.
    """
    if s._state is not SessionState.ACTIVE or s.record is None:
        return
    record = s.record
    budget = s.config.recovery.crash_timeout
    started = time.monotonic()
    s._set_state(SessionState.RECOVERING)
    if s._streamer is not None:
        s._streamer.stop_watching()
        try:
            s._streamer.rescan("")
            s._streamer.flush(timeout=budget * 0.4)
        except AgentError as exc:
            log.warning("crash_flush_failed", error=str(exc))
    backup = s.config.paths.recovery_root / record.session_id
    changes = local_changes(record.work_path, s._base_files, s._journal, s.rules)
    copy_pending(record.work_path, backup, sorted({*changes.pending, *changes.staged}))
    make_private_dirs(backup / "files")  # backup_path names it even when nothing was unsaved
    if s._journal is not None:
        s._journal.backup(backup / "journal.sqlite")
    info = RecoveryInfo(
        session_id=record.session_id,
        projekt_id=record.projekt_id,
        user=record.user,
        stage=record.stage,
        machine=record.machine,
        work_path=record.work_path,
        backup_path=backup / "files",
        base_manifest_etag=record.base_manifest_etag,
        pending=changes.pending,
        staged=changes.staged,
        deleted=changes.deleted,
        crashed_at=datetime.now(UTC),
        kind="handled",
        reason=reason,
    )
    write_info(s.config.paths.recovery_root, info)
    s._stop_heartbeat()
    released = False
    if s._lock is not None and time.monotonic() - started < budget * 0.9:
        try:
            s._lock.release()
            released = True
        except AgentError as exc:
            log.warning("crash_release_failed", error=str(exc))
    write_info(s.config.paths.recovery_root, info.model_copy(update={"lock_released": released}))
    log.warning(
        "crash_saved",
        session_id=record.session_id,
        reason=reason,
        pending=len(changes.pending),
        staged=len(changes.staged),
        lock_released=released,
    )
    if s._streamer is not None:
        s._streamer.stop(wait=False)
        s._streamer = None
    if s._journal is not None:
        s._journal.close()
        s._journal = None
    s._set_state(SessionState.CLOSED)
