"""The resume merge plan: every combination of ours / theirs / both, decided by content."""

from __future__ import annotations

from agent.folder.merge import MergePlan, plan_merge

A = (1, "a" * 64)
A2 = (2, "b" * 64)
A3 = (3, "c" * 64)


def test_their_change_to_a_file_we_did_not_touch_is_downloaded() -> None:
    """Only they changed a.txt: take theirs, no conflict."""
    plan = plan_merge({"a.txt": A}, {"a.txt": A2}, {})
    assert ["a.txt"] == plan.download
    assert [] == plan.conflicts


def test_our_change_to_a_file_they_did_not_touch_is_left_alone() -> None:
    """Only we changed a.txt, they changed b.txt: ours is kept, theirs downloaded, no conflict."""
    plan = plan_merge({"a.txt": A, "b.txt": A}, {"a.txt": A, "b.txt": A2}, {"a.txt": A3[1]})
    assert ["b.txt"] == plan.download
    assert [] == plan.conflicts
    assert [] == plan.forget


def test_both_changed_differently_is_a_conflict() -> None:
    """Both changed a.txt to different content: keep both."""
    plan = plan_merge({"a.txt": A}, {"a.txt": A2}, {"a.txt": A3[1]})
    assert ["a.txt"] == plan.conflicts
    assert ["a.txt"] == plan.forget


def test_both_made_the_same_change_is_no_conflict() -> None:
    """Both changed a.txt to the same bytes: nothing to do but forget our staged copy."""
    plan = plan_merge({"a.txt": A}, {"a.txt": A2}, {"a.txt": A2[1]})
    assert ["a.txt"] == plan.same
    assert [] == plan.conflicts
    assert [] == plan.download


def test_their_delete_of_an_untouched_file_removes_it() -> None:
    """They deleted a.txt that we left alone: remove it locally."""
    plan = plan_merge({"a.txt": A}, {}, {})
    assert ["a.txt"] == plan.remove


def test_their_delete_of_a_file_we_changed_keeps_ours() -> None:
    """They deleted a.txt, we edited it: ours survives and is committed again."""
    plan = plan_merge({"a.txt": A}, {}, {"a.txt": A3[1]})
    assert ["a.txt"] == plan.kept_ours
    assert [] == plan.remove


def test_our_delete_of_a_file_they_changed_brings_theirs_back() -> None:
    """We deleted a.txt, they edited it: their work is never dropped."""
    plan = plan_merge({"a.txt": A}, {"a.txt": A2}, {"a.txt": None})
    assert ["a.txt"] == plan.revived
    assert ["a.txt"] == plan.forget


def test_deleted_on_both_sides_is_nothing_to_do() -> None:
    """Both deleted a.txt: agreed."""
    plan = plan_merge({"a.txt": A}, {}, {"a.txt": None})
    assert ["a.txt"] == plan.same
    assert [] == plan.remove


def test_a_file_they_added_is_downloaded_and_a_file_we_added_is_ours() -> None:
    """New on their side: download; new on ours only: nothing to plan."""
    plan = plan_merge({}, {"new.txt": A}, {"mine.txt": A2[1]})
    assert ["new.txt"] == plan.download
    assert MergePlan(download=["new.txt"]) == plan


def test_both_added_the_same_path_differently_is_a_conflict() -> None:
    """Both created new.txt with different bytes: keep both."""
    plan = plan_merge({}, {"new.txt": A}, {"new.txt": A2[1]})
    assert ["new.txt"] == plan.conflicts


def test_etags_play_no_part_only_size_and_sha256() -> None:
    """Equal content on both sides means unchanged, whatever else the manifests say."""
    plan = plan_merge({"a.txt": A, "b.txt": A}, {"a.txt": A, "b.txt": A}, {"a.txt": A2[1]})
    assert MergePlan() == plan
