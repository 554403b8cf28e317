"""A host that gives up on an unreachable store exits promptly (stop 24).

A plain Python host (``tests/hosts.py``, ``plain-close-fails``) with hundreds of
uploads queued while every request to the store hangs: its ``close()`` fails and it
returns from main. The exit hook saves the session; the uploads that have not started
are cancelled and the ones in flight are not retried, so the process ends within a
bounded time instead of running every queued upload through its retries (minutes).
Nothing saved is lost: the journal keeps every change, the lock stays held, and a
resume with the store back commits every file.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore
from tests.conftest import proxy_env, s3_config
from tests.faultproxy import Delay, FaultProxy, Rule
from tests.integration.bucket import lock_state
from tests.integration.session.test_host_crash import Host

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
FILES = 300
# Generous: the machine is shared. The bug this guards against took minutes.
EXIT_DEADLINE = 60.0
REQUEST_TIMEOUT = 10


# The host's mode, and the kind of crash it leaves: saved at exit, or (no hooks) not.
MODES = {"crash-hooks": ("plain-close-fails", "handled"),
         "no-crash-hooks": ("plain-close-fails-unhooked", "unseen")}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MODES))
def test_a_host_whose_close_failed_on_a_dead_store_exits_promptly_and_resume_commits_all(
    s3_env: dict[str, str],
    fault_proxy: FaultProxy,
    s3_store: ObjectStore,
    tmp_path: Path,
    case: str,
) -> None:
    """Every request hangs (the store is unreachable), 300 files are saved (most of their
    uploads queued), close() fails and the host returns from main: it exits within the
    deadline (saved at exit, or with no crash hooks not), the lock is not released, and
    resume (the store reachable again) commits every file."""
    env = {
        **proxy_env(s3_env, fault_proxy),
        "AGENT_TRANSFER__CLOSE_TIMEOUT": "3",
        # Each unanswered request waits this long; with the retries, one upload (or the
        # lock's release) takes 4 x 10 s: an exit that runs them through takes minutes.
        "AGENT_STORE__READ_TIMEOUT": str(REQUEST_TIMEOUT),
    }
    base = tmp_path / "m"
    mode, kind = MODES[case]
    h = Host(mode, env, base)
    try:
        work = Path(h.read()["ready"])
        dead = fault_proxy.add(Rule(Delay(3600), times=None, name="unreachable"))
        files = {f"d{i % 7}/f{i:04d}.txt": f"content {i}\n".encode() for i in range(FILES)}
        for rel, data in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        assert h.proc.stdin is not None
        h.proc.stdin.write("\n")
        h.proc.stdin.flush()
        assert {"close_failed": "TransferError"} == h.read()
        started = time.monotonic()
        try:
            code = h.finish(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the host has not exited {EXIT_DEADLINE:.0f} s after close failed")
        assert 0 == code, h.stderr()
        assert dead.fired > 0, "the store was never unreachable"
        assert time.monotonic() - started < EXIT_DEADLINE
        fault_proxy.remove(dead)
    finally:
        h.kill()
    assert "held" == lock_state(s3_store), "the lock was released with unsent work"
    config = s3_config(s3_env, base, lock={"heartbeat_interval": 3600, "stale_after": 7200})
    info = PlantDesignSession(config).check_previous_crash()
    assert info is not None, "the exit left nothing to recover"
    assert kind == info.kind
    assert set(files) <= set(info.unsaved), "the journal lost unsent changes"
    session = PlantDesignSession(config)
    assert work == session.resume(info.session_id, watch=False)
    session.close()
    manifest = json.loads(s3_store.get(KEYS.manifest).body)
    assert set(files) <= set(manifest["files"])
    for rel in ("d0/f0000.txt", f"d{(FILES - 1) % 7}/f{FILES - 1:04d}.txt"):
        assert files[rel] == s3_store.get(KEYS.committed(rel)).body
