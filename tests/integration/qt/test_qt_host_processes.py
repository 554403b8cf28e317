"""The Qt adapter in real host processes (issue 20): long runs, quitting mid-close,
a host's own wake-up fd. Each host is a child (``tests/qt_hosts.py``)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PySide6")

from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore
from tests.children import ChildOutput, as_from_a_terminal
from tests.conftest import s3_config
from tests.integration.bucket import lock_state, resume_and_close_commits, write_files
from tests.qt_hosts import EDITS

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
ROOT = Path(__file__).resolve().parents[3]


class QtHost:
    """One child host process and the JSON lines it printed."""

    def __init__(
        self, mode: str, env: dict[str, str], base: Path, launcher: tuple[str, ...] = ()
    ) -> None:
        self.proc = subprocess.Popen(
            as_from_a_terminal([*launcher, sys.executable, "-m", "tests.qt_hosts", *mode.split()]),
            cwd=ROOT,
            env={
                **os.environ,
                **env,
                "AGENT_PATHS__BASE_DIR": str(base),
                "AGENT_LOCK__HEARTBEAT_INTERVAL": "3600",
                "AGENT_LOCK__STALE_AFTER": "7200",
                "AGENT_WATCH__DEBOUNCE": "0.05",
                "AGENT_RECOVERY__CRASH_TIMEOUT": "5",
                "QT_QPA_PLATFORM": "offscreen",
                "PYTHONPATH": str(ROOT),
                "PYTHONFAULTHANDLER": "1",
            },
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output = ChildOutput(self.proc)
        self.lines: list[dict[str, Any]] = []
        self.err = ""

    def read(self, key: str, timeout: float = 120) -> dict[str, Any]:
        """The next JSON line that has ``key`` (the others are kept in ``lines``); a host
        that prints none within ``timeout`` seconds is killed (the test then fails)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.output.next(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                data = None
            if data is None:
                self.finish()
                raise AssertionError(f"host ended without {key!r}: {self.lines} {self.err}")
            self.lines.append(data)
            if key in data:
                return data

    def send(self, line: str) -> None:
        """A line on the host's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> int:
        """Wait for the host to end (its stdin closed, as ``communicate`` does); its exit
        status, and every line it printed in ``lines``."""
        if not self.output.ended(timeout):
            self.proc.send_signal(signal.SIGABRT)  # its stacks on stderr (faulthandler)
            self.proc.wait()
            self.output.rest()
            out, err = self.output.stdout(), self.output.stderr()
            raise AssertionError(f"host hung: {out} {err[-5000:]}")
        self.lines += self.output.rest()
        self.err = self.output.stderr()
        return self.proc.returncode

    def events(self) -> list[str]:
        """The ``event`` lines, in order."""
        return [line["event"] for line in self.lines if "event" in line]

    def kill(self) -> None:
        """Make sure the process is gone."""
        self.output.kill()


@pytest.fixture
def hosts() -> Iterator[list[QtHost]]:
    """Hosts started by a test are gone after it."""
    started: list[QtHost] = []
    yield started
    for h in started:
        h.kill()


def _host(
    hosts: list[QtHost],
    mode: str,
    env: dict[str, str],
    base: Path,
    launcher: tuple[str, ...] = (),
) -> QtHost:
    h = QtHost(mode, env, base, launcher)
    hosts.append(h)
    return h


def _seed(env: dict[str, str], base: Path, files: int) -> None:
    session = PlantDesignSession(s3_config(env, base))
    work = session.open(P, "seeder", STAGE, watch=False)
    for i in range(files):
        (work / f"f{i}.bin").write_bytes(os.urandom(1024))
    session.close()


def test_forty_open_close_cycles_leave_the_refcounts_of_pythons_singletons_alone(
    s3_env: dict[str, str], tmp_path: Path, hosts: list[QtHost]
) -> None:
    """PySide6 6.12.0's Signal.emit hands back True without a reference of its own: each
    emit lowered True's count by one until the interpreter aborted (issue 20)."""
    _seed(s3_env, tmp_path / "seed", files=2)
    h = _host(hosts, "refcounts", s3_env, tmp_path / "m")
    code = h.finish()
    assert 0 == code, h.err[-3000:]
    counts = next(line for line in h.lines if "before" in line)
    assert ["open", "close"] * 41 == counts["verbs"]
    before, after = counts["before"], counts["after"]
    fallen = {k: before[k] - after[k] for k in before if after[k] < before[k] - 20}
    assert {} == fallen, f"reference counts fell over 40 cycles: {fallen}"


def test_closing_the_main_window_during_close_finishes_the_commit_before_the_process_ends(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[QtHost]
) -> None:
    """The last window closed while close uploads: the interpreter shut down mid-commit
    ("cannot schedule new futures after interpreter shutdown", lock left held) or a
    worker emitted into a deleted adapter ("Signal source has been deleted") (issue 20)."""
    _seed(s3_env, tmp_path / "seed", files=2)
    h = _host(hosts, "quit-during-close", s3_env, tmp_path / "m")
    code = h.finish()
    assert 0 == code, h.err[-3000:]
    for symptom in ("Traceback", "RuntimeError", "cannot schedule new futures"):
        assert symptom not in h.err, h.err[-3000:]
    assert ["open", "close"] == [line["finished"] for line in h.lines if "finished" in line]
    assert ["about-to-quit", "exited"] == h.events()
    for rel, data in EDITS.items():
        assert data == s3_store.get(KEYS.committed(rel)).body
    assert "released" == lock_state(s3_store)
    config = s3_config(s3_env, tmp_path / "m")
    assert PlantDesignSession(config).check_previous_crash() is None


def test_sigterm_reaches_the_adapter_when_the_host_sets_its_wakeup_fd_after_the_session(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[QtHost]
) -> None:
    """The host's own wake-up fd, set after the adapter's session: the signal's byte went
    to the host's fd only, the hooks took the Python handler's call for a stale wake of
    their own, and SIGTERM was lost: no save, the process not ended (issue 20)."""
    h = _host(hosts, "wakeup-after", s3_env, tmp_path / "m")
    work = Path(h.read("ready")["ready"])
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGTERM)
    assert 0 == h.finish(timeout=60), h.err[-3000:]
    assert ["about-to-quit", "exited"] == h.events()
    exited = next(line for line in h.lines if line.get("event") == "exited")
    assert [int(signal.SIGTERM)] == exited["host_bytes"], "the host's wake-up fd missed it"
    resume_and_close_commits(s3_env, tmp_path / "m", s3_store, work, EDITS)


