"""``CrashHooks``: the process's termination hooks, shared by every live session.

How they behave (install, the relay, the chain to the host's handler, the host's say) is
told in ``agent.session.crash``, the module sessions use. Here: the registry of sessions,
installing and removing the handlers, what a signal does, the bounded save; the wake-up
socket and its reader are ``WakeupRelay`` (``crash_relay``). The process's one instance
and its exit hooks live here too (``hooks()``).
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
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING

from agent.folder import exiting
from agent.log import get_logger
from agent.platform import (
    SignalHandler,
    at_threads_exit,
    current_handler,
    end_by_signal,
    exit_now,
    install_console_handler,
    is_default_action,
    is_ignored,
    on_main_thread,
    open_wakeup_channel,
    run_on_main_thread,
    set_handler,
    set_termination_handlers,
    swap_wakeup_fd,
    wake_main_thread,
)
from agent.session.crash_relay import WakeupRelay
from agent.state import SessionState

if TYPE_CHECKING:
    from agent.session import PlantDesignSession

log = get_logger(__name__)

# After the save, how long the relay waits for the main thread to run the handler chain
# before it does the default action itself (a Qt app idling in C++ never runs Python).
_CHAIN_GRACE = 2.0
# How long the main thread's handler waits for the relay to count a signal it read.
_REAL_WAIT = 0.5


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
        self._remove_console: Callable[[], None] | None = None
        self._atexit = False
        self._save_thread: threading.Thread | None = None
        self._save_deadline = 0.0
        self._handled_at = -1e9
        self._restore_requested = False
        self._wakes = 0  # handler calls of our own requests, for the main thread to swallow
        self._in_signal = False  # a signal is being handled: the handler restores at its end
        self._warned = False
        self._host_handles: set[int] = set()  # signals the host acts on itself (no save)
        self._wakeup = WakeupRelay(self)  # the wake-up socket, and who reads it

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
        self._wakeup.join_stopped()

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
                self._wakeup.tokens += 1
                self._wakes += 1
                if not wake_main_thread(signum):
                    self._wakeup.tokens -= 1
                    self._wakes -= 1
                return
        # The host replaced every handler of ours: no handler to wake the main thread by
        # (and none of the host's may run for nothing). The interpreter's queue of calls
        # for the main thread takes the hooks down instead.
        if run_on_main_thread(self._restore_on_main):
            self._restore_requested = True
            return
        log.info("crash_hooks_replaced_by_host")

    def _restore_on_main(self) -> None:
        """Main thread, as a close on another thread asked: the hooks down if unused."""
        with self._lock:
            self._restore_requested = False
            if self._previous is not None and not self.live_sessions():
                self._uninstall()
        self._wakeup.join_stopped()

    # -- installing ------------------------------------------------------------------

    def _install(self) -> None:
        """Main thread, under the lock: handlers, wake-up socket, relay (or event loop)."""
        wakeup = self._wakeup
        wakeup.reader, wakeup.writer = open_wakeup_channel()
        self._previous = set_termination_handlers(self._handler)
        wakeup.prev_wakeup = swap_wakeup_fd(wakeup.writer.fileno())
        self._remove_console = install_console_handler(self._on_console)
        wakeup.start_reading()
        log.debug("crash_hooks_installed", signals=sorted(self._previous))

    def _uninstall(self) -> None:
        """Main thread, under the lock: put back what was there (unless the host replaced it)."""
        assert self._previous is not None and self._wakeup.writer is not None
        for signum, previous in self._previous.items():
            if current_handler(signum) is self._handler:
                set_handler(signum, previous)
        self._wakeup.unhook()
        if self._remove_console is not None:
            self._remove_console()
            self._remove_console = None
        self._previous = None
        self._restore_requested = False
        self._wakes = 0
        self._wakeup.close()
        with contextlib.suppress(Exception):  # also at interpreter shutdown (a collected session)
            log.debug("crash_hooks_removed")

    def use_event_loop(
        self, reader: Callable[[int | None], None], terminator: Callable[[int], None]
    ) -> None:
        """An event loop reads the wake-up socket (``reader(fd)``; ``reader(None)``: stop).

        ``terminator(signum)`` replaces a default action (e.g. ``QApplication.quit``).
        Main thread only.
        """
        self._wakeup.use_event_loop(reader, terminator)

    def leave_event_loop(self) -> None:
        """The event loop stops reading: the relay thread reads again. Main thread only."""
        self._wakeup.leave_event_loop()

    # -- a signal arrives ------------------------------------------------------------

    def drain(self) -> None:
        """Read the wake-up socket without blocking (the event loop's notifier calls this).

        The Python handler itself runs on the main thread as soon as the slot runs Python.
        If the host set its own handler for the signal after ours, ours never runs: the
        save runs here (bounded), and the host's handler does what the host wants.
        """
        signum = self._wakeup.read_now()
        if (
            signum is None
            or signum in self._host_handles
            or current_handler(signum) is self._handler
        ):
            return
        with self._lock:
            self._wakeup.real_pending.pop(signum, None)  # handled here: no real signal for a wake
            self._in_signal = True  # a close meanwhile restores below, not by a wake
        try:
            self.run(_signal_name(signum))
        finally:
            self._in_signal = False
        with self._lock:
            if not self.live_sessions() and self._previous is not None:
                self._uninstall()
        self._wakeup.join_stopped()

    def reclaim_wakeup_fd(self) -> bool:
        """Main thread: if the host made another fd the wake-up fd after ours, make ours
        the wake-up fd again and chain to the host's (real signal bytes are forwarded to
        it, and it is put back when the hooks come down). True if it was replaced.

        The wake-up fd contract: while the hooks are installed the interpreter's wake-up
        fd is ours; a host that sets its own (``signal.set_wakeup_fd``) before or after
        the first session still gets every signal's byte, forwarded by us once we read
        it; ``agent.qt`` calls this every second and on every signal.
        """
        return self._wakeup.reclaim()

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
        if self._wakeup.terminator is not None:
            self._wakeup.terminator(signum)
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
            or self._wakeup.real_pending.get(signum, 0) > 0
            or self._wakeup.unread_signal()
        )
        if not real and self._wakes == 0:
            # Neither our request nor a byte seen yet: the relay may hold it between its
            # read and its count. A stale request (hooks re-installed since) shows none.
            deadline = time.monotonic() + _REAL_WAIT
            while not real and time.monotonic() < deadline:
                time.sleep(0.01)
                real = self._wakeup.real_pending.get(signum, 0) > 0
            if not real:
                log.info("crash_hooks_stale_wake_ignored", signal=_signal_name(signum))
                return
        with self._lock:
            real = real or self._wakeup.real_pending.get(signum, 0) > 0
            ours = self._wakes > 0
            self._wakes = 0  # one call covers every request made before it
            self._wakeup.consume(signum, real=real)
            if ours and not real:
                self._restore_requested = False
                # Our own request (off-main close): restore if nothing is left to protect.
                if self._previous is not None and not self.live_sessions():
                    self._uninstall()
        if ours and not real:
            self._wakeup.join_stopped()
            return
        self._handled_at = time.monotonic()
        # Read first: the hooks may come down while the save runs (a restore the main
        # thread runs from the interpreter's queue of pending calls).
        previous = (self._previous or {}).get(signum, signal.SIG_DFL)
        self._in_signal = True
        try:
            if signum not in self._host_handles:
                self.run(_signal_name(signum))
        finally:
            self._in_signal = False
        terminator = self._wakeup.terminator
        with self._lock:
            if not self.live_sessions() and self._previous is not None:
                self._uninstall()
        self._wakeup.join_stopped()
        if is_ignored(previous):
            return
        if not is_default_action(previous) and callable(previous):
            previous(signum, frame)
            return
        if terminator is not None:
            terminator(signum)
            return
        end_by_signal(signum, previous, frame)

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
    # Saved (or out of time): what is still queued to send stays in the journal.
    exiting.abandon_all()


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
