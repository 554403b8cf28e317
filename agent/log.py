"""Logging department: the only ``structlog.configure()`` call, and our processors.

JSON lines go to ``<state>/agent.log``; readable lines go to the console (stderr)
at the configured console level. Credentials, authorization headers and signed
URLs never reach either: ``redact`` scrubs them.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from agent.config import LogConfig

__all__ = ["configure_logging", "library_defaults", "redact"]

_SECRET_KEYS = re.compile(
    r"(secret|password|passwd|token|credential|authorization|auth_key|authkey|signature|session_token|access_key)",
    re.IGNORECASE,
)
_SIGNED_URL = re.compile(r"([?&](X-Amz-[A-Za-z-]+|Signature|AWSAccessKeyId|Expires)=)[^&\s\"']+")
_AWS_KEY = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        value = _SIGNED_URL.sub(r"\1<redacted>", value)
        return _AWS_KEY.sub("<redacted-key>", value)
    return value


def redact(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop secret-looking keys and scrub signed URLs / access keys from values."""
    for key in list(event_dict):
        if _SECRET_KEYS.search(key):
            event_dict[key] = "<redacted>"
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure_logging(config: LogConfig, state_dir: Path | None, *, console: bool = True) -> None:
    """Configure structlog + stdlib logging once for this process."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pdagent", False):
            root.removeHandler(handler)
            handler.close()
    # The host's root level is the host's: only the agent's own loggers are opened up.
    levels = [config.level.upper()] + ([config.console_level.upper()] if console else [])
    logging.getLogger("agent").setLevel(min(logging.getLevelName(lv) for lv in levels))
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            state_dir / "agent.log", maxBytes=10 * 1024**2, backupCount=3, encoding="utf-8"
        )
        file_handler.setLevel(config.level.upper())
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processor=structlog.processors.JSONRenderer(), foreign_pre_chain=shared
            )
        )
        file_handler._pdagent = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    if console:
        console_handler = logging.StreamHandler()
        console_handler.setLevel(config.console_level.upper())
        console_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processor=structlog.dev.ConsoleRenderer(colors=False),
                foreign_pre_chain=shared,
            )
        )
        console_handler._pdagent = True  # type: ignore[attr-defined]
        root.addHandler(console_handler)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def library_defaults() -> None:
    """Silent unless the host configures logging (called when ``agent`` is imported).

    The ``agent`` logger gets a ``NullHandler`` (so Python's last-resort handler never
    prints our warnings), and, unless the host configured structlog itself, structlog
    is routed through stdlib logging: a host sees the agent's events in its own
    handlers, at the levels it sets, and nothing when it sets none.
    """
    logging.getLogger("agent").addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
