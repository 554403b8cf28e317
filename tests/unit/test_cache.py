"""The cache of closed stage copies."""

from __future__ import annotations

from pathlib import Path

from agent.cache import StageCache
from agent.manifest import LocalEntry


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_put_then_take_moves_the_copy_back_with_its_snapshot(tmp_path: Path) -> None:
    """A cached copy comes back at the new place with the snapshot it was stored with."""
    cache = StageCache(tmp_path / "cache", max_bytes=10_000)
    work = _folder(tmp_path / "w1", {"a.txt": b"abc", "d/b.txt": b"xy"})
    snap = {"a.txt": LocalEntry(3, 1, "h1"), "d/b.txt": LocalEntry(2, 2, "h2")}
    cache.put("P", "planning", work, snap)
    assert not work.exists()
    dest = tmp_path / "w2"
    assert snap == cache.take("P", "planning", dest)
    assert b"xy" == (dest / "d" / "b.txt").read_bytes()
    assert {} == cache.take("P", "planning", tmp_path / "w3"), "an entry is taken only once"


def test_disabled_cache_removes_the_folder(tmp_path: Path) -> None:
    """With the cache off, put just removes the working folder."""
    cache = StageCache(tmp_path / "cache", max_bytes=10_000, enabled=False)
    work = _folder(tmp_path / "w", {"a": b"1"})
    cache.put("P", "s", work, {"a": LocalEntry(1, 1, "h")})
    assert not work.exists()
    assert {} == cache.take("P", "s", tmp_path / "x")


def test_prune_evicts_least_recent_copies_beyond_the_bound(tmp_path: Path) -> None:
    """Older stage copies go first once the total exceeds max_bytes."""
    cache = StageCache(tmp_path / "cache", max_bytes=150)
    cache.put(
        "P", "old", _folder(tmp_path / "a", {"f": b"x" * 100}), {"f": LocalEntry(100, 1, "h")}
    )
    cache.put(
        "P", "new", _folder(tmp_path / "b", {"f": b"y" * 100}), {"f": LocalEntry(100, 1, "h")}
    )
    assert {} == cache.take("P", "old", tmp_path / "c")
    assert "f" in cache.take("P", "new", tmp_path / "d")


def test_damaged_snapshot_is_dropped_not_trusted(tmp_path: Path) -> None:
    """A cache entry whose snapshot does not parse is removed and reported as a miss."""
    cache = StageCache(tmp_path / "cache", max_bytes=10_000)
    cache.put("P", "s", _folder(tmp_path / "w", {"f": b"1"}), {"f": LocalEntry(1, 1, "h")})
    (tmp_path / "cache" / "P" / "s" / "snapshot.json").write_text("{broken")
    assert {} == cache.take("P", "s", tmp_path / "x")
    assert not (tmp_path / "cache" / "P" / "s").exists()
