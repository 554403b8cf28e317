"""The folder store under processes that write and delete neighbouring keys at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from agent.store.local import LocalStore

_ROUNDS = 150


def _put_and_delete(args: tuple[str, str]) -> int:
    folder, name = args
    store = LocalStore(Path(folder))
    for n in range(_ROUNDS):
        key = f"shared/{name}-{n}.json"
        store.put_bytes(key, b"{}", if_none_match=True)
        store.delete(key)
    return _ROUNDS


def test_a_write_survives_a_neighbours_delete_emptying_the_folder_it_writes_into(
    tmp_path: Path,
) -> None:
    """A delete prunes its emptied folder; a write into that folder at that moment
    still lands (the CI failure of stop 23: the lock probe's put raised FileNotFoundError)."""
    folder = tmp_path / "store"
    folder.mkdir()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        done = pool.map(_put_and_delete, [(str(folder), f"w{i}") for i in range(4)])
    assert done == [_ROUNDS] * 4
    assert list(LocalStore(folder).list("shared/")) == []
