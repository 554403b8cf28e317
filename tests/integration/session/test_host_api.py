"""What a host application relies on (issue 10): Cancel, progress, silence, recovery data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import AgentError, SessionCancelledError
from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.state import SessionState
from agent.store.base import ObjectStore
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
ROOT = Path(__file__).resolve().parents[3]


def _config(base: Path) -> AgentConfig:
    return load_config(
        paths={"base_dir": str(base)},
        lock={"heartbeat_interval": 3600, "stale_after": 7200},
        watch={"debounce": 0.05, "max_delay": 0.5, "min_interval_per_path": 0.1},
    )


def _seed(store: ObjectStore, base: Path, files: int, size: int = 1024) -> None:
    s = PlantDesignSession(_config(base), store=store)
    work = s.open(P, "seeder", STAGE, watch=False)
    for i in range(files):
        (work / f"d{i % 7}" / f"f{i}.bin").parent.mkdir(exist_ok=True)
        (work / f"d{i % 7}" / f"f{i}.bin").write_bytes(os.urandom(size))
    s.close()


def _lock_free(store: ObjectStore) -> bool:
    try:
        body = json.loads(store.get(KEYS.lock).body)
    except AgentError:
        return True
    return bool(body["state"] != "held")


class Canceller:
    """Calls ``abort()`` from another thread (as a GUI's Cancel button would)."""

    def __init__(self, session: PlantDesignSession) -> None:
        self.session = session
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.session.abort()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def cancel_and_wait_until_seen(self) -> None:
        """Start the abort; return once the session knows it is cancelled."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run)
            self.thread.start()
            assert wait_for(self.session._cancel.is_set, timeout=10)

    def join(self) -> None:
        assert self.thread is not None, "the cancel was never triggered"
        self.thread.join(timeout=60)
        assert self.error is None, f"abort raised {self.error!r}"


def _on_state(session: PlantDesignSession, state: SessionState, fn: Callable[[], None]) -> None:
    session.state_changed.connect(lambda s: fn() if s == int(state) else None)


def _nothing_left(config: AgentConfig, store: ObjectStore, work: Path) -> None:
    assert _lock_free(store), "the cancelled open left the lock held"
    assert [] == list(PlantDesignSession(config, store=store).records.all())
    assert not work.exists() or not any(work.iterdir()), "the partial folder was left"
    other = PlantDesignSession(_config(config.paths.base_dir.parent / "bob"), store=store)
    other.open(P, "bob", STAGE, watch=False)  # at once: nobody holds the stage
    other.abort()


def test_cancel_while_acquiring_never_takes_the_lock(s3_store: ObjectStore, tmp_path: Path) -> None:
    """Cancel at ACQUIRING: SessionCancelledError, the lock free at once, nothing on disk."""
    config = _config(tmp_path / "m")
    s = PlantDesignSession(config, store=s3_store)
    cancel = Canceller(s)
    _on_state(s, SessionState.ACQUIRING, cancel.cancel_and_wait_until_seen)
    with pytest.raises(SessionCancelledError):
        s.open(P, "admin", STAGE)
    cancel.join()
    assert SessionState.CLOSED is s.state
    _nothing_left(config, s3_store, config.paths.work_root / P / STAGE)


def test_cancel_while_downloading_stops_the_transfer_and_releases(
    s3_store: ObjectStore, tmp_path: Path
) -> None:
    """Cancel at DOWNLOADING (first progress): the transfer stops, lock released, folder gone."""
    _seed(s3_store, tmp_path / "seed", files=60)
    config = _config(tmp_path / "m")
    s = PlantDesignSession(config, store=s3_store)
    cancel = Canceller(s)
    percents: list[int] = []

    def on_progress(_message: str, pct: int) -> None:
        percents.append(pct)
        cancel.cancel_and_wait_until_seen()

    s.progress.connect(on_progress)
    with pytest.raises(SessionCancelledError):
        s.open(P, "admin", STAGE)
    cancel.join()
    assert 100 not in percents, "the download ran to the end"
    _nothing_left(config, s3_store, config.paths.work_root / P / STAGE)


def test_cancel_while_restoring_keeps_the_orphan_and_releases(
    s3_store: ObjectStore, tmp_path: Path
) -> None:
    """Cancel a resume: SessionCancelledError, lock released, the orphan still resumable."""
    config = _config(tmp_path / "m")
    first = PlantDesignSession(config, store=s3_store)
    work = first.open(P, "admin", STAGE, watch=False)
    (work / "mine.dwg").write_bytes(b"mine")
    first.emergency_save("test")
    s = PlantDesignSession(config, store=s3_store)
    cancel = Canceller(s)
    _on_state(s, SessionState.RESTORING, cancel.cancel_and_wait_until_seen)
    with pytest.raises(SessionCancelledError):
        s.resume()
    cancel.join()
    assert _lock_free(s3_store)
    info = PlantDesignSession(config, store=s3_store).check_previous_crash()
    assert info is not None and ["mine.dwg"] == info.unsaved
    again = PlantDesignSession(config, store=s3_store)
    again.resume(watch=False)
    again.close()
    assert b"mine" == s3_store.get(KEYS.committed("mine.dwg")).body


def _monotonic_per_operation(events: list[tuple[str, int]]) -> dict[str, list[int]]:
    by_op: dict[str, list[int]] = {}
    for message, pct in events:
        by_op.setdefault(message, []).append(pct)
    for message, seq in by_op.items():
        assert seq == sorted(seq), f"{message}: progress went backwards: {seq}"
        assert len(seq) == len(set(seq)), f"{message}: a percentage was repeated: {seq}"
        assert 100 == seq[-1], f"{message}: did not end at 100 %"
    return by_op


def test_progress_of_open_and_close_is_monotonic_and_ends_at_100(
    s3_store: ObjectStore, tmp_path: Path
) -> None:
    """Download, upload and commit copies: each operation's percentages only go up."""
    _seed(s3_store, tmp_path / "seed", files=120, size=8192)
    s = PlantDesignSession(_config(tmp_path / "m"), store=s3_store)
    events: list[tuple[str, int]] = []
    s.progress.connect(lambda m, p: events.append((m, p)))
    work = s.open(P, "admin", STAGE, watch=False)
    for path in sorted(work.rglob("*.bin"))[:80]:
        path.write_bytes(os.urandom(8192))
    s.close()
    ops = _monotonic_per_operation(events)
    assert {"Downloading", "Uploading", "Committing"} == {m.split()[0] for m in ops}


def test_the_library_is_silent_unless_the_host_configures_logging(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """A host that configures nothing sees no output from open/close (NullHandler)."""
    code = (
        "from agent.session import PlantDesignSession\n"
        "s = PlantDesignSession()\n"
        "w = s.open('Kraftwerk_1234567', 'admin', 'planning')\n"
        "(w / 'a.txt').write_text('a')\n"
        "s.close()\n"
    )
    env = {
        **os.environ,
        **s3_env,
        "AGENT_PATHS__BASE_DIR": str(tmp_path / "m"),
        "AGENT_LOCK__HEARTBEAT_INTERVAL": "3600",
        "AGENT_LOCK__STALE_AFTER": "7200",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert 0 == done.returncode, done.stderr
    assert "" == done.stdout
    assert "" == done.stderr
