"""Name validation and the key layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import InvalidNameError
from agent.keys import StageKeys, local_path_for, validate_name, validate_rel_path


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
    """A valid relative path maps inside the root; a symlink escape is refused."""
    assert tmp_path / "a" / "b.txt" == local_path_for(tmp_path, "a/b.txt")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidNameError, match="outside the working folder"):
        local_path_for(tmp_path, "link/x.txt")
