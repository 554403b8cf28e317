"""What we know of a local file (its stat tuple and sha256) and the hashing of local bytes.

``LocalEntry`` and ``is_unchanged`` are the one change test (the snapshot, the cache
and the streamer use it); ``fd_sha256``/``file_sha256`` hash content, ``object_etag``
computes the ETag the store gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

from pydantic_core import to_json

from agent.platform import executable_bit

__all__ = [
    "LocalEntry",
    "StatLike",
    "fd_sha256",
    "file_sha256",
    "is_unchanged",
    "object_etag",
]


class StatLike(Protocol):
    """What change detection reads from a stat: ``os.stat_result`` or ``snapshot.FileStat``."""

    @property
    def st_size(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ctime_ns(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_mode(self) -> int: ...


# A stat taken this soon after the file's last change may not see a write made in the
# same clock tick (same size, mtime and ctime, other bytes: git's "racily clean"). Such
# an entry keeps no ctime, so the next check hashes the file instead of trusting it.
_RACY_NS = 20_000_000  # above the coarsest kernel tick (HZ=100: 10 ms)

_JSON_CHUNK = 4096  # entries per piece of ``many_to_json_chunks``


class LocalEntry(NamedTuple):
    """What we know of a local file: its stat tuple and the sha256 of its content.

    A file is judged unchanged only when ``(size, mtime_ns, ctime_ns, inode)`` are all
    the ones recorded (``matches``). ``cp -p``, ``tar x``, ``unzip -o`` and ``touch -r``
    put the old size and mtime back, but not the ctime nor (for a new file) the inode.
    When only those differ (``same_size_and_mtime``) the caller hashes the file and
    compares with ``sha256``. An entry whose ctime or inode is unknown (written by an
    older agent, or racily recorded) never matches, so the file is hashed once.

    A named tuple, not a frozen dataclass: a stage's snapshot is read into one per file
    (100,000 at a time), and a tuple is made in a third of the time and is left alone
    by the cyclic garbage collector.
    """

    size: int
    mtime_ns: int
    sha256: str
    ctime_ns: int | None = None
    inode: int | None = None
    executable: bool | None = None
    """The executable bit; ``None`` where the platform has none (never compared)."""

    @classmethod
    def from_stat(cls, st: StatLike, sha256: str, *, now_ns: int | None = None) -> LocalEntry:
        """The entry of a file whose content (as of ``st``) hashes to ``sha256``."""
        now = time.time_ns() if now_ns is None else now_ns
        racy = now - st.st_ctime_ns < _RACY_NS
        return cls(
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            sha256=sha256,
            ctime_ns=None if racy else st.st_ctime_ns,
            inode=st.st_ino,
            executable=executable_bit(st.st_mode),
        )

    def matches(self, st: StatLike) -> bool:
        """True only if the whole stat tuple is the recorded one (the file is unchanged)."""
        return (
            self.ctime_ns is not None
            and self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.inode == st.st_ino
            and self.same_mode(st)
        )

    def same_mode(self, st: StatLike) -> bool:
        """The executable bit is the recorded one (or unknown on either side)."""
        now = executable_bit(st.st_mode)
        return self.executable is None or now is None or self.executable == now

    def same_size_and_mtime(self, st: StatLike) -> bool:
        """True if size and mtime are the recorded ones: hash to know whether it changed."""
        return self.size == st.st_size and self.mtime_ns == st.st_mtime_ns

    @staticmethod
    def many_to_json(entries: Mapping[str, LocalEntry]) -> bytes:
        """``{path: [size, mtime_ns, sha256, ctime_ns, inode, executable]}`` as JSON (the
        compact form ``from_list`` reads); ``many_to_json_chunks`` joined."""
        return b"".join(LocalEntry.many_to_json_chunks(entries))

    @staticmethod
    def many_to_json_chunks(
        entries: Mapping[str, LocalEntry], per: int = _JSON_CHUNK
    ) -> Iterator[bytes]:
        """``many_to_json`` in pieces of ``per`` entries, for a writer that takes them one
        by one: at 100,000 files the lists and the text of the whole snapshot held at
        once were about 30 MiB at the open's peak. Each piece is written by
        pydantic-core (a third of ``json.dumps``'s time), its lists built here, not by a
        call per entry."""
        yield b"{"
        batch: dict[str, list[object]] = {}
        first = True
        for rel, e in entries.items():
            batch[rel] = [e.size, e.mtime_ns, e.sha256, e.ctime_ns, e.inode, e.executable]
            if len(batch) == per:
                yield (b"" if first else b",") + to_json(batch)[1:-1]
                batch.clear()
                first = False
        if batch:
            yield (b"" if first else b",") + to_json(batch)[1:-1]
        yield b"}"

    @classmethod
    def from_list(cls, raw: list[object]) -> LocalEntry:
        """Read ``many_to_json``'s form of one entry (or the older ``[size, mtime_ns, sha256]``)."""
        if not isinstance(raw, list) or not 3 <= len(raw) <= 6:
            raise TypeError(f"not a local entry: {raw!r}")
        entry = cls._make(raw) if len(raw) == 6 else cls(*raw)  # type: ignore[arg-type]
        size, mtime_ns, sha256, ctime_ns, inode, executable = entry
        if not (
            type(size) is int
            and type(mtime_ns) is int
            and type(sha256) is str
            and (ctime_ns is None or type(ctime_ns) is int)
            and (inode is None or type(inode) is int)
            and (executable is None or type(executable) is bool)
        ):
            raise TypeError(f"not a local entry: {raw!r}")
        return entry


def is_unchanged(entry: LocalEntry | None, st: StatLike, hasher: Callable[[], str]) -> bool:
    """The one change test: stat tuple equal, or same size and mtime and the same sha256.

    ``hasher`` is called (the file read) only when size and mtime are equal but ctime or
    inode are not.
    """
    if entry is None:
        return False
    if entry.matches(st):
        return True
    if not entry.same_mode(st):  # a chmod +x alone is a change to commit
        return False
    return entry.same_size_and_mtime(st) and hasher() == entry.sha256


def fd_sha256(fd: int) -> str:
    """The sha256 hex digest of an open file, from its start (``hashlib.file_digest``)."""
    os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    os.lseek(fd, 0, os.SEEK_SET)
    return digest


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file (``hashlib.file_digest``)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def object_etag(fd: int, size: int, part: int | None) -> str:
    """The ETag an S3 store gives ``size`` bytes of an open file uploaded in ``part``-byte
    parts (``None``: one part, the MD5), as ``etag_part_size`` says the store sends it.

    Multipart: the MD5 of the parts' binary MD5s, then ``-<parts>``. This is how an
    existing ``.objects/{sha256}`` is checked against the local bytes before a commit
    relies on it (DESIGN.md "Key layout": trust nothing by name alone).
    """
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
            if part is None:
                return hashlib.file_digest(fh, "md5").hexdigest()
            parts: list[bytes] = []
            left = size
            while left > 0:
                want = min(part, left)
                one = hashlib.md5(usedforsecurity=False)
                while want > 0:
                    chunk = fh.read(min(want, 1 << 20))
                    if not chunk:
                        break
                    one.update(chunk)
                    want -= len(chunk)
                    left -= len(chunk)
                if want > 0:  # the file is shorter than ``size``: it changed meanwhile
                    break
                parts.append(one.digest())
            whole = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
            return f"{whole}-{len(parts)}"
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
