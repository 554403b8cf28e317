"""The plain tree repairs itself: whoever holds a stage's lock makes it equal the manifest.

The truth of a stage is its manifest and the project's ``.objects/``; the plain tree
``{projekt_id}/{stage}/...`` is a view of them for other tools and read-only hosts
(DESIGN.md "Key layout"). A late CopyObject or DELETE that lands after someone
else's commit, a plain tool deleting or overwriting a committed file, or a store
that ignored a copy condition leaves the view different from the manifest. The
lock holder (open, resume) lists the view and, where it differs:

- a path missing, or with another size or ETag: copied again from
  ``.objects/{sha256}``, the answer checked;
- a key under the stage that the manifest does not name: deleted;
- (content-addressed manifests) an object the manifest needs that is missing from
  ``.objects/`` while the plain key still holds its bytes: copied back from the plain
  key (a prune DELETE that arrived after a commit that needed the object);
- content that is in neither place: reported as lost, nothing else changed.

Every repair is logged and returned, for ``status`` and ``--json``.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agent.errors import AgentError, NotFoundError, PreconditionFailedError
from agent.log import get_logger
from agent.names import printable
from agent.stage.keys import StageKeys
from agent.stage.manifest import Manifest, ManifestEntry
from agent.store.base import ObjectInfo, ObjectStore
from agent.store.parallel import Parallel

__all__ = ["RepairReport", "repair_stage"]

log = get_logger(__name__)


@dataclass
class RepairReport:
    """What one check of the plain tree found and did."""

    recopied: list[str] = field(default_factory=list)
    """Paths whose plain key was missing or held other bytes: copied again from .objects/."""
    removed: list[str] = field(default_factory=list)
    """Plain keys the manifest does not name: deleted."""
    objects_restored: list[str] = field(default_factory=list)
    """Paths whose object was missing from .objects/: copied back from the plain key."""
    lost: list[str] = field(default_factory=list)
    """Paths whose content is in neither place (restore them from history)."""
    error: str | None = None
    """Why the check stopped early (the store failed), if it did."""

    @property
    def repaired(self) -> bool:
        """Anything was put right."""
        return bool(self.recopied or self.removed or self.objects_restored)

    def as_dict(self) -> dict[str, object]:
        """For ``status`` and ``--json``."""
        return {
            "recopied": [printable(r) for r in self.recopied],
            "removed": [printable(k) for k in self.removed],
            "objects_restored": [printable(r) for r in self.objects_restored],
            "lost": [printable(r) for r in self.lost],
            "error": self.error,
        }


def _differs(entry: ManifestEntry, info: ObjectInfo | None) -> bool:
    if info is None or info.size != entry.size:
        return True
    # A manifest written before ETags were recorded has none: size is what can be told.
    return bool(entry.etag) and info.etag != entry.etag


def repair_stage(
    store: ObjectStore,
    keys: StageKeys,
    manifest: Manifest,
    *,
    workers: int,
    stop: threading.Event | None = None,
) -> RepairReport:
    """Make the plain tree of ``keys``' stage equal ``manifest`` (the caller holds the lock).

    ``stop`` ends the check between requests (an abort while it runs in the background).
    """
    report = RepairReport()
    try:
        _repair(store, keys, manifest, report, workers=workers, stop=stop or threading.Event())
    except AgentError as exc:
        report.error = str(exc)
        log.warning("stage_repair_incomplete", stage=keys.stage, error=str(exc))
    if report.repaired or report.lost:
        log.warning(
            "stage_repaired",
            projekt_id=keys.projekt_id,
            stage=keys.stage,
            recopied=len(report.recopied),
            removed=len(report.removed),
            objects_restored=len(report.objects_restored),
            lost=[printable(r) for r in report.lost[:20]],
            paths=[printable(r) for r in report.recopied[:20]],
        )
    return report


def _compare_plain(
    store: ObjectStore, keys: StageKeys, manifest: Manifest
) -> tuple[list[str], list[str]]:
    """``(paths whose plain key is missing or differs, keys the manifest does not name)``."""
    prefix = keys.committed_prefix
    files = manifest.files
    unseen = set(files)
    damaged: list[str] = []
    extras: list[str] = []
    for info in store.list(prefix):
        rel = info.key[len(prefix) :]
        entry = files.get(rel)
        if entry is not None:
            unseen.discard(rel)
            if _differs(entry, info):
                damaged.append(rel)
        elif not info.key.endswith("/"):  # a folder marker holds no file
            extras.append(info.key)
    return sorted(unseen.union(damaged)), extras  # a key listed twice is repaired once


def _missing_objects(store: ObjectStore, keys: StageKeys, manifest: Manifest) -> set[str]:
    """The sha256 of each content the manifest needs that ``.objects/`` does not list."""
    prefix = keys.objects_prefix
    needed = {e.sha256 for e in manifest.files.values()}
    for info in store.list(prefix):
        needed.discard(info.key[len(prefix) :])
    return needed


def _repair(
    store: ObjectStore,
    keys: StageKeys,
    manifest: Manifest,
    report: RepairReport,
    *,
    workers: int,
    stop: threading.Event,
) -> None:
    # Both listings are compared page by page as they come, against sets of the
    # manifest's own strings: at 100,000 files, holding an ObjectInfo per listed object
    # (both listings) was ~100 MiB on top of the session's.
    with ThreadPoolExecutor(1, thread_name_prefix="pdagent-repair-list") as ahead:
        objects_missing = (
            ahead.submit(_missing_objects, store, keys, manifest)
            if manifest.content_addressed
            else None
        )
        damaged, extras = _compare_plain(store, keys, manifest)
        needed = objects_missing.result() if objects_missing is not None else set()
    if stop.is_set():
        return
    damaged_set = set(damaged)
    missing_objects = sorted(
        rel for rel, e in manifest.files.items() if e.sha256 in needed and rel not in damaged_set
    )
    pool = Parallel(workers)

    def recopy(rel: str) -> None:
        if stop.is_set():
            return
        entry = manifest.files[rel]
        try:
            result = store.copy(keys.version(entry.sha256), keys.committed(rel), size=entry.size)
        except (NotFoundError, PreconditionFailedError):
            report.lost.append(rel)
            return
        if entry.etag and result.etag != entry.etag and "-" not in result.etag + entry.etag:
            # Other bytes under the content's name: the plain copy is not trusted either.
            store.delete(keys.committed(rel))
            report.lost.append(rel)
            return
        report.recopied.append(rel)

    def restore_object(rel: str) -> None:
        if stop.is_set():
            return
        entry = manifest.files[rel]
        try:
            store.copy(
                keys.committed(rel),
                keys.version(entry.sha256),
                if_source_etag=entry.etag or None,
                size=entry.size,
            )
        except (NotFoundError, PreconditionFailedError):
            report.lost.append(rel)
            return
        report.objects_restored.append(rel)

    pool.map(damaged, recopy)
    pool.map(missing_objects, restore_object)
    if extras and not stop.is_set():
        store.delete_many(extras)
        report.removed.extend(extras)
    report.recopied.sort()
    report.lost.sort()
    report.objects_restored.sort()
