"""``LocalEntry``'s JSON form written in pieces reads back as the whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_core import from_json

from agent.folder.entries import LocalEntry
from agent.platform.files import write_private_file


def _entries(n: int) -> dict[str, LocalEntry]:
    return {
        f"d{i // 7}/f{i}.txt": LocalEntry(
            i, 10**18 + i, f"{i:064x}", 10**18 - i, 10**9 + i, i % 2 == 0
        )
        for i in range(n)
    }


@pytest.mark.parametrize(("count", "per"), [(0, 4), (1, 4), (4, 4), (9, 4), (10, 1)])
def test_snapshot_json_written_in_pieces_is_the_whole_json(count: int, per: int) -> None:
    entries = _entries(count)
    pieces = list(LocalEntry.many_to_json_chunks(entries, per=per))
    assert b"".join(pieces) == LocalEntry.many_to_json(entries)
    parsed = from_json(b"".join(pieces))
    assert {rel: LocalEntry.from_list(v) for rel, v in parsed.items()} == entries
    assert len(pieces) == 2 + -(-count // per)  # braces, and one piece per ``per`` entries


def test_a_private_file_written_from_pieces_holds_them_all_in_order(tmp_path: Path) -> None:
    target = tmp_path / "state" / "base.json"
    entries = _entries(100)
    write_private_file(target, LocalEntry.many_to_json_chunks(entries, per=7))
    assert target.read_bytes() == LocalEntry.many_to_json(entries)
    assert {
        rel: LocalEntry.from_list(v) for rel, v in from_json(target.read_bytes()).items()
    } == entries


@pytest.mark.parametrize(
    "raw",
    [
        [1, 2, "a" * 64],  # the oldest form: size, mtime, sha256
        [1, 2, "a" * 64, 3],
        [1, 2, "a" * 64, None, None, None],
        [1, 2, "a" * 64, 3, 4, True],
    ],
)
def test_every_written_form_of_an_entry_reads_back(raw: list[object]) -> None:
    entry = LocalEntry.from_list(raw)
    assert list(entry)[: len(raw)] == raw
    assert all(v is None for v in list(entry)[len(raw) :])


@pytest.mark.parametrize(
    "raw",
    [
        [1, 2],
        [1, 2, "a", 3, 4, True, "extra"],
        [True, 2, "a"],  # a bool is no size
        [1.0, 2, "a"],
        [1, 2, 3],
        [1, 2, "a", "3"],
        [1, 2, "a", 3, 4, 1],  # the executable flag is a bool
        {"size": 1},
        "1,2,a",
    ],
)
def test_an_entry_of_another_shape_is_refused_by_type(raw: object) -> None:
    with pytest.raises(TypeError, match="not a local entry"):
        LocalEntry.from_list(raw)  # type: ignore[arg-type]
