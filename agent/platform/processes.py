"""Processes: this machine's name, whether a pid lives, starting the agent detached
(Windows' creation flags included), ending at once, and this process's memory (freed heap
given back, the cyclic garbage collector paused over per-file work)."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NoReturn

from agent.platform.system import IS_WINDOWS


def release_free_memory() -> None:
    """Give memory this process freed back to the system, where the C library keeps it.

    glibc (Linux) keeps freed heap pages mapped: after a 16 MB manifest was read and
    parsed, ~30 MiB freed by the parse stayed in the process (``malloc_trim`` returns
    them; at 100,000 files the open's peak was 25-35 MiB higher without it). Elsewhere
    (Windows, macOS, musl) a no-op: their allocators return large freed blocks themselves.
    """
    trim = _find_malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _find_malloc_trim() -> Callable[[int], int] | None:
    if IS_WINDOWS or not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return trim


class _GcPause:
    """Counted pauses of the cyclic garbage collector, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._was_enabled:
                    gc.enable()


paused_gc = _GcPause()
"""``with paused_gc():`` no cyclic collection runs inside (reference counting still frees).

For short, local, per-file work that builds a structure per file of a stage (the plan of
an open, its entries, ``base.json``): at 100,000 files the collector's full passes, run
again each time the heap grew by a quarter, were 0.4-0.5 s of a 3.4 s warm re-open.
Never around transfers (a long download would hold every cycle the HTTP stack leaves).
Pauses nest and may overlap across threads: the collector comes back when the last ends,
and only if it was enabled when the first began (a host that disabled it keeps it off).
"""


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


def detach_creationflags() -> int:
    """``Popen(creationflags=...)`` that detach a child from our console (Windows; else 0).

    On POSIX, ``Popen(start_new_session=True)`` does the same; see ``spawn_detached``.
    """
    if IS_WINDOWS:
        return windows_detach_flags(breakaway=True)
    return 0


def spawn_detached(argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached from our terminal and process group, output to ``log``.

    On Windows the child also breaks away from a kill-on-close job the caller may
    run in; a job that forbids breakaway answers ACCESS_DENIED, and the start is
    retried without it (the agent then lives as long as that job).
    """

    def start(flags: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
            start_new_session=not IS_WINDOWS,
            creationflags=flags,
        )

    return spawn_with_breakaway_fallback(start, windows=IS_WINDOWS)


def exit_now(code: int) -> NoReturn:
    """End the process at once (after a bounded crash save, from any thread).

    Also from a signal handler that interrupted a write of a log handler: whatever
    flushing the logs raises, the process ends.
    """
    with contextlib.suppress(Exception):
        logging.shutdown()
    os._exit(code)


# --- Windows seams (on paper: exercised with the OS calls faked) ------------------------
#
# A detached agent starts in a new process group without a console and breaks away
# from a kill-on-close job where the job allows it (the named pipe: ``channel``).

CREATE_NEW_PROCESS_GROUP = 0x00000200
DETACHED_PROCESS = 0x00000008
CREATE_BREAKAWAY_FROM_JOB = 0x01000000
_ERROR_ACCESS_DENIED = 5


def windows_detach_flags(*, breakaway: bool) -> int:
    """``creationflags`` of a detached agent: new group, no console, maybe breakaway."""
    flags = CREATE_NEW_PROCESS_GROUP | DETACHED_PROCESS
    return flags | CREATE_BREAKAWAY_FROM_JOB if breakaway else flags


def spawn_with_breakaway_fallback(
    start: Callable[[int], subprocess.Popen[bytes]], *, windows: bool
) -> subprocess.Popen[bytes]:
    """``start(creationflags)``; on Windows retry without breakaway if the job denies it."""
    if not windows:
        return start(0)
    try:
        return start(windows_detach_flags(breakaway=True))
    except OSError as exc:
        if getattr(exc, "winerror", None) != _ERROR_ACCESS_DENIED:
            raise
    return start(windows_detach_flags(breakaway=False))
