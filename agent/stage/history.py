"""Version history (issue 11): every commit can be looked at and brought back.

R2 keeps no object versions, so the commit keeps them itself (``agent.stage.commit``):

- ``{projekt_id}/.history/{stage}/{seq}~{when}~{commit_id}~...~{user}.json`` (see
  ``agent.stage.keys.CommitInfo``)
  holds each commit's full manifest (with its parent's id). Everything ``agent
  history`` shows is in the key, so listing 1,000 commits is one listing request,
  not 1,000 reads.
- ``{projekt_id}/.objects/{sha256}`` holds every file version: the streamer sends each
  content there once, and the commit copies it onto the plain key. Content-addressed:
  a version is stored once per project, however many commits or stages refer to it,
  so keeping a replaced version costs nothing. (A stage committed before content
  addressing had its versions copied there by its first commit since.)

History is never rewritten: a restore is a new commit. ``prune`` deletes the
manifests of commits the retention no longer keeps and the versions no kept
manifest (of any stage of the project) and no unfinished commit needs.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from agent.config import HistoryConfig
from agent.errors import (
    InvalidNameError,
    NotFoundError,
    ObjectTooLargeError,
    PermanentStoreError,
    StoreError,
    VersionNotFoundError,
)
from agent.log import get_logger
from agent.stage.intent import read_intent, read_manifest
from agent.stage.keys import CommitInfo, StageKeys
from agent.stage.manifest import Manifest, ManifestEntry
from agent.store.base import ObjectStore
from agent.store.parallel import Parallel

__all__ = [
    "CommitInfo",
    "FileVersion",
    "PrunePlan",
    "fetch_version",
    "file_versions",
    "find_commit",
    "list_commits",
    "plan_prune",
    "read_commit",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class FileVersion:
    """One version of one file: the commit that wrote it (or deleted it: ``entry`` None)."""

    commit: CommitInfo
    entry: ManifestEntry | None

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        out = self.commit.as_dict()
        out["deleted"] = self.entry is None
        if self.entry is not None:
            out.update(size=self.entry.size, sha256=self.entry.sha256)
        return out


def list_commits(store: ObjectStore, keys: StageKeys) -> list[CommitInfo]:
    """Every commit of the stage that history holds, oldest first (one listing)."""
    out = []
    for info in store.list(keys.history_prefix):
        parsed = CommitInfo.parse(keys, info.key)
        if parsed is None:
            log.warning("history_key_ignored", key=info.key)  # not ours: never trusted
            continue
        out.append(parsed)
    return sorted(out, key=lambda c: (c.seq, c.committed_at, c.commit_id))


def find_commit(commits: Sequence[CommitInfo], ref: str, keys: StageKeys) -> CommitInfo:
    """The commit named by a full id, a unique prefix (>= 6 characters) or ``#SEQ``."""
    if ref.startswith("#") and ref[1:].isdigit():
        found = [c for c in commits if c.seq == int(ref[1:])]
    elif len(ref) >= 6 and re.fullmatch(r"[0-9a-f]+", ref):
        found = [c for c in commits if c.commit_id.startswith(ref)]
    else:
        found = []
    if len(found) == 1:
        return found[0]
    what = "is ambiguous" if found else "is not in the history"
    raise VersionNotFoundError(
        f"commit {ref!r} {what} of {keys.projekt_id}/{keys.stage}: use a commit id (or at "
        "least 6 of its first characters) or #SEQ from `agent history`"
    )


def read_commit(store: ObjectStore, commit: CommitInfo) -> Manifest:
    """The manifest a commit wrote; ``VersionNotFoundError`` when it is gone or damaged."""
    try:
        data = store.get(commit.key)
    except NotFoundError as exc:
        raise VersionNotFoundError(
            f"commit {commit.commit_id} was pruned from the history meanwhile"
        ) from exc
    try:
        return Manifest.parse(data.body, key=commit.key)
    except PermanentStoreError as exc:  # bucket input that is not a manifest
        raise VersionNotFoundError(
            f"the history entry of commit #{commit.seq} ({commit.commit_id}) is damaged, so "
            f"that commit cannot be shown or restored: {exc}"
        ) from exc


