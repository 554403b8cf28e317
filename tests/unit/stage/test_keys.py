"""Name validation and the key layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import InvalidNameError, LocalFileError
from agent.folder.workfolder import WorkFolder, local_path_for
from agent.names import validate_name, validate_rel_path
from agent.stage.keys import StageKeys


def test_key_layout_matches_design() -> None:
    """Lock, manifest, committed and staging keys follow DESIGN.md."""
    keys = StageKeys("Kraftwerk_1234567", "planning")
    assert "Kraftwerk_1234567/planning.lock.json" == keys.lock
    assert "Kraftwerk_1234567/planning.manifest.json" == keys.manifest
    assert "Kraftwerk_1234567/planning/a/b.dwg" == keys.committed("a/b.dwg")
    assert "Kraftwerk_1234567/.sessions/s1/a.txt" == keys.staged("s1", "a.txt")
    assert "a/b.dwg" == keys.rel_from_committed("Kraftwerk_1234567/planning/a/b.dwg")


@pytest.mark.parametrize(
    "bad", ["", "..", "a/b", "a\\b", "../x", "x" * 129, "-lead", "CON", "a b", "a\x00b"]
)
def test_unsafe_names_are_refused_with_the_rule(bad: str) -> None:
    """projekt_id/stage/user with separators, '..', spaces or device names are refused."""
    with pytest.raises(InvalidNameError, match="projekt_id"):
        validate_name("projekt_id", bad)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("../etc/passwd", "'..' segment"),
        ("/abs/file", "absolute"),
        ("C:/Windows/x", "drive letter"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a//b", "empty"),
        ("a/./b", "'.'"),
    ],
)
def test_escaping_paths_are_refused_naming_the_key(bad: str, why: str) -> None:
    """A key that would map outside the working folder is refused, naming it and why."""
    with pytest.raises(InvalidNameError, match=why) as info:
        validate_rel_path(bad, key=f"P/s/{bad}")
    assert f"P/s/{bad}"[:5] in str(info.value)


def test_local_path_stays_inside_root(tmp_path: Path) -> None:
    """A valid relative path maps inside the root; a path through a symlink is refused."""
    assert tmp_path / "a" / "b.txt" == local_path_for(tmp_path, "a/b.txt")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LocalFileError, match="link"):
        local_path_for(tmp_path, "link/x.txt")


def test_a_folder_swapped_for_a_link_after_a_first_check_is_refused(tmp_path: Path) -> None:
    """Nothing is cached: a folder that was checked once and then became a link is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    root = tmp_path / "work"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "secret.txt").write_bytes(b"inside")
    folder = WorkFolder(root)
    folder.path("sub/secret.txt")
    with folder.open_file("sub/secret.txt") as (fd, _st):
        assert b"inside" == os.read(fd, 100)
    shutil.rmtree(root / "sub")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LocalFileError, match="link"):
        folder.path("sub/secret.txt")
    with pytest.raises(LocalFileError, match="link"), folder.open_file("sub/secret.txt"):
        pass
    with pytest.raises(LocalFileError, match="link"), folder.open_dir("sub", create=True):
        pass
    folder.unlink("sub")  # removes the link itself, never what it points to
    assert b"secret" == (outside / "secret.txt").read_bytes()


def test_open_file_refuses_a_linked_file_and_a_fifo(tmp_path: Path) -> None:
    """The last component is never followed, and a FIFO cannot hang the reader."""
    (tmp_path / "target.txt").write_bytes(b"t")
    (tmp_path / "link.txt").symlink_to(tmp_path / "target.txt")
    os.mkfifo(tmp_path / "pipe")
    folder = WorkFolder(tmp_path)
    for rel in ("link.txt", "pipe"):
        with pytest.raises(LocalFileError), folder.open_file(rel):
            pass


def test_a_working_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """check_root refuses a work path (or its project folder) that is a link."""
    (tmp_path / "real").mkdir()
    (tmp_path / "P").mkdir()
    (tmp_path / "P" / "stage").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(LocalFileError, match="link"):
        WorkFolder(tmp_path / "P" / "stage").check_root()
    WorkFolder(tmp_path / "P" / "other").check_root()  # not there yet: fine


def test_every_control_character_and_only_those_is_refused_in_a_path() -> None:
    """The refusal is exactly Unicode's category Cc (C0, DEL, C1): no more, no less."""
    import sys
    import unicodedata

    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if char in "/\\" or unicodedata.category(char) == "Cs":
            continue  # separators have rules of their own; lone surrogates are not names
        rel = f"ab{char}c"
        if unicodedata.category(char) == "Cc":
            with pytest.raises(InvalidNameError, match="control characters"):
                validate_rel_path(rel)
        else:
            assert rel == validate_rel_path(rel)


_PATH_PIECES = [
    "a",
    "b",
    "/",
    ".",
    "..",
    "\\",
    "\x00",
    "\x1f",
    "\x7f",
    "\x9f",
    "\xa0",
    "C:",
    ":",
    " ",
    "é",
]


@given(st.lists(st.sampled_from(_PATH_PIECES), max_size=8).map("".join))
def test_the_quick_path_check_never_passes_a_path_the_full_check_refuses(rel: str) -> None:
    """validate_rel_path's fast path (no message built) agrees with the full rules."""
    refused = False
    try:
        validate_rel_path(rel + "/x")  # ends in a plain name: only the pieces decide
    except InvalidNameError:
        refused = True
    full_refuses = (
        not rel + "/x"
        or (rel + "/x").startswith("/")
        or any(c in rel for c in "\\\x00\x1f\x7f\x9f")
        or (len(rel) > 1 and rel[0].isascii() and rel[0].isalpha() and rel[1] == ":")
        or any(p in ("", ".", "..") for p in (rel + "/x").split("/"))
    )
    assert full_refuses == refused
