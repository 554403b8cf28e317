"""Files that differ between Windows and POSIX: the executable bit, case folding, a
file held by another program, and the agent's private (owner-only) files and folders."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from agent.platform.system import IS_WINDOWS


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


# --- Local security (issue 9): private state (the control endpoint: ``channel``) -------
#
# Everything the agent keeps under its state folder is
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


def write_private_file(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or pieces written one by one) to ``path`` readable by this
    user only (0600 on POSIX), atomically.

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
            for piece in (data,) if isinstance(data, bytes) else data:
                view = memoryview(piece)
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


def open_private_append(path: Path) -> int:
    """Open ``path`` for appending, creating it 0600; never through a symbolic link."""
    make_private_dirs(path.parent)
    return _open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
