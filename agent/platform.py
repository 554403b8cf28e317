"""Everything that differs between Windows and POSIX lives here (and only here).

Machine identity, process liveness, private file permissions, detaching a
background process, and the termination signals a crash handler listens to.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "IS_WINDOWS",
    "detach_creationflags",
    "install_termination_handler",
    "machine_name",
    "pid_alive",
    "spawn_detached",
    "termination_signals",
    "write_private_file",
]

IS_WINDOWS = sys.platform == "win32"


def executable_bit(st_mode: int) -> bool | None:
    """Whether a file's mode says "executable"; ``None`` where files have no such bit.

    On Windows the bit does not exist: ``None`` means "unknown", so an edit made
    there keeps the flag the commit had (it is never cleared by accident).
    """
    if IS_WINDOWS:
        return None
    return bool(st_mode & stat.S_IXUSR)


def set_executable(fd: int, executable: bool) -> None:
    """Give the open file ``fd`` the executable bit where it is readable (as git does),
    or take it away. Nothing on Windows."""
    if IS_WINDOWS:
        return
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    readable = mode & (stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    wanted = mode | (readable >> 2) if executable else mode & ~0o111
    if wanted != mode:
        os.fchmod(fd, wanted)


def folds_case(folder: Path) -> bool:
    """Whether ``folder``'s file system treats ``A.dwg`` and ``a.dwg`` as one name.

    Probed, not guessed from the OS (Windows and macOS folders usually fold case, a
    Linux one can too): a fresh lower-case name is created and looked up in upper case.
    """
    probe = folder / f".pdagent.case-{os.urandom(4).hex()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.close(fd)
    try:
        return os.path.lexists(folder / probe.name.upper())
    finally:
        probe.unlink()


_SHARING_VIOLATIONS = frozenset({32, 33})  # ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION


def held_by_another_program(exc: BaseException) -> bool:
    """The file cannot be read now because a program holds it (or its mode denies us).

    Windows: the editor opened it without sharing (a sharing or lock violation).
    POSIX: ``EACCES``/``EPERM`` (a file being written by a tool that set mode 000, or
    another user's file). Both pass: the upload waits and retries.
    """
    for err in (exc, exc.__cause__):
        if isinstance(err, PermissionError):
            return True
        if isinstance(err, OSError) and getattr(err, "winerror", None) in _SHARING_VIOLATIONS:
            return True
    return False


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


def install_termination_handler(handler: Callable[[str], None]) -> Callable[[], None]:
    """Call ``handler(reason)`` on SIGTERM/SIGINT/SIGHUP (SIGBREAK and console close on Windows).

    Must be called from the main thread. Returns a function that restores the
    previous handlers.
    """
    previous: dict[signal.Signals, object] = {}

    def on_signal(signum: int, _frame: object) -> None:
        handler(signal.Signals(signum).name)

    for sig in termination_signals():
        previous[sig] = signal.signal(sig, on_signal)
    console_cb: object = None
    if IS_WINDOWS:  # pragma: no cover - exercised on Windows desktops only
        import ctypes

        handler_type = ctypes.WINFUNCTYPE(ctypes.c_int, ctypes.c_uint)  # type: ignore[attr-defined,unused-ignore]

        def on_console(event: int) -> int:
            handler(f"console-event-{event}")
            return 1

        console_cb = handler_type(on_console)
        ctypes.windll.kernel32.SetConsoleCtrlHandler(console_cb, True)  # type: ignore[attr-defined,unused-ignore]

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        if IS_WINDOWS and console_cb is not None:  # pragma: no cover
            import ctypes

            ctypes.windll.kernel32.SetConsoleCtrlHandler(console_cb, False)  # type: ignore[attr-defined,unused-ignore]

    return restore
