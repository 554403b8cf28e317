"""Logging department: the only ``structlog.configure()`` call, our processors, our loggers.

``import agent`` configures nothing process-wide (issue 20): structlog's configuration
is the host's. The library's loggers (``get_logger``) follow it once the host (or our
CLI, through ``configure_logging`` at its entry point) has configured structlog, and
otherwise go through stdlib logging (where a ``NullHandler`` keeps them silent unless
the host configures logging); a host pipeline that cannot take an event of ours does
not break the library: the event goes the stdlib way instead.

JSON lines go to one file per process, ``<state>/logs/<UTC time>-<pid>.log``
(created 0600 on its first record, so a command that logs nothing leaves no file);
readable lines go to the console (stderr) at the configured console level.
Credentials, authorization headers and signed URLs never reach either: ``redact``
scrubs them.

One file per process, because every CLI call and every background agent logs:
a rotating handler shared by several processes is not safe (two processes roll
the same file over, and on Windows a rollover fails while another process holds
the file). Old files are pruned when a process starts: older than
``_KEEP_DAYS`` days, or beyond the newest ``_KEEP_FILES``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import LogConfig
from agent.platform import make_private_dirs, open_private_append
from agent.text import printable

__all__ = [
    "LibraryLogger",
    "configure_logging",
    "get_logger",
    "library_defaults",
    "log_folder",
    "redact",
    "structlog_without_rich",
]

_KEEP_DAYS = 14
_KEEP_FILES = 200

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


def _escaped(render: Callable[..., Any]) -> Callable[..., Any]:
    """``render`` with every string value shown through ``agent.text.printable``.

    Log values carry bucket content (keys, users): on a terminal, an ESC or a bidi
    override in one must not drive it, nor a newline forge a line (issue 19). The
    traceback (``exception``) is the agent's own and keeps its lines.
    """

    def escaped(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
        safe = {
            key: printable(value) if isinstance(value, str) and key != "exception" else value
            for key, value in event_dict.items()
        }
        return render(logger, name, safe)

    return escaped


def structlog_without_rich() -> None:
    """Import structlog, without rich, in a process of our own (the CLI, the background agent).

    structlog imports rich when it is imported, only to offer rich tracebacks: about
    0.1 s of every command's start, for tracebacks ``configure_logging`` renders plain.
    A host that imported structlog or rich already keeps them as they are; rich itself
    stays importable (the CLI's progress bars use it).
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # Python's "not installed" marker
    try:
        import structlog  # noqa: F401 - imported for its side effect: now without rich
    finally:
        del sys.modules["rich"]


def configure_logging(config: LogConfig, state_dir: Path | None, *, console: bool = True) -> None:
    """Configure structlog + stdlib logging once for this process."""
    import structlog

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # below every handler's level: no work at all
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
        folder = log_folder(state_dir)
        make_private_dirs(folder)
        _prune(folder)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        file_handler = _PrivateFileHandler(folder / f"{stamp}-{os.getpid()}.log")
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
                processor=_escaped(
                    structlog.dev.ConsoleRenderer(
                        colors=False, exception_formatter=structlog.dev.plain_traceback
                    )
                ),
                foreign_pre_chain=shared,
            )
        )
        console_handler._pdagent = True  # type: ignore[attr-defined]
        root.addHandler(console_handler)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def library_defaults() -> None:
    """Silent unless the host configures logging (called when ``agent`` is imported).

    Only our own namespace is touched: the ``agent`` logger gets a ``NullHandler`` (so
    Python's last-resort handler never prints our warnings), as a library should. No
    ``structlog.configure()`` here: that is the host's (issue 20).
    """
    logging.getLogger("agent").addHandler(logging.NullHandler())
    # watchdog (our watcher's) logs an error when its emitter stops mid-event: ours to quiet.
    logging.getLogger("watchdog").addHandler(logging.NullHandler())


@functools.cache
def _stdlib_processors() -> list[Any]:
    """The stdlib way of our events while the host has not configured structlog."""
    import structlog

    return [
        structlog.stdlib.filter_by_level,  # below the logger's level: no work at all
        structlog.contextvars.merge_contextvars,
        redact,
        structlog.processors.format_exc_info,
        structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
    ]


class LibraryLogger:
    """The agent's logger (see the module's docstring); ``bind`` like structlog's."""

    __slots__ = ("_context", "_host", "_name", "_own")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = dict(context or {})
        self._host: Any = None
        self._own: Any = None  # made on the first event: structlog is imported then

    def bind(self, **values: Any) -> LibraryLogger:
        """A logger that adds ``values`` to every event."""
        return LibraryLogger(self._name, {**self._context, **values})

    def _emit(self, method: str, event: str, values: dict[str, Any]) -> None:
        import structlog

        if structlog.is_configured():
            try:
                if self._host is None:
                    self._host = structlog.get_logger(self._name)
                logger = self._host.bind(**self._context) if self._context else self._host
                getattr(logger, method)(event, **values)
                return
            except Exception:  # noqa: BLE001, S110 - the host's pipeline refused it: ours takes it
                pass
        if self._own is None:
            self._own = structlog.stdlib.BoundLogger(
                logging.getLogger(self._name), _stdlib_processors(), self._context
            )
        getattr(self._own, method)(event, **values)

    def debug(self, event: str, **values: Any) -> None:
        """Log ``event`` at DEBUG."""
        self._emit("debug", event, values)

    def info(self, event: str, **values: Any) -> None:
        """Log ``event`` at INFO."""
        self._emit("info", event, values)

    def warning(self, event: str, **values: Any) -> None:
        """Log ``event`` at WARNING."""
        self._emit("warning", event, values)

    def error(self, event: str, **values: Any) -> None:
        """Log ``event`` at ERROR."""
        self._emit("error", event, values)

    def exception(self, event: str, **values: Any) -> None:
        """Log ``event`` at ERROR with the exception being handled."""
        values.setdefault("exc_info", True)
        self._emit("error", event, values)


def get_logger(name: str) -> LibraryLogger:
    """The library's logger for module ``name``."""
    return LibraryLogger(name)


def log_folder(state_dir: Path) -> Path:
    """Where the per-process log files are."""
    return state_dir / "logs"


class _PrivateFileHandler(logging.FileHandler):
    """A log file of this process only: created 0600 on the first record, never via a link."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self) -> io.TextIOWrapper:  # type: ignore[override,unused-ignore]
        fd = open_private_append(Path(self.baseFilename))
        return io.TextIOWrapper(io.FileIO(fd, "a"), encoding=self.encoding or "utf-8")


def _prune(folder: Path) -> None:
    """Delete log files older than ``_KEEP_DAYS`` and beyond the newest ``_KEEP_FILES``."""
    try:
        files = sorted(
            (entry for entry in folder.iterdir() if entry.suffix == ".log"),
            key=lambda e: e.name,
            reverse=True,
        )
    except OSError:
        return
    cutoff = time.time() - _KEEP_DAYS * 86400
    for index, entry in enumerate(files):
        with contextlib.suppress(OSError):  # in use on Windows, or removed by another process
            if index >= _KEEP_FILES or entry.lstat().st_mtime < cutoff:
                entry.unlink()
