"""The control channel's endpoint: a Unix socket (0600, in a 0700 folder) and its
peer's uid; on Windows, a named pipe (on paper: exercised with the OS calls faked)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from agent.errors import LocalFileError
from agent.platform.files import PRIVATE_FILE_MODE
from agent.platform.system import IS_WINDOWS


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
# clients (the detached start: ``processes``).

PIPE_ACCESS_DUPLEX = 0x00000003
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
_PIPE_TYPE_BYTE_WAIT = 0x00000000


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
