"""History, show, restore and prune for the facade (issue 11): ``agent.stage.history`` applied.

``restore`` is an ordinary session: it takes the lock with ``open``, puts the old
versions into the working folder and commits them with ``close``, so a restore is
a new commit and history is never rewritten. Asking for it is the consent the
mass-delete guard wants (issue 20): the CLI shows ``plan_restore`` first and asks.
``show`` and ``history`` need no lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConflictError, StoreError, VersionNotFoundError
from agent.folder.snapshot import scan
from agent.folder.workfolder import WorkFolder
from agent.log import get_logger
from agent.names import validate_rel_path
from agent.session.reports import CloseReport
from agent.stage.history import (
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
from agent.stage.intent import read_manifest
from agent.stage.keys import CommitInfo, StageKeys
from agent.stage.manifest import Manifest, ManifestEntry

if TYPE_CHECKING:
    from agent.session import PlantDesignSession

log = get_logger(__name__)

_PRUNE_LIMIT_AFTER_CLOSE = 1000


@dataclass(frozen=True)
class RestorePlan:
    """What a restore changes in the stage as it is now: shown before, checked after open."""

    restored_from: CommitInfo
    added: list[str]
    """In the commit, not in the stage now."""
    changed: list[str]
    """In both, with other bytes or another executable bit."""
    removed: list[str]
    """In the stage now, not in the commit."""

    @property
    def is_empty(self) -> bool:
        """The stage (or the selected paths) already is as the commit left it."""
        return not (self.added or self.changed or self.removed)

    def same_changes(self, other: RestorePlan) -> bool:
        """Both restore the same commit by the same adds, changes and removes."""
        return (self.restored_from.commit_id, self.added, self.changed, self.removed) == (
            other.restored_from.commit_id,
            other.added,
            other.changed,
            other.removed,
        )

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "restored_from": self.restored_from.as_dict(),
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
        }


@dataclass(frozen=True)
class RestoreReport:
    """What ``restore`` brought back, and the commit that recorded it."""

    plan: RestorePlan
    written: list[str]
    removed: list[str]
    close: CloseReport
    commit_id: str | None

    @property
    def restored_from(self) -> CommitInfo:
        """The commit the stage (or the paths) went back to."""
        return self.plan.restored_from

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            **self.plan.as_dict(),
            "written": self.written,
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


def _plan(
    info: CommitInfo,
    target: dict[str, ManifestEntry],
    current: dict[str, ManifestEntry],
    paths: Sequence[str],
) -> RestorePlan:
    """Pure: what going from ``current`` to ``target`` (within ``paths``) changes."""
    added, changed = [], []
    for rel, entry in sorted(target.items()):
        if not _selected(rel, paths):
            continue
        now = current.get(rel)
        if now is None:
            added.append(rel)
        elif (now.sha256, now.executable) != (entry.sha256, entry.executable):
            changed.append(rel)
    removed = sorted(r for r in current if r not in target and _selected(r, paths))
    return RestorePlan(restored_from=info, added=added, changed=changed, removed=removed)


def plan_restore(
    s: PlantDesignSession, projekt_id: str, stage: str, *, commit: str, paths: Sequence[str] = ()
) -> RestorePlan:
    """What ``restore`` would add, change and remove in the stage as it is now (no lock)."""
    plan, _target = _prepare(s, StageKeys(projekt_id, stage), commit, paths)
    return plan


def _prepare(
    s: PlantDesignSession, keys: StageKeys, commit: str, paths: Sequence[str]
) -> tuple[RestorePlan, Manifest]:
    """The plan against the stage's manifest now, and the commit's manifest."""
    wanted_paths = [validate_rel_path(p.rstrip("/")) for p in paths]
    info = find_commit(list_commits(s.store, keys), commit, keys)
    target = read_commit(s.store, info)
    current, _etag = read_manifest(s.store, keys)
    now = current.files if current is not None else {}
    known = {*target.files, *now}
    missing = [p for p in wanted_paths if not any(_selected(r, [p]) for r in known)]
    if missing:
        raise VersionNotFoundError(
            f"{', '.join(missing)}: neither in commit {info.commit_id} nor in the stage now"
        )
    return _plan(info, target.files, now, wanted_paths), target


def _check_as_shown(plan: RestorePlan, expected: RestorePlan, keys: StageKeys) -> None:
    """Refuse a restore that would now do other than what the user was shown."""
    if not plan.same_changes(expected):
        raise ConflictError(
            f"{keys.projekt_id}/{keys.stage} was committed to since the restore was shown; "
            "nothing was restored. Run `agent restore` again to see what it does now"
        )


def restore(
    s: PlantDesignSession,
    projekt_id: str,
    user: str,
    stage: str,
    *,
    commit: str,
    paths: Sequence[str] = (),
    expected: RestorePlan | None = None,
) -> RestoreReport:
    """Bring the stage (or ``paths``: files or folders) back to ``commit``, as a new commit.

    The restore is the confirmation: it removes what the commit did not have however
    much that is (the mass-delete guard does not apply; the state before stays in the
    history). With ``expected`` (the plan the user was shown), a stage that changed
    since is refused before anything is touched.
    """
    keys = StageKeys(projekt_id, stage)
    wanted_paths = [validate_rel_path(p.rstrip("/")) for p in paths]
    planned, target = _prepare(s, keys, commit, paths)
    work = s.open(projekt_id, user, stage, watch=False)
    try:
        base = s._base_manifest.files if s._base_manifest is not None else {}
        plan = _plan(planned.restored_from, target.files, base, wanted_paths)
        if expected is not None:
            _check_as_shown(plan, expected, keys)
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
        report = s.close(allow_mass_delete=True)  # the restore is the user's consent
    except BaseException:
        if not s.is_closed:
            s.abort()
        raise
    manifest, _etag = read_manifest(s.store, keys)
    log.info(
        "stage_restored",
        projekt_id=projekt_id,
        stage=stage,
        restored_from=plan.restored_from.commit_id,
        written=len(written),
        removed=len(removed),
    )
    return RestoreReport(
        plan=plan,
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
