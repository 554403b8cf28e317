"""The public surface: exported names, and what logs may never contain."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import structlog

import agent
from agent.config import LogConfig
from agent.log import configure_logging, redact


def test_exported_members_are_pinned() -> None:
    """``agent.__all__`` is the contract with the host application; changes are deliberate."""
    assert [
        "AgentConfig",
        "AgentError",
        "CloseReport",
        "ConfigError",
        "ConflictError",
        "LockError",
        "LockHeldError",
        "LockLostError",
        "PlantDesignSession",
        "PreviousCrashError",
        "SessionCancelledError",
        "SessionError",
        "SessionState",
        "StoreError",
        "UnsavedWorkError",
        "__version__",
        "load_config",
    ] == agent.__all__
    for name in agent.__all__:
        assert getattr(agent, name) is not None


def test_redact_drops_secrets_and_signed_urls() -> None:
    """Secret-looking keys, signed URL parameters and access key ids never reach a log."""
    event = redact(
        None,
        "info",
        {
            "event": "x",
            "aws_secret_access_key": "s3cr3t",
            "url": "https://b.r2.dev/k?X-Amz-Signature=abcdef&X-Amz-Credential=AKIAABCDEFGHIJKLMNOP",
            "note": "key AKIAABCDEFGHIJKLMNOP used",
        },
    )
    text = json.dumps(dict(event))
    assert "s3cr3t" not in text
    assert "abcdef" not in text
    assert "AKIAABCDEFGHIJKLMNOP" not in text


def test_log_file_gets_json_lines_without_credentials(tmp_path: Path) -> None:
    """configure_logging writes JSON lines to this process's own 0600 file, redacted."""
    configure_logging(LogConfig(level="info"), tmp_path, console=False)
    try:
        structlog.get_logger("agent.t").info(
            "lock_acquired", key="P/s.lock.json", secret_key="hunter2"
        )
    finally:
        for handler in list(logging.getLogger().handlers):
            if getattr(handler, "_pdagent", False):
                handler.flush()
                logging.getLogger().removeHandler(handler)
                handler.close()
    [log_file] = (tmp_path / "logs").glob(f"*-{os.getpid()}.log")
    assert 0o600 == log_file.stat().st_mode & 0o777
    [line] = log_file.read_text().splitlines()
    record = json.loads(line)
    assert "lock_acquired" == record["event"]
    assert "P/s.lock.json" == record["key"]
    assert "hunter2" not in line


def test_configure_logging_leaves_the_hosts_root_level_alone(tmp_path: Path) -> None:
    """The host's root logger keeps its level; only the agent's loggers are opened up."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.WARNING)
    try:
        configure_logging(LogConfig(level="debug"), tmp_path, console=False)
        assert logging.WARNING == root.level
        assert logging.getLogger("agent.session").isEnabledFor(logging.DEBUG)
    finally:
        for handler in [h for h in root.handlers if getattr(h, "_pdagent", False)]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(before)


def test_the_package_ships_py_typed() -> None:
    """Type checkers of the host see the agent's annotations."""
    assert (Path(agent.__file__).parent / "py.typed").is_file()
