"""The process front door (issue 20): Ctrl-C in the foreground CLI, a host's own signal
handlers and structlog configuration, in real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.session import PlantDesignSession
from agent.stage.keys import StageKeys
from agent.store.base import ObjectStore
from tests.children import as_from_a_terminal
from tests.conftest import proxy_env, s3_config
from tests.faultproxy import Delay, FaultProxy, Rule
from tests.waiting import wait_for

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
ROOT = Path(__file__).resolve().parents[3]
EDITS = {"plan.dwg": b"edited plan", "sub/notes.txt": b"notes"}
AFTER_SHUTDOWN = "cannot schedule new futures after interpreter shutdown"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and /proc")


def _env(s3_env: dict[str, str], base: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **s3_env,
        "AGENT_PATHS__BASE_DIR": str(base),
        "AGENT_LOCK__HEARTBEAT_INTERVAL": "3600",
        "AGENT_LOCK__STALE_AFTER": "7200",
        "AGENT_WATCH__DEBOUNCE": "0.05",
        "AGENT_RECOVERY__CRASH_TIMEOUT": "5",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def _edit(work: Path) -> None:
    for rel, data in EDITS.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)


def _work(base: Path) -> Path:
    return base / ".app_temp" / "plant_design" / P / STAGE


class Lines:
    """A child's text stream, read line by line on a thread of its own."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        """True once a line holding ``text`` was read."""
        return any(text in line for line in list(self.lines))

    def text(self) -> str:
        """Everything read (after the stream ended)."""
        self._thread.join(timeout=30)
        return "".join(self.lines)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    """Child processes started by a test are gone after it."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _committed(store: ObjectStore) -> None:
    for rel, data in EDITS.items():
        assert data == store.get(KEYS.committed(rel)).body, f"{rel} was not committed"


# -- 1. Ctrl-C in `agent open --foreground` ------------------------------------------------


def _in_write_to_stdout(pid: int) -> bool:
    """True while the process's main thread is blocked in write(1, ...)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().startswith("1 0x1 ")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs /proc/PID/syscall")
