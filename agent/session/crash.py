"""The crash path: process-wide termination hooks, and the emergency save.

One ``CrashHooks`` per process serves every session in it.

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
  the next time it runs Python. A handler the host set after ours is left alone.

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

import atexit
import concurrent.futures.thread  # noqa: F401 - its exit hook first: ours must run before it
import contextlib
import signal
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING

from agent.errors import AgentError
from agent.log import get_logger
from agent.platform import (
    SignalHandler,
    at_threads_exit,
    current_handler,
    end_by_signal,
    exit_now,
    forward_wakeup,
    install_console_handler,
    is_default_action,
    is_ignored,
    make_private_dirs,
    on_main_thread,
    open_wakeup_channel,
    peek_wakeup,
    set_handler,
    set_termination_handlers,
    swap_wakeup_fd,
    wake_main_thread,
)
from agent.session.recovery import RecoveryInfo, copy_pending, local_changes, write_info
from agent.state import SessionState

if TYPE_CHECKING:
    import socket

    from agent.session import PlantDesignSession

log = get_logger(__name__)

# After the save, how long the relay waits for the main thread to run the handler chain
# before it does the default action itself (a Qt app idling in C++ never runs Python).
_CHAIN_GRACE = 2.0
_STOP = b"\x00"
# How long the main thread's handler waits for the relay to count a signal it read.
_REAL_WAIT = 0.5

__all__ = [
    "CrashHooks",
    "emergency_save",
    "hooks",
    "host_handles",
    "install_crash_handler",
    "register",
    "unregister",
]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal-{signum}"


class CrashHooks:
    """The process's termination hooks, shared by every live session."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._refs: dict[int, weakref.ref[PlantDesignSession]] = {}
        self._previous: dict[int, SignalHandler] | None = None  # set while installed
        self._handler: Callable[[int, FrameType | None], None] = self._on_signal
        self._prev_wakeup = -1
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._relay: threading.Thread | None = None
        self._relay_stop = threading.Event()
        self._stopped_relays: list[threading.Thread] = []
        self._remove_console: Callable[[], None] | None = None
        self._atexit = False
        self._save_thread: threading.Thread | None = None
        self._save_deadline = 0.0
        self._handled_at = -1e9
        self._restore_requested = False
        self._tokens = 0  # wake-up bytes of our own requests, for the relay to swallow
        self._wakes = 0  # handler calls of our own requests, for the main thread to swallow
        # Real signal bytes seen, per signal, not yet handled by our handler on the main thread.
        self._real_pending: dict[int, int] = {}
        # Bytes of signals our handler already handled while they were still unread in
        # the socket (an event loop reads after the handler ran): not counted when read.
        self._handled_unread: dict[int, int] = {}
        self._in_signal = False  # a signal is being handled: the handler restores at its end
        self._warned = False
        self._host_handles: set[int] = set()  # signals the host acts on itself (no save)
        # Set by an event loop that reads the wake-up socket itself (agent.qt).
        self._loop_reader: Callable[[int | None], None] | None = None
        self._terminator: Callable[[int], None] | None = None

    # -- who is protected ------------------------------------------------------------

    def live_sessions(self) -> list[PlantDesignSession]:
        """The registered sessions that still exist."""
        with self._lock:
            alive = [r() for r in self._refs.values()]
        return [s for s in alive if s is not None]

    @property
    def installed(self) -> bool:
        """True while our signal handlers are (or should be) in place."""
        return self._previous is not None

    def register(self, s: PlantDesignSession) -> None:
        """Protect ``s``: install the hooks if they are not (main thread needed for signals)."""
        with self._lock:
            if id(s) not in self._refs:
                self._refs[id(s)] = weakref.ref(s, partial(self._forget, id(s)))
            if not self._atexit:
                atexit.register(_at_exit)
                self._atexit = True
            _save_before_pools_stop()
            if self._previous is None:
                if on_main_thread():
                    self._install()
                elif not self._warned:
                    self._warned = True
                    log.warning(
                        "crash_signals_unavailable",
                        hint="create the PlantDesignSession on the main thread so that "
                        "SIGTERM/SIGINT/SIGHUP save the session; only the exit hook is set",
                    )
            elif self._restore_requested:
                self._restore_requested = False  # a new session came before the main thread

    def unregister(self, s: PlantDesignSession) -> None:
        """Stop protecting ``s``; put the previous hooks back if it was the last one."""
        with self._lock:
            self._refs.pop(id(s), None)
        self.release_if_unused()

    def _forget(self, key: int, _ref: object = None) -> None:
        with self._lock:
            self._refs.pop(key, None)
        self.release_if_unused()

    def release_if_unused(self) -> None:
        """No live session left: restore now (main thread) or ask the main thread to."""
        with self._lock:
            self._release_locked()
        self._join_stopped()

    def _release_locked(self) -> None:
        if self.live_sessions():
            return
        if self._atexit:
            atexit.unregister(_at_exit)
            self._atexit = False
        if self._previous is None:
            return
        if on_main_thread():
            self._uninstall()
            return
        if self._restore_requested or self._in_signal:
            return
        for signum in self._previous:
            if current_handler(signum) is self._handler:
                self._restore_requested = True
                self._tokens += 1
                self._wakes += 1
                if not wake_main_thread(signum):
                    self._tokens -= 1
                    self._wakes -= 1
                return
        log.info("crash_hooks_replaced_by_host")

    # -- installing ------------------------------------------------------------------

    def _install(self) -> None:
        """Main thread, under the lock: handlers, wake-up socket, relay (or event loop)."""
        self._reader, self._writer = open_wakeup_channel()
        self._previous = set_termination_handlers(self._handler)
        self._prev_wakeup = swap_wakeup_fd(self._writer.fileno())
        self._remove_console = install_console_handler(self._on_console)
        if self._loop_reader is not None:
            self._loop_reader(self._reader.fileno())
        else:
            self._start_relay()
        log.debug("crash_hooks_installed", signals=sorted(self._previous))

    def _uninstall(self) -> None:
        """Main thread, under the lock: put back what was there (unless the host replaced it)."""
        assert self._previous is not None and self._writer is not None
        for signum, previous in self._previous.items():
            if current_handler(signum) is self._handler:
                set_handler(signum, previous)
        now = swap_wakeup_fd(self._prev_wakeup)
        if now != self._writer.fileno():
            swap_wakeup_fd(now)  # the host set its own after ours: keep theirs
        self._forward_unread()
        if self._remove_console is not None:
            self._remove_console()
            self._remove_console = None
        self._previous = None
        self._restore_requested = False
        self._tokens = self._wakes = 0
        self._real_pending = {}
        self._handled_unread = {}
        if self._loop_reader is not None:
            self._loop_reader(None)
        self._stop_relay()
        self._reader.close() if self._reader is not None else None
        self._writer.close()
        self._reader = self._writer = None
        with contextlib.suppress(Exception):  # also at interpreter shutdown (a collected session)
            log.debug("crash_hooks_removed")

    def _forward_unread(self) -> None:
        """Under the lock, before our channel closes: signal bytes no one read yet (the
        event loop reads after the handler ran) go on to the host's wake-up fd."""
        reader = self._reader
        if reader is None:
            return
        reader.setblocking(False)
        try:
            while data := reader.recv(64):
                self._take(data, None)
        except OSError:
            pass  # nothing left (BlockingIOError), or closed
        finally:
            reader.setblocking(True)

    def _start_relay(self) -> None:
        assert self._reader is not None
        self._relay_stop = threading.Event()
        self._relay = threading.Thread(
            target=self._relay_loop,
            args=(self._reader, self._relay_stop),
            name="pdagent-crash-relay",
            daemon=True,
        )
        self._relay.start()

    def _stop_relay(self) -> None:
        """Under the lock: tell the relay to stop (joined later, outside the lock)."""
        relay, self._relay = self._relay, None
        self._relay_stop.set()
        if relay is None or self._writer is None:
            return
        with contextlib.suppress(OSError):
            self._writer.send(_STOP)
        self._stopped_relays.append(relay)

    def _join_stopped(self) -> None:
        """Outside the lock: wait for relays told to stop (they may wait for the lock)."""
        while self._stopped_relays:
            relay = self._stopped_relays.pop()
            if relay is not threading.current_thread():
                relay.join(timeout=5)

    def use_event_loop(
        self, reader: Callable[[int | None], None], terminator: Callable[[int], None]
    ) -> None:
        """An event loop reads the wake-up socket (``reader(fd)``; ``reader(None)``: stop).

        ``terminator(signum)`` replaces a default action (e.g. ``QApplication.quit``).
        Main thread only.
        """
        with self._lock:
            self._terminator = terminator
            self._loop_reader = reader
            if self._previous is not None and self._reader is not None:
                self._stop_relay()
                reader(self._reader.fileno())
        self._join_stopped()

    def leave_event_loop(self) -> None:
        """The event loop stops reading: the relay thread reads again. Main thread only."""
        with self._lock:
            reader, self._loop_reader, self._terminator = self._loop_reader, None, None
            if reader is not None:
                reader(None)
            if self._previous is not None and self._relay is None:
                self._start_relay()

    # -- a signal arrives ------------------------------------------------------------

    def _relay_loop(self, reader: socket.socket, stop: threading.Event) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data or stop.is_set():
                return
            signum = self._take(data, stop)
            if signum is not None:
                self._after_signal(signum, stop)

    def drain(self) -> None:
        """Read the wake-up socket without blocking (the event loop's notifier calls this).

        The Python handler itself runs on the main thread as soon as the slot runs Python.
        If the host set its own handler for the signal after ours, ours never runs: the
        save runs here (bounded), and the host's handler does what the host wants.
        """
        reader = self._reader
        if reader is None:
            return
        reader.setblocking(False)
        try:
            data = reader.recv(64)
        except (BlockingIOError, OSError):
            return
        finally:
            reader.setblocking(True)
        signum = self._take(data, None)
        if (
            signum is None
            or signum in self._host_handles
            or current_handler(signum) is self._handler
        ):
            return
        with self._lock:
            self._real_pending.pop(signum, None)  # handled here: no real signal for a wake
            self._in_signal = True  # a close meanwhile restores below, not by a wake
        try:
            self.run(_signal_name(signum))
        finally:
            self._in_signal = False
        with self._lock:
            if not self.live_sessions() and self._previous is not None:
                self._uninstall()
        self._join_stopped()

    def _take(self, data: bytes, stop: threading.Event | None) -> int | None:
        """Forward real signal bytes to the host's wake-up fd; the first real signal we
        hooked, or None."""
        real = bytearray()
        with self._lock:
            if (stop is not None and stop.is_set()) or self._previous is None:
                return None  # bytes of a channel being taken down: nothing to act on
            hooked = set(self._previous)
            for b in data:
                if b == 0:
                    continue
                if self._tokens > 0:
                    self._tokens -= 1  # our own request to the main thread, not a signal
                    continue
                real.append(b)
            fresh = bytearray()
            for b in real:
                if self._handled_unread.get(b, 0) > 0:
                    self._handled_unread[b] -= 1  # its handler ran already: only forwarded
                    continue
                fresh.append(b)
                self._real_pending[b] = self._real_pending.get(b, 0) + 1
        if not real:
            return None
        forward_wakeup(self._prev_wakeup, bytes(real))
        # Only the signals we hooked end a session: a host's own SIGUSR1 or SIGCHLD
        # handler writes its byte to the same wake-up fd (issue 20).
        return next((b for b in fresh if b in hooked), None)

    def reclaim_wakeup_fd(self) -> bool:
        """Main thread: if the host made another fd the wake-up fd after ours, make ours
        the wake-up fd again and chain to the host's (real signal bytes are forwarded to
        it, and it is put back when the hooks come down). True if it was replaced.

        The wake-up fd contract: while the hooks are installed the interpreter's wake-up
        fd is ours; a host that sets its own (``signal.set_wakeup_fd``) before or after
        the first session still gets every signal's byte, forwarded by us once we read
        it; ``agent.qt`` calls this every second and on every signal.
        """
        with self._lock:
            if self._previous is None or self._writer is None or not on_main_thread():
                return False
            ours = self._writer.fileno()
            now = swap_wakeup_fd(ours)
            if now == ours:
                return False
            self._prev_wakeup = now
        log.info("crash_hooks_wakeup_fd_chained", host_fd=now)
        return True

    def host_handles(self, *signums: int) -> None:
        """The host acts on these signals itself (e.g. Ctrl-C closes): no save, just chain."""
        self._host_handles.update(signums)

    def _after_signal(self, signum: int, stop: threading.Event) -> None:
        """On the relay: save now, then let the main thread chain, or do the default action."""
        if signum in self._host_handles:
            return
        seen = time.monotonic()
        self._in_signal = True
        self.run(_signal_name(signum))
        if current_handler(signum) is not self._handler:
            # The host set its own handler after ours: Python runs that one, and what
            # becomes of the process is the host's to decide (issue 20).
            self._in_signal = False
            log.info("crash_signal_left_to_host", signal=_signal_name(signum))
            return
        deadline = time.monotonic() + _CHAIN_GRACE
        while time.monotonic() < deadline:
            if self._handled_at >= seen - _CHAIN_GRACE:
                return
            time.sleep(0.02)
        previous = (self._previous or {}).get(signum, signal.SIG_DFL)
        self._in_signal = False
        if stop.is_set():
            return  # our hooks were taken down meanwhile: the handler in place acts
        if self._terminator is not None:
            self._terminator(signum)
        elif is_default_action(previous):
            log.warning("crash_hooks_ending_process", signal=_signal_name(signum))
            exit_now(128 + signum)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """The Python handler (main thread): save (bounded), then the host's own action."""
        # A wake-up fd the host set after ours got the signal's byte instead of us: then
        # only a request of our own (counted in _wakes) is not a real signal.
        replaced = self.reclaim_wakeup_fd()
        real = (
            (replaced and self._wakes == 0)
            or self._real_pending.get(signum, 0) > 0
            or self._unread_signal()
        )
        if not real and self._wakes == 0:
            # Neither our request nor a byte seen yet: the relay may hold it between its
            # read and its count. A stale request (hooks re-installed since) shows none.
            deadline = time.monotonic() + _REAL_WAIT
            while not real and time.monotonic() < deadline:
                time.sleep(0.01)
                real = self._real_pending.get(signum, 0) > 0
            if not real:
                log.info("crash_hooks_stale_wake_ignored", signal=_signal_name(signum))
                return
        with self._lock:
            real = real or self._real_pending.get(signum, 0) > 0
            ours = self._wakes > 0
            self._wakes = 0  # one call covers every request made before it
            self._consume(signum, real=real)
            if ours and not real:
                self._restore_requested = False
                # Our own request (off-main close): restore if nothing is left to protect.
                if self._previous is not None and not self.live_sessions():
                    self._uninstall()
        if ours and not real:
            self._join_stopped()
            return
        self._handled_at = time.monotonic()
        self._in_signal = True
        try:
            if signum not in self._host_handles:
                self.run(_signal_name(signum))
        finally:
            self._in_signal = False
        previous = (self._previous or {}).get(signum, signal.SIG_DFL)
        terminator = self._terminator
        with self._lock:
            if not self.live_sessions() and self._previous is not None:
                self._uninstall()
        self._join_stopped()
        if is_ignored(previous):
            return
        if not is_default_action(previous) and callable(previous):
            previous(signum, frame)
            return
        if terminator is not None:
            terminator(signum)
            return
        end_by_signal(signum, previous, frame)

    def _consume(self, signum: int, *, real: bool) -> None:
        """Under the lock, as our handler takes ``signum``: its count is used up, and
        (a real signal) so are its bytes still unread in the socket. Counted when read
        later, they made a stale count, and the next request of our own (a close
        restoring the handlers) was taken for that signal: the host's handler called
        again, or the application quit at the end of a normal close (issue 20)."""
        self._real_pending.pop(signum, None)
        if not real or self._reader is None:
            return
        waiting = [b for b in peek_wakeup(self._reader) if b != 0][self._tokens :]
        self._handled_unread[signum] = waiting.count(signum)

    def _unread_signal(self) -> bool:
        """True if a real signal's byte waits in the socket (the relay has not read it yet)."""
        if self._reader is None:
            return False
        return len([b for b in peek_wakeup(self._reader) if b != 0]) > self._tokens

    def _on_console(self, reason: str) -> None:
        self.run(reason)  # pragma: no cover - Windows console close / logoff / shutdown

    # -- the save --------------------------------------------------------------------

    def run(self, reason: str) -> bool:
        """Save every ACTIVE session within the bound; True if the save finished in time.

        Called again while a save runs, it waits for that save (within its bound).
        """
        with self._lock:
            if self._save_thread is None or not self._save_thread.is_alive():
                active = [s for s in self.live_sessions() if s.state is SessionState.ACTIVE]
                if not active:
                    return True
                budget = max(s.config.recovery.crash_timeout for s in active)
                self._save_deadline = time.monotonic() + budget
                self._save_thread = threading.Thread(
                    target=_save_all, args=(active, reason), name="pdagent-crash", daemon=True
                )
                self._save_thread.start()
            thread, deadline = self._save_thread, self._save_deadline
        thread.join(max(0.0, deadline - time.monotonic()))
        finished = not thread.is_alive()
        log.warning("crash_handler_ran", reason=reason, finished=finished)
        return finished


