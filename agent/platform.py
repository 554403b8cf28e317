"""Everything that differs between Windows and POSIX lives here (and only here).

Machine identity, process liveness, private file permissions, detaching a
background process, and the termination signals a crash handler listens to.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

from agent.errors import LocalFileError

__all__ = [
    "IS_WINDOWS",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "SignalHandler",
    "at_threads_exit",
    "bind_control_socket",
    "check_private_dir",
    "connect_control_socket",
    "create_private_file",
    "current_handler",
    "current_uid",
    "detach_creationflags",
    "end_by_signal",
    "ensure_private_dir",
    "exit_now",
    "forward_wakeup",
    "fsync_dir",
    "install_console_handler",
    "is_default_action",
    "is_ignored",
    "machine_name",
    "make_private_dirs",
    "on_main_thread",
    "open_private_append",
    "open_wakeup_channel",
    "peek_wakeup",
    "peer_uid",
    "pid_alive",
    "set_handler",
    "set_interrupt_handler",
    "set_termination_handlers",
    "spawn_detached",
    "spawn_with_breakaway_fallback",
    "swap_wakeup_fd",
    "termination_signals",
    "wake_main_thread",
    "windows_create_pipe",
    "windows_detach_flags",
    "windows_pipe_name",
    "windows_pipe_sddl",
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


def exit_now(code: int) -> NoReturn:
    """End the process at once (after a bounded crash save, from any thread).

    Also from a signal handler that interrupted a write of a log handler: whatever
    flushing the logs raises, the process ends.
    """
    with contextlib.suppress(Exception):
        logging.shutdown()
    os._exit(code)


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


# --- Local security (issue 9): private state, the control endpoint ---------------------
#
# Kept apart from the rest of this module on purpose (other work touches the
# signal handling above). Everything the agent keeps under its state folder is
# owner-only by construction: folders 0700, files 0600, set explicitly (never
# left to the umask), private files created with O_EXCL | O_NOFOLLOW under a
# fresh random name and renamed into place.

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_TEMP_ATTEMPTS = 16


def check_private_dir(path: Path) -> str | None:
    """Why ``path`` is not a safe private folder of this user, or ``None`` if it is.

    Unsafe: a symbolic link, not a folder, owned by someone else, or writable by
    group or others. On Windows the profile's ACLs decide; nothing is checked here.
    """
    if IS_WINDOWS:  # pragma: no cover - ACLs of the user profile, see the README
        return None
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {st.st_mode & 0o7777:04o})"
    return None


def ensure_private_dir(path: Path) -> str | None:
    """Create ``path`` (and missing parents) 0700, or check the existing one.

    Returns why an existing folder is unsafe (see ``check_private_dir``), else
    ``None``. A safe folder that others could read (0755 from an older version or
    a loose umask) is tightened to 0700.
    """
    make_private_dirs(path)
    problem = check_private_dir(path)
    if problem is None and not IS_WINDOWS and path.lstat().st_mode & 0o077:
        path.chmod(PRIVATE_DIR_MODE)
    return problem


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents as 0700 folders (existing ones untouched)."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        if not IS_WINDOWS:
            folder.chmod(PRIVATE_DIR_MODE)


def create_private_file(path: Path) -> int:
    """Create ``path`` new (``O_EXCL | O_NOFOLLOW``) as 0600; return the open descriptor.

    A file or link already at ``path`` makes this fail (``FileExistsError``): a
    planted file or symbolic link is never followed or reused.
    """
    return _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def _open_private(path: Path, flags: int) -> int:
    """``os.open`` never through a link, the file 0600 whatever the umask said."""
    fd = os.open(path, flags | _O_NOFOLLOW | _O_BINARY, PRIVATE_FILE_MODE)
    if not IS_WINDOWS:
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        except OSError:
            os.close(fd)
            raise
    return fd


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by this user only (0600 on POSIX), atomically.

    The bytes go to a fresh random temp name beside ``path`` created with
    ``O_EXCL | O_NOFOLLOW`` (whatever was planted at a guessable name is never
    opened), are fsync'd, renamed over ``path`` and the folder is fsync'd.
    """
    make_private_dirs(path.parent)
    for _ in range(_TEMP_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = create_private_file(tmp)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 16 collisions of 48 random bits
        raise FileExistsError(f"no free temp name beside {path}")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op on Windows)."""
    if IS_WINDOWS:
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def bind_control_socket(path: Path, backlog: int = 64) -> socket.socket:
    """Listen on a Unix domain socket at ``path`` (0600, in a 0700 folder of the user).

    A stale socket of ours at ``path`` (a previous agent that was killed) is
    replaced; anything else there is left alone and the bind fails.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # type: ignore[attr-defined,unused-ignore]
    try:
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not (stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid()):
                raise LocalFileError(
                    f"{path} is taken by something that is not this agent's socket (a folder, "
                    "a file, or another user's socket); it was left alone and the agent did "
                    "not start. Remove it (it is in the agent's private runtime folder) and "
                    "run the command again"
                )
            path.unlink()
        sock.bind(os.fspath(path))
        path.chmod(PRIVATE_FILE_MODE)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_control_socket(path: Path, timeout: float) -> socket.socket:
    """Connect to the agent's socket at ``path`` with ``timeout`` on every operation."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # type: ignore[attr-defined,unused-ignore]
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (``None``: cannot tell).

    Linux answers ``SO_PEERCRED``: for an accepted connection the client's uid at
    connect time, for a client socket the listener's uid at listen time.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # pragma: no cover - macOS/BSD: the 0700 folder is the guard
        return None
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def current_uid() -> int | None:
    """This process's effective uid (``None`` on Windows)."""
    return None if IS_WINDOWS else os.geteuid()


