"""Ignore rules, our temp names, and folder snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DEFAULT_IGNORE
from agent.ignore import IgnoreRules, is_temporary, temp_name_for
from agent.snapshot import FileStat, diff, scan

RULES = IgnoreRules(DEFAULT_IGNORE)


@pytest.mark.parametrize(
    "name",
    [
        "~$report.docx",
        "~WRL0001.tmp",
        ".~lock.plan.odt#",
        "x.tmp",
        ".plan.dwg.swp",
        "plan.dwg~",
        ".DS_Store",
        "thumbs.db",
        "sub/dir/~$x.xlsx",
    ],
)
def test_editor_leftovers_are_ignored(name: str) -> None:
    """Office, LibreOffice and vim lock/temp files never reach the store."""
    assert RULES.is_ignored(name)


@pytest.mark.parametrize("name", ["plan.dwg", "docs/report.docx", "a/b/c.step", "tmp/file.txt"])
def test_real_files_are_not_ignored(name: str) -> None:
    """Ordinary project files pass."""
    assert not RULES.is_ignored(name)


def test_path_patterns_and_folder_names() -> None:
    """A pattern with '/' matches the path; a folder matching a name pattern hides its files."""
    rules = IgnoreRules(["build/*.log", "cache"])
    assert rules.is_ignored("build/x.log")
    assert not rules.is_ignored("src/x.log")
    assert rules.is_ignored("cache/deep/file.bin")


def test_temp_names_are_recognised_and_short(tmp_path: Path) -> None:
    """Our own temp names are ignored, and long names are hashed."""
    tmp = temp_name_for(tmp_path / ("n" * 300 + ".dwg"))
    assert is_temporary(tmp.name)
    assert RULES.is_ignored(tmp.name)
    assert len(tmp.name) < 80


def test_scan_lists_files_skips_ignored_and_symlinks(tmp_path: Path) -> None:
    """scan gives POSIX paths with size and mtime, without ignored files or links."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_bytes(b"123")
    (tmp_path / "a" / "~$x.docx").write_bytes(b"lock")
    (tmp_path / "top.dwg").write_bytes(b"1")
    (tmp_path / "link").symlink_to(tmp_path / "top.dwg")
    snap = scan(tmp_path, RULES)
    assert ["a/x.txt", "top.dwg"] == sorted(snap)
    assert 3 == snap["a/x.txt"].size
    assert ["a/x.txt"] == list(scan(tmp_path, RULES, "a"))


def test_diff_reports_changed_added_and_removed() -> None:
    """diff compares size and mtime."""
    old = {"same": FileStat(1, 1), "changed": FileStat(1, 1), "gone": FileStat(1, 1)}
    new = {"same": FileStat(1, 1), "changed": FileStat(1, 2), "added": FileStat(5, 5)}
    assert ({"changed", "added"}, {"gone"}) == diff(old, new)
