"""The stage check compares listings with the manifest (unit: the in-memory store)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from agent.stage.keys import StageKeys
from agent.stage.manifest import Manifest, ManifestEntry
from agent.stage.repair import repair_stage
from agent.store.base import ObjectInfo
from tests.fakes import MemoryStore

KEYS = StageKeys("P1", "planning")


def _stage(store: MemoryStore, files: dict[str, bytes]) -> Manifest:
    entries = {}
    for rel, body in files.items():
        sha = hashlib.sha256(body).hexdigest()
        store.put_bytes(KEYS.version(sha), body)
        etag = store.put_bytes(KEYS.committed(rel), body).etag
        entries[rel] = ManifestEntry(size=len(body), sha256=sha, etag=etag)
    return Manifest(version=2, files=entries)


class _DoublingStore(MemoryStore):
    """Lists every key twice (a hostile or broken listing)."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for info in super().list(prefix):
            yield info
            yield info


def test_the_stage_check_repairs_each_damage_once_though_the_listing_names_keys_twice() -> None:
    store = _DoublingStore()
    manifest = _stage(store, {"a.txt": b"alpha", "b/b.txt": b"bravo", "c.txt": b"charlie"})
    store.delete(KEYS.committed("a.txt"))
    store.put_bytes(KEYS.committed("b/b.txt"), b"overwritten")
    store.put_bytes(KEYS.committed("stray.txt"), b"foreign")
    store.delete(KEYS.version(manifest.files["c.txt"].sha256))

    report = repair_stage(store, KEYS, manifest, workers=2)

    assert ["a.txt", "b/b.txt"] == report.recopied
    assert ["c.txt"] == report.objects_restored
    assert [KEYS.committed("stray.txt")] == sorted(set(report.removed))
    assert [] == report.lost
    for rel, entry in manifest.files.items():
        assert store.get(KEYS.committed(rel)).etag == entry.etag
        assert store.get(KEYS.version(entry.sha256)).body == store.get(KEYS.committed(rel)).body


def test_the_stage_check_of_an_intact_stage_changes_nothing() -> None:
    store = MemoryStore()
    manifest = _stage(store, {f"d{i % 3}/f{i}.txt": b"x%d" % i for i in range(50)})
    before = dict(store.objects)
    report = repair_stage(store, KEYS, manifest, workers=2)
    assert not report.repaired
    assert [] == report.lost
    assert before == store.objects
