"""A local cache of committed working copies that survives ``close``.

After a successful close the working folder is *moved* (not copied) to
``<cache>/<projekt_id>/<stage>/files`` together with a snapshot of what each
file is (size, mtime, ctime, inode and the sha256 that was committed). The next
``open`` of that stage moves it back and downloads only what the manifest says
changed, so re-opening an unchanged copy transfers nothing. Bounded by
``transfer.cache_max_bytes`` (least recently used stage copies go first);
deleting the cache folder is always safe.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import structlog

from agent.keys import validate_name
from agent.manifest import LocalEntry

__all__ = ["StageCache"]

log = structlog.get_logger(__name__)


class StageCache:
    """Moves whole stage copies in and out of the cache folder."""

    def __init__(self, root: Path, *, max_bytes: int, enabled: bool = True) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.enabled = enabled and max_bytes > 0

    def _entry(self, projekt_id: str, stage: str) -> Path:
        return self.root / validate_name("projekt_id", projekt_id) / validate_name("stage", stage)

    def take(self, projekt_id: str, stage: str, dest: Path) -> dict[str, LocalEntry]:
        """Move a cached copy to ``dest`` (which must not exist); return its snapshot.

        Returns an empty snapshot (and leaves ``dest`` absent) when nothing is cached.
        """
        entry = self._entry(projekt_id, stage)
        files = entry / "files"
        if not self.enabled or not files.is_dir():
            return {}
        try:
            raw = json.loads((entry / "snapshot.json").read_bytes())
            snapshot = {rel: LocalEntry.from_list(v) for rel, v in raw["files"].items()}
            dest.parent.mkdir(parents=True, exist_ok=True)
            _move(files, dest)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("cache_entry_unusable", projekt_id=projekt_id, stage=stage, error=str(exc))
            shutil.rmtree(entry, ignore_errors=True)
            return {}
        shutil.rmtree(entry, ignore_errors=True)
        log.info("cache_hit", projekt_id=projekt_id, stage=stage, files=len(snapshot))
        return snapshot

    def put(
        self, projekt_id: str, stage: str, folder: Path, snapshot: dict[str, LocalEntry]
    ) -> None:
        """Move ``folder`` into the cache with its snapshot, then prune to the size bound.

        When the cache is disabled (or the move fails) the folder is simply removed.
        """
        if not self.enabled:
            shutil.rmtree(folder, ignore_errors=True)
            return
        entry = self._entry(projekt_id, stage)
        try:
            shutil.rmtree(entry, ignore_errors=True)
            entry.mkdir(parents=True)
            files = {rel: e.to_list() for rel, e in snapshot.items()}
            (entry / "snapshot.json").write_text(
                json.dumps({"cached_at_ns": time.time_ns(), "files": files})
            )
            _move(folder, entry / "files")
        except OSError as exc:
            log.warning("cache_put_failed", projekt_id=projekt_id, stage=stage, error=str(exc))
            shutil.rmtree(entry, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            return
        self.prune()

    def prune(self) -> None:
        """Drop least recently cached stage copies until the cache fits ``max_bytes``."""
        if not self.root.is_dir():
            return
        entries: list[tuple[int, int, Path]] = []
        for snap in self.root.glob("*/*/snapshot.json"):
            try:
                raw = json.loads(snap.read_bytes())
                total = sum(int(v[0]) for v in raw["files"].values())
                entries.append((int(raw["cached_at_ns"]), total, snap.parent))
            except (OSError, ValueError, TypeError, IndexError, KeyError):
                shutil.rmtree(snap.parent, ignore_errors=True)
        used = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if used <= self.max_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)
            used -= size
            log.info("cache_evicted", path=str(path), bytes=size)


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError:
        shutil.move(str(src), str(dst))