def test_the_adapter_takes_back_a_wakeup_fd_nobody_reads_and_forwards_the_signal_to_it(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[QtHost]
) -> None:
    """A wake-up fd the host set while the session is open and never reads: Qt idling in
    C++ ran no Python, so SIGTERM woke nothing (issue 20)."""
    h = _host(hosts, "wakeup-unread", s3_env, tmp_path / "m")
    ready = h.read("ready")
    assert ready["reclaimed"], "the adapter did not take the wake-up fd back"
    work = Path(ready["ready"])
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGTERM)
    assert 0 == h.finish(timeout=60), h.err[-3000:]
    assert ["about-to-quit", "exited"] == h.events()
    exited = next(line for line in h.lines if line.get("event") == "exited")
    assert [int(signal.SIGTERM)] == exited["host_bytes"], "not forwarded to the host's fd"
    resume_and_close_commits(s3_env, tmp_path / "m", s3_store, work, EDITS)


def test_sigterm_saves_through_the_adapter_when_the_host_set_its_handler_after_the_session(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[QtHost]
) -> None:
    """The host's SIGTERM handler, set after the adapter's: ours never ran, and the event
    loop's notifier only read the byte, so nothing was saved (issue 20)."""
    h = _host(hosts, "handler-after", s3_env, tmp_path / "m")
    work = Path(h.read("ready")["ready"])
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGTERM)
    h.read("event", timeout=60)  # the host's handler ran
    saved = h.read("event", timeout=60)
    assert "saved" == saved["event"], h.lines
    assert ["host-handler", "saved"] == h.events()
    h.proc.kill()  # the host's handler chose not to quit
    h.finish()
    config = s3_config(s3_env, tmp_path / "m")
    info = PlantDesignSession(config).check_previous_crash()
    assert info is not None and "SIGTERM" == info.reason
    resume_and_close_commits(s3_env, tmp_path / "m", s3_store, work, EDITS)


def _close_then_quit(h: QtHost, store: ObjectStore) -> None:
    """Close through the host; the host is still running after it, and quits when asked."""
    h.send("close")
    assert "close" == h.read("closed")["closed"], h.lines
    for rel, data in EDITS.items():
        assert data == store.get(KEYS.committed(rel)).body
    assert "released" == lock_state(store)
    h.send("quit")
    assert 0 == h.finish(timeout=60), h.err[-3000:]
    assert ["quit-asked", "about-to-quit"] == h.events()[-2:], (
        f"the application quit before the host asked it to: {h.lines}"
    )


@pytest.mark.parametrize("term_after", [False, True], ids=["hooks", "host-sigterm-after"])
def test_signals_the_host_handles_do_not_quit_the_app_at_the_end_of_a_later_close(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    hosts: list[QtHost],
    term_after: bool,
) -> None:
    """A host's own SIGUSR1, and a Ctrl-C its own handler took (``host_handles``), left
    a count of real signals that no handler of ours used up: the close's request to
    restore the handlers was then taken for a signal, and the application quit at the
    end of a normal close; with the host's SIGTERM handler set after the session the
    host's Ctrl-C handler was called again (it quits once no session is ACTIVE)
    (issue 20)."""
    mode = "own-signals term-after" if term_after else "own-signals"
    h = _host(hosts, mode, s3_env, tmp_path / "m")
    work = Path(h.read("ready")["ready"])
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGINT)
    assert {"event": "interrupt", "active": True} == h.read("event", timeout=60)
    h.proc.send_signal(signal.SIGUSR1)
    assert "ACTIVE" == h.read("state", timeout=60)["state"]
    _close_then_quit(h, s3_store)
    assert 1 == h.events().count("interrupt"), h.lines
    assert PlantDesignSession(s3_config(s3_env, tmp_path / "m")).check_previous_crash() is None


def test_sighup_leaves_the_session_of_a_qt_host_started_under_nohup_active(
    s3_env: dict[str, str], s3_store: ObjectStore, tmp_path: Path, hosts: list[QtHost]
) -> None:
    """Under ``nohup`` SIGHUP is ignored from the start: the adapter's hooks replaced
    that, and a SIGHUP saved and ended the session (issue 20)."""
    h = _host(hosts, "own-signals", s3_env, tmp_path / "m", launcher=("nohup",))
    work = Path(h.read("ready")["ready"])
    write_files(work, EDITS)
    h.proc.send_signal(signal.SIGHUP)
    # Delivered after SIGHUP (a lower number, sent first): a handler of SIGHUP ran first.
    h.proc.send_signal(signal.SIGUSR1)
    assert "ACTIVE" == h.read("state", timeout=60)["state"], h.lines
    _close_then_quit(h, s3_store)
    assert PlantDesignSession(s3_config(s3_env, tmp_path / "m")).check_previous_crash() is None
