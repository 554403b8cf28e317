"""The working folder on disk: local paths reached without ever following a link.

``WorkFolder`` maps working-copy paths (checked by ``agent.names``) into one root
and opens them with descriptor-relative ``O_NOFOLLOW`` opens where the platform
has them, ``lstat`` of each folder on the way elsewhere.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath

from agent.errors import InvalidNameError, LocalFileError, WorkFolderReplacedError
from agent.names import _WINDOWS_RESERVED, is_plain, printable, validate_rel_path
from agent.platform import set_executable

__all__ = [
    "HAS_DIR_FD",
    "FolderIdentity",
    "WorkFolder",
    "fd_path",
    "folder_identity",
    "local_path_for",
]

_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)


_O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)


_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)


_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)


_O_BINARY: int = getattr(os, "O_BINARY", 0)


# Descriptor-relative opens (openat) without following links: Linux, macOS, the BSDs.
HAS_DIR_FD = bool(_O_NOFOLLOW and _O_DIRECTORY and os.open in os.supports_dir_fd)


_PROC_FD = Path("/proc/self/fd")


_NAME_MAX = 255  # bytes in one name: ext4, APFS, NTFS (UTF-16 units there; close enough)


_PATH_MAX = 4096 if os.name != "nt" else 32767


def fd_path(fd: int) -> Path | None:
    """A path that reopens exactly the file or folder ``fd`` refers to (Linux's /proc), or None.

    Handing this to a library that wants a path (the store's upload and download)
    keeps it on the object we opened without following links, whatever happens to
    the names meanwhile.
    """
    return _PROC_FD / str(fd) if _has_proc_fd() else None


@functools.cache
def _has_proc_fd() -> bool:
    return _PROC_FD.is_dir()


FolderIdentity = tuple[int, int]
"""A folder's ``(st_dev, st_ino)``: which folder it is, whatever path reaches it."""


def folder_identity(root: Path) -> FolderIdentity:
    """The identity of the real folder ``root`` (``lstat``: a link is refused, never followed)."""
    try:
        st = root.lstat()
    except OSError as exc:
        raise LocalFileError(f"cannot read the working folder {root}: {exc.strerror}") from exc
    if not is_plain(st) or not stat.S_ISDIR(st.st_mode):
        raise WorkFolderReplacedError(_replaced_message(root, "is a link or not a folder"))
    return (st.st_dev, st.st_ino)


def _replaced_message(root: Path, what: str) -> str:
    return (
        f"the working folder {root} {what}: it is not the folder this session opened, so "
        "nothing was committed, moved or deleted and the lock is kept. Put the session's "
        "own folder back at that path (remove the link, or move the other folder away), "
        "then run the command again"
    )


class WorkFolder:
    """Maps working-copy paths into one root and opens them without following links.

    Nothing outside the root is ever read or written: every check happens at the
    moment of use (``lstat`` of each folder on the way, or, where the platform has
    them, descriptor-relative opens with ``O_NOFOLLOW``), never from a cached
    answer. A link, junction or special file anywhere on the way is refused with
    ``LocalFileError``; a link as the last component is never followed (reads
    refuse it, writes replace it).

    ``identity`` (the session's folder, recorded when it was made): the root itself
    must still be that folder, checked on every use; a link or another folder in its
    place raises ``WorkFolderReplacedError`` (a missing root is left to the caller).
    """

    def __init__(self, root: Path, identity: FolderIdentity | None = None) -> None:
        self.root = root
        self.identity = identity

    def check_identity(self) -> None:
        """Refuse (``WorkFolderReplacedError``) a root that is not the recorded folder.

        A missing root passes: nothing is there to be mistaken for the session's folder.
        """
        if self.identity is None:
            return
        try:
            st = self.root.lstat()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LocalFileError(f"cannot read {self.root}: {exc.strerror}") from exc
        self._check_root_stat(st)

    def _check_root_stat(self, st: os.stat_result) -> None:
        if self.identity is None:
            return
        if not is_plain(st) or not stat.S_ISDIR(st.st_mode):
            raise WorkFolderReplacedError(_replaced_message(self.root, "is a link or not a folder"))
        if (st.st_dev, st.st_ino) != self.identity:
            raise WorkFolderReplacedError(
                _replaced_message(self.root, "is another folder than the one the session made")
            )

    def _refuse(self, rel: str, key: str | None, where: Path, what: str) -> LocalFileError:
        name = f"key {key!r}" if key else f"path {rel!r}"
        return LocalFileError(
            f"{name} would be reached through {where}, which is {what}; refused: links and "
            f"special files are never followed, so nothing outside the working folder "
            f"{self.root} is read or written. Replace the link with a real folder."
        )

    def check_root(self) -> None:
        """The working folder (and its project folder) exist as real folders, not links."""
        for folder in (self.root.parent, self.root):
            try:
                st = folder.lstat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise LocalFileError(f"cannot read {folder}: {exc.strerror}") from exc
            if not is_plain(st) or not stat.S_ISDIR(st.st_mode):
                raise LocalFileError(
                    f"the working folder path {folder} is a link or not a folder; refused, so "
                    "that nothing outside the working folder is written. Remove it (or move it "
                    "away) and open again."
                )

    def path(self, rel: str, *, key: str | None = None) -> Path:
        """The local path of ``rel``; refused if it is not a safe name or its folders are links.

        The folders on the way are checked now, with ``lstat`` (nothing is cached); the
        last component may itself be a link: callers ``lstat`` it and never follow it.
        """
        parts = self._check_names(rel, key)
        current = self.root
        for part in ("", *parts[:-1]):
            current = current / part if part else current
            try:
                st = current.lstat()
            except FileNotFoundError:
                break  # created later, by us, as a real folder
            except OSError as exc:
                raise LocalFileError(f"cannot read {current}: {exc.strerror}") from exc
            if not part:
                self._check_root_stat(st)
            if not is_plain(st):
                raise self._refuse(rel, key, current, "a link (outside the working folder?)")
            if not stat.S_ISDIR(st.st_mode):
                raise self._refuse(rel, key, current, "not a folder")
        return self.root.joinpath(*parts)

    def check_names(self, rels: Iterable[str], *, key_of: Callable[[str], str]) -> None:
        """Refuse (``InvalidNameError``) the first of ``rels`` this file system cannot hold.

        For a whole manifest before anything is written: the paths were validated when
        it was parsed, so only the local limits are checked here, and a path short
        enough to be within every limit whatever its characters costs one comparison.
        ``key_of`` names the remote key in the message.
        """
        root = len(os.fsencode(self.root)) + 1
        quick = min(_NAME_MAX, _PATH_MAX - root - 1) // 4  # UTF-8: at most 4 bytes a char
        for rel in rels:
            if len(rel) <= quick and os.name != "nt":
                continue
            self._check_local_name(rel, tuple(rel.split("/")), key_of(rel))

    def _check_names(self, rel: str, key: str | None = None) -> tuple[str, ...]:
        """``rel``'s parts, refused if unsafe or not a name this file system can hold."""
        validate_rel_path(rel, key=key)
        parts = tuple(rel.split("/"))
        self._check_local_name(rel, parts, key)
        return parts

    def _check_local_name(self, rel: str, parts: tuple[str, ...], key: str | None) -> None:
        """Refuse (``InvalidNameError``, exit 3) a name this file system cannot hold."""
        where = f"key {key!r}" if key else f"path {printable(rel)!r}"
        problem = None
        for part in parts:
            size = len(os.fsencode(part))
            if size > _NAME_MAX:
                problem = f"a name of {size} bytes (the limit is {_NAME_MAX})"
            elif os.name == "nt" and (
                part.split(".", maxsplit=1)[0].upper() in _WINDOWS_RESERVED
                or part.endswith((".", " "))
            ):  # pragma: no cover - Windows
                problem = f"{part!r}, a name Windows reserves or cannot keep"
        total = len(os.fsencode(self.root)) + 1 + len(os.fsencode(rel))
        if problem is None and total >= _PATH_MAX:
            problem = f"a path of {total} bytes (the limit is {_PATH_MAX})"
        if problem:
            raise InvalidNameError(
                f"{where} cannot be a local file here: it has {problem}. Nothing was written "
                "for it; rename or remove that object in the store (or move the working "
                "folder to a shorter path)."
            )

    @contextmanager
    def open_dir(self, rel_dir: str, *, create: bool = False) -> Iterator[int]:
        """A descriptor of the folder ``rel_dir`` ("" is the root), walked with O_NOFOLLOW.

        With ``create`` missing folders are made (each inside the previous descriptor).
        Only where ``HAS_DIR_FD``.
        """
        parts = PurePosixPath(rel_dir).parts if rel_dir else ()
        flags = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
        try:
            fd = os.open(self.root, flags)
        except OSError as exc:
            if self.identity is not None and exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self.check_identity()  # says what is there now
            raise self._translate(exc, rel_dir, self.root) from exc
        try:
            if self.identity is not None:  # the folder opened is the session's own
                self._check_root_stat(os.fstat(fd))
            for part in parts:
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    raise self._translate(exc, rel_dir, self.root / rel_dir) from exc
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _translate(self, exc: OSError, rel: str, where: Path) -> OSError | LocalFileError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            return self._refuse(rel, None, where, "a link or not a folder")
        return exc

    @contextmanager
    def open_file(self, rel: str) -> Iterator[tuple[int, os.stat_result]]:
        """Open a regular file for reading without following any link; ``(fd, fstat)``.

        ``FileNotFoundError`` if it is gone; ``LocalFileError`` if it (or a folder on
        the way) is a link or not a regular file (a FIFO is opened non-blocking, so it
        cannot hang us, and refused).
        """
        head, _, name = rel.rpartition("/")
        flags = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC | _O_BINARY
        if HAS_DIR_FD:  # the O_NOFOLLOW walk is the link check: the names only here
            self._check_names(rel)
            with self.open_dir(head) as dfd:
                try:
                    fd = os.open(name, flags, dir_fd=dfd)
                except OSError as exc:
                    raise self._translate(exc, rel, self.root / rel) from exc
        else:  # pragma: no cover - Windows: lstat the folders, then the file, then open
            self.path(rel)
            target = self.root / rel
            if not is_plain(target.lstat()):
                raise self._refuse(rel, None, target, "a link")
            fd = os.open(target, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(rel, None, self.root / rel, "not a regular file")
            yield fd, st
        finally:
            os.close(fd)

    def set_executable(self, rel: str, executable: bool) -> os.stat_result:
        """Give ``rel`` the executable bit or take it away (never through a link); its stat."""
        with self.open_file(rel) as (fd, _st):
            set_executable(fd, executable)
            return os.fstat(fd)

    def unlink(self, rel: str) -> None:
        """Remove the file (or link) ``rel`` if present, never following a link on the way."""
        self.path(rel)
        head, _, name = rel.rpartition("/")
        if not HAS_DIR_FD:  # pragma: no cover - Windows
            (self.root / rel).unlink(missing_ok=True)
            return
        try:
            with self.open_dir(head) as dfd:
                os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass


def local_path_for(root: Path, rel: str, *, key: str | None = None) -> Path:
    """The local path of ``rel`` inside ``root`` (its folders checked now, never followed)."""
    return WorkFolder(root).path(rel, key=key)
