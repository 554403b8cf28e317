"""Ignore rules and our own temp names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import DEFAULT_IGNORE
from agent.folder.ignore import IgnoreRules, is_temporary, temp_name_for

RULES = IgnoreRules(DEFAULT_IGNORE)


@pytest.mark.parametrize(
    "name",
    [
        "~$report.docx",
        "~WRL0001.tmp",
        ".~lock.plan.odt#",
        "x.tmp",
        ".plan.dwg.swp",
        ".plan.dwg.swx",
        "plan.dwg~",
        ".DS_Store",
        "thumbs.db",
        "Desktop.ini",
        "sub/dir/~$x.xlsx",
        "~$REPORT.DOCX",
        "X.TMP",
    ],
)
def test_editor_leftovers_are_ignored(name: str) -> None:
    """Office, LibreOffice and vim lock/temp files are ignored, whatever their case."""
    assert RULES.is_ignored(name)


@pytest.mark.parametrize(
    "path",
    [
        "repo/.git/objects/pack/tmp_pack_48vCYQ",
        "repo/.git/objects/pack/tmp_idx_Zx81aB",
        "repo/.git/objects/pack/tmp_rev_Zx81aB",
        "repo/.git/objects/4f/tmp_obj_a1B2c3",
        ".git/index.lock",
        "repo/.git/refs/heads/main.lock",
        ".plan.dwg.vvcKel",
        "sub/.Report 2.docx.A1b2C3",
        ".~tmp~/plan.dwg",
        "sub/.rsync-partial/plan.dwg",
        ".~lock.plan.odt#",
        "sub/.~lock.Kalkulation.xlsx#",
    ],
)
def test_temp_files_of_git_rsync_and_libreoffice_are_ignored(path: str) -> None:
    """git's pack/index/object temp names and lock files, rsync's ``.name.XXXXXX`` temp
    files and its ``.~tmp~`` / ``.rsync-partial`` folders, LibreOffice's lock files."""
    assert RULES.is_ignored(path)


@pytest.mark.parametrize(
    "path",
    [
        "repo/.git/objects/pack/pack-08c93d.pack",
        "repo/.git/index",
        "tmp_results.xlsx",
        "plan.lock",
        ".gitignore",
        ".config.tar.gz",
        ".plan.dwg.v2",
        "plan.dwg.vvcKel",
    ],
)
def test_names_like_tool_temp_files_but_not_theirs_are_kept(path: str) -> None:
    """Near misses of those rules are real files: a lock outside ``.git``, a dotfile whose
    last part is not six letters or digits, a name without rsync's leading dot."""
    assert not RULES.is_ignored(path)


@pytest.mark.parametrize(
    "name", ["plan.dwg", "docs/report.docx", "a/b/c.step", "tmp/file.txt", "notes.tmp.txt"]
)
def test_real_files_are_not_ignored(name: str) -> None:
    """Ordinary project files pass."""
    assert not RULES.is_ignored(name)


def test_path_patterns_match_the_path_and_its_folders() -> None:
    """A pattern with '/' matches the relative path, or a folder path above it."""
    rules = IgnoreRules(["build/*.log", "/docs/old", "exports/"])
    assert rules.is_ignored("build/x.log")
    assert not rules.is_ignored("src/x.log")
    assert rules.is_ignored("docs/old")
    assert rules.is_ignored("docs/old/a/b.pdf")
    assert not rules.is_ignored("docs/older.pdf")
    assert rules.is_ignored("exports/deep/file.csv")


def test_name_patterns_hide_whole_folders() -> None:
    """A folder whose name matches a name pattern hides everything below it."""
    rules = IgnoreRules(["cache", "*.bak"])
    assert rules.is_ignored("cache/deep/file.bin")
    assert rules.is_ignored("x/old.bak/file.txt")
    assert not rules.is_ignored("cached/file.bin")


def test_windows_separators_in_patterns_are_accepted() -> None:
    """A pattern written with backslashes means the same as with slashes."""
    assert IgnoreRules(["build\\*.obj"]).is_ignored("build/a.obj")


def test_no_patterns_ignores_only_our_temp_names() -> None:
    """Our temp files are ignored even with an empty pattern list."""
    rules = IgnoreRules([])
    assert not rules.is_ignored("~$x.docx")
    assert rules.is_ignored("a/.pdagent.plan.dwg.0a1b2c3d.tmp")


def test_temp_names_are_beside_the_target_recognised_and_unique(tmp_path: Path) -> None:
    """temp_name_for gives a fresh, ignored name in the target's folder."""
    target = tmp_path / "sub" / "plan.dwg"
    first, second = temp_name_for(target), temp_name_for(target)
    assert first.parent == target.parent
    assert first != second
    assert first.name.startswith(".pdagent.plan.dwg.")
    assert is_temporary(first.name)
    assert RULES.is_ignored(f"sub/{first.name}")
    assert not is_temporary("plan.dwg")


@pytest.mark.parametrize("name", ["n" * 300 + ".dwg", "ü" * 40 + ".dwg"])
def test_long_names_are_hashed_to_keep_temp_names_short(tmp_path: Path, name: str) -> None:
    """A long target name (counted in UTF-8 bytes) is hashed; the temp name stays short."""
    tmp = temp_name_for(tmp_path / name)
    assert is_temporary(tmp.name)
    assert len(tmp.name.encode()) < 70
    assert tmp.name.startswith(".pdagent.")


@given(
    st.lists(
        st.sampled_from(["a", "b.tmp", "~$x.docx", "build", "out", ".git", "ok.dwg", "n"]),
        min_size=1,
        max_size=5,
    )
)
def test_judging_an_entry_of_a_kept_folder_agrees_with_judging_its_whole_path(
    parts: list[str],
) -> None:
    """A walk judges only an entry's own name and path once its folders were kept: the same
    answer as ``is_ignored`` on the whole path, for name and path patterns alike."""
    rules = IgnoreRules(["*.tmp", "~$*", ".git", "build/out", "a/n"])
    for depth in range(1, len(parts)):
        if rules.is_ignored("/".join(parts[:depth])):
            return  # the walk never reaches below an ignored folder
    rel = "/".join(parts)
    assert rules.is_ignored(rel) == rules.is_ignored_entry(rel, parts[-1])
