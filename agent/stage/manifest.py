"""The committed manifest and the pure plans built from it (no I/O here but hashing).

A manifest maps each working-copy path to ``size``, ``sha256`` and the ETag of the
committed object. It is written last in a commit, with ``If-Match`` on the
manifest the session started from, so it is also the commit's fence.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import to_json

from agent.errors import PermanentStoreError
from agent.names import validate_rel_path
from agent.platform import executable_bit

__all__ = [
    "CONTENT_ADDRESSED",
    "LocalEntry",
    "Manifest",
    "ManifestEntry",
    "OpenPlan",
    "StatLike",
    "fd_sha256",
    "file_sha256",
    "is_unchanged",
    "object_etag",
    "plan_open",
    "summarize",
    "summarize_changes",
]


CONTENT_ADDRESSED = 2
"""The manifest version from which every entry's content is in ``.objects/``."""


@pydantic_dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One committed file.

    A slotted (pydantic) dataclass, not a model: a 100,000-file manifest held 8 objects
    per entry as models (81 MB); as slotted dataclasses it holds 39 MB.
    """

    size: int
    sha256: str
    etag: str
    executable: bool = False
    """The file's executable bit (POSIX), restored on download; omitted from JSON if False."""


class Manifest(BaseModel):
    """``{projekt_id}/{stage}.manifest.json``: what the committed working copy is."""

    model_config = ConfigDict(frozen=True)

    version: int = 1
    """2: every file's content is at ``.objects/{sha256}`` (content-addressed); 1: a stage
    committed before that, whose plain keys are the only copy (migrated by its next commit)."""
    files: dict[str, ManifestEntry] = {}
    committed_at: datetime | None = None
    committed_by: str | None = None
    machine: str | None = None
    session_id: str | None = None
    commit_id: str | None = None
    """The commit that wrote this manifest: a close whose answer was lost knows its own."""
    parent_commit_id: str | None = None
    """The commit this one was based on (version history)."""
    seq: int = 0
    """1 for a stage's first commit with history, parent's + 1 after (0: before history)."""
    write_id: str | None = None

    @property
    def content_addressed(self) -> bool:
        """Every file's content is in ``.objects/`` (written by a commit of this design)."""
        return self.version >= CONTENT_ADDRESSED

    def same_files(self, other: Manifest) -> bool:
        """Both name the same paths with the same size and sha256 (ETags aside)."""
        return {r: (e.size, e.sha256) for r, e in self.files.items()} == {
            r: (e.size, e.sha256) for r, e in other.files.items()
        }

    @classmethod
    def parse(cls, data: bytes, *, key: str) -> Manifest:
        """Parse a stored manifest; a body that is not one is a clear error."""
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            raise PermanentStoreError(
                f"the manifest {key} does not parse ({exc.error_count()} problems, first: "
                f"{exc.errors()[0]['msg']}). Restore it from the bucket's versioning or ask an "
                "operator; nothing was changed."
            ) from exc
        for rel in manifest.files:
            validate_rel_path(rel, key=f"{key}:{rel}")
        return manifest

    def to_bytes(self) -> bytes:
        """Stable JSON (paths sorted), so equal manifests have equal bytes.

        Fields at their default are left out (an entry's ``executable: false``, an unset
        ``committed_by``): pydantic-core writes it all without a Python call per entry.
        100,000 files took 1 s with a per-entry serializer and a sorted copy, 0.3 s now;
        a manifest already in order (as parsed, or as a commit leaves it) is not copied.
        """
        paths = list(self.files)
        ordered = self
        if paths != sorted(paths):
            ordered = self.model_copy(update={"files": dict(sorted(self.files.items()))})
        return ordered.model_dump_json(exclude_defaults=True).encode()

    @property
    def total_bytes(self) -> int:
        """Sum of the committed files' sizes."""
        return sum(e.size for e in self.files.values())


def summarize(base: Manifest, new: Manifest) -> tuple[int, int, int, int]:
    """``(added, changed, removed, bytes written)`` from ``base`` to ``new``."""
    added = changed = written = 0
    for rel, entry in new.files.items():
        was = base.files.get(rel)
        if was is None:
            added += 1
        elif (was.sha256, was.executable) != (entry.sha256, entry.executable):
            changed += 1
        else:
            continue
        written += entry.size
    removed = sum(1 for rel in base.files if rel not in new.files)
    return added, changed, removed, written


