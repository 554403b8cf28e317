"""Taking in someone else's commit on resume: a pure plan, decided by content.

A resumed session may find that someone committed to the stage after its base
(the lock expired, or was broken, while it was away). Each path is judged by
``(size, sha256)`` against the base the session started from, never by ETags or
by a manifest's equality as a whole: only a path whose content *they* changed
can collide with ours. Nothing here touches a file; ``PlantDesignSession``
applies the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Content", "MergePlan", "plan_merge"]

Content = tuple[int, str]
"""``(size, sha256)`` of a file."""


@dataclass
class MergePlan:
    """What to do with each path both sides may have touched."""

    download: list[str] = field(default_factory=list)
    """They changed it, we did not: take theirs."""
    remove: list[str] = field(default_factory=list)
    """They deleted it, we did not touch it: delete the local file."""
    conflicts: list[str] = field(default_factory=list)
    """Both changed it differently: ours is kept beside theirs (``*.conflict-*``), theirs taken."""
    revived: list[str] = field(default_factory=list)
    """We deleted it, they changed it: theirs comes back (their work is never dropped)."""
    kept_ours: list[str] = field(default_factory=list)
    """They deleted it, we changed it: ours stays and is committed again."""
    same: list[str] = field(default_factory=list)
    """Both made the same change: nothing to send."""

    @property
    def forget(self) -> list[str]:
        """Paths whose staged/pending change of ours is superseded by theirs."""
        return sorted([*self.conflicts, *self.revived, *self.same])


def plan_merge(
    base: Mapping[str, Content],
    theirs: Mapping[str, Content],
    ours: Mapping[str, str | None],
) -> MergePlan:
    """Plan the merge of ``theirs`` into a working copy that started at ``base``.

    ``ours`` maps every path this session changed (staged, pending, or different
    on disk from ``base``) to its current sha256, or ``None`` where we deleted it.
    A path only we changed is left alone: our change is committed at close.
    """
    plan = MergePlan()
    for rel in sorted(set(base) | set(theirs)):
        before, after = base.get(rel), theirs.get(rel)
        if before == after:
            continue  # they did not change it (ours, if any, wins as usual)
        if rel not in ours:
            (plan.remove if after is None else plan.download).append(rel)
            continue
        mine = ours[rel]
        if after is None:
            if mine is not None:
                plan.kept_ours.append(rel)
            else:
                plan.same.append(rel)
        elif mine is None:
            plan.revived.append(rel)
        elif mine == after[1]:
            plan.same.append(rel)
        else:
            plan.conflicts.append(rel)
    return plan
