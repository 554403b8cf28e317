"""History keys and retention, pure (issue 11)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.config import HistoryConfig
from agent.stage.history import kept
from agent.stage.keys import CommitInfo, StageKeys
from agent.stage.manifest import Manifest, ManifestEntry, summarize

KEYS = StageKeys("P1", "planning")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _commit(seq: int, days_ago: float, now: datetime = T0) -> CommitInfo:
    return CommitInfo(
        seq=seq,
        commit_id=f"{seq:032x}",
        committed_at=now - timedelta(days=days_ago),
        user="a.b-c_d",
        added=1,
        changed=2,
        removed=3,
        bytes=4,
    )


def test_a_commit_round_trips_through_its_history_key() -> None:
    info = _commit(7, 0)
    key = info.key_in(KEYS)
    assert key.startswith("P1/.history/planning/0000000007~20260101T000000Z~")
    parsed = CommitInfo.parse(KEYS, key)
    assert parsed is not None
    assert parsed.as_dict() == info.as_dict()


def test_foreign_or_malformed_history_keys_are_ignored() -> None:
    assert CommitInfo.parse(KEYS, "P1/.history/planning/notes.txt") is None
    assert CommitInfo.parse(KEYS, "P1/.history/other/" + _commit(1, 0).key_in(KEYS)) is None
    assert CommitInfo.parse(StageKeys("P1", "other"), _commit(1, 0).key_in(KEYS)) is None


def test_unsafe_user_names_are_made_key_safe() -> None:
    info = CommitInfo(1, "0" * 32, T0, "eve/../x y", 0, 0, 0, 0)
    parsed = CommitInfo.parse(KEYS, info.key_in(KEYS))
    assert parsed is not None and parsed.user == "eve_.._x_y"


def test_retention_keeps_the_newest_or_the_young_and_zero_keeps_all() -> None:
    commits = [_commit(i, days) for i, days in enumerate([200, 150, 100, 10, 1], start=1)]
    config = HistoryConfig(keep_commits=2, keep_days=30)
    assert [c.seq for c in kept(commits, config, T0)] == [4, 5]
    config = HistoryConfig(keep_commits=3, keep_days=120)
    assert [c.seq for c in kept(commits, config, T0)] == [3, 4, 5]
    assert len(kept(commits, HistoryConfig(keep_commits=0, keep_days=1), T0)) == 5
    assert len(kept(commits, HistoryConfig(keep_commits=1, keep_days=0), T0)) == 5


def test_summarize_counts_added_changed_removed_and_bytes() -> None:
    def entry(sha: str, size: int, executable: bool = False) -> ManifestEntry:
        return ManifestEntry(size=size, sha256=sha * 64, etag="e", executable=executable)

    base = Manifest(files={"a": entry("a", 1), "b": entry("b", 2), "c": entry("c", 3)})
    new = Manifest(files={"a": entry("a", 1), "b": entry("b", 2, True), "d": entry("d", 5)})
    assert summarize(base, new) == (1, 1, 1, 7)
