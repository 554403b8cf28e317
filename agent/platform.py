"""Everything that differs between Windows and POSIX lives here (and only here).

Machine identity, process liveness, private file permissions, detaching a
background process, and the termination signals a crash handler listens to.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

__all__ = [
    "IS_WINDOWS",
    "SignalHandler",
    "current_handler",
    "detach_creationflags",
    "end_by_signal",
    "exit_now",
    "forward_wakeup",
    "install_console_handler",
    "is_default_action",
    "is_ignored",
    "machine_name",
    "on_main_thread",
    "open_wakeup_channel",
    "peek_wakeup",
    "pid_alive",
    "set_handler",
    "set_termination_handlers",
    "spawn_detached",
    "swap_wakeup_fd",
    "termination_signals",
    "wake_main_thread",
    "write_private_file",
]

IS_WINDOWS = sys.platform == "win32"


def machine_name() -> str:
    """This machine's name as recorded in locks (the host name)."""
    return socket.gethostname() or "unknown-host"


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    if IS_WINDOWS:
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill(0).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by this user only (0600 on POSIX), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def detach_creationflags() -> int:
    """``Popen(creationflags=...)`` that detach a child from our console (Windows; else 0).

    On POSIX, ``Popen(start_new_session=True)`` does the same; see ``spawn_detached``.
    """
    if IS_WINDOWS:
        flags: int = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS  # type: ignore[attr-defined,unused-ignore]
        return flags
    return 0


def spawn_detached(argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached from our terminal and process group, output to ``log``."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        close_fds=True,
        start_new_session=not IS_WINDOWS,
        creationflags=detach_creationflags(),
    )


def termination_signals() -> Sequence[signal.Signals]:
    """The signals that mean "terminate now" on this platform."""
    names = ["SIGTERM", "SIGINT", "SIGBREAK"] if IS_WINDOWS else ["SIGTERM", "SIGINT", "SIGHUP"]
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def on_main_thread() -> bool:
    """True on the interpreter's main thread (the only one that may set signal handlers)."""
    return threading.current_thread() is threading.main_thread()


# --- Termination hooks (issue 10): the signal plumbing of ``agent.session.crash``. ---
#
# Python runs a signal handler only on the main thread and only when that thread runs
# Python; a Qt application idling in C++ runs none. The C-level part of the handler
# still writes the signal number to the wake-up fd, so a thread of ours reading it (or
# a ``QSocketNotifier`` on the GUI thread) learns of the signal at once.

SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def set_termination_handlers(handler: SignalHandler) -> dict[int, SignalHandler]:
    """Set ``handler`` for every termination signal; return the previous handlers.

    Main thread only (``ValueError`` elsewhere).
    """
    previous: dict[int, SignalHandler] = {}
    for sig in termination_signals():
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


def exit_now(code: int) -> NoReturn:
    """End the process at once (after a bounded crash save, from any thread)."""
    logging.shutdown()
    os._exit(code)


def wake_main_thread(signum: int) -> bool:
    """Make the main thread run ``signum``'s Python handler soon (no OS signal is sent).

    Returns False when that handler is not a Python callable (nothing would run).
    """
    if not callable(signal.getsignal(signum)):
        return False
    _thread.interrupt_main(signal.Signals(signum))
    return True


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