# --- Windows seams (on paper: exercised with the OS calls faked) ------------------------
#
# The control channel on Windows is a named pipe whose name carries the user and
# the session, created with an owner-only security descriptor and refusing remote
# clients; a detached agent starts in a new process group without a console and
# breaks away from a kill-on-close job where the job allows it.

CREATE_NEW_PROCESS_GROUP = 0x00000200
DETACHED_PROCESS = 0x00000008
CREATE_BREAKAWAY_FROM_JOB = 0x01000000
_ERROR_ACCESS_DENIED = 5
PIPE_ACCESS_DUPLEX = 0x00000003
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
_PIPE_TYPE_BYTE_WAIT = 0x00000000


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


def windows_pipe_name(user_sid: str, session_id: str) -> str:
    r"""The per-user, per-session pipe name: ``\\.\pipe\pd-session-agent-<sid>-<session>``."""
    safe_sid = "".join(c for c in user_sid if c.isalnum() or c == "-")
    safe_session = "".join(c for c in session_id if c.isalnum() or c in "-T")
    return rf"\\.\pipe\pd-session-agent-{safe_sid}-{safe_session}"


def windows_pipe_sddl(user_sid: str) -> str:
    """An owner-only security descriptor: owner ``user_sid``, protected DACL, full access."""
    return f"O:{user_sid}D:P(A;;GA;;;{user_sid})"


def windows_create_pipe(name: str, user_sid: str, *, kernel32: object, advapi32: object) -> int:
    """Create the first instance of the agent's pipe; return its handle.

    ``kernel32``/``advapi32`` are the ctypes DLLs (faked in the unit tests).
    ``FILE_FLAG_FIRST_PIPE_INSTANCE`` makes the call fail if anyone else already
    created a pipe of that name (squatting), and remote clients are refused.
    """
    import ctypes

    sd = ctypes.c_void_p()
    ok = advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(  # type: ignore[attr-defined]
        windows_pipe_sddl(user_sid), 1, ctypes.byref(sd), None
    )
    if not ok:
        raise OSError(f"cannot build the security descriptor of {name}")

    class SecurityAttributes(ctypes.Structure):
        _fields_ = [
            ("nLength", ctypes.c_ulong),
            ("lpSecurityDescriptor", ctypes.c_void_p),
            ("bInheritHandle", ctypes.c_int),
        ]

    attrs = SecurityAttributes(ctypes.sizeof(SecurityAttributes), sd, 0)
    try:
        handle = kernel32.CreateNamedPipeW(  # type: ignore[attr-defined]
            name,
            PIPE_ACCESS_DUPLEX | FILE_FLAG_FIRST_PIPE_INSTANCE,
            _PIPE_TYPE_BYTE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            16,
            65536,
            65536,
            0,
            ctypes.byref(attrs),
        )
    finally:
        kernel32.LocalFree(sd)  # type: ignore[attr-defined]
    if handle in (None, 0, -1):
        raise OSError(f"cannot create the pipe {name} (already taken?)")
    return int(handle)


def open_private_append(path: Path) -> int:
    """Open ``path`` for appending, creating it 0600; never through a symbolic link."""
    make_private_dirs(path.parent)
    return _open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
