"""Keys that differ only in case, and folders that fold case (issue 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import InvalidNameError
from agent.names import case_collisions
from agent.platform import folds_case
from agent.session import checkout
from agent.stage.keys import StageKeys


def test_case_collisions_groups_full_paths_that_differ_only_in_case() -> None:
    rels = ["A.dwg", "a.dwg", "Docs/x.txt", "docs/x.txt", "docs/y.txt", "b.dwg"]
    assert sorted(case_collisions(rels)) == [["A.dwg", "a.dwg"], ["Docs/x.txt", "docs/x.txt"]]
    assert case_collisions(["a", "b", "c/a"]) == []


def test_folds_case_probes_the_real_folder_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # This machine's test folders are case-sensitive (ext4/tmpfs without casefold).
    assert folds_case(tmp_path) is False
    assert list(tmp_path.iterdir()) == []


def test_clashing_keys_are_refused_naming_both_where_the_folder_folds_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel here has no case-folding file system to mount, so the probe's answer is faked.
    monkeypatch.setattr(checkout, "folds_case", lambda _folder: True)
    keys = StageKeys("P1", "planning")
    with pytest.raises(InvalidNameError) as info:
        checkout._refuse_case_clashes(keys, ["A.dwg", "a.dwg", "b.txt"], tmp_path / "work")
    assert "P1/planning/A.dwg and P1/planning/a.dwg" in str(info.value)
    checkout._refuse_case_clashes(keys, ["A.dwg", "b.txt"], tmp_path / "work")  # no clash
