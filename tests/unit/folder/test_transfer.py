"""Parallel transfers: temp + verify + rename, progress, failures (with a fake store)."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Mapping
from pathlib import Path

import pytest

from agent.errors import LocalFileError, PermanentStoreError, TransientStoreError
from agent.folder.transfer import Download, Transfers, Upload, content_type_for
from agent.store.base import ObjectInfo, ProgressFn, WriteResult
from agent.store.parallel import Progress
from tests.fakes import FaultyStore, MemoryStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_many_writes_every_file_and_reports_100_percent(tmp_path: Path) -> None:
    """All files arrive whole, the digests are returned, progress ends at 100 %."""
    store = MemoryStore()
    items = []
    for i in range(30):
        data = bytes([i]) * (i * 100 + 1)
        store.put_bytes(f"k/{i}", data)
        items.append(
            Download(
                key=f"k/{i}",
                dest=tmp_path / f"d{i % 3}" / f"f{i}",
                size=len(data),
                sha256=_sha(data),
            )
        )
    seen: list[int] = []
    progress = Progress("dl", sum(d.size or 0 for d in items), lambda _m, p: seen.append(p))
    digests = Transfers(store, workers=4).download(items, progress)
    assert [d.sha256 for d in items] == digests
    assert all(d.dest.read_bytes() == store.objects[d.key] for d in items)
    assert 100 == seen[-1]
    assert seen == sorted(seen)
    assert [] == list(tmp_path.rglob(".pdagent.*"))


def test_checksum_mismatch_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    """A download whose sha256 differs from the manifest is refused; nothing is left behind."""
    store = MemoryStore()
    store.put_bytes("k", b"tampered")
    item = Download(key="k", dest=tmp_path / "f", size=8, sha256=_sha(b"original"))
    with pytest.raises(PermanentStoreError, match="sha256"):
        Transfers(store, workers=2).download([item])
    assert [] == list(tmp_path.iterdir())


def test_disk_full_is_a_local_file_error_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """ENOSPC while writing becomes LocalFileError saying the disk is full; no partial file."""
    store = FaultyStore(MemoryStore())
    store.inner.put_bytes("k", b"x" * 10)

    def full(key: str, dest: Path, *, progress: ProgressFn | None = None) -> ObjectInfo:
        dest.write_bytes(b"x" * 3)
        raise OSError(errno.ENOSPC, "No space left on device")

    store.faults["download_file"] = full
    with pytest.raises(LocalFileError, match="disk is full"):
        Transfers(store, workers=2).download([Download(key="k", dest=tmp_path / "f")])
    assert [] == list(tmp_path.iterdir())


def test_first_failure_is_raised_and_others_are_not_left_half_written(tmp_path: Path) -> None:
    """One failing key raises its own error class; completed files are whole."""
    inner = MemoryStore()
    for i in range(10):
        inner.put_bytes(f"k/{i}", b"data")
    store = FaultyStore(inner)

    def flaky(key: str, dest: Path, *, progress: ProgressFn | None = None) -> ObjectInfo:
        if key == "k/5":
            raise TransientStoreError("connection reset after retries")
        return inner.download_file(key, dest, progress=progress)

    store.faults["download_file"] = flaky
    items = [Download(key=f"k/{i}", dest=tmp_path / str(i)) for i in range(10)]
    with pytest.raises(TransientStoreError):
        Transfers(store, workers=3).download(items)
    for path in tmp_path.iterdir():
        assert b"data" == path.read_bytes()


def test_upload_is_redone_when_the_file_changes_while_read(tmp_path: Path) -> None:
    """An upload whose file changed during the transfer is sent again with the final bytes."""
    inner = MemoryStore()
    store = FaultyStore(inner)
    src = tmp_path / "f.txt"
    src.write_bytes(b"v1")
    calls = 0

    def racing(
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        progress: ProgressFn | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> WriteResult:
        nonlocal calls
        calls += 1
        result = inner.upload_file(key, path, progress=progress, metadata=metadata)
        if calls == 1:
            path.write_bytes(b"v2-longer")
        return result

    store.faults["upload_file"] = racing
    [done] = Transfers(store, workers=1).upload([Upload(rel="f.txt", key="s/f.txt", src=src)])
    assert 2 == calls
    assert b"v2-longer" == inner.objects["s/f.txt"]
    assert _sha(b"v2-longer") == done.sha256
    assert 9 == done.size


def test_progress_rewinds_on_failure() -> None:
    """Negative deltas lower the count (a retry rewinds)."""
    progress = Progress("x", 100, None)
    progress.add(60)
    progress.add(-60)
    assert 0 == progress.bytes_done


def test_content_types() -> None:
    """Known plant-design and office types are mapped; unknown ones are octet-stream."""
    assert "image/vnd.dwg" == content_type_for("a/plan.DWG")
    assert "application/pdf" == content_type_for("x.pdf")
    assert "application/octet-stream" == content_type_for("noext")
    assert "application/octet-stream" == content_type_for("dir.v1/noext")


def test_content_type_looks_past_an_encoding_suffix() -> None:
    """A .tar.gz is a tar archive, as mimetypes says for the whole name (cached by suffix)."""
    import mimetypes

    for name in ("b.tar.gz", "c.tgz", "d.PDF.gz", "e.svg.Z"):
        assert (mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream") == (
            content_type_for(f"x/{name}")
        )
