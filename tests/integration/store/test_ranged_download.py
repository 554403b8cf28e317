"""Downloads hash what they write (issue 18, cold open): the sha256 comes with the download.

A small object is hashed as its bytes are written; a large one is read as ranges in
parallel (the first GET's answer gives the first range while the others are asked
for) and hashed in order, read back from the file, while later ranges still arrive.
The transfer layer verifies that digest against the manifest, as it did its own
second pass. Everything runs against the real SeaweedFS, through the fault proxy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.errors import ContentMismatchError
from agent.folder.ignore import is_temporary
from agent.folder.transfer import Download, Transfers
from agent.folder.workfolder import WorkFolder
from agent.store.base import ObjectStore
from tests.faultproxy import CutBody, FaultProxy, Rule

MiB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1000, MiB, 11 * MiB + 7], ids=["empty", "1k", "1MiB", "11MiB"])
def test_a_download_answers_the_sha256_of_the_bytes_it_wrote(
    ranged_store: ObjectStore, tmp_path: Path, size: int
) -> None:
    """Small, at the threshold, and ranged: the answer's sha256 is the file's, bytes whole."""
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    ranged_store.upload_file("d/f.bin", tmp_path / "src")
    moved: list[int] = []
    info = ranged_store.download_file("d/f.bin", tmp_path / "out", progress=moved.append)
    assert data == (tmp_path / "out").read_bytes()
    assert (size, size, _sha(data)) == (info.size, sum(moved), info.sha256)


def test_a_ranged_download_asks_for_every_range_once_beside_the_first_answer(
    ranged_store: ObjectStore, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """11 MiB: one plain GET (its answer gives the first range) and two ranged GETs pinned to
    the ETag the first answer carried; nothing is read twice."""
    data = os.urandom(11 * MiB)
    (tmp_path / "src").write_bytes(data)
    sent = ranged_store.upload_file("d/model.step", tmp_path / "src")
    info = ranged_store.download_file("d/model.step", tmp_path / "out")
    gets = [s for s in fault_proxy.seen if s.method == "GET" and "model.step" in s.path]
    pinned = [s for s in gets if sent.etag in s.headers.get("if-match", "")]
    assert (3, 2) == (len(gets), len(pinned)), "the ranges (and only they) carry If-Match"
    assert _sha(data) == info.sha256


@pytest.mark.parametrize("cut", ["first", "range"])
def test_a_cut_range_read_again_still_gives_the_digest_of_the_whole_file(
    ranged_store: ObjectStore, fault_proxy: FaultProxy, tmp_path: Path, cut: str
) -> None:
    """The first answer cut inside the first range (read again as a range), or a ranged GET
    cut: the range alone is read again, and the digest is still that of the whole file."""
    data = os.urandom(11 * MiB)
    (tmp_path / "src").write_bytes(data)
    ranged_store.upload_file("d/model.step", tmp_path / "src")
    where = {"no_headers": ("Range",)} if cut == "first" else {"headers": ("Range",)}
    rule = fault_proxy.add(
        Rule(CutBody(MiB // 2), method="GET", path=r"model\.step$", **where)  # type: ignore[arg-type]
    )
    info = ranged_store.download_file("d/model.step", tmp_path / "out")
    assert 1 == rule.fired
    gets = [s for s in fault_proxy.seen if s.method == "GET" and "model.step" in s.path]
    assert 1 + 2 + 1 == len(gets), "the first GET, two ranges, the cut one once more"
    assert data == (tmp_path / "out").read_bytes()
    assert _sha(data) == info.sha256


def _damage_last_range(data: bytes) -> bytes:
    """The same size, one byte changed in the last range (10 MiB on)."""
    at = 10 * MiB + 12345
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize("fallback", [True, False], ids=["objects-copy", "no-copy"])
def test_a_large_download_with_other_bytes_in_one_range_is_never_put_in_place(
    ranged_store: ObjectStore, tmp_path: Path, fallback: bool
) -> None:
    """The plain object has other bytes in its last range only: the digest does not match the
    manifest's. With the content's ``.objects/`` copy, that is read instead; without one,
    ``ContentMismatchError`` and neither the file nor its temp is left in the folder."""
    data = os.urandom(11 * MiB)
    (tmp_path / "good").write_bytes(data)
    (tmp_path / "bad").write_bytes(_damage_last_range(data))
    ranged_store.upload_file("s/plan/model.step", tmp_path / "bad")
    objects = f"s/.objects/{_sha(data)}"
    if fallback:
        ranged_store.upload_file(objects, tmp_path / "good")
    work = tmp_path / "work"
    work.mkdir()
    transfers = Transfers(ranged_store, 4, folder=WorkFolder(work))
    item = Download(
        key="s/plan/model.step",
        dest=work / "sub" / "model.step",
        size=len(data),
        sha256=_sha(data),
        fallback=objects,
    )
    if fallback:
        assert [_sha(data)] == transfers.download([item])
        assert data == (work / "sub" / "model.step").read_bytes()
        assert ["s/plan/model.step"] == transfers.damaged
        return
    with pytest.raises(ContentMismatchError, match="gone from the store"):
        transfers.download([item])
    left = [p.name for p in work.rglob("*") if p.is_file()]
    assert [] == left, "no file and no temp left behind"
    assert not any(is_temporary(name) for name in left)
