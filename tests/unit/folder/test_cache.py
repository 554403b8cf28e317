"""The cache of closed stage copies."""

from __future__ import annotations

import json
from pathlib import Path

from agent.folder.cache import StageCache
from agent.folder.entries import LocalEntry, file_sha256
from agent.folder.ignore import IgnoreRules


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _snap(root: Path, *rels: str) -> dict[str, LocalEntry]:
    """The true snapshot of ``rels`` (what a close would hand over)."""
    return {r: LocalEntry.from_stat((root / r).stat(), file_sha256(root / r)) for r in rels}


def test_put_then_take_moves_the_copy_back_with_its_snapshot(tmp_path: Path) -> None:
    """A cached copy comes back at the new place with the snapshot it was stored with."""
    cache = StageCache(tmp_path / "cache", max_bytes=10_000)
    work = _folder(tmp_path / "w1", {"a.txt": b"abc", "d/b.txt": b"xy"})
    snap = _snap(work, "a.txt", "d/b.txt")
    cache.put("P", "planning", work, snap)
    assert not work.exists()
    dest = tmp_path / "w2"
    assert snap == cache.take("P", "planning", dest)
    assert b"xy" == (dest / "d" / "b.txt").read_bytes()
    assert {} == cache.take("P", "planning", tmp_path / "w3"), "an entry is taken only once"


def test_take_shares_the_hash_strings_of_the_manifest_it_is_given(tmp_path: Path) -> None:
    """A snapshot entry whose sha256 is the manifest's holds the manifest's string (one copy
    of each hash in memory); a different sha256 is kept as the snapshot says."""
    cache = StageCache(tmp_path / "cache", max_bytes=10_000)
    work = _folder(tmp_path / "w1", {"a.txt": b"abc", "b.txt": b"xy"})
    snap = _snap(work, "a.txt", "b.txt")
    cache.put("P", "planning", work, snap)
    same = "".join(snap["a.txt"].sha256)  # equal, but another string object
    known: dict[str, tuple[int, str | None]] = {"a.txt": (3, same), "b.txt": (2, "0" * 64)}
    taken = cache.take("P", "planning", tmp_path / "w2", known=known)
    assert snap == taken
    assert taken["a.txt"].sha256 is same
    assert taken["b.txt"].sha256 == snap["b.txt"].sha256


def test_disabled_cache_removes_the_folder(tmp_path: Path) -> None:
    """With the cache off, put just removes the working folder."""
    cache = StageCache(tmp_path / "cache", max_bytes=10_000, enabled=False)
    work = _folder(tmp_path / "w", {"a": b"1"})
    cache.put("P", "s", work, _snap(work, "a"))
    assert not work.exists()
    assert {} == cache.take("P", "s", tmp_path / "x")


def test_prune_evicts_least_recent_copies_beyond_the_bound(tmp_path: Path) -> None:
    """Older stage copies go first once the total exceeds max_bytes."""
    cache = StageCache(tmp_path / "cache", max_bytes=150)
    old = _folder(tmp_path / "a", {"f": b"x" * 100})
    cache.put("P", "old", old, _snap(old, "f"))
    new = _folder(tmp_path / "b", {"f": b"y" * 100})
    cache.put("P", "new", new, _snap(new, "f"))
    assert {} == cache.take("P", "old", tmp_path / "c")
    assert "f" in cache.take("P", "new", tmp_path / "d")


def test_prune_counts_an_entry_an_older_agent_wrote_without_its_size_file(
    tmp_path: Path,
) -> None:
    """Prune reads each entry's small size file, not its snapshot; an entry without
    one (an older agent's) is counted from its snapshot, and evicted by age as ever."""
    cache = StageCache(tmp_path / "cache", max_bytes=150)
    old = _folder(tmp_path / "a", {"f": b"x" * 100})
    cache.put("P", "old", old, _snap(old, "f"))
    size_file = tmp_path / "cache" / "P" / "old" / "size.json"
    assert 100 == json.loads(size_file.read_bytes())["bytes"]
    size_file.unlink()
    new = _folder(tmp_path / "b", {"f": b"y" * 100})
    cache.put("P", "new", new, _snap(new, "f"))
    assert {} == cache.take("P", "old", tmp_path / "c")
    assert "f" in cache.take("P", "new", tmp_path / "d")


def test_damaged_snapshot_is_dropped_not_trusted(tmp_path: Path) -> None:
    """A cache entry whose snapshot does not parse is removed and reported as a miss."""
    cache = StageCache(tmp_path / "cache", max_bytes=10_000)
    work = _folder(tmp_path / "w", {"f": b"1"})
    cache.put("P", "s", work, _snap(work, "f"))
    (tmp_path / "cache" / "P" / "s" / "snapshot.json").write_text("{broken")
    assert {} == cache.take("P", "s", tmp_path / "x")
    assert not (tmp_path / "cache" / "P" / "s").exists()


def test_put_sets_aside_links_odd_names_and_uncommitted_files_never_deleting_them(
    tmp_path: Path,
) -> None:
    """Only what the snapshot vouches for is cached; the rest is kept beside the folder."""
    outside = tmp_path / "decoy"
    outside.mkdir()
    (outside / "home.txt").write_bytes(b"mine")
    work = _folder(tmp_path / "w", {"a.txt": b"abc", "new.txt": b"not committed"})
    (work / "docs").symlink_to(outside, target_is_directory=True)
    (work / "odd\\name.txt").write_bytes(b"odd")
    (work / "~$lock.docx").write_bytes(b"editor lock")
    cache = StageCache(tmp_path / "cache", max_bytes=10_000, rules=IgnoreRules(["~$*"]))
    kept = cache.put("P", "s", work, _snap(work, "a.txt"))
    assert ["docs", "new.txt", "odd\\name.txt"] == kept
    [aside] = tmp_path.glob("w.kept-*")
    assert (aside / "docs").is_symlink()
    assert b"not committed" == (aside / "new.txt").read_bytes()
    assert b"odd" == (aside / "odd\\name.txt").read_bytes()
    assert b"mine" == (outside / "home.txt").read_bytes()
    dest = tmp_path / "w2"
    assert ["a.txt"] == list(cache.take("P", "s", dest))
    assert ["a.txt", "~$lock.docx"] == sorted(p.name for p in dest.iterdir())


def test_take_never_puts_a_link_from_an_older_cache_in_place(tmp_path: Path) -> None:
    """A cached copy holding a link (cached before issue 8) comes back without it."""
    outside = tmp_path / "decoy"
    outside.mkdir()
    cache = StageCache(tmp_path / "cache", max_bytes=10_000)
    work = _folder(tmp_path / "w", {"a.txt": b"abc"})
    cache.put("P", "s", work, _snap(work, "a.txt"))
    files = tmp_path / "cache" / "P" / "s" / "files"
    (files / "docs").symlink_to(outside, target_is_directory=True)
    dest = tmp_path / "w2"
    cache.take("P", "s", dest)
    assert not (dest / "docs").exists()
    assert not (dest / "docs").is_symlink()
    assert list(tmp_path.glob("w2.kept-*/docs"))