def _save_all(sessions: list[PlantDesignSession], reason: str) -> None:
    for s in sessions:
        try:
            s.emergency_save(reason)
        except Exception:
            log.exception("crash_save_failed", reason=reason)


_HOOKS = CrashHooks()


def hooks() -> CrashHooks:
    """The process's crash hooks."""
    return _HOOKS


def _at_exit() -> None:
    _HOOKS.run("atexit")


_threads_exit_hook = False


def _save_before_pools_stop() -> None:
    """Once per process: at interpreter exit, save before the thread pools stop.

    Python shuts every ``ThreadPoolExecutor`` down before it runs ``atexit`` hooks; a
    session still ACTIVE then could no longer send anything (and its uploader logged
    "cannot schedule new futures after interpreter shutdown" every second). The save
    runs first and stops the streamer; then the pools stop (issue 20).
    """
    global _threads_exit_hook  # noqa: PLW0603 - one hook per process, like atexit's
    if not _threads_exit_hook:
        _threads_exit_hook = True
        at_threads_exit(_at_exit)


def register(s: PlantDesignSession) -> None:
    """Protect ``s`` (see the module's docstring)."""
    _HOOKS.register(s)


def unregister(s: PlantDesignSession) -> None:
    """Stop protecting ``s``, from any thread."""
    _HOOKS.unregister(s)


def host_handles(*names: str) -> None:
    """Signals (by name, e.g. ``"SIGINT"``) the host handles itself: chained, no save."""
    _HOOKS.host_handles(*(int(getattr(signal, n)) for n in names if hasattr(signal, n)))


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
