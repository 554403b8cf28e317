"""Termination hooks (issue 10): the signal plumbing of ``agent.session.crash``.

Python runs a signal handler only on the main thread and only when that thread runs
Python; a Qt application idling in C++ runs none. The C-level part of the handler
still writes the signal number to the wake-up fd, so a thread of ours reading it (or
a ``QSocketNotifier`` on the GUI thread) learns of the signal at once.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import functools
import itertools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from agent.platform.system import IS_WINDOWS


def termination_signals() -> Sequence[signal.Signals]:
    """The signals that mean "terminate now" on this platform."""
    names = ["SIGTERM", "SIGINT", "SIGBREAK"] if IS_WINDOWS else ["SIGTERM", "SIGINT", "SIGHUP"]
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def on_main_thread() -> bool:
    """True on the interpreter's main thread (the only one that may set signal handlers)."""
    return threading.current_thread() is threading.main_thread()


SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def set_termination_handlers(handler: SignalHandler) -> dict[int, SignalHandler]:
    """Set ``handler`` for every termination signal the process does not ignore; return
    the previous handlers of those it set.

    A signal ignored now (SIG_IGN: SIGHUP under ``nohup``, SIGINT of a job started in
    the background) stays ignored: whoever started the process decided it must not end
    it (issue 20). Main thread only (``ValueError`` elsewhere).
    """
    previous: dict[int, SignalHandler] = {}
    for sig in termination_signals():
        if signal.getsignal(sig) == signal.SIG_IGN:
            continue
        previous[int(sig)] = signal.signal(sig, handler)
    return previous


def current_handler(signum: int) -> SignalHandler:
    """The Python-level handler of ``signum`` now (any thread may ask)."""
    return signal.getsignal(signum)


def set_handler(signum: int, handler: SignalHandler) -> None:
    """Set one signal's handler (main thread only)."""
    signal.signal(signum, handler)


def open_wakeup_channel() -> tuple[socket.socket, socket.socket]:
    """``(reader, writer)``: a socket pair whose non-blocking writer can be the wake-up fd."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    return reader, writer


def swap_wakeup_fd(fd: int) -> int:
    """Make ``fd`` the interpreter's wake-up fd (-1: none); return the previous one."""
    return signal.set_wakeup_fd(fd, warn_on_full_buffer=False)


def forward_wakeup(fd: int, data: bytes) -> None:
    """Pass signal bytes on to the wake-up fd the host had set before ours (best effort)."""
    if fd < 0 or not data:
        return
    with contextlib.suppress(OSError):
        if IS_WINDOWS:  # pragma: no cover - a wake-up fd is a socket there
            sock = socket.socket(fileno=fd)
            try:
                sock.send(data)
            finally:
                sock.detach()
        else:
            os.write(fd, data)


def peek_wakeup(reader: socket.socket) -> bytes:
    """The bytes waiting in a wake-up channel, left unread (b"" where it cannot peek)."""
    flags = getattr(socket, "MSG_DONTWAIT", 0)
    if not flags:
        return b""  # pragma: no cover - Windows
    try:
        return reader.recv(64, socket.MSG_PEEK | flags)
    except OSError:
        return b""


def is_default_action(handler: SignalHandler) -> bool:
    """True if ``handler`` means "the process ends" (SIG_DFL or Python's KeyboardInterrupt)."""
    return handler in (signal.SIG_DFL, None) or handler is signal.default_int_handler


def is_ignored(handler: SignalHandler) -> bool:
    """True if ``handler`` is SIG_IGN."""
    return handler == signal.SIG_IGN


