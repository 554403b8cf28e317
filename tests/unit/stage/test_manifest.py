"""The manifest and the open plan (pure)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.errors import InvalidNameError, PermanentStoreError
from agent.folder.entries import LocalEntry, file_sha256, is_unchanged
from agent.folder.snapshot import FileStat
from agent.session.checkout import plan_open
from agent.stage.manifest import Manifest, ManifestEntry


def _m(**files: tuple[int, str]) -> Manifest:
    return Manifest(
        files={
            k.replace("__", "/"): ManifestEntry(size=s, sha256=h, etag="e")
            for k, (s, h) in files.items()
        }
    )


def test_roundtrip_is_stable_bytes() -> None:
    """Equal manifests serialize to equal bytes and parse back."""
    m = _m(a=(1, "h1"), b__c=(2, "h2"))
    data = m.to_bytes()
    assert data == Manifest.parse(data, key="k").to_bytes()
    assert 3 == Manifest.parse(data, key="k").total_bytes


def test_corrupt_manifest_is_reported_with_its_key() -> None:
    """A body that is not a manifest names the key."""
    with pytest.raises(PermanentStoreError, match=r"P/planning\.manifest\.json"):
        Manifest.parse(b"{not json", key="P/planning.manifest.json")


def test_manifest_with_escaping_path_is_refused() -> None:
    """A manifest naming '../x' cannot make us write outside the folder."""
    bad = b'{"files": {"../x": {"size": 1, "sha256": "h", "etag": "e"}}}'
    with pytest.raises(InvalidNameError, match=r"\.\./x"):
        Manifest.parse(bad, key="P/s.manifest.json")


def test_plan_keeps_matching_downloads_changed_and_removes_extra() -> None:
    """Unchanged cached files are kept, changed or missing ones downloaded, extras removed."""
    manifest = _m(same=(3, "h1"), changed=(3, "new"), missing=(4, "h3"), touched=(3, "h4"))
    snapshot = {
        "same": LocalEntry(3, 100, "h1", 0, 0),
        "changed": LocalEntry(3, 100, "old", 0, 0),
        "touched": LocalEntry(3, 100, "h4", 0, 0),
        "extra": LocalEntry(1, 100, "x", 0, 0),
    }
    current = {
        "same": FileStat(3, 100),
        "changed": FileStat(3, 100),
        "touched": FileStat(3, 999),
        "extra": FileStat(1, 100),
    }
    plan = plan_open(manifest, snapshot, current)
    assert ["same"] == plan.keep
    assert ["changed", "missing", "touched"] == plan.download
    assert ["extra"] == plan.remove
    assert not plan.is_noop


def test_plan_of_unchanged_cache_is_noop() -> None:
    """A cache equal to the manifest needs nothing."""
    manifest = _m(a=(1, "h"))
    plan = plan_open(manifest, {"a": LocalEntry(1, 5, "h", 7, 8)}, {"a": FileStat(1, 5, 7, 8)})
    assert plan.is_noop


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    """Chunked hashing equals hashing the whole content."""
    data = b"x" * (3 * 1024 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert hashlib.sha256(data).hexdigest() == file_sha256(tmp_path / "f")


def test_plan_hashes_a_cached_file_whose_ctime_or_inode_moved() -> None:
    """Same size and mtime but another inode: kept only if the content still hashes the same."""
    manifest = _m(same=(3, "h1"), swapped=(3, "h2"))
    snapshot = {"same": LocalEntry(3, 100, "h1", 7, 1), "swapped": LocalEntry(3, 100, "h2", 7, 2)}
    current = {"same": FileStat(3, 100, 9, 11), "swapped": FileStat(3, 100, 9, 12)}
    contents = {"same": "h1", "swapped": "other bytes"}
    plan = plan_open(manifest, snapshot, current, hasher=contents.__getitem__)
    assert ["same"] == plan.keep
    assert ["swapped"] == plan.download
    assert FileStat(3, 100, 9, 11).st_ino == plan.kept["same"].inode


def test_entry_without_ctime_never_matches_by_stat_alone() -> None:
    """An entry from an older agent (no ctime/inode) is confirmed by hashing, not trusted."""
    old = LocalEntry(3, 100, "h")
    assert not old.matches(FileStat(3, 100, 5, 6))
    assert is_unchanged(old, FileStat(3, 100, 5, 6), lambda: "h")
    assert not is_unchanged(old, FileStat(3, 100, 5, 6), lambda: "x")
    assert not is_unchanged(old, FileStat(4, 100, 5, 6), lambda: "h")


def test_entry_recorded_right_after_a_write_is_racy_and_not_trusted() -> None:
    """A stat taken in the same instant as the write keeps no ctime (a same-tick write hides)."""
    st = FileStat(3, 100, 1_000_000_000, 6)
    assert not LocalEntry.from_stat(st, "h", now_ns=1_000_000_001).matches(st)
    assert LocalEntry.from_stat(st, "h", now_ns=2_000_000_000).matches(st)


def test_the_executable_bit_is_kept_in_the_manifest_only_when_set() -> None:
    """Old manifests parse (bit False); JSON carries the bit only for executable files."""
    manifest = Manifest(
        files={
            "run.sh": ManifestEntry(size=1, sha256="a" * 64, etag="e", executable=True),
            "a.txt": ManifestEntry(size=1, sha256="b" * 64, etag="f"),
        }
    )
    data = json.loads(manifest.to_bytes())
    assert data["files"]["run.sh"]["executable"] is True
    assert "executable" not in data["files"]["a.txt"]
    again = Manifest.parse(manifest.to_bytes(), key="m")
    assert (again.files["run.sh"].executable, again.files["a.txt"].executable) == (True, False)


def test_a_chmod_alone_is_a_change_although_the_bytes_are_the_same(tmp_path: Path) -> None:
    path = tmp_path / "run.sh"
    path.write_bytes(b"x")
    entry = LocalEntry.from_stat(path.stat(), "h", now_ns=path.stat().st_ctime_ns + 10**9)
    assert is_unchanged(entry, path.stat(), lambda: "h")
    path.chmod(0o755)
    assert not is_unchanged(entry, path.stat(), lambda: "h")
