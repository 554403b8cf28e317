"""``list_locks`` / ``agent locks`` (issue 11): every stage lock at once, on both stores."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from agent.config import load_config
from agent.session import PlantDesignSession
from agent.store.base import ObjectStore


def _session(store: ObjectStore, tmp_path: Path, machine: str) -> PlantDesignSession:
    config = load_config(
        paths={"base_dir": str(tmp_path / machine)},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
    )
    return PlantDesignSession(config, store=store)


def _lock_body(state: str, user: str, heartbeat_age: timedelta, store: ObjectStore) -> bytes:
    now = store.server_time()
    return json.dumps(
        {
            "state": state,
            "user": user,
            "machine": "far",
            "since": (now - timedelta(days=1)).isoformat(),
            "expires": (now + timedelta(hours=1)).isoformat(),
            "heartbeat_at": (now - heartbeat_age).isoformat(),
        }
    ).encode()


def test_the_board_shows_held_released_stale_and_corrupt_locks(
    store: ObjectStore, tmp_path: Path
) -> None:
    alice = _session(store, tmp_path, "alice")
    alice.open("Werk_A", "alice", "planning", watch=False)
    done = _session(store, tmp_path, "bob")
    done.open("Werk_A", "bob", "design", watch=False)
    done.close()
    store.put_bytes(
        "Werk_B/piping.lock.json", _lock_body("held", "carol", timedelta(hours=3), store)
    )
    store.put_bytes("Werk_B/civil.lock.json", b"{not json")
    store.put_bytes("Werk_B/civil/plan.dwg", b"x")  # a stage folder is not a lock
    store.put_bytes(".pdagent-probe/x", b"x")  # a foreign top-level folder is skipped
    try:
        rows = {(r.projekt_id, r.stage): r for r in _session(store, tmp_path, "ops").list_locks()}
        assert sorted(rows) == [
            ("Werk_A", "design"),
            ("Werk_A", "planning"),
            ("Werk_B", "civil"),
            ("Werk_B", "piping"),
        ]
        held = rows["Werk_A", "planning"]
        assert (held.state, held.user, held.appears_gone) == ("held", "alice", False)
        assert held.heartbeat_age_seconds is not None and held.heartbeat_age_seconds < 600
        assert (rows["Werk_A", "design"].state, rows["Werk_A", "design"].user) == (
            "released",
            "bob",
        )
        stale = rows["Werk_B", "piping"]
        assert (stale.state, stale.user, stale.appears_gone) == ("held", "carol", True)
        assert rows["Werk_B", "civil"].state == "corrupt"
        assert rows["Werk_B", "civil"].problem
        only_b = _session(store, tmp_path, "ops").list_locks(["Werk_B"])
        assert {r.stage for r in only_b} == {"civil", "piping"}
    finally:
        alice.abort()