class ChangeLike(Protocol):
    """What ``summarize_changes`` reads of one changed file (a commit's copy)."""

    @property
    def size(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def executable(self) -> bool | None: ...


def summarize_changes(
    base: Manifest, copies: Mapping[str, ChangeLike], deletes: Iterable[str]
) -> tuple[int, int, int, int]:
    """``summarize`` of ``base`` and ``base`` with ``copies`` and ``deletes`` applied,
    without building the new manifest."""
    added = changed = written = 0
    for rel, item in copies.items():
        was = base.files.get(rel)
        executable = item.executable
        if was is None:
            added += 1
        elif was.sha256 != item.sha256 or (executable is not None and executable != was.executable):
            changed += 1
        else:
            continue
        written += item.size
    gone = set(deletes) - set(copies)
    removed = sum(1 for rel in gone if rel in base.files)
    return added, changed, removed, written


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


@dataclass(frozen=True, slots=True)
class LocalEntry:
    """What we know of a local file: its stat tuple and the sha256 of its content.

    A file is judged unchanged only when ``(size, mtime_ns, ctime_ns, inode)`` are all
    the ones recorded (``matches``). ``cp -p``, ``tar x``, ``unzip -o`` and ``touch -r``
    put the old size and mtime back, but not the ctime nor (for a new file) the inode.
    When only those differ (``same_size_and_mtime``) the caller hashes the file and
    compares with ``sha256``. An entry whose ctime or inode is unknown (written by an
    older agent, or racily recorded) never matches, so the file is hashed once.
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
        compact form ``from_list`` reads), by pydantic-core: 100,000 entries in a third of
        ``json.dumps``'s time (the list built here, not by a call per entry)."""
        return to_json(
            {
                rel: [e.size, e.mtime_ns, e.sha256, e.ctime_ns, e.inode, e.executable]
                for rel, e in entries.items()
            }
        )

    @classmethod
    def from_list(cls, raw: list[object]) -> LocalEntry:
        """Read ``many_to_json``'s form of one entry (or the older ``[size, mtime_ns, sha256]``)."""
        size, mtime_ns, sha256, *rest = raw
        ctime_ns = rest[0] if len(rest) > 0 else None
        inode = rest[1] if len(rest) > 1 else None
        executable = rest[2] if len(rest) > 2 else None
        if not (
            isinstance(size, int)
            and isinstance(mtime_ns, int)
            and isinstance(sha256, str)
            and (ctime_ns is None or isinstance(ctime_ns, int))
            and (inode is None or isinstance(inode, int))
            and (executable is None or isinstance(executable, bool))
        ):
            raise TypeError(f"not a local entry: {raw!r}")
        return cls(size, mtime_ns, sha256, ctime_ns, inode, executable)


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


@dataclass
class OpenPlan:
    """What ``open`` must do to make a local folder equal a manifest.

    ``kept`` holds the refreshed entry of each kept file (its current stat).
    """

    download: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    kept: dict[str, LocalEntry] = field(default_factory=dict)

    @property
    def is_noop(self) -> bool:
        """True when the local folder already equals the manifest."""
        return not self.download and not self.remove


def plan_open(
    manifest: Manifest | Mapping[str, tuple[int, str | None]],
    local: Mapping[str, LocalEntry],
    current: Mapping[str, StatLike],
    hasher: Callable[[str], str] | None = None,
) -> OpenPlan:
    """Compare a cached copy with the manifest (or ``path -> (size, sha256)``, ``None``
    for a sha256 not known: such a file is always downloaded).

    ``local`` is the snapshot recorded when the copy was cached (with hashes);
    ``current`` is a fresh scan of the folder (``path -> stat``). A file is kept only
    if it is unchanged since the snapshot (``is_unchanged``: the stat tuple, or, when
    only ctime/inode moved, ``hasher(path)``; without a hasher such a file is
    downloaded) and the snapshot's sha256 equals the manifest's; everything else in
    the manifest is downloaded, and local files the manifest does not name are removed.
    """
    plan = OpenPlan()
    wanted = (
        {rel: (e.size, e.sha256) for rel, e in manifest.files.items()}
        if isinstance(manifest, Manifest)
        else manifest
    )
    for rel, (size, sha256) in sorted(wanted.items()):
        snap = local.get(rel)
        now = current.get(rel)
        if (
            snap is not None
            and now is not None
            and sha256 is not None
            and snap.sha256 == sha256
            and snap.size == size
            and is_unchanged(snap, now, partial(hasher, rel) if hasher else str)
        ):
            plan.keep.append(rel)
            # The snapshot's own entry when the whole stat tuple is the same (a cached
            # copy put back untouched): no second entry per file.
            plan.kept[rel] = snap if snap.matches(now) else LocalEntry.from_stat(now, snap.sha256)
        else:
            plan.download.append(rel)
    plan.remove = sorted(set(current) - set(wanted))
    return plan


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
