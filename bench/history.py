"""Benchmark group ``history`` (issue 11): what version history costs a commit, and how
fast ``agent history`` answers. Run through ``bench/run.py --only history``.

* A close of 10 changed files in a 10,000-file stage, with history and with its two
  steps (keeping the replaced versions, writing the history entry) switched off in
  this process, alternately, so the ratio is read in one run.
* ``history()`` of a stage with 1,000 commits (library call, and ``agent history
  --json`` as a process).
* ``list_locks()`` over 1,000 stage locks in 100 projects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from agent.session import PlantDesignSession
from agent.stage.commit import Commit
from agent.stage.keys import CommitInfo, StageKeys
from agent.store import open_store
from bench.common import median, timed

if TYPE_CHECKING:
    from bench.run import Bench

STAGE_FILES = 10_000
CHANGED = 10
COMMITS = 1_000
LOCK_PROJECTS = 100
STAGES_PER_PROJECT = 10


@contextmanager
def history_steps_off() -> Iterator[None]:
    """The commit without its history steps (this process only; for the side-by-side)."""
    saved = Commit._keep, Commit._record_history
    Commit._keep = lambda self, intent, rel: None  # type: ignore[method-assign]
    Commit._record_history = lambda self, intent, body, manifest_etag: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Commit._keep, Commit._record_history = saved  # type: ignore[method-assign]


def bench_history(bench: Bench) -> None:
    """Close cost of history, and the history listing of 1,000 commits."""
    projekt = "History_1"
    seed = PlantDesignSession(bench.config("hist-seed", transfer={"cache_enabled": False}))
    work = seed.open(projekt, "bench", "planning", watch=False)
    for i in range(STAGE_FILES):
        (work / f"f{i:05d}.txt").write_bytes(os.urandom(1024))
    seed.close()

    with_history: list[float] = []
    without: list[float] = []
    for run in range(bench.runs * 2):
        off = run % 2 == 1
        s = PlantDesignSession(bench.config("hist-user"))
        work = s.open(projekt, "bench", "planning", watch=False)
        for i in range(CHANGED):
            (work / f"f{(run * CHANGED + i) % STAGE_FILES:05d}.txt").write_bytes(os.urandom(1024))
        if off:
            with history_steps_off():
                without.append(timed(s.close))
        else:
            with_history.append(timed(s.close))
    on, base = median(with_history), median(without)
    bench.add(
        "history: close of 10 changed files in a 10,000-file stage",
        "close with history",
        on,
        f"{on / base:.2f} x without (+{(on - base) * 1000:.0f} ms)",
    )
    bench.add(
        "history: close of 10 changed files in a 10,000-file stage",
        "close without the history steps",
        base,
        "1.00",
    )

    keys = StageKeys("History_2", "planning")
    store = open_store(bench.config("hist-list"))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    body = b"{}"
    for seq in range(1, COMMITS + 1):
        info = CommitInfo(
            seq=seq,
            commit_id=f"{seq:032x}",
            committed_at=start + timedelta(minutes=seq),
            user="bench",
            added=1,
            changed=2,
            removed=0,
            bytes=4096,
        )
        store.put_bytes(info.key_in(keys), body)
    store.close()
    reader = PlantDesignSession(bench.config("hist-reader"))
    calls = [timed(lambda: reader.history(keys.projekt_id, keys.stage)) for _ in range(bench.runs)]
    assert len(reader.history(keys.projekt_id, keys.stage)) == COMMITS
    env = {**bench.env, "AGENT_STORE__URL": "s3://bench/agent"}
    env["AGENT_STORE__ENDPOINT_URL"] = bench.server.endpoint
    env["AGENT_STORE__REGION"] = "us-east-1"
    env["AGENT_PATHS__BASE_DIR"] = str(bench.scratch / "agent" / "hist-cli")
    argv = [sys.executable, "-m", "agent", "history", keys.projekt_id, "--stage", keys.stage]
    cli = [
        timed(lambda: subprocess.run([*argv, "--json"], env=env, capture_output=True, check=True))
        for _ in range(bench.runs)
    ]
    table = "history: listing a stage with 1,000 commits"
    bench.add(table, "history() (library call)", median(calls), "target < 1 s")
    bench.add(table, "`agent history --json` (whole process)", median(cli), "target < 1 s")

    board = open_store(bench.config("locks-seed"))
    now = board.server_time()
    lock = json.dumps(
        {
            "state": "held",
            "user": "bench",
            "machine": "m",
            "since": now.isoformat(),
            "expires": (now + timedelta(hours=12)).isoformat(),
            "heartbeat_at": now.isoformat(),
        }
    ).encode()
    for p in range(LOCK_PROJECTS):
        for st in range(STAGES_PER_PROJECT):
            board.put_bytes(f"Locks_{p:03d}/stage{st:02d}.lock.json", lock)
    board.close()
    viewer = PlantDesignSession(bench.config("locks-view"))
    projects = [f"Locks_{p:03d}" for p in range(LOCK_PROJECTS)]
    assert len(viewer.list_locks(projects)) == LOCK_PROJECTS * STAGES_PER_PROJECT
    board_times = [timed(lambda: viewer.list_locks(projects)) for _ in range(bench.runs)]
    all_times = [timed(viewer.list_locks) for _ in range(bench.runs)]
    table = "history: `agent locks` over 1,000 stages (100 projects)"
    bench.add(table, "list_locks(100 named projects)", median(board_times), "target < 1 s")
    bench.add(table, "list_locks() (every project in the bucket)", median(all_times), "")