def _read_or_skip(store: ObjectStore, commit: CommitInfo) -> Manifest | None:
    """``read_commit``, or ``None`` (with a warning) for an entry that is gone, damaged
    or over the size limit: one bad entry hides that commit, not the file's history."""
    try:
        return read_commit(store, commit)
    except (VersionNotFoundError, ObjectTooLargeError) as exc:
        log.warning("history_entry_skipped", key=commit.key, error=str(exc))
        return None


def file_versions(
    store: ObjectStore, commits: Sequence[CommitInfo], rel: str, *, workers: int
) -> list[FileVersion]:
    """The commits that changed ``rel`` (wrote other bytes, or deleted it), oldest first.

    Reads the commits' manifests in parallel (``workers`` at a time).
    """
    manifests = Parallel(workers).map(list(commits), lambda c: _read_or_skip(store, c))
    out: list[FileVersion] = []
    last: tuple[str, bool] | None = None
    for commit, manifest in zip(commits, manifests, strict=True):
        if manifest is None:
            continue
        entry = manifest.files.get(rel)
        now = (entry.sha256, entry.executable) if entry is not None else None
        if now != last and not (now is None and last is None):
            out.append(FileVersion(commit, entry))
        last = now
    return out


def fetch_version(
    store: ObjectStore, keys: StageKeys, rel: str, entry: ManifestEntry, dest: Path
) -> None:
    """Write the version ``entry`` of ``rel`` to ``dest`` (temp file, checked, renamed).

    Read from ``.objects/{sha256}``, then from the committed key (a stage from before
    content addressing); the bytes must hash to ``entry.sha256`` either way, and no more
    than the manifest's size is read: an object larger than that is not this version.
    """
    for key in (keys.version(entry.sha256), keys.committed(rel)):
        try:
            body = store.get(key, max_bytes=entry.size).body
        except NotFoundError:
            continue
        except ObjectTooLargeError:
            log.warning("version_object_too_large", key=key, expected_size=entry.size)
            continue
        if hashlib.sha256(body).hexdigest() != entry.sha256:
            continue  # the committed key holds a newer version
        _write_new(dest, body)
        return
    raise VersionNotFoundError(
        f"the version {entry.sha256[:12]} of {rel} is no longer kept (pruned, or the stage "
        "was committed before history existed)"
    )


