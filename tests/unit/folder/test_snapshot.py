"""Folder snapshots (size and mtime per file) and their pure difference."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.config import DEFAULT_IGNORE
from agent.errors import WorkFolderReplacedError
from agent.folder.ignore import IgnoreRules, temp_name_for
from agent.folder.snapshot import FileStat, diff, scan
from agent.folder.workfolder import WorkFolder, folder_identity

RULES = IgnoreRules(DEFAULT_IGNORE)


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "x.txt").write_bytes(b"123")
    (root / "a" / "b" / "deep.step").write_bytes(b"12345")
    (root / "a" / "~$x.docx").write_bytes(b"lock")
    (root / "top.dwg").write_bytes(b"1")
    temp_name_for(root / "top.dwg").write_bytes(b"half")


def test_scan_lists_regular_files_with_posix_paths_size_and_mtime(tmp_path: Path) -> None:
    """scan gives every file below the root, without ignored or temp files."""
    _tree(tmp_path)
    snap = scan(tmp_path, RULES)
    assert ["a/b/deep.step", "a/x.txt", "top.dwg"] == sorted(snap)
    st = (tmp_path / "a" / "x.txt").stat()
    assert FileStat(3, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode) == snap["a/x.txt"]


def test_scan_skips_symlinks_to_files_and_folders(tmp_path: Path) -> None:
    """Links are never followed nor listed."""
    _tree(tmp_path)
    (tmp_path / "link.dwg").symlink_to(tmp_path / "top.dwg")
    (tmp_path / "linkdir").symlink_to(tmp_path / "a", target_is_directory=True)
    assert "link.dwg" not in scan(tmp_path, RULES)
    assert not any(p.startswith("linkdir") for p in scan(tmp_path, RULES))


def test_scan_of_a_subtree_keeps_root_relative_paths(tmp_path: Path) -> None:
    """A subtree scan lists only that folder, with paths relative to the root."""
    _tree(tmp_path)
    assert ["a/b/deep.step", "a/x.txt"] == sorted(scan(tmp_path, RULES, "a"))
    assert ["a/b/deep.step"] == sorted(scan(tmp_path, RULES, "a/b"))


def test_scan_of_a_subtree_that_is_a_file_lists_that_file(tmp_path: Path) -> None:
    """A rescan of a path that is now a file reports the file, not an empty folder."""
    _tree(tmp_path)
    assert ["a/x.txt"] == list(scan(tmp_path, RULES, "a/x.txt"))


def test_scan_of_a_missing_or_ignored_subtree_is_empty(tmp_path: Path) -> None:
    """A subtree that vanished, or is ignored, has no files."""
    _tree(tmp_path)
    assert {} == scan(tmp_path, RULES, "gone")
    assert {} == scan(tmp_path, RULES, "a/~$x.docx")
    assert {} == scan(tmp_path / "nothing-here", RULES)


def test_an_ignored_folder_is_not_entered(tmp_path: Path) -> None:
    """Files inside an ignored folder are not listed."""
    (tmp_path / "cache" / "deep").mkdir(parents=True)
    (tmp_path / "cache" / "deep" / "f.bin").write_bytes(b"x")
    (tmp_path / "keep.txt").write_bytes(b"x")
    assert ["keep.txt"] == list(scan(tmp_path, IgnoreRules(["cache"])))


def test_diff_reports_changed_added_and_removed() -> None:
    """diff compares size and mtime."""
    old = {"same": FileStat(1, 1), "changed": FileStat(1, 1), "gone": FileStat(1, 1)}
    new = {"same": FileStat(1, 1), "changed": FileStat(1, 2), "added": FileStat(5, 5)}
    assert ({"changed", "added"}, {"gone"}) == diff(old, new)


def test_diff_of_two_scans_sees_an_edit_a_new_file_and_a_deletion(tmp_path: Path) -> None:
    """Scanning before and after edits and diffing finds exactly the edits."""
    _tree(tmp_path)
    before = scan(tmp_path, RULES)
    (tmp_path / "a" / "x.txt").write_bytes(b"1234")
    os.utime(tmp_path / "top.dwg", ns=(1, 1))
    (tmp_path / "a" / "b" / "deep.step").unlink()
    (tmp_path / "new.txt").write_bytes(b"n")
    (tmp_path / "ignored.tmp").write_bytes(b"n")
    assert ({"a/x.txt", "top.dwg", "new.txt"}, {"a/b/deep.step"}) == diff(
        before, scan(tmp_path, RULES)
    )


def test_diff_sees_new_bytes_behind_a_restored_size_and_mtime(tmp_path: Path) -> None:
    """A file rewritten with its old size and mtime put back (``touch -r``) is changed."""
    (tmp_path / "a.txt").write_bytes(b"old!")
    (tmp_path / "ref").write_bytes(b"")
    subprocess.run(["touch", "-r", str(tmp_path / "a.txt"), str(tmp_path / "ref")], check=True)
    before = scan(tmp_path, RULES)
    (tmp_path / "a.txt").write_bytes(b"new!")
    subprocess.run(["touch", "-r", str(tmp_path / "ref"), str(tmp_path / "a.txt")], check=True)
    after = scan(tmp_path, RULES)
    assert (before["a.txt"].size, before["a.txt"].mtime_ns) == (
        after["a.txt"].size,
        after["a.txt"].mtime_ns,
    )
    assert ({"a.txt"}, set()) == diff(before, after)


def test_a_replaced_session_folder_is_an_error_not_an_empty_folder(tmp_path: Path) -> None:
    """With the session folder's identity, a link or another folder in its place raises
    instead of reading as "every file deleted"; the files behind the link are not read."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    _tree(outside)
    identity = folder_identity(work)
    assert {} == scan(work, RULES, identity=identity)
    work.rename(tmp_path / "moved")
    work.symlink_to(outside, target_is_directory=True)
    with pytest.raises(WorkFolderReplacedError, match="is a link"):
        scan(work, RULES, identity=identity)
    with pytest.raises(WorkFolderReplacedError):
        WorkFolder(work, identity).path("a/x.txt")
    with pytest.raises(WorkFolderReplacedError):
        folder_identity(work)
    work.unlink()
    outside.rename(work)
    with pytest.raises(WorkFolderReplacedError, match="another folder"):
        scan(work, RULES, "a", identity=identity)
    with pytest.raises(WorkFolderReplacedError), WorkFolder(work, identity).open_file("top.dwg"):
        pass
    assert {} == scan(tmp_path / "gone", RULES, identity=identity)  # missing: left to callers
