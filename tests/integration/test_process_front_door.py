"""The process front door (issue 20): Ctrl-C in the foreground CLI, a host's own signal
handlers and structlog configuration, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.keys import StageKeys
from agent.store.base import ObjectStore

P, STAGE = "Kraftwerk_1234567", "planning"
KEYS = StageKeys(P, STAGE)
ROOT = Path(__file__).resolve().parents[2]
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