def _write_new(dest: Path, body: bytes) -> None:
    """``dest`` gets ``body`` whole or not at all (temp beside it, fsync, rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.with_name(f".pdagent.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temp, flags | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ retention


@dataclass
class PrunePlan:
    """What ``prune`` deletes (or, in a dry run, would delete)."""

    commits: list[CommitInfo] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    version_bytes: int = 0
    kept_commits: int = 0
    projekt_id: str = ""
    """The project planned (``apply_prune`` looks at its stages again right before deleting)."""

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "commits": [c.as_dict() for c in self.commits],
            "versions": self.versions,
            "version_bytes": self.version_bytes,
            "kept_commits": self.kept_commits,
        }


def kept(commits: Sequence[CommitInfo], config: HistoryConfig, now: datetime) -> list[CommitInfo]:
    """The commits retention keeps: among the newest ``keep_commits``, or younger than
    ``keep_days`` (0 = no limit on either, which keeps everything)."""
    if config.keep_days == 0 or config.keep_commits == 0:
        return list(commits)
    newest = {c.commit_id for c in list(commits)[-config.keep_commits :]}
    young = now - timedelta(days=config.keep_days)
    return [c for c in commits if c.commit_id in newest or c.committed_at >= young]


def plan_prune(
    store: ObjectStore,
    projekt_id: str,
    stages: Iterable[str],
    config: HistoryConfig,
    *,
    workers: int,
    now: datetime | None = None,
) -> PrunePlan:
    """What retention lets go in a project (reads only; ``apply_prune`` deletes).

    ``stages`` are the project's stages with history. An object is needed while any
    kept manifest of any of them, any stage's current manifest, or any unfinished
    commit intent names its sha256; an object younger than ``grace`` is never let go
    (a session may have just sent it, or a commit be copying it). ``grace`` is longer
    than any request can be delayed, so a late DELETE never meets a new object; an old
    object that a commit came to need after this plan is checked again by
    ``apply_prune``, and one a DELETE removed anyway is restored from the plain tree by
    the next lock holder (``agent.stage.repair``).
    """
    now = now or store.server_time()
    plan = PrunePlan(projekt_id=projekt_id)
    needed = needed_now(store, projekt_id)
    for stage in stages:
        keys = StageKeys(projekt_id, stage)
        commits = list_commits(store, keys)
        keep = kept(commits, config, now)
        plan.kept_commits += len(keep)
        keep_ids = {c.commit_id for c in keep}
        plan.commits += [c for c in commits if c.commit_id not in keep_ids]
        manifests = Parallel(workers).map(keep, lambda c: read_commit(store, c))
        for manifest in manifests:
            needed.update(e.sha256 for e in manifest.files.values())
    prefix = f"{projekt_id}/.objects/"
    young = now - timedelta(seconds=config.grace)
    for info in store.list(prefix):
        sha = info.key.removeprefix(prefix)
        if sha in needed:
            continue
        if info.last_modified is None or info.last_modified > young:
            continue
        plan.versions.append(info.key)
        plan.version_bytes += info.size
    return plan


def needed_now(store: ObjectStore, projekt_id: str) -> set[str]:
    """The sha256s that every stage's current manifest and unfinished intent name."""
    stages = [
        info.key.removeprefix(f"{projekt_id}/").removesuffix(".manifest.json")
        for info in store.list_level(f"{projekt_id}/")[0]
        if info.key.endswith(".manifest.json")
    ]
    needed: set[str] = set()
    for stage in stages:
        try:
            keys = StageKeys(projekt_id, stage)
        except InvalidNameError:
            continue  # not a stage of ours
        manifest, _etag = read_manifest(store, keys)
        if manifest is not None:
            needed.update(e.sha256 for e in manifest.files.values())
        intent = read_intent(store, keys)
        if intent is not None and intent[0].state != "done":
            needed.update(intent[0].shas())
    return needed


def apply_prune(store: ObjectStore, plan: PrunePlan, *, limit: int | None = None) -> int:
    """Delete what ``plan`` names: unkept versions first, then the commits' manifests.

    Right before deleting, the project's current manifests and unfinished intents are
    read again: an object a commit came to need since the plan is kept. ``limit``
    bounds the number of deletes (the background prune after a close); returns how
    many objects were deleted.
    """
    versions = plan.versions
    if versions and plan.projekt_id:
        prefix = f"{plan.projekt_id}/.objects/"
        again = needed_now(store, plan.projekt_id)
        versions = [k for k in versions if k.removeprefix(prefix) not in again]
        if len(versions) < len(plan.versions):
            log.info("prune_kept_newly_needed", count=len(plan.versions) - len(versions))
    doomed = [*versions, *(c.key for c in plan.commits)]
    if limit is not None:
        doomed = doomed[:limit]
    deleted = 0
    for start in range(0, len(doomed), 1000):
        batch = doomed[start : start + 1000]
        try:
            store.delete_many(batch)
        except StoreError as exc:
            log.warning("history_prune_failed", error=str(exc), deleted=deleted)
            break
        deleted += len(batch)
    log.info("history_pruned", deleted=deleted, planned=len(doomed))
    return deleted


def stages_with_history(store: ObjectStore, projekt_id: str) -> list[str]:
    """The stages of a project that have history (from one listing of ``.history/``)."""
    prefix = f"{projekt_id}/.history/"
    stages = {info.key.removeprefix(prefix).split("/", 1)[0] for info in store.list(prefix)}
    return sorted(s for s in stages if s)