def test_ctrl_c_while_the_foreground_cli_prints_its_folder_closes_and_commits(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    procs: list[subprocess.Popen[Any]],
) -> None:
    """Ctrl-C that lands inside the print of the folder (the pipe is full, so the write
    blocks and the signal interrupts it) closes and commits, as it does in the loop."""
    base = tmp_path / "m"
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    try:
        while True:
            os.write(writer, b"#" * 4096)  # fill the pipe: the child's first line blocks
    except BlockingIOError:
        pass
    os.set_blocking(writer, True)
    argv = ["open", P, "--user", "admin", "--stage", STAGE, "--foreground", "--json"]
    proc = subprocess.Popen(
        as_from_a_terminal([sys.executable, "-m", "agent", *argv]),
        env=_env(s3_env, base),
        stdout=writer,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    os.close(writer)
    err = Lines(proc.stderr)
    assert wait_for(lambda: _in_write_to_stdout(proc.pid) or proc.poll() is not None, 120)
    assert proc.poll() is None, err.text()
    _edit(_work(base))
    proc.send_signal(signal.SIGINT)  # arrives while the folder is being printed
    with os.fdopen(reader, "rb") as out:
        lines = out.read().lstrip(b"#").splitlines()
    assert 0 == proc.wait(timeout=120), err.text()
    assert str(_work(base)) == json.loads(lines[0])["path"]
    assert "closed" == json.loads(lines[-1])["state"]
    _committed(s3_store)
    assert PlantDesignSession(s3_config(s3_env, base)).check_previous_crash() is None
    assert AFTER_SHUTDOWN not in err.text()


def test_ctrl_c_the_instant_the_foreground_folder_is_read_closes_cleanly(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    procs: list[subprocess.Popen[Any]],
) -> None:
    """SIGINT sent the moment the folder's line is read: a close (exit 0), never an abort."""
    base = tmp_path / "m"
    argv = ["open", P, "--user", "admin", "--stage", STAGE, "--foreground", "--json"]
    proc = subprocess.Popen(
        as_from_a_terminal([sys.executable, "-m", "agent", *argv]),
        env=_env(s3_env, base),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert 0 == proc.returncode, err
    assert str(_work(base)) == json.loads(first)["path"]
    assert "closed" == json.loads(out.splitlines()[-1])["state"]
    assert "released" == json.loads(s3_store.get(KEYS.lock).body)["state"]
    assert PlantDesignSession(s3_config(s3_env, base)).check_previous_crash() is None
    assert AFTER_SHUTDOWN not in err


def test_ctrl_c_during_the_foreground_close_warns_then_leaves_it_for_recover(
    s3_env: dict[str, str],
    fault_proxy: FaultProxy,
    s3_store: ObjectStore,
    tmp_path: Path,
    procs: list[subprocess.Popen[Any]],
) -> None:
    """A second Ctrl-C while the close runs says how to leave; a third leaves at once
    (exit 130) with no thread left logging, and the session is there to recover."""
    base = tmp_path / "m"
    env = _env(proxy_env(s3_env, fault_proxy), base, AGENT_STORE__READ_TIMEOUT="60")
    argv = ["open", P, "--user", "admin", "--stage", STAGE, "--foreground", "--json"]
    proc = subprocess.Popen(
        as_from_a_terminal([sys.executable, "-m", "agent", *argv]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    work = Path(json.loads(proc.stdout.readline())["path"])
    out = Lines(proc.stdout)
    err = Lines(proc.stderr)
    _edit(work)
    # The commit's server-side copies hang: the close is in progress for as long as needed.
    held = fault_proxy.add(
        Rule(Delay(120), method="PUT", headers=("x-amz-copy-source",), times=None)
    )
    try:
        proc.send_signal(signal.SIGINT)
        assert wait_for(lambda: held.fired > 0 or proc.poll() is not None, 120), err.text()
        assert proc.poll() is None, err.text()
        proc.send_signal(signal.SIGINT)
        assert wait_for(lambda: err.has("close in progress") or proc.poll() is not None, 60)
        assert proc.poll() is None, err.text()
        assert err.has("press again to leave it for `agent recover`")
        proc.send_signal(signal.SIGINT)
        assert 130 == proc.wait(timeout=60), err.text()
    finally:
        held.release()
        fault_proxy.clear()
    text = err.text()
    assert "agent recover" in text.splitlines()[-1], text
    assert AFTER_SHUTDOWN not in text
    assert "closed" not in out.text()
    config = s3_config(s3_env, base)
    info = PlantDesignSession(config).check_previous_crash()
    assert info is not None, "the interrupted close left nothing to recover"
    session = PlantDesignSession(config)
    session.resume(info.session_id, watch=False)
    session.close()
    _committed(s3_store)


# -- 3. A host's own handlers ---------------------------------------------------------------


def _host(mode: str, env: dict[str, str], *prefix: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        as_from_a_terminal([*prefix, sys.executable, "-m", "tests.signal_hosts", mode]),
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    for raw in proc.stdout:
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    _out, err = proc.communicate(timeout=60)
    raise AssertionError(f"host ended early ({proc.returncode}): {err}")


def test_a_host_handler_set_after_the_session_runs_and_the_library_does_not_end_the_process(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    procs: list[subprocess.Popen[Any]],
) -> None:
    """SIGTERM to a host whose handler came after the session's: the session is saved,
    the host's handler runs, and the process lives on until the host itself ends."""
    base = tmp_path / "m"
    proc = _host("own-sigterm-later", _env(s3_env, base))
    procs.append(proc)
    work = Path(_read_json(proc)["ready"])
    _edit(work)
    proc.send_signal(signal.SIGTERM)
    assert {"event": "host-handler"} == _read_json(proc)
    report = _read_json(proc)
    _out, err = proc.communicate(timeout=60)
    assert 0 == proc.returncode, err
    assert {"state": "closed", "left_to_host": True} == report
    config = s3_config(s3_env, base)
    info = PlantDesignSession(config).check_previous_crash()
    assert info is not None
    assert "handled" == info.kind
    assert info.backup_path is not None
    for rel, data in EDITS.items():
        assert data == (info.backup_path / rel).read_bytes()
    assert "released" == json.loads(s3_store.get(KEYS.lock).body)["state"]


def test_a_host_that_exits_with_the_session_open_is_saved_before_the_pools_stop(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    procs: list[subprocess.Popen[Any]],
) -> None:
    """Returning from main with the session ACTIVE: the exit save runs while the uploader
    and its pool still work, then they stop in order; no thread logs after shutdown."""
    base = tmp_path / "m"
    proc = _host("exit-unclosed", _env(s3_env, base))
    procs.append(proc)
    work = Path(_read_json(proc)["ready"])
    _edit(work)
    _out, err = proc.communicate("exit\n", timeout=120)
    assert 0 == proc.returncode, err
    assert AFTER_SHUTDOWN not in err
    assert "uploader_loop_failed" not in err
    assert "reason='atexit'" in err, err
    info = PlantDesignSession(s3_config(s3_env, base)).check_previous_crash()
    assert info is not None
    assert "handled" == info.kind
    assert info.backup_path is not None
    for rel, data in EDITS.items():
        assert data == (info.backup_path / rel).read_bytes()


@pytest.mark.skipif(shutil.which("nohup") is None, reason="needs nohup")
def test_a_sighup_the_host_ignores_under_nohup_leaves_the_session_running(
    s3_env: dict[str, str],
    s3_store: ObjectStore,
    tmp_path: Path,
    procs: list[subprocess.Popen[Any]],
) -> None:
    """Under nohup a SIGHUP is ignored: the session stays ACTIVE and its close commits."""
    base = tmp_path / "m"
    proc = _host("sighup-ignored", _env(s3_env, base), "nohup")
    procs.append(proc)
    ready = _read_json(proc)
    assert ready["sighup_ignored"]
    _edit(Path(ready["ready"]))
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGUSR1)  # handled after any SIGHUP handler has run
    assert {"state": "active"} == _read_json(proc)
    out, err = proc.communicate("close\n", timeout=120)
    assert 0 == proc.returncode, err
    assert '{"event": "closed"}' in out
    _committed(s3_store)


# -- 2. structlog is the host's ---------------------------------------------------------------

_HOST_LOGS = """
import sys
import agent
import structlog
{configure}
structlog.get_logger("host").warning("host_line", n=1)
from agent.session import PlantDesignSession
from agent.signals import Signal
PlantDesignSession()
def broken(_v):
    raise ValueError("slot")
sig = Signal("probe")
sig.connect(broken)
sig.emit(1)  # the library logs signal_slot_failed through its own logger
print("done")
"""


@pytest.mark.parametrize(
    ("configure", "library_line"),
    [
        ("", False),
        ("structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stdout))", True),
        (
            "structlog.configure(processors=[structlog.processors.add_log_level, "
            "structlog.processors.JSONRenderer()])",
            True,
        ),
        (
            "structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))",
            True,
        ),
    ],
    ids=["defaults", "factory-only", "processors-only", "level-only"],
)
def test_import_agent_leaves_structlog_to_the_host(
    configure: str, library_line: bool, tmp_path: Path
) -> None:
    """``import agent`` configures no structlog: the host's configuration (or structlog's
    defaults) gets the host's lines, and the library's own loggers work under it (silent
    when the host configured nothing)."""
    code = _HOST_LOGS.format(configure=configure)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "AWS_"))},
        "AGENT_PATHS__BASE_DIR": str(tmp_path / "m"),
        "AGENT_STORE__URL": "s3://bucket/prefix",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert 0 == done.returncode, done.stderr
    assert "host_line" in done.stdout, done.stdout
    assert "done" == done.stdout.splitlines()[-1]
    assert library_line == ("signal_slot_failed" in done.stdout), done.stdout
    assert "" == done.stderr
