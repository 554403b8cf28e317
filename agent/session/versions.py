"""History, show, restore and prune for the facade (issue 11): ``agent.history`` applied.

``restore`` is an ordinary session: it takes the lock with ``open``, puts the old
versions into the working folder and commits them with ``close``, so a restore is
a new commit and history is never rewritten. ``show`` and ``history`` need no lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.commit import read_manifest
from agent.errors import StoreError, VersionNotFoundError
from agent.history import (
    FileVersion,
    PrunePlan,
    apply_prune,
    fetch_version,
    file_versions,
    find_commit,
    kept,
    list_commits,
    plan_prune,
    read_commit,
    stages_with_history,
)
from agent.keys import CommitInfo, StageKeys, WorkFolder, validate_rel_path
from agent.log import get_logger
from agent.snapshot import scan

if TYPE_CHECKING:
    from agent.session import PlantDesignSession
    from agent.session.checkin import CloseReport

log = get_logger(__name__)

_PRUNE_LIMIT_AFTER_CLOSE = 1000


@dataclass(frozen=True)
class RestoreReport:
    """What ``restore`` brought back, and the commit that recorded it."""

    restored_from: CommitInfo
    written: list[str]
    removed: list[str]
    close: CloseReport
    commit_id: str | None

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "restored_from": self.restored_from.as_dict(),
            "written": self.written,
            "removed": self.removed,
            "commit_id": self.commit_id,
        }


def history(
    s: PlantDesignSession, projekt_id: str, stage: str, path: str | None = None
) -> list[CommitInfo] | list[FileVersion]:
    """The stage's commits (one listing); with ``path``, the versions of that file."""
    keys = StageKeys(projekt_id, stage)
    commits = list_commits(s.store, keys)
    if path is None:
        return commits
    return file_versions(
        s.store, commits, validate_rel_path(path), workers=s.config.transfer.workers
    )


def show(
    s: PlantDesignSession, projekt_id: str, stage: str, *, commit: str, path: str, output: Path
) -> FileVersion:
    """Write ``path`` as commit ``commit`` left it to ``output`` (no lock needed)."""
    keys = StageKeys(projekt_id, stage)
    rel = validate_rel_path(path)
    info = find_commit(list_commits(s.store, keys), commit, keys)
    entry = read_commit(s.store, info).files.get(rel)
    if entry is None:
        raise VersionNotFoundError(
            f"{rel} is not in commit {info.commit_id} of {projekt_id}/{stage} (deleted, or "
            "not yet there): `agent history --path` lists its versions"
        )
    fetch_version(s.store, keys, rel, entry, output)
    return FileVersion(info, entry)


def _selected(rel: str, paths: Sequence[str]) -> bool:
    return not paths or any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in paths)


def restore(
    s: PlantDesignSession,
    projekt_id: str,
    user: str,
    stage: str,
    *,
    commit: str,
    paths: Sequence[str] = (),
) -> RestoreReport:
    """Bring the stage (or ``paths``: files or folders) back to ``commit``, as a new commit."""
    keys = StageKeys(projekt_id, stage)
    wanted_paths = [validate_rel_path(p.rstrip("/")) for p in paths]
    info = find_commit(list_commits(s.store, keys), commit, keys)
    target = read_commit(s.store, info)
    current, _etag = read_manifest(s.store, keys)
    known = {*target.files, *(current.files if current is not None else ())}
    missing = [p for p in wanted_paths if not any(_selected(r, [p]) for r in known)]
    if missing:
        raise VersionNotFoundError(
            f"{', '.join(missing)}: neither in commit {info.commit_id} nor in the stage now"
        )
    work = s.open(projekt_id, user, stage, watch=False)
    try:
        folder = WorkFolder(work)
        present = scan(work, s.rules)
        removed = sorted(r for r in present if _selected(r, wanted_paths) and r not in target.files)
        for rel in removed:
            folder.unlink(rel)
        written = []
        for rel, entry in sorted(target.files.items()):
            if not _selected(rel, wanted_paths):
                continue
            have = s._base_files.get(rel) if rel in present else None
            if have is not None and have.sha256 == entry.sha256:
                if have.executable in (None, entry.executable):
                    continue
            else:
                fetch_version(s.store, keys, rel, entry, folder.path(rel))
            folder.set_executable(rel, entry.executable)
            written.append(rel)
        report = s.close()
    except BaseException:
        if not s.is_closed:
            s.abort()
        raise
    manifest, _etag = read_manifest(s.store, keys)
    log.info(
        "stage_restored",
        projekt_id=projekt_id,
        stage=stage,
        restored_from=info.commit_id,
        written=len(written),
        removed=len(removed),
    )
    return RestoreReport(
        restored_from=info,
        written=written,
        removed=removed,
        close=report,
        commit_id=manifest.commit_id if manifest is not None else None,
    )


def prune(s: PlantDesignSession, projekt_id: str, *, dry_run: bool = False) -> PrunePlan:
    """Apply the retention of ``[history]`` to a project (every stage with history)."""
    stages = stages_with_history(s.store, projekt_id)
    plan = plan_prune(
        s.store, projekt_id, stages, s.config.history, workers=s.config.transfer.workers
    )
    if not dry_run:
        apply_prune(s.store, plan)
    return plan


def prune_after_close(s: PlantDesignSession, keys: StageKeys) -> None:
    """After a commit: prune the project when this stage has commits retention lets go.

    One listing decides; the prune itself is bounded and its errors are only logged
    (the commit is complete either way).
    """
    config = s.config.history
    if not config.prune_on_close:
        return
    try:
        commits = list_commits(s.store, keys)
        if len(kept(commits, config, s.store.server_time())) == len(commits):
            return
        stages = stages_with_history(s.store, keys.projekt_id)
        plan = plan_prune(
            s.store, keys.projekt_id, stages, config, workers=s.config.transfer.workers
        )
        apply_prune(s.store, plan, limit=_PRUNE_LIMIT_AFTER_CLOSE)
    except StoreError as exc:
        log.warning("history_prune_after_close_failed", error=str(exc))