def end_by_signal(signum: int, previous: SignalHandler, frame: FrameType | None) -> None:
    """Do what ``previous`` (a default action) would have done, on the main thread.

    SIGINT under Python's default raises ``KeyboardInterrupt`` here; any other
    default action ends the process by the signal itself (its usual exit status).
    """
    if previous is signal.default_int_handler:
        signal.default_int_handler(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # pragma: no cover - a default action that did not end us


def set_interrupt_handler(handler: SignalHandler) -> SignalHandler:
    """Set the handler of Ctrl-C (SIGINT, on every platform); return the previous one.

    Main thread only.
    """
    return signal.signal(signal.SIGINT, handler)


def at_threads_exit(hook: Callable[[], None]) -> None:
    """Call ``hook`` when the interpreter exits, *before* the thread pools stop.

    ``atexit`` hooks run only after ``concurrent.futures`` has shut every pool down
    (at that point a submit raises "cannot schedule new futures after interpreter
    shutdown"); hooks registered here run before that, latest first, as long as they
    are registered after ``concurrent.futures.thread`` was imported. Falls back to
    ``atexit`` where the interpreter has no such hook list.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - every CPython the agent supports has it
        atexit.register(hook)
        return
    with contextlib.suppress(RuntimeError):  # already shutting down: nothing to add to
        register(hook)


def wake_main_thread(signum: int) -> bool:
    """Make the main thread run ``signum``'s Python handler soon (no OS signal is sent).

    Returns False when that handler is not a Python callable (nothing would run).
    """
    if not callable(signal.getsignal(signum)):
        return False
    _thread.interrupt_main(signal.Signals(signum))
    return True


def run_on_main_thread(callback: Callable[[], None]) -> bool:
    """Run ``callback`` on the main thread the next time it runs Python; from any thread.

    No signal is sent and no signal handler runs: CPython's ``Py_AddPendingCall``
    (stable ABI), the queue the interpreter runs at its next check for signals, on the
    main thread. Returns False where there is none (not CPython) or its queue is full.
    An exception from ``callback`` is logged, never raised into whatever the main thread
    is running.
    """
    api = _pending_call_api()
    if api is None:
        return False
    add_pending, callback_type = api
    key = next(_call_keys)

    def call(_arg: object) -> int:
        try:
            callback()
        except Exception:
            logging.getLogger(__name__).exception("main_thread_call_failed")
        finally:
            _calls_ran.append(key)  # its C callback is let go by a later request, not here
        return 0

    with _calls_lock:
        while _calls_ran:
            _calls_waiting.pop(_calls_ran.pop(), None)
        c_call = _calls_waiting[key] = callback_type(call)  # alive until it ran
        if add_pending(c_call, None) == 0:
            return True
        del _calls_waiting[key]
    return False


# C callbacks queued by ``run_on_main_thread``, kept alive until they ran (freeing one
# while it runs would free the code it returns through).
_calls_lock = threading.Lock()
_calls_waiting: dict[int, Any] = {}
_calls_ran: list[int] = []
_call_keys = itertools.count()


@functools.cache
def _pending_call_api() -> tuple[Callable[[Any, None], int], Any] | None:
    try:
        import ctypes

        add_pending = ctypes.pythonapi.Py_AddPendingCall
    except (ImportError, AttributeError):  # pragma: no cover - not CPython, or no ctypes
        return None
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    add_pending.argtypes = [callback_type, ctypes.c_void_p]
    add_pending.restype = ctypes.c_int
    return add_pending, callback_type


def install_console_handler(handler: Callable[[str], None]) -> Callable[[], None]:
    """Windows: call ``handler(reason)`` on console close / logoff / shutdown; else a no-op.

    Returns the function that removes it (callable from any thread).
    """
    if not IS_WINDOWS:
        return lambda: None
    import ctypes  # pragma: no cover - exercised on Windows desktops only

    handler_type = ctypes.WINFUNCTYPE(ctypes.c_int, ctypes.c_uint)  # type: ignore[attr-defined,unused-ignore]

    def on_console(event: int) -> int:  # pragma: no cover
        handler(f"console-event-{event}")
        return 0  # let the next handler (and Windows) go on

    console_cb = handler_type(on_console)
    ctypes.windll.kernel32.SetConsoleCtrlHandler(console_cb, True)  # type: ignore[attr-defined,unused-ignore]

    def remove() -> None:  # pragma: no cover
        ctypes.windll.kernel32.SetConsoleCtrlHandler(console_cb, False)  # type: ignore[attr-defined,unused-ignore]

    return remove
